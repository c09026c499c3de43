"""C-STORE SCU: send stored instances to a peer, recording each answer.

:func:`stream` keeps one association open for as long as the caller has more to send to the
same peer; :func:`send` sends one list. Neither raises for a fault of the peer or the network:
every item gets an :class:`Outcome`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import _config as pynetdicom_config

from pacs_node import faststore, statuses
from pacs_node.ae import build_scu
from pacs_node.config import Config, Peer

log = logging.getLogger(__name__)

# what the node makes (ai.results): proposed on every association, so a stream of results
# never needs a second association for a class it has not seen yet
GENERATED_SOP_CLASSES = (
    UID("1.2.840.10008.5.1.4.1.1.88.33"),  # Comprehensive SR
    UID("1.2.840.10008.5.1.4.1.1.88.34"),  # Comprehensive 3D SR (results made by 0.3.0)
    UID("1.2.840.10008.5.1.4.1.1.7"),  # Secondary Capture Image
    UID("1.2.840.10008.5.1.4.1.1.30"),  # Parametric Map
)
MAX_CONTEXTS = 64  # of the 128 an association may carry; leaves room for both syntaxes
# a C-STORE of a file path sends its data set without decoding it (pynetdicom >= 2.1)
pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True


@dataclass(frozen=True)
class Outcome:
    key: int  # the caller's identifier for the item (a delivery id)
    status: int | None  # DIMSE status, None when no answer came
    error: str = ""
    permanent: bool = False  # retrying cannot help (the peer refused this object)

    @property
    def ok(self) -> bool:
        """Accepted, with nothing found wrong since (an error with a Success status: the
        peer did not keep what it accepted)."""
        return self.status is not None and not statuses.is_failure(self.status) and not self.error


def send(config: Config, peer: Peer, items: Sequence[tuple[int, Path]]) -> list[Outcome]:
    """C-STORE each (key, file) to *peer* over one association; one outcome per item."""
    return [o for batch in stream(config, peer, items, lambda: []) for o in batch]


@dataclass(frozen=True)
class _File:
    """A file to send: its path and what its File Meta Information says it holds."""

    path: Path
    SOPClassUID: UID
    transfer_syntax: UID
    sop_instance_uid: str


def _read(items: Sequence[tuple[int, Path]]) -> tuple[list[tuple[int, _File]], list[Outcome]]:
    """The files' meta information (the data sets are read when sent)."""
    datasets: list[tuple[int, _File]] = []
    outcomes: list[Outcome] = []
    for key, path in items:
        try:
            meta = read_file_meta_info(path)
            datasets.append(
                (
                    key,
                    _File(
                        path,
                        UID(meta.MediaStorageSOPClassUID),
                        UID(meta.TransferSyntaxUID),
                        str(meta.MediaStorageSOPInstanceUID),
                    ),
                )
            )
        except Exception as exc:
            outcomes.append(Outcome(key, None, f"cannot read {path.name}: {exc}", permanent=True))
    return datasets, outcomes


def stream(
    config: Config,
    peer: Peer,
    items: Sequence[tuple[int, Path]],
    more: Callable[[], Sequence[tuple[int, Path]]],
) -> Iterator[list[Outcome]]:
    """Send *items*, then whatever *more* returns, until it returns nothing. Each outcome is
    yielded as soon as its answer comes, before the next C-STORE, so that the caller records it
    then: a caller killed mid-batch sends again only the one C-STORE that was in flight. One
    association carries it all unless a batch needs a SOP class the open one was not
    negotiated for."""
    datasets, failed = _read(items)
    while True:  # the first batch that holds something readable
        if failed:
            yield failed
        if datasets:
            break
        batch = list(more())
        if not batch:
            return
        datasets, failed = _read(batch)
    while datasets:  # one association per pass; a new one only for a class not negotiated
        classes = sorted(set(GENERATED_SOP_CLASSES) | {UID(ds.SOPClassUID) for _, ds in datasets})
        ae = build_scu(config, [str(c) for c in classes[:MAX_CONTEXTS]])
        where = f"{peer.ae_title}@{peer.host}:{peer.port}"
        try:
            assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
        except Exception as exc:  # e.g. a bad host name
            yield [Outcome(k, None, f"cannot connect to {where}: {exc}") for k, _ in datasets]
            return
        if not assoc.is_established:
            how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
            yield [Outcome(k, None, f"association with {where} {how}") for k, _ in datasets]
            return
        _keep_responses(assoc)
        message_ids = itertools.count(1)
        try:
            while True:
                for key, ds in datasets:
                    yield [_store(assoc, key, ds, next(message_ids) % 0x10000 or 1)]
                if not assoc.is_established:
                    return
                datasets, failed = _read(list(more()))
                if failed:
                    yield failed
                if not datasets or any(UID(ds.SOPClassUID) not in classes for _, ds in datasets):
                    break  # nothing more, or a class this association was not negotiated for
        finally:
            if assoc.is_established:
                assoc.release()


def _keep_responses(assoc: Any) -> None:
    """Work around a race in pynetdicom's association reactor.

    ``send_c_store`` pauses the reactor thread before sending, but the reactor can pass its
    checkpoint just before the pause and then take the C-STORE response off the DIMSE queue
    itself; it logs "Received unexpected C-STORE service message" and drops it, and the sender
    waits for the DIMSE timeout (seen here under load: one in a few hundred stores, a 60 s
    stall and a resend). A response the reactor takes is put back on the queue, where the
    waiting ``send_c_store`` finds it. Requests from the peer are served as before.
    """
    serve = assoc._serve_request

    def serve_or_return(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request:
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_or_return


def _store(assoc: Any, key: int, item: _File, message_id: int) -> Outcome:
    if not assoc.is_established:
        return Outcome(key, None, "association ended before sending")
    try:
        context_id = faststore.unconverted_context(
            assoc, str(item.SOPClassUID), str(item.transfer_syntax)
        )
        # in the file's own transfer syntax, the encoded data set goes as it lies on disk
        # (pacs_node.faststore, else pynetdicom's STORE_SEND_CHUNKED_DATASET); another one
        # accepted needs it decoded and encoded again
        answer = (
            faststore.store(
                assoc,
                item.path,
                str(item.SOPClassUID),
                item.sop_instance_uid,
                context_id,
                message_id,
            )
            if context_id is not None
            else None
        )
        if answer is None:
            as_written = context_id is not None
            what: Path | Dataset = item.path if as_written else pydicom.dcmread(item.path)
            answer = assoc.send_c_store(what, msg_id=message_id)
    except Exception as exc:  # e.g. no accepted presentation context for the class
        if not assoc.is_established:  # it ended under us (the peer aborted): not the object's
            return Outcome(key, None, f"association ended: {type(exc).__name__}: {exc}")
        return Outcome(key, None, f"{type(exc).__name__}: {exc}", permanent=True)
    code = int(answer.Status) if "Status" in answer else None
    if code is None:
        return Outcome(key, None, "no answer (timeout or abort)")
    if statuses.is_failure(code):
        comment = str(answer.get("ErrorComment", "")).strip()
        return Outcome(key, code, f"status 0x{code:04X} {comment}".strip())
    return Outcome(key, code)
