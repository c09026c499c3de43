"""The audit trail: who sent, queried, retrieved and received what, and what the models read.

Messages follow the DICOM Audit Message schema (PS3.15 A.5.1) and the DICOM-specific messages of
A.5.3: *Security Alert* for a refused association, *DICOM Instances Transferred* for instances
stored (C-STORE, STOW-RS), retrieved (C-GET, C-MOVE, WADO-RS) and results exported (the send
role), *Query* for C-FIND and QIDO-RS, *Application Activity* when a role starts and stops, and
one extension (a private code, as A.5 allows and ``docs/conformance.md`` describes): *AI
Analysis*, with the model's name, version and weights' SHA-256 and the input and output SOP
Instance UIDs.

Each message is written to a file, one message a line (appends of one ``write`` each, so the
roles' processes can share the file; a file moved away by logrotate is reopened), and, when
``audit.syslog_host`` is set, sent to a syslog collector over TLS: RFC 5424 messages (facility
authpriv, severity notice, MSGID ``IHE+RFC-3881``, as IHE ATNA asks) framed as RFC 5425 says. The
collector gets them from a thread with a bounded queue, so a slow or absent collector never
delays a DICOM service; the file has every message either way.

This is the one place where participant identities (patient IDs and names, AE titles and
addresses) are written, as the Standard intends; the ordinary logs carry UIDs only.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import logging
import os
import queue
import re
import select
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset

from pacs_node.config import Config
from storage.query import Subject

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Code:
    """A coded value of the schema: ``csd-code``, ``codeSystemName``, ``originalText``."""

    code: str
    system: str
    meaning: str


DCM = "DCM"
RFC_3881 = "RFC-3881"
PRIVATE = "99PACSNODE"  # this node's private coding scheme (PS3.16 8.2: "99" prefix)

# Audit Event IDs (DCID 400) and Event Type Codes (DCID 401, 402)
APPLICATION_ACTIVITY = Code("110100", DCM, "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", DCM, "DICOM Instances Transferred")
QUERY = Code("110112", DCM, "Query")
SECURITY_ALERT = Code("110113", DCM, "Security Alert")
USER_AUTHENTICATION = Code("110114", DCM, "User Authentication")
AI_ANALYSIS = Code("AI-ANALYSIS", PRIVATE, "AI Analysis")
APPLICATION_START = Code("110120", DCM, "Application Start")
APPLICATION_STOP = Code("110121", DCM, "Application Stop")
LOGIN = Code("110122", DCM, "Login")
NODE_AUTHENTICATION = Code("110126", DCM, "Node Authentication")
# Active participant roles (DCID 402)
APPLICATION = Code("110150", DCM, "Application")
DESTINATION = Code("110152", DCM, "Destination Role ID")
SOURCE = Code("110153", DCM, "Source Role ID")
# Participant object ID types
PATIENT_NUMBER = Code("2", RFC_3881, "Patient Number")
URI = Code("12", RFC_3881, "URI")
STUDY_UID = Code("110180", DCM, "Study Instance UID")
SOP_CLASS_UID = Code("110181", DCM, "SOP Class UID")
NODE_ID = Code("110182", DCM, "Node ID")
MODEL = Code("AI-MODEL", PRIVATE, "AI Model")

# outcomes (EventOutcomeIndicator)
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"
# action codes
CREATE, READ, EXECUTE = "C", "R", "E"
# ParticipantObjectTypeCode / ...Role / ...DataLifeCycle values of the schema
PERSON, SYSTEM_OBJECT = "1", "2"
ROLE_PATIENT, ROLE_REPORT, ROLE_SECURITY_RESOURCE, ROLE_QUERY, ROLE_PROCESSING = (
    "1",
    "3",
    "13",
    "24",
    "26",
)
LIFE_CREATION, LIFE_ACCESS_USE = "1", "6"

MAX_REASONS = 5  # distinct refusal reasons one message quotes
_NOT_XML = re.compile("[^\t\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _clean(value: object) -> str:
    """Text as XML 1.0 can hold it, on one line (the file holds one message a line)."""
    return _NOT_XML.sub("?", str(value).replace("\r", " ").replace("\n", " "))


def _token(value: object) -> str:
    """An xsd:token: no leading, trailing or repeated white space."""
    return " ".join(_clean(value).split())


@dataclass(frozen=True)
class Participant:
    """An active participant: a person or process that took part."""

    user_id: str  # an AE title, a process ("pacs-node work"), a web client
    requestor: bool
    role: Code | None = None
    address: str = ""  # NetworkAccessPointID: an IP address or a host name
    alternative_id: str = ""  # AlternativeUserID: the process ID, for the node's own roles
    user_name: str = ""


@dataclass
class StudyRecord:
    """What one message says of one study: its patient and its instances by SOP class."""

    study_uid: str
    patient_id: str = ""
    patient_name: str = ""
    accession: str = ""
    instances: dict[str, list[str]] = field(default_factory=dict)  # SOP class -> instance UIDs
    counts: dict[str, int] = field(default_factory=dict)  # SOP class -> how many
    refused: int = 0
    reasons: list[str] = field(default_factory=list)  # the first few distinct ones

    @classmethod
    def of(cls, subject: Subject) -> StudyRecord:
        """The (empty) record of a ``storage.query.Subject``'s study and patient."""
        return cls(
            subject.study_instance_uid,
            patient_id=subject.patient_id,
            patient_name=subject.patient_name,
            accession=subject.accession_number,
        )

    def add(self, sop_class: str, sop_instance: str) -> None:
        """One instance, its UID kept (the AI Analysis lists them)."""
        self.instances.setdefault(sop_class, []).append(sop_instance)
        self.tally(sop_class)

    def tally(self, sop_class: str) -> None:
        """One instance, counted only (a long association keeps no UIDs)."""
        self.counts[sop_class] = self.counts.get(sop_class, 0) + 1

    def refuse(self, reason: str) -> None:
        self.refused += 1
        if reason not in self.reasons and len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)

    @property
    def count(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class ObjectRecord:
    """A participant object: what the event was about."""

    object_id: str
    id_type: Code
    type_code: str = ""
    role: str = ""
    life_cycle: str = ""
    name: str = ""
    query: bytes | None = None
    details: tuple[tuple[str, bytes], ...] = ()
    sop_classes: tuple[tuple[str, tuple[str, ...], int], ...] = ()  # (UID, instances, count)
    accession: str = ""


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent,
        tag,
        {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.meaning},
    )


def _address_type(address: str) -> str:
    try:
        ipaddress.ip_address(address)
        return "2"  # IP address
    except ValueError:
        return "1"  # machine name


@dataclass(frozen=True)
class Source:
    """AuditSourceIdentification: the node that reports."""

    source_id: str
    site_id: str = ""
    type_code: str = "4"  # application server process


def message(
    event: Code,
    *,
    action: str,
    outcome: str,
    participants: Sequence[Participant],
    source: Source,
    objects: Sequence[ObjectRecord] = (),
    event_types: Sequence[Code] = (),
    description: str = "",
    when: datetime | None = None,
) -> str:
    """One AuditMessage (PS3.15 A.5.1) as a line of XML (no declaration, no new line); every
    value made XML 1.0 text on one line at the end (:func:`_clean`), tokens also collapsed."""
    root = ET.Element("AuditMessage")
    moment = (when or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="milliseconds")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {"EventActionCode": action, "EventDateTime": moment, "EventOutcomeIndicator": outcome},
    )
    _coded(ident, "EventID", event)
    for event_type in event_types:
        _coded(ident, "EventTypeCode", event_type)
    if description:
        ET.SubElement(ident, "EventOutcomeDescription").text = description[:1000]
    for p in participants:
        attrs = {"UserID": p.user_id or "?", "UserIsRequestor": str(p.requestor).lower()}
        if p.alternative_id:
            attrs["AlternativeUserID"] = p.alternative_id
        if p.user_name:
            attrs["UserName"] = p.user_name
        if p.address:
            attrs["NetworkAccessPointID"] = _token(p.address)
            attrs["NetworkAccessPointTypeCode"] = _address_type(p.address)
        element = ET.SubElement(root, "ActiveParticipant", attrs)
        if p.role is not None:
            _coded(element, "RoleIDCode", p.role)
    src_attrs = {"AuditSourceID": _token(source.source_id) or "pacs-node"}
    if source.site_id:
        src_attrs["AuditEnterpriseSiteID"] = _token(source.site_id)
    src = ET.SubElement(root, "AuditSourceIdentification", src_attrs)
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": source.type_code})
    for obj in objects:
        attrs = {"ParticipantObjectID": _token(obj.object_id) or "?"}
        if obj.type_code:
            attrs["ParticipantObjectTypeCode"] = obj.type_code
        if obj.role:
            attrs["ParticipantObjectTypeCodeRole"] = obj.role
        if obj.life_cycle:
            attrs["ParticipantObjectDataLifeCycle"] = obj.life_cycle
        element = ET.SubElement(root, "ParticipantObjectIdentification", attrs)
        _coded(element, "ParticipantObjectIDTypeCode", obj.id_type)
        if obj.query is not None:
            ET.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(
                obj.query
            ).decode("ascii")
        elif obj.name:
            ET.SubElement(element, "ParticipantObjectName").text = _token(obj.name)
        for kind, value in obj.details:
            ET.SubElement(
                element,
                "ParticipantObjectDetail",
                {"type": kind, "value": base64.b64encode(value).decode("ascii")},
            )
        if obj.sop_classes or obj.accession:
            described = ET.SubElement(element, "ParticipantObjectDescription")
            if obj.accession:
                ET.SubElement(described, "Accession", {"Number": _token(obj.accession)})
            for uid, instances, count in obj.sop_classes:
                sop = ET.SubElement(
                    described, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)}
                )
                for instance in instances:
                    ET.SubElement(sop, "Instance", {"UID": instance})
    for element in root.iter():  # values from peers may hold anything: XML 1.0 text only
        for key in list(element.attrib):
            element.set(key, _clean(element.attrib[key]))
        if element.text is not None:
            element.text = _clean(element.text)
    return ET.tostring(root, encoding="unicode")


# -- the participant objects the node's messages use -------------------------------------------


def study_object(
    study: StudyRecord, *, list_instances: bool = False, life_cycle: str = ""
) -> ObjectRecord:
    return ObjectRecord(
        study.study_uid,
        STUDY_UID,
        type_code=SYSTEM_OBJECT,
        role=ROLE_REPORT,
        life_cycle=life_cycle,
        sop_classes=tuple(
            (uid, tuple(study.instances.get(uid, ())) if list_instances else (), n)
            for uid, n in sorted(study.counts.items())
        ),
        accession=study.accession,
    )


def patient_object(study: StudyRecord) -> ObjectRecord:
    return ObjectRecord(
        study.patient_id or "(no Patient ID)",
        PATIENT_NUMBER,
        type_code=PERSON,
        role=ROLE_PATIENT,
        name=study.patient_name,
    )


# -- where the messages go -------------------------------------------------------------------


class AuditTrail:
    """One role's audit trail: :meth:`record` never raises and never waits on the network."""

    def __init__(self, config: Config, role: str) -> None:
        settings = config.audit
        self.enabled = settings.enabled
        self.role = role
        self.ae_title = config.node.ae_title
        self.source = Source(
            settings.source_id or config.node.ae_title, settings.enterprise_site_id
        )
        self.path = settings.file or (config.node.storage_dir / "audit" / "audit.log")
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._failed = False
        self.syslog: SyslogTls | None = None
        if self.enabled and settings.syslog_host:
            assert settings.syslog_ca_file is not None
            self.syslog = SyslogTls(
                settings.syslog_host,
                settings.syslog_port,
                ca_file=settings.syslog_ca_file,
                cert_file=settings.syslog_cert_file,
                key_file=settings.syslog_key_file,
                max_queue=settings.syslog_queue,
                app_name=f"pacs-node-{role}",
            )

    # the node's own participants
    def node(self, *, requestor: bool, role: Code | None, address: str = "") -> Participant:
        return Participant(
            self.ae_title,
            requestor,
            role,
            address=address,
            alternative_id=str(os.getpid()),
            user_name=f"pacs-node {self.role}",
        )

    def emit(self, event: Code, **kwargs: object) -> None:
        """Build a message (see :func:`message`) from the node as the audit source and record it."""
        if not self.enabled:
            return
        try:
            line = message(event, source=self.source, **kwargs)  # type: ignore[arg-type]
        except Exception:
            log.exception("audit message %s could not be built", event.meaning)
            return
        self.record(line)

    def record(self, line: str) -> None:
        if not self.enabled:
            return
        data = (line + "\n").encode("utf-8")
        with self._lock:
            try:
                fd = self._open()
                os.write(fd, data)
                self._failed = False
            except OSError as exc:
                if not self._failed:  # once per outage, not once per message
                    log.error("audit trail %s cannot be written: %s", self.path, exc)
                self._failed = True
                self._close_file()
        if self.syslog is not None:
            self.syslog.put(line)

    def _open(self) -> int:
        try:
            st = os.stat(self.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if self._fd is not None and current == self._inode:
            return self._fd
        self._close_file()  # rotated away or never opened
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        st = os.fstat(self._fd)
        self._inode = (st.st_dev, st.st_ino)
        return self._fd

    def _close_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None
        self._inode = None

    def application(self, started: bool) -> None:
        """Application Activity: this role started or stops."""
        self.emit(
            APPLICATION_ACTIVITY,
            action=EXECUTE,
            outcome=SUCCESS,
            event_types=[APPLICATION_START if started else APPLICATION_STOP],
            participants=[self.node(requestor=False, role=APPLICATION)],
        )

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """A role's life: Application Start now, Application Stop and :meth:`close` at the end."""
        self.application(started=True)
        try:
            yield
        finally:
            self.application(started=False)
            self.close()

    def close(self, timeout_s: float = 2.0) -> None:
        if self.syslog is not None:
            self.syslog.close(timeout_s)
        with self._lock:
            self._close_file()

    # -- the events -----------------------------------------------------------------------

    def association_refused(self, calling: str, called: str, address: str, reason: str) -> None:
        """Security Alert (A.5.3.11): a node failed to authenticate (refused association)."""
        self.emit(
            SECURITY_ALERT,
            action=EXECUTE,
            outcome=MINOR_FAILURE,
            event_types=[NODE_AUTHENTICATION],
            description=reason,
            participants=[
                Participant(calling or "?", True, None, address=address),
                self.node(requestor=False, role=None),
            ],
            objects=[
                ObjectRecord(
                    f"dicom://{address}/{calling}" if address else calling,
                    NODE_ID,
                    type_code=SYSTEM_OBJECT,
                    role=ROLE_SECURITY_RESOURCE,
                    details=(("Alert Description", reason.encode("utf-8")),),
                )
            ],
        )

    def login_failed(self, address: str, reason: str, path: str) -> None:
        """User Authentication (A.5.3.12): an HTTP request without the right bearer token."""
        self.emit(
            USER_AUTHENTICATION,
            action=EXECUTE,
            outcome=MINOR_FAILURE,
            event_types=[LOGIN],
            description=f"{reason} for {path[:200]}",
            participants=[
                Participant(f"http client {address}", True, None, address=address),
                self.node(requestor=False, role=None),
            ],
        )

    def transferred(
        self,
        studies: Iterable[StudyRecord],
        *,
        action: str,
        source: Participant,
        destination: Participant,
        others: Sequence[Participant] = (),
        problem: str = "",
        note: str = "",
    ) -> None:
        """DICOM Instances Transferred (A.5.3.5): one message per study (one patient each);
        *problem* makes every one a minor failure saying so, *note* is said on success."""
        for study in studies:
            failed = study.refused > 0 or bool(problem)
            description = problem or note
            if study.refused:
                why = "; ".join(study.reasons)[:500]
                description = f"{study.refused} of {study.refused + study.count} refused: {why}"
            if not study.count and not failed:
                continue
            self.emit(
                INSTANCES_TRANSFERRED,
                action=action,
                outcome=MINOR_FAILURE if failed else SUCCESS,
                description=description,
                participants=[source, destination, *others],
                objects=[study_object(study), patient_object(study)],
            )

    def query(
        self,
        requestor: Participant,
        *,
        sop_class: str,
        query: bytes,
        transfer_syntax: str = "",
        outcome: str = SUCCESS,
        description: str = "",
    ) -> None:
        """Query (A.5.3.10): C-FIND (the identifier, encoded) or QIDO-RS (the URL)."""
        details: tuple[tuple[str, bytes], ...] = ()
        if transfer_syntax:
            details = (("TransferSyntax", transfer_syntax.encode("ascii")),)
        self.emit(
            QUERY,
            action=EXECUTE,
            outcome=outcome,
            description=description,
            participants=[
                Participant(
                    requestor.user_id,
                    True,
                    SOURCE,
                    address=requestor.address,
                    user_name=requestor.user_name,
                ),
                self.node(requestor=False, role=DESTINATION),
            ],
            objects=[
                ObjectRecord(
                    sop_class or "QIDO-RS",
                    SOP_CLASS_UID if sop_class else URI,
                    type_code=SYSTEM_OBJECT,
                    role=ROLE_QUERY,
                    query=query,
                    details=details,
                )
            ],
        )

    def analysed(
        self,
        study: StudyRecord,
        outputs: dict[str, list[str]],
        *,
        model_name: str,
        model_version: str,
        weights_sha256: str,
        outcome: str = SUCCESS,
        description: str = "",
    ) -> None:
        """AI Analysis (this node's extension): the model, what it read, what it made."""
        made = StudyRecord(study.study_uid, accession=study.accession)
        for sop_class, uids in outputs.items():
            for uid in uids:
                made.add(sop_class, uid)
        details = [
            ("Version", model_version.encode("utf-8")),
            ("WeightsSHA256", weights_sha256.encode("ascii")),
        ]
        self.emit(
            AI_ANALYSIS,
            action=EXECUTE,
            outcome=outcome,
            description=description,
            participants=[self.node(requestor=True, role=APPLICATION)],
            objects=[
                ObjectRecord(
                    model_name,
                    MODEL,
                    type_code=SYSTEM_OBJECT,
                    role=ROLE_PROCESSING,
                    name=model_name,
                    details=tuple(details),
                ),
                study_object(study, list_instances=True, life_cycle=LIFE_ACCESS_USE),
                *(
                    [study_object(made, list_instances=True, life_cycle=LIFE_CREATION)]
                    if outputs
                    else []
                ),
                patient_object(study),
            ],
        )


def from_dataset(ds: Dataset) -> StudyRecord:
    """A :class:`StudyRecord` (no instances yet) from a data set's patient and study."""
    return StudyRecord(
        str(ds.get("StudyInstanceUID", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        patient_name=str(ds.get("PatientName", "") or ""),
        accession=str(ds.get("AccessionNumber", "") or ""),
    )


# -- syslog over TLS -------------------------------------------------------------------------

FACILITY_AUTHPRIV, SEVERITY_NOTICE = 10, 5
MSGID = "IHE+RFC-3881"


def syslog_frame(xml: str, *, app_name: str, hostname: str, procid: int, when: datetime) -> bytes:
    """One RFC 5424 message carrying *xml*, framed by octet counting (RFC 5425 4.3)."""
    stamp = when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    header = (
        f"<{FACILITY_AUTHPRIV * 8 + SEVERITY_NOTICE}>1 {stamp} {_printable(hostname, 255)} "
        f"{_printable(app_name, 48)} {procid} {MSGID} - "
    )
    body = header.encode("ascii") + b"\xef\xbb\xbf" + xml.encode("utf-8")
    return str(len(body)).encode("ascii") + b" " + body


def _printable(value: str, limit: int) -> str:
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


class SyslogTls:
    """Sends messages to a syslog collector over TLS from a thread of its own.

    The collector's certificate is checked against *ca_file* (and its name against *host*); the
    node presents *cert_file* when given. Unreachable: the messages wait in a bounded queue
    (the oldest are dropped when it is full, counted and logged) and the connection is tried
    again with a growing pause.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca_file: Path,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        max_queue: int = 10_000,
        app_name: str = "pacs-node",
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.host, self.port = host, port
        self.app_name = app_name
        self.hostname = socket.gethostname()
        self.connect_timeout_s = connect_timeout_s
        self.context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file is not None:
            self.context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        self.queue: queue.Queue[str | None] = queue.Queue(maxsize=max_queue)
        self.dropped = 0
        self.sent = 0
        self._count_lock = threading.Lock()
        self._sock: ssl.SSLSocket | None = None
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def put(self, line: str) -> None:
        while True:
            try:
                self.queue.put_nowait(line)
                return
            except queue.Full:
                try:
                    self.queue.get_nowait()  # the file has it; the collector loses the oldest
                    with self._count_lock:
                        self.dropped += 1
                        dropped = self.dropped
                    if dropped in (1, 10, 100) or dropped % 1000 == 0:
                        log.warning(
                            "audit syslog %s:%d: %d messages dropped (queue full)",
                            self.host,
                            self.port,
                            dropped,
                        )
                except queue.Empty:
                    pass

    def close(self, timeout_s: float = 2.0) -> None:
        """Send what is queued (for up to *timeout_s*), then stop."""
        with contextlib.suppress(queue.Full):
            self.queue.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)
        self._disconnect()

    def _run(self) -> None:
        pause = 0.5
        pending: str | None = None
        while True:
            if pending is None:
                pending = self.queue.get()
                if pending is None:
                    return
            try:
                sock = self._connect()
                frame = syslog_frame(
                    pending,
                    app_name=self.app_name,
                    hostname=self.hostname,
                    procid=os.getpid(),
                    when=datetime.now(UTC),
                )
                sock.sendall(frame)
                self.sent += 1
                pending = None
                pause = 0.5
                if self._down_since is not None:
                    log.info("audit syslog %s:%d reachable again", self.host, self.port)
                    self._down_since = None
            except (OSError, ssl.SSLError) as exc:
                self._disconnect()
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning(
                        "audit syslog %s:%d unreachable (%s); messages wait in the queue",
                        self.host,
                        self.port,
                        exc,
                    )
                time.sleep(pause)
                pause = min(pause * 2, 30.0)

    def _connect(self) -> ssl.SSLSocket:
        if self._sock is not None and self._closed_by_peer(self._sock):
            self._disconnect()  # a write to it would seem to succeed, and the message be lost
        if self._sock is None:
            raw = socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = self.context.wrap_socket(raw, server_hostname=self.host)
        return self._sock

    def _closed_by_peer(self, sock: ssl.SSLSocket) -> bool:
        """Whether the collector has closed the connection (it never sends anything else)."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable and not sock.pending():
                return False
            sock.settimeout(0.2)
            try:
                return sock.recv(4096) == b""
            finally:
                sock.settimeout(self.connect_timeout_s)  # a stalled collector fails a send
        except (ssl.SSLWantReadError, TimeoutError):
            return False
        except (OSError, ValueError):
            return True

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None


def studies_of(subjects: Iterable[Subject]) -> list[StudyRecord]:
    """One :class:`StudyRecord` per study of *subjects* (``storage.query.Subject`` rows)."""
    studies: dict[str, StudyRecord] = {}
    for s in subjects:
        record = studies.get(s.study_instance_uid)
        if record is None:
            record = studies[s.study_instance_uid] = StudyRecord.of(s)
        record.tally(s.sop_class_uid)
    return list(studies.values())
