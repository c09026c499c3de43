"""DIMSE event handlers: an event in, a storage call, a status out.

C-STORE answers Success only once the file is fsynced in place and its rows are committed.
Every refusal carries a named status and, where the Standard allows, an ErrorComment saying why.
Log lines carry UIDs and AE titles, never patient names or IDs.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
)
from sqlalchemy.exc import IntegrityError

from ai.eligibility import has_pixels
from pacs_node import assembly, audit, fastfind, statuses, wake
from pacs_node.ae import STORAGE_COMMITMENT_PUSH
from pacs_node.audit import AuditTrail
from pacs_node.config import Config
from pacs_node.logs import log_failure
from pacs_node.wake import Nudger
from storage import query, queue, refusals
from storage.db import Database
from storage.errors import InvalidInstanceError, OutOfSpaceError, QueryError
from storage.files import FileStore, check_uid, instance_relpath
from storage.header import read_header
from storage.ingest import IndexCache, record_instance
from storage.models import utcnow

log = logging.getLogger(__name__)

PATIENT_ROOT_CLASSES = {
    str(PatientRootQueryRetrieveInformationModelFind),
    str(PatientRootQueryRetrieveInformationModelGet),
    str(PatientRootQueryRetrieveInformationModelMove),
}
MAX_MOVE_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2)

ERROR_COMMENT_MAX = 64  # ErrorComment is LO
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFER_BYTES = 65536
INDEX_ATTEMPTS = 3


def status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:ERROR_COMMENT_MAX]
    return ds


def _calling_ae(event: Any) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def bindings(
    config: Config, files: FileStore, db: Database, trail: AuditTrail, refused: refusals.Tally
) -> list[Any]:
    """The node's DIMSE handlers, each bound with what it needs (pynetdicom passes the
    listed arguments after the event)."""
    from pynetdicom import evt

    cache = IndexCache()
    workers = Nudger(files.root, wake.WORK)
    return [
        (evt.EVT_REQUESTED, handle_requested, [config, refused, trail]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [config, files, db, cache, trail, refused, workers.nudge]),
        (evt.EVT_C_FIND, handle_find, [db, trail, config.node.network_timeout_s]),
        (evt.EVT_C_GET, handle_get, [db, files, trail]),
        (evt.EVT_C_MOVE, handle_move, [config, db, files, trail]),
        (evt.EVT_N_EVENT_REPORT, handle_event_report, [db]),
        (evt.EVT_CONN_CLOSE, handle_closed, [trail]),
    ]


def _requestor(event: Any, role: audit.Code | None = audit.SOURCE) -> audit.Participant:
    address = str(event.assoc.requestor.address)
    return audit.Participant(_calling_ae(event), True, role, address=address)


class StoredStudies:
    """What one association stored, by study, audited when it closes. ``handle_closed`` runs
    in the DUL thread, perhaps while a C-STORE is still being handled: a lock, and a store
    after the close is audited on its own."""

    _create = threading.Lock()

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.studies: dict[str, audit.StudyRecord] = {}
        self.closed = False

    @classmethod
    def of(cls, assoc: Any) -> StoredStudies:
        with cls._create:
            stored: StoredStudies | None = getattr(assoc, "_pacs_node_stored", None)
            if stored is None:
                stored = assoc._pacs_node_stored = cls()
            return stored


def _audit_store(event: Any, trail: AuditTrail, ds: Dataset, outcome: Admission) -> None:
    study_uid = str(ds.get("StudyInstanceUID", "") or "")
    if not study_uid:
        return
    stored = StoredStudies.of(event.assoc)
    with stored.lock:
        late = stored.closed
        record = None if late else stored.studies.get(study_uid)
        if record is None:  # the study's first instance on this association (or a late one)
            record = audit.from_dataset(ds)
            if not late:
                stored.studies[study_uid] = record
        if outcome.stored:
            record.tally(str(ds.get("SOPClassUID", "")))
        else:
            record.refuse(outcome.comment or outcome.label)
    if late:
        _emit_stored(event, trail, [record])


def _emit_stored(event: Any, trail: AuditTrail, studies: list[audit.StudyRecord]) -> None:
    trail.transferred(
        studies,
        action=audit.CREATE,
        source=_requestor(event),
        destination=trail.node(requestor=False, role=audit.DESTINATION),
    )


def handle_closed(event: Any, trail: AuditTrail) -> None:
    """The association ended (released, aborted or dropped): one DICOM Instances Transferred
    message per study it stored in."""
    if getattr(event.assoc, "_pacs_node_stored", None) is None:
        return
    stored = StoredStudies.of(event.assoc)
    with stored.lock:
        stored.closed = True
        studies, stored.studies = list(stored.studies.values()), {}
    if studies:
        _emit_stored(event, trail, studies)


# A-ASSOCIATE-RJ diagnostics (PS3.8 9.3.4, service-user source)
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07


@dataclass(frozen=True)
class Refused:
    """Why an association is refused: the reason, its name for the metrics, the diagnostic."""

    reason: str
    label: str
    diagnostic: int


def refusal(config: Config, calling: str, called: str, address: str) -> Refused | None:
    """Why an association from *calling* at *address* to *called* is refused, with the
    A-ASSOCIATE-RJ diagnostic to send; None to accept."""
    if called not in config.node.accepted_called_ae_titles:
        return Refused(
            f"called AE title {called!r} is not this node's",
            "unknown_called_ae",
            CALLED_AE_NOT_RECOGNISED,
        )
    peer = config.peer(calling)
    if peer is None:
        if config.node.accept_unknown_peers:
            return None
        return Refused(
            f"calling AE title {calling!r} is not a configured peer",
            "unknown_calling_ae",
            CALLING_AE_NOT_RECOGNISED,
        )
    if peer.check_host and address not in resolve(peer.host):
        why = f"calling AE title {calling!r} is configured for {peer.host}, not {address}"
        return Refused(why, "wrong_address", CALLING_AE_NOT_RECOGNISED)
    return None


def handle_requested(
    event: Any, config: Config, refused_tally: refusals.Tally, trail: AuditTrail
) -> None:
    primitive = event.assoc.requestor.primitive
    calling = str(primitive.calling_ae_title).strip()
    called = str(primitive.called_ae_title).strip()
    address = str(event.assoc.requestor.address)
    refused = refusal(config, calling, called, address)
    if refused is not None:
        log.warning("association from %s refused: %s", address, refused.reason)
        # rejected-permanent, by the service-user
        event.assoc.acse.send_reject(0x01, 0x01, refused.diagnostic)
        _wait_until_sent(event.assoc)
        trail.association_refused(calling, called, address, refused.reason)
        refused_tally.add("association", refused.label)


REJECT_SEND_S = 2.0


def _wait_until_sent(assoc: Any) -> None:
    """Wait (briefly) until the DUL thread has put the A-ASSOCIATE-RJ on the wire.

    pynetdicom queues the reject for its DUL thread and, as soon as this handler returns,
    shuts the socket down: the reject was lost in that race every time (the stranger saw a
    dropped connection). Sending it moves the DUL's state machine to Sta13.
    """
    dul = getattr(assoc, "dul", None)
    deadline = time.monotonic() + REJECT_SEND_S
    while dul is not None and time.monotonic() < deadline:
        # Sta13: sent, waiting for the peer to close; Sta1: the peer has closed already
        state = dul.state_machine.current_state
        if state in ("Sta13", "Sta1") and dul.to_provider_queue.empty():
            return
        time.sleep(0.001)


def handle_echo(event: Any) -> int:
    return statuses.SUCCESS


def handle_event_report(event: Any, db: Database) -> tuple[int, Dataset | None]:
    """A destination's Storage Commitment result (PS3.4 J.3.3): event type 1, all committed;
    2, some failed. Recorded on the deliveries of its transaction; anything else refused."""
    request = event.request
    if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
        return statuses.NO_SUCH_SOP_CLASS, None
    if request.EventTypeID not in (1, 2):
        return statuses.NO_SUCH_EVENT_TYPE, None
    try:
        info = event.event_information
        transaction = str(info.TransactionUID)
        committed = [str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])]
        failed = [
            (
                str(i.ReferencedSOPInstanceUID),
                int(i.FailureReason) if "FailureReason" in i else None,
            )
            for i in info.get("FailedSOPSequence", [])
        ]
    except Exception:
        log.warning("N-EVENT-REPORT from %s: unreadable event information", _calling_ae(event))
        return statuses.INVALID_ARGUMENT_VALUE, None
    with db.session() as session:
        changed = queue.record_commitment(
            session, transaction, committed, failed, peer=_calling_ae(event), now=utcnow()
        )
    log.info(
        "storage commitment %s from %s: %d committed, %d failed, %d deliveries recorded",
        transaction,
        _calling_ae(event),
        len(committed),
        len(failed),
        changed,
    )
    return statuses.SUCCESS, None


@dataclass(frozen=True)
class Admission:
    """What became of one instance offered for storage: the status (C-STORE's codes, also
    STOW-RS's Failure Reasons), why, and the refusal's name for the metrics ("" when stored)."""

    code: int
    comment: str = ""
    label: str = ""
    due: datetime | None = None  # stored: when the job it queued starts (None: none queued)

    @property
    def stored(self) -> bool:
        return self.code == statuses.SUCCESS


def handle_store(
    event: Any,
    config: Config,
    files: FileStore,
    db: Database,
    cache: IndexCache | None = None,
    trail: AuditTrail | None = None,
    refused: refusals.Tally | None = None,
    stored: Callable[[], None] | None = None,
) -> Dataset:
    """C-STORE SCP: :func:`admit` the instance; a refusal is counted, and what the
    association stored (or was refused) is audited per study when it closes. *stored* is
    called after an instance is stored whose job is due at once (the work roles are nudged:
    :mod:`pacs_node.wake`; a CT slice moves its series' start later, which no one need know)."""
    outcome, ds = _store(event, config, files, db, cache)
    if stored is not None and outcome.due is not None and outcome.due <= utcnow():
        stored()  # due now (a radiograph): the work roles need not wait for their poll
    if not outcome.stored and refused is not None:
        refused.add("instance", outcome.label)
    if trail is not None and trail.enabled and ds is not None:
        _audit_store(event, trail, ds, outcome)
    return status(outcome.code, outcome.comment)


def _store(
    event: Any, config: Config, files: FileStore, db: Database, cache: IndexCache | None
) -> tuple[Admission, Dataset | None]:
    calling = _calling_ae(event)
    request = event.request
    try:  # the data set as pynetdicom wrote it to disk, fragment by fragment
        path: Path | None = event.dataset_path
    except AttributeError:  # not streamed to disk (node.stream_to_disk false): in memory
        path = None
    try:
        incoming: bytes | Path
        if path is not None:
            incoming, size = path, path.stat().st_size
        else:
            encoded: bytes = event.encoded_dataset()
            incoming, size = encoded, len(encoded)
        maximum = config.node.max_dataset_bytes
        if size > maximum:
            return _too_big(calling, request, size, maximum), None
        if path is not None:  # values over 64 KiB (Pixel Data) stay on disk until read
            ds = read_stored(path)
        else:
            ds = event.dataset
            ds.file_meta = event.file_meta
        sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
    except InvalidInstanceError as exc:
        log.warning("C-STORE from %s refused: %s", calling, exc)
        return Admission(statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc), "invalid_uid"), None
    except Exception as exc:  # the data set cannot even be parsed
        log.warning("C-STORE from %s refused: unreadable data set (%s)", calling, exc)
        why = f"cannot decode data set: {exc}"
        return Admission(statuses.CANNOT_UNDERSTAND, why, "unreadable"), None
    if sop_uid != str(request.AffectedSOPInstanceUID).strip():
        log.warning(
            "C-STORE from %s refused: SOP Instance UID %s differs from request %s",
            calling,
            sop_uid,
            request.AffectedSOPInstanceUID,
        )
        why = "SOPInstanceUID differs from the request's"
        return Admission(statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, why, "uid_mismatch"), ds
    sop_class = str(ds.get("SOPClassUID", "")).strip()
    if sop_class != str(request.AffectedSOPClassUID).strip():
        why = "SOPClassUID differs from the request's"
        return Admission(statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, why, "class_mismatch"), ds
    size_on_disk = size if path is not None else None
    return admit(config, files, db, ds, incoming, size_on_disk, calling, cache), ds


def read_stored(path: Path) -> Dataset:
    """The data set pynetdicom streamed to *path*, as ``pydicom.dcmread`` with values over
    ``DEFER_BYTES`` left on disk: by :func:`storage.header.read_header` (half the CPU) where
    it reads the encoding, else (and for whatever it cannot read) by pydicom, whose errors
    are the ones reported."""
    try:
        ds = read_header(path, DEFER_BYTES)
    except Exception:
        ds = None
    return ds if ds is not None else pydicom.dcmread(path, defer_size=DEFER_BYTES)


def admit(
    config: Config,
    files: FileStore,
    db: Database,
    ds: Dataset,
    incoming: bytes | Path,
    file_size: int | None,
    source: str,
    cache: IndexCache | None = None,
    how: str = "C-STORE",
    sender_ae: str | None = None,
) -> Admission:
    """The checks every stored instance passes, then :func:`receive_instance`. *file_size*:
    of the file the data set was read from with values left on disk, so that a cut-off value
    is seen. *source* names the sender in the log; *sender_ae* is the AE title recorded as
    the series' sender (results may be owed to it), *source* when not given."""
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    sop_class = str(ds.get("SOPClassUID", "")).strip()
    deflated = str(ds.file_meta.get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian
    cut = truncated_element(ds, file_size if not deflated else None)
    if cut is not None:
        # the sender promised more bytes than it sent (a cut-off or forged data set): keeping
        # it would keep a file no reader can use, and Success would be a lie
        log.warning("%s %s from %s refused: %s", how, sop_uid, source, cut)
        return Admission(statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, cut, "truncated")
    if "Image Storage" in UID(sop_class).name and not has_pixels(ds):
        # Type 1 in every image IOD; missing here usually means the data set was cut off
        log.warning("%s %s from %s refused: no pixel data", how, sop_uid, source)
        why = "Pixel Data missing or truncated"
        return Admission(statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, why, "no_pixel_data")
    try:
        sender = source if sender_ae is None else sender_ae
        due = receive_instance(config, files, db, ds, incoming, sender, cache)
    except OutOfSpaceError as exc:
        log.error("%s %s from %s refused: %s", how, sop_uid, source, exc)
        return Admission(statuses.OUT_OF_RESOURCES, str(exc), "out_of_space")
    except InvalidInstanceError as exc:
        log.warning("%s %s from %s refused: %s", how, sop_uid, source, exc)
        return Admission(statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc), "invalid_instance")
    except Exception as exc:  # never let a storage fault kill the association
        log_failure(log, "%s %s from %s failed", how, sop_uid, source)
        why = f"could not store: {type(exc).__name__}"
        return Admission(statuses.OUT_OF_RESOURCES, why, "storage_fault")
    return Admission(statuses.SUCCESS, due=due)


def handle_find(
    event: Any, db: Database, trail: AuditTrail | None = None, timeout_s: float = 60.0
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """Stream the matches: each response goes out as its row is read (in partitions of
    ``query.PARTITION_SIZE``), so the first arrives at once and memory does not grow with the
    number of matches. The query is audited when it ends (pynetdicom closes the generator
    after a final status, so the outcome is kept as it happens, not returned)."""
    outcome = FindOutcome()
    try:
        yield from _find(event, db, outcome, timeout_s)
    finally:
        if trail is not None and trail.enabled:
            request = event.request
            encoded = request.Identifier.getvalue() if request.Identifier is not None else b""
            trail.query(
                _requestor(event),
                sop_class=str(request.AffectedSOPClassUID),
                query=encoded,
                transfer_syntax=str(event.context.transfer_syntax),
                outcome=audit.MINOR_FAILURE if outcome.problem else audit.SUCCESS,
                description=outcome.problem or f"{outcome.sent} matches",
            )


@dataclass
class FindOutcome:
    sent: int = 0
    problem: str = ""  # why the query was refused, failed or ended early; "" when answered


def _find(
    event: Any, db: Database, outcome: FindOutcome, timeout_s: float
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """C-FIND's responses. The pending ones go out by :mod:`pacs_node.fastfind` where it can
    send them, the rest (and the final status) by pynetdicom."""
    calling = _calling_ae(event)
    responder = fastfind.Responder(event, timeout_s)
    try:
        identifier = event.identifier
        model = _model(event)
        with db.read() as session:
            answer = query.search(session, identifier, model)  # a bad request raises here
            pending = statuses.PENDING_WARNING if answer.unsupported else statuses.PENDING
            if answer.unsupported:
                log.info(
                    "C-FIND from %s: cannot match on %s", calling, ", ".join(answer.unsupported)
                )
            for match in answer.matches:
                if "SpecificCharacterSet" not in match and not _is_ascii(match):
                    match.SpecificCharacterSet = "ISO_IR 192"  # names are kept as Unicode
                if event.is_cancelled:
                    log.info("C-FIND from %s cancelled after %d matches", calling, outcome.sent)
                    outcome.problem = f"cancelled after {outcome.sent} matches"
                    responder.flush()
                    yield statuses.CANCEL, None
                    return
                if responder.usable:
                    responder.send(pending, match)
                else:
                    yield pending, match
                outcome.sent += 1
            responder.flush()
    except fastfind.SendFailed as exc:
        # the stream may end inside a PDU: nothing more can be said on this association
        log.warning("C-FIND from %s: responses not sent (%s); aborted", calling, exc)
        outcome.problem = f"aborted after {outcome.sent} matches: {exc}"
        event.assoc.abort()
        return
    except QueryError as exc:
        log.warning("C-FIND from %s refused: %s", calling, exc)
        outcome.problem = str(exc)
        yield status(statuses.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)), None
        return
    except Exception as exc:
        log_failure(log, "C-FIND from %s failed after %d matches", calling, outcome.sent)
        outcome.problem = f"query failed: {type(exc).__name__}"
        try:
            responder.flush()
        except fastfind.SendFailed:
            event.assoc.abort()
            return
        yield status(statuses.UNABLE_TO_PROCESS, f"query failed: {type(exc).__name__}"), None
        return
    log.info("C-FIND from %s: %d matches", calling, outcome.sent)


def _model(event: Any) -> query.Model:
    if str(event.request.AffectedSOPClassUID) in PATIENT_ROOT_CLASSES:
        return query.Model.PATIENT_ROOT
    return query.Model.STUDY_ROOT


def _selected(event: Any, db: Database, what: str) -> list[query.Stored] | Dataset:
    """The instances a C-GET/C-MOVE names, or the failure status that says why not."""
    calling = _calling_ae(event)
    try:
        with db.read() as session:
            found = query.retrieve(session, event.identifier, _model(event))
    except QueryError as exc:
        log.warning("%s from %s refused: %s", what, calling, exc)
        return status(statuses.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc))
    except Exception as exc:
        log_failure(log, "%s from %s failed", what, calling)
        return status(statuses.UNABLE_TO_PROCESS, f"retrieve failed: {type(exc).__name__}")
    if len(found) > 65535:  # the sub-operation counts are US
        return status(statuses.OUT_OF_RESOURCES_SUBOPERATIONS, f"{len(found)} instances: too many")
    log.info("%s from %s: %d instances", what, calling, len(found))
    return found


def _sub_operations(
    event: Any, found: list[query.Stored], files: FileStore, what: str
) -> Iterator[tuple[int, Dataset | None]]:
    """One (pending, data set) per instance, read from disk as it is sent; an unreadable file
    counts as a failed sub-operation (pynetdicom counts a pending without a data set so)."""
    for item in found:
        if event.is_cancelled:
            yield statuses.CANCEL, None
            return
        try:
            ds = pydicom.dcmread(files.abspath(item.path))
        except Exception as exc:
            log.error("%s: instance %s unreadable: %s", what, item.sop_instance_uid, exc)
            yield statuses.PENDING, None
            continue
        yield statuses.PENDING, ds


def _audited(
    sub_operations: Iterator[tuple[int, Dataset | None]],
    db: Database,
    trail: AuditTrail | None,
    found: list[query.Stored],
    destination: audit.Participant,
    others: list[audit.Participant],
) -> Iterator[tuple[int, Dataset | None]]:
    """The sub-operations, and once they are over (pynetdicom asks for the next one after it
    has sent the last), DICOM Instances Transferred (read) for each study they sent from."""
    handed, cancelled, complete = 0, False, False
    try:
        for item in sub_operations:
            if item[0] == statuses.CANCEL:
                cancelled = True
            else:
                handed += 1
            yield item
        complete = True
    finally:
        if trail is not None and trail.enabled and found:
            problem = ""
            if cancelled:
                problem = f"cancelled after {handed} of {len(found)} sub-operations"
            elif not complete:
                problem = f"ended after {handed} of {len(found)} sub-operations"
            _audit_retrieve(db, trail, found, destination, others, problem)


def _audit_retrieve(
    db: Database,
    trail: AuditTrail,
    found: list[query.Stored],
    destination: audit.Participant,
    others: list[audit.Participant],
    problem: str,
) -> None:
    try:
        with db.read() as session:
            subjects = query.subjects(session, [item.sop_instance_uid for item in found])
    except Exception:
        log_failure(log, "retrieve not audited: its studies could not be read")
        return
    trail.transferred(
        audit.studies_of(subjects),
        action=audit.READ,
        source=trail.node(requestor=False, role=audit.SOURCE),
        destination=destination,
        others=others,
        problem=problem,
        note="sent; each sub-operation's status is in the final response",
    )


def handle_get(
    event: Any, db: Database, files: FileStore, trail: AuditTrail | None = None
) -> Iterator[Any]:
    """C-GET SCP: the instances go back on the requestor's association, as C-STOREs on the
    storage contexts it negotiated with the SCP role."""
    found = _selected(event, db, "C-GET")
    if isinstance(found, Dataset):
        yield 1
        yield found, None
        return
    yield len(found)
    yield from _audited(
        _sub_operations(event, found, files, "C-GET"),
        db, trail, found, _requestor(event, audit.DESTINATION), [],
    )  # fmt: skip


def handle_move(
    event: Any, config: Config, db: Database, files: FileStore, trail: AuditTrail | None = None
) -> Iterator[Any]:
    """C-MOVE SCP: only to a configured peer (its host and port from the config, never from
    the request); an unknown Move Destination is 0xA801."""
    destination = str(event.move_destination or "").strip()
    peer = config.peer(destination)
    if peer is None:
        log.warning(
            "C-MOVE from %s refused: move destination %r is not a configured peer",
            _calling_ae(event),
            destination,
        )
        yield None, None
        return
    found = _selected(event, db, f"C-MOVE to {destination}")
    if isinstance(found, Dataset):
        yield from _move_refused(peer, found)
        return
    contexts = _move_contexts(found)
    if len(contexts) > MAX_MOVE_CONTEXTS:
        yield from _move_refused(
            peer,
            status(
                statuses.OUT_OF_RESOURCES_SUBOPERATIONS,
                f"{len(contexts)} SOP classes: more than one association can carry",
            ),
        )
        return
    yield peer.host, peer.port, {"contexts": contexts}
    moved_to = audit.Participant(peer.ae_title, False, audit.DESTINATION, address=peer.host)
    yield len(found)
    yield from _audited(
        _sub_operations(event, found, files, f"C-MOVE to {destination}"),
        db, trail, found, moved_to, [_requestor(event, None)],
    )  # fmt: skip


def _move_refused(peer: Any, failure: Dataset) -> Iterator[Any]:
    """What pynetdicom needs to answer a C-MOVE with *failure*: the destination, one
    sub-operation, then the failure status."""
    yield peer.host, peer.port
    yield 1
    yield failure, None


def _move_contexts(found: list[query.Stored]) -> list[Any]:
    """One presentation context per SOP class, in the transfer syntaxes it is stored in."""
    from pynetdicom import build_context

    syntaxes: dict[str, set[str]] = {}
    for item in found:
        syntaxes.setdefault(item.sop_class_uid, set()).add(
            item.transfer_syntax_uid or ExplicitVRLittleEndian
        )
    return [build_context(sop, sorted(ts)) for sop, ts in sorted(syntaxes.items())]


def _too_big(calling: str, request: Any, size: int, maximum: int) -> Admission:
    log.warning(
        "C-STORE %s from %s refused: %d bytes, above node.max_dataset_bytes %d",
        request.AffectedSOPInstanceUID,
        calling,
        size,
        maximum,
    )
    why = f"data set of {size} bytes exceeds {maximum}"
    return Admission(statuses.OUT_OF_RESOURCES, why, "too_big")


def truncated_element(ds: Dataset, file_size: int | None = None) -> str | None:
    """The first top-level element whose value is shorter than its declared length, described
    (None when every value is whole). pydicom reads such a value without complaint, giving
    whatever bytes there were; a value left on disk (deferred) is checked against the size of
    the file it was read from, *file_size*."""
    for tag in list(ds.keys()):
        elem = ds.get_item(tag, keep_deferred=True)
        if not isinstance(elem, RawDataElement) or elem.length == UNDEFINED_LENGTH:
            continue
        if elem.value is None:  # deferred: still in the file
            if file_size is None:
                continue  # a deflated file: offsets are in the inflated stream
            got = max(0, min(elem.length, file_size - elem.value_tell))
        else:
            got = len(elem.value) if elem.value is not None else 0
        if got < elem.length:
            name = keyword_for_tag(tag) or str(Tag(tag))
            return f"{name} declares {elem.length} bytes, {got} received"[:ERROR_COMMENT_MAX]
    return None


@functools.lru_cache(maxsize=256)
def _resolve_cached(host: str, _epoch: int) -> frozenset[str]:
    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None))
    except OSError:
        return frozenset()


def resolve(host: str) -> frozenset[str]:
    """The addresses of *host*; names are looked up again every five minutes."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        return _resolve_cached(host, int(time.monotonic() // 300))


def _is_ascii(ds: Dataset) -> bool:
    return all(str(elem.value).isascii() for elem in ds if elem.VR in ("PN", "LO", "SH", "LT"))


def receive_instance(
    config: Config,
    files: FileStore,
    db: Database,
    ds: Dataset,
    incoming: bytes | Path,
    calling_ae: str,
    cache: IndexCache | None = None,
) -> datetime | None:
    """Put the file in place durably (the bytes, or the file pynetdicom streamed to disk),
    then index and schedule it in one transaction; the start of the job it queued or moved
    (:func:`pacs_node.assembly.schedule`)."""
    relpath = instance_relpath(
        ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID")
    )
    existed = files.abspath(relpath).exists()
    if isinstance(incoming, Path):
        size = files.adopt(incoming, relpath)
    else:
        files.check_space(len(incoming))
        size = files.write_atomic(relpath, lambda fh: fh.write(incoming))
    try:
        for attempt in range(INDEX_ATTEMPTS):
            try:
                with db.session() as session:
                    indexed = record_instance(
                        session,
                        ds,
                        relpath=relpath.as_posix(),
                        size_bytes=size,
                        transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")),
                        source_ae=calling_ae,
                        cache=cache,
                    )
                    due = assembly.schedule(session, indexed, ds, config, utcnow(), cache)
                break
            except IntegrityError:
                # another association inserted the same study or series first (PostgreSQL
                # runs them concurrently): the row exists now, so index again
                if cache is not None:
                    cache.forget()
                if attempt == INDEX_ATTEMPTS - 1:
                    raise
    except Exception:
        if cache is not None:
            cache.forget()  # it may hold keys of rows the failed transaction never made
        if not existed:  # nothing half-recorded: the file goes with its failed row
            files.remove(relpath)
        raise
    log.info(
        "stored %s (series %s, %s) from %s",
        ds.SOPInstanceUID,
        ds.SeriesInstanceUID,
        ds.get("Modality", ""),
        calling_ae,
    )
    return due
