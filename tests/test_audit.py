"""The audit trail (issue 12, item 5): DICOM PS3.15 A.5 messages for what the node does, each
valid against the Standard's schema (tests/audit_message.rng, read by lxml's RELAX NG), written to
a file one message a line and sent to a real rsyslog over TLS (RFC 5425)."""

from __future__ import annotations

import base64
import io
import logging
import os
import shutil
import signal
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
from lxml import etree
from pydicom.uid import generate_uid
from sqlalchemy import select

from ai.runtime import weights_sha256
from pacs_node import audit
from pacs_node.config import AuditSettings, Peer, WebSettings, load
from storage.models import Result
from tests import scu
from tests.conftest import CR_CHEST, CT_SERIES, DICOM, make_config
from tests.orthanc import StoreScp, dcmtk_available, free_port, port_open, wait_for
from tests.test_web import request

SCHEMA = etree.RelaxNG(etree.parse(str(Path(__file__).with_name("audit_message.rng"))))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def messages(path: Path) -> list[Any]:
    """Every line of the audit file, parsed and checked against the schema."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        doc = etree.fromstring(line.encode("utf-8"))
        assert SCHEMA.validate(doc), f"line {number}: {SCHEMA.error_log.last_error}\n{line}"
        out.append(doc)
    return out


def event(doc: Any) -> str:
    return str(doc.find("EventIdentification/EventID").get("csd-code"))


def of(docs: list[Any], code: str, **attrs: str) -> list[Any]:
    """The messages of event *code* whose EventIdentification has *attrs*."""
    found = [d for d in docs if event(d) == code]
    return [
        d for d in found if all(d.find("EventIdentification").get(k) == v for k, v in attrs.items())
    ]


def participants(doc: Any) -> dict[str, Any]:
    return {p.get("UserID"): p for p in doc.findall("ActiveParticipant")}


def objects(doc: Any) -> dict[str, Any]:
    return {
        o.find("ParticipantObjectIDTypeCode").get("csd-code"): o
        for o in doc.findall("ParticipantObjectIdentification")
    }


def test_the_schema_is_not_a_rubber_stamp():
    """The validator refuses what the Standard's schema refuses."""
    good = audit.message(
        audit.QUERY,
        action=audit.EXECUTE,
        outcome=audit.SUCCESS,
        participants=[audit.Participant("PACS", True, audit.SOURCE, address="127.0.0.1")],
        source=audit.Source("AINODE"),
    )
    assert SCHEMA.validate(etree.fromstring(good))
    for bad in (
        good.replace('EventOutcomeIndicator="0"', 'EventOutcomeIndicator="3"'),
        good.replace("<ActiveParticipant", "<Participant").replace(
            "</ActiveParticipant", "</Participant"
        ),
        good.replace(' UserIsRequestor="true"', ""),
    ):
        assert not SCHEMA.validate(etree.fromstring(bad)), bad


def test_what_the_node_does_is_audited_and_only_there_are_patients_named(
    start_node, tmp_path, caplog
):
    """Refused association, instances stored (C-STORE, STOW-RS), queries (C-FIND, QIDO-RS),
    retrieve (WADO-RS), the AI analysis with the model's weights, results exported; one file,
    every line valid. The ordinary log names no patient."""
    if not dcmtk_available("storescp"):
        if IN_CI:
            pytest.fail("dcmtk must be installed in CI")
        pytest.skip("needs dcmtk")
    caplog.set_level(logging.DEBUG)
    source = pydicom.dcmread(CR_CHEST)
    source.PatientID, source.PatientName = "PAT-AUDIT-7", "Audit^Jane"
    source.save_as(tmp_path / "cr.dcm", enforce_file_format=True)
    with StoreScp(tmp_path / "received") as scp:
        peers = (Peer("STORESCP", "127.0.0.1", scp.port),)
        config = make_config(tmp_path, peers=peers, accept_unknown_peers=False)
        node = start_node(replace(config, web=WebSettings(port=0)), web=True)
        assert not scu.association_accepted(node.port, calling="STRANGER")
        assert scu.store(node.port, [tmp_path / "cr.dcm"], calling="STORESCP")[0].Status == 0
        matches, _ = scu.find(
            node.port,
            scu.query("STUDY", StudyInstanceUID="", PatientID="PAT-AUDIT-7"),
            calling="STORESCP",
        )
        assert len(matches) == 1
        assert node.run_pending() == 1
        wait_for(lambda: len(scp.received()) == 3, timeout_s=20, what="results at storescp")
    study = str(source.StudyInstanceUID)
    url = node.web.url
    assert request(url, "/dicomweb/studies?PatientID=PAT-AUDIT-7")[0] == 200
    assert request(url, f"/dicomweb/studies/{study}/metadata")[0] == 200
    ct = pydicom.dcmread(CT_SERIES[0])
    ct.PatientID, ct.PatientName = "PAT-STOW-8", "Stow^Sam"
    ct.SOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ct.save_as(buffer, enforce_file_format=True)
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + buffer.getvalue() + b"\r\n--b--\r\n"
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    assert request(url, "/dicomweb/studies", method="POST", headers=headers, body=body)[0] == 200
    trail = node.config.node.storage_dir / "audit" / "audit.log"

    def has_all() -> list[Any] | None:
        docs = messages(trail)
        return docs if len(of(docs, "110104")) >= 4 else None

    docs = wait_for(has_all, timeout_s=10, what="the audit messages")

    (alert,) = of(docs, "110113")  # Security Alert: the stranger's association
    assert alert.find("EventIdentification/EventTypeCode").get("csd-code") == "110126"
    assert participants(alert)["STRANGER"].get("NetworkAccessPointID") == "127.0.0.1"

    (stored,) = [
        d for d in of(docs, "110104", EventActionCode="C") if "STORESCP" in participants(d)
    ]
    assert participants(stored)["STORESCP"].get("UserIsRequestor") == "true"
    patient = objects(stored)["2"]
    assert patient.get("ParticipantObjectID") == "PAT-AUDIT-7"
    assert patient.find("ParticipantObjectName").text == "Audit^Jane"
    sop = objects(stored)["110180"].find("ParticipantObjectDescription/SOPClass")
    assert (sop.get("UID"), sop.get("NumberOfInstances")) == (str(source.SOPClassUID), "1")

    find, qido = sorted(of(docs, "110112"), key=lambda d: "STORESCP" not in participants(d))
    asked = pydicom.dcmread(
        io.BytesIO(base64.b64decode(objects(find)["110181"].find("ParticipantObjectQuery").text)),
        force=True,
    )
    assert asked.PatientID == "PAT-AUDIT-7"
    url_asked = base64.b64decode(objects(qido)["12"].find("ParticipantObjectQuery").text)
    assert url_asked == b"/dicomweb/studies?PatientID=PAT-AUDIT-7"

    (analysis,) = of(docs, "AI-ANALYSIS", EventOutcomeIndicator="0")
    model = objects(analysis)["AI-MODEL"]
    details = {
        d.get("type"): base64.b64decode(d.get("value")).decode()
        for d in model.findall("ParticipantObjectDetail")
    }
    assert details["WeightsSHA256"] == weights_sha256("cxr")
    assert details["Version"] and model.get("ParticipantObjectID") == "cxr"
    studies = analysis.findall(
        "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='3']"
    )
    lifecycle = {o.get("ParticipantObjectDataLifeCycle"): o for o in studies}
    inputs = {i.get("UID") for i in lifecycle["6"].iter("Instance")}
    outputs = {i.get("UID") for i in lifecycle["1"].iter("Instance")}
    assert inputs == {str(source.SOPInstanceUID)}
    with node.db.read() as session:
        result = session.scalars(select(Result)).one()
    assert outputs == {result.sr_sop_instance_uid, *result.sc_sop_instance_uids}

    read = of(docs, "110104", EventActionCode="R")
    exported = [d for d in read if "STORESCP" in participants(d)]
    assert len(exported) == 1  # the SR, the SC and the Parametric Map went to STORESCP
    exported_sop = objects(exported[0])["110180"].findall("ParticipantObjectDescription/SOPClass")
    assert sum(int(s.get("NumberOfInstances")) for s in exported_sop) == 3
    wado = [d for d in read if any(u.startswith("http client") for u in participants(d))]
    assert objects(wado[0])["110180"].get("ParticipantObjectID") == study
    (stow,) = [d for d in of(docs, "110104", EventActionCode="C") if d not in (stored,)]
    assert objects(stow)["2"].get("ParticipantObjectID") == "PAT-STOW-8"

    # the node's own log lines (the test's SCU dumps what it sends at DEBUG; not the node's)
    own = [r for r in caplog.records if r.name.split(".")[0] in ("pacs_node", "storage", "ai")]
    assert len(own) >= 5
    logged = "\n".join(r.getMessage() for r in own)
    for identity in ("PAT-AUDIT-7", "Audit^Jane", "PAT-STOW-8", "Stow^Sam"):
        assert identity not in logged


def test_a_refused_query_is_audited_as_a_failure(start_node):
    """pynetdicom closes the handler after a failure status: the outcome is kept anyway."""
    node = start_node()
    _, final = scu.find(node.port, scu.query("NOT-A-LEVEL", PatientID=""))
    assert final.Status == 0xA900
    matches, _ = scu.find(node.port, scu.query("STUDY", StudyInstanceUID=""))
    docs = of(messages(node.config.node.storage_dir / "audit" / "audit.log"), "110112")
    outcomes = [
        (d.find("EventIdentification").get("EventOutcomeIndicator"),
         d.find("EventIdentification/EventOutcomeDescription").text)
        for d in docs
    ]  # fmt: skip
    assert outcomes[0][0] == "4" and "QueryRetrieveLevel" in outcomes[0][1]
    assert outcomes[1] == ("0", f"{len(matches)} matches")


def test_a_peer_value_that_is_not_xml_text_still_gives_valid_xml():
    line = audit.message(
        audit.QUERY,
        action=audit.EXECUTE,
        outcome=audit.SUCCESS,
        participants=[audit.Participant("PA\x01CS", True, address="127.0.0.1")],
        source=audit.Source("AINODE"),
        objects=[
            audit.study_object(
                audit.StudyRecord("1.2\x02.3", counts={"1.2.840\x00.1": 1}, accession="A\x1b1")
            )
        ],
        description="bad \x07 bytes",
    )
    assert SCHEMA.validate(etree.fromstring(line.encode()))


def test_a_skipped_series_is_audited_with_the_model_and_its_reason(start_node):
    """An analysis the model declines (a leg radiograph for the chest model) is in the trail:
    minor failure, the reason, the not-analysed report as its output."""
    node = start_node()
    leg = DICOM / "compressed" / "pydicom_data__RG3_J2KR.dcm"
    assert scu.store(node.port, [leg])[0].Status == 0
    node.run_pending()
    docs = messages(node.config.node.storage_dir / "audit" / "audit.log")
    (analysis,) = of(docs, "AI-ANALYSIS", EventOutcomeIndicator="4")
    assert (
        "body part EXTREMITY" in analysis.find("EventIdentification/EventOutcomeDescription").text
    )
    assert objects(analysis)["AI-MODEL"].get("ParticipantObjectID") == "cxr"
    made = analysis.find(
        "ParticipantObjectIdentification[@ParticipantObjectDataLifeCycle='1']"
        "/ParticipantObjectDescription/SOPClass"
    )
    assert made.get("UID") == "1.2.840.10008.5.1.4.1.1.88.33"  # the not-analysed SR


def test_the_file_is_reopened_after_rotation_and_a_failing_file_never_raises(tmp_path, caplog):
    config = make_config(tmp_path)
    config = replace(config, audit=AuditSettings(file=tmp_path / "a" / "audit.log"))
    trail = audit.AuditTrail(config, "receive")
    trail.application(started=True)
    (tmp_path / "a" / "audit.log").rename(tmp_path / "a" / "audit.log.1")  # logrotate
    trail.application(started=False)
    assert len(messages(tmp_path / "a" / "audit.log.1")) == 1
    assert len(messages(tmp_path / "a" / "audit.log")) == 1
    shutil.rmtree(tmp_path / "a")
    (tmp_path / "a").write_text("a file where the folder was")  # unwritable trail
    for _ in range(3):
        trail.application(started=True)  # logged once, never raised
    assert sum("cannot be written" in r.getMessage() for r in caplog.records) == 1
    trail.close()


def test_audit_config_is_checked(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    ok = tmp_path / "ok.toml"
    ok.write_text(
        '[audit]\nfile = "trail/audit.log"\nsyslog_host = "127.0.0.1"\n'
        'syslog_ca_file = "ca.pem"\nsource_id = "NODE-1"\n'
    )
    settings = load(ok).audit
    assert settings.file == tmp_path / "trail" / "audit.log"
    assert settings.syslog_port == 6514 and settings.source_id == "NODE-1"
    for text, why in (
        ('[audit]\nsyslog_host = "127.0.0.1"\n', "syslog_ca_file: required"),
        ('[audit]\nsyslog_host = "h"\nsyslog_ca_file = "nope.pem"\n', "no such file"),
        ('[audit]\nsyslog_cert_file = "ca.pem"\n', "give both or neither"),
        ('[audit]\nsource_id = "a b"\n', "no spaces"),
        ("[audit]\nenabled = 1\n", "audit.enabled"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(Exception, match=why):
            load(bad)


# -- syslog over TLS, to a real rsyslog ---------------------------------------------------------

RSYSLOG = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


def _rsyslog_conf(folder: Path, port: int, pki: Path) -> Path:
    conf = folder / "rsyslog.conf"
    conf.write_text(
        f'global(workDirectory="{folder}" maxMessageSize="64k"\n'
        f'  DefaultNetstreamDriver="gtls"\n'
        f'  DefaultNetstreamDriverCAFile="{pki / "ca.pem"}"\n'
        f'  DefaultNetstreamDriverCertFile="{pki / "server.pem"}"\n'
        f'  DefaultNetstreamDriverKeyFile="{pki / "server.key"}")\n'
        'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"'
        ' StreamDriver.AuthMode="anon")\n'
        f'input(type="imtcp" address="127.0.0.1" port="{port}")\n'
        'template(name="audit" type="string"'
        ' string="%pri% %app-name% %msgid% %msg:::drop-last-lf%\\n")\n'
        f'action(type="omfile" file="{folder / "received.log"}" template="audit")\n'
    )
    return conf


class Rsyslog:
    def __init__(self, folder: Path, port: int, pki: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port = folder, port
        self.conf = _rsyslog_conf(folder, port, pki)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Rsyslog:
        self.proc = subprocess.Popen(
            [RSYSLOG, "-n", "-f", str(self.conf), "-i", str(self.folder / "rsyslog.pid")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "rsyslog.err", "wb"),  # noqa: SIM115
        )
        wait_for(
            lambda: port_open(self.port), timeout_s=20, interval_s=0.1, what="rsyslog to listen"
        )
        return self

    def lines(self) -> list[str]:
        path = self.folder / "received.log"
        return path.read_text(encoding="utf-8").splitlines() if path.exists() else []

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)


def _syslog_node(start_node, tmp_path: Path, ca_file: Path):
    """A node that knows only PACS and sends its audit trail to a syslog port on 127.0.0.1
    (nothing listens yet), trusting *ca_file*: (node, port)."""
    if not Path(RSYSLOG).exists():
        if IN_CI:
            pytest.fail("rsyslog (with rsyslog-gnutls) must be installed in CI")
        pytest.skip("needs rsyslog and rsyslog-gnutls")
    port = free_port()
    settings = AuditSettings(syslog_host="127.0.0.1", syslog_port=port, syslog_ca_file=ca_file)
    config = make_config(tmp_path, peers=(Peer("PACS", "127.0.0.1", 104),))
    node = start_node(
        replace(config, audit=settings, node=replace(config.node, accept_unknown_peers=False))
    )
    return node, port


def test_messages_reach_a_tls_syslog_collector_even_one_that_starts_late(start_node, tmp_path, pki):
    """rsyslog (imtcp with the gtls driver, octet-counted frames) receives each message whole:
    facility authpriv, severity notice, MSGID IHE+RFC-3881; a message recorded while the
    collector was down arrives once it is up (the file had it all along)."""
    node, port = _syslog_node(start_node, tmp_path, pki / "ca.pem")
    assert not scu.association_accepted(node.port, calling="EARLY")  # collector not up yet
    with Rsyslog(tmp_path / "rsyslog", port, pki) as collector:
        assert not scu.association_accepted(node.port, calling="LATE")

        def both() -> list[str] | None:
            got = [line for line in collector.lines() if "110113" in line]
            return got if len(got) == 2 else None

        got = wait_for(both, timeout_s=40, what="both alerts at rsyslog")
    # the collector restarts: the node finds its connection closed and connects again
    with Rsyslog(tmp_path / "rsyslog", port, pki) as collector:
        assert not scu.association_accepted(node.port, calling="AGAIN")
        wait_for(
            lambda: any("AGAIN" in line for line in collector.lines()),
            timeout_s=40,
            what="the alert sent after the collector restarted",
        )
    for line in got:
        pri, app, msgid, xml = line.split(" ", 3)
        assert (pri, app, msgid) == ("85", "pacs-node-node", "IHE+RFC-3881")
        doc = etree.fromstring(xml.lstrip("\ufeff").encode("utf-8"))
        assert SCHEMA.validate(doc), SCHEMA.error_log.last_error
    callers = [set(participants(etree.fromstring(g.split(" ", 3)[3].lstrip("\ufeff").encode())))
               for g in got]  # fmt: skip
    assert {"EARLY", "LATE"} == {c for caller in callers for c in caller if c != "AINODE"}
    assert len(of(messages(node.config.node.storage_dir / "audit" / "audit.log"), "110113")) == 3


def test_a_collector_with_an_untrusted_certificate_gets_nothing(start_node, tmp_path, pki):
    """The node checks the collector's certificate: one the CA did not sign gets no message
    (the node says why in its log); the file still has every message."""
    node, port = _syslog_node(start_node, tmp_path, pki / "stranger.pem")
    with Rsyslog(tmp_path / "rsyslog", port, pki) as collector:
        assert not scu.association_accepted(node.port, calling="NOSY")
        trail = node.config.node.storage_dir / "audit" / "audit.log"
        wait_for(lambda: of(messages(trail), "110113"), timeout_s=10, what="the alert on file")
        syslog = node.trail.syslog
        assert syslog is not None
        wait_for(lambda: syslog._down_since is not None, timeout_s=10, what="a failed handshake")
        assert not collector.lines() and syslog.sent == 0
