"""The C-FIND responses the node writes itself (pacs_node/fastfind.py, issue 9) are byte for
byte what pynetdicom would send: the identifiers of real queries over real studies, the command
set, the P-DATA-TF PDUs with and without fragmentation; and an SCU whose maximum PDU forces
fragments gets the same matches over a real association."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from pacs_node import fastfind
from pacs_node.handlers import _is_ascii
from storage import query
from tests import scu
from tests.conftest import CR_CHEST, CT_SERIES, DICOM

QUERIES = [
    ("STUDY", dict(PatientName="", PatientID="", StudyDate="", StudyTime="", AccessionNumber="",
                   StudyInstanceUID="", ModalitiesInStudy="", NumberOfStudyRelatedInstances="",
                   NumberOfStudyRelatedSeries="", StudyDescription="", PatientBirthDate="",
                   PatientSex="", ReferringPhysicianName="", StudyID="")),
    ("SERIES", dict(StudyInstanceUID="", SeriesInstanceUID="", Modality="", SeriesNumber="",
                    SeriesDescription="", NumberOfSeriesRelatedInstances="", BodyPartExamined="")),
    ("IMAGE", dict(StudyInstanceUID="", SeriesInstanceUID="", SOPInstanceUID="", SOPClassUID="",
                   InstanceNumber="", Rows=None, Columns=None, ContentDate="")),
]  # fmt: skip


@pytest.fixture
def stored(start_node, tmp_path):
    """A node holding a CR, CT slices, an SR, and a study whose patient has a non-ASCII name."""
    node = start_node()
    files = [CR_CHEST, *CT_SERIES[:3], *sorted((DICOM / "sr").glob("*.dcm"))[:2]]
    named = pydicom.dcmread(CR_CHEST)
    named.PatientName, named.PatientID = "Müller^Zoë", "PID-Ü"
    named.SpecificCharacterSet = "ISO_IR 192"
    named.StudyInstanceUID, named.SeriesInstanceUID = generate_uid(), generate_uid()
    named.SOPInstanceUID = generate_uid()
    named.save_as(tmp_path / "named.dcm", enforce_file_format=True)
    files.append(tmp_path / "named.dcm")
    statuses = [s.Status for s in scu.store(node.port, files)]
    assert statuses == [0] * len(files)
    return node


def _responses(node) -> list[Dataset]:
    """The identifiers the C-FIND handler sends (its character set rule applied)."""
    out = []
    with node.db.read() as session:
        for level, keys in QUERIES:
            for match in query.find(session, scu.query(level, **keys)):
                if "SpecificCharacterSet" not in match and not _is_ascii(match):
                    match.SpecificCharacterSet = "ISO_IR 192"
                out.append(match)
    return out


def test_identifiers_are_encoded_as_pydicom_encodes_them(stored):
    responses = _responses(stored)
    assert len(responses) >= 10
    assert any("ISO_IR 192" in str(r.get("SpecificCharacterSet", "")) for r in responses)
    for ds in responses:
        for implicit in (True, False):
            assert fastfind.encode_flat(ds, implicit) == encode(ds, implicit, True), ds


def test_a_sequence_is_left_to_pydicom():
    ds = Dataset()
    ds.PatientID = "P1"
    ds.ReferencedSeriesSequence = [Dataset()]
    with pytest.raises(fastfind.NotFlat):
        fastfind.encode_flat(ds, True)


@pytest.mark.parametrize("max_pdu", [0, 64, 200, 16384])
@pytest.mark.parametrize("status", [0xFF00, 0xFF01])
def test_the_pdus_are_the_ones_pynetdicom_sends(stored, max_pdu, status):
    for ds in _responses(stored)[:5]:
        identifier = encode(ds, True, True)
        primitive = C_FIND()
        primitive.MessageIDBeingRespondedTo = 7
        primitive.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
        primitive.Status = status
        primitive.Identifier = __import__("io").BytesIO(identifier)
        message = C_FIND_RSP()
        message.primitive_to_message(primitive)
        expected = b""
        for pdata in message.encode_msg(3, max_pdu):
            pdu = P_DATA_TF()
            pdu.from_primitive(pdata)
            expected += pdu.encode()
        command = fastfind.command_set(str(StudyRootQueryRetrieveInformationModelFind), 7, status)
        assert fastfind.pdus(3, command, identifier, max_pdu) == expected


def test_a_small_maximum_pdu_gets_fragments_and_the_same_matches(stored):
    """An SCU that takes PDUs of at most 256 bytes: the identifiers arrive in fragments, the
    same as an SCU with the default maximum receives; the Patient Root model too."""
    identifier = scu.query("STUDY", **QUERIES[0][1])

    def matches(max_pdu: int, model: str) -> list[Dataset]:
        ae = AE(ae_title="SMALLPDU")
        ae.maximum_pdu_size = max_pdu
        ae.add_requested_context(model)
        assoc = ae.associate("127.0.0.1", stored.port, ae_title="AINODE")
        assert assoc.is_established
        try:
            found = [i for s, i in assoc.send_c_find(identifier, model) if s.Status == 0xFF00]
        finally:
            assoc.release()
        return sorted(found, key=lambda d: d.StudyInstanceUID)

    small = matches(256, StudyRootQueryRetrieveInformationModelFind)
    default = matches(16384, StudyRootQueryRetrieveInformationModelFind)
    assert len(small) == len(default) >= 3
    assert [encode(d, True, True) for d in small] == [encode(d, True, True) for d in default]
    assert any(d.PatientName == "Müller^Zoë" for d in small)
    identifier.QueryRetrieveLevel = "PATIENT"
    patients = matches(256, PatientRootQueryRetrieveInformationModelFind)
    assert {str(d.PatientID) for d in patients} >= {"PID-Ü"}


def test_a_peer_that_stops_reading_ends_the_send_at_the_deadline():
    """A real socket pair whose far end never reads: the send gives up after the deadline
    (the handler then aborts the association) instead of holding its thread and its database
    read forever; a far end that reads, slowly, gets every byte exactly once."""
    import socket
    import threading
    import time

    near, far = socket.socketpair()
    near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        start = time.monotonic()
        with pytest.raises(fastfind.SendFailed, match="took no data"):
            fastfind.send_within(near, b"x" * (8 << 20), timeout_s=1.0)
        assert time.monotonic() - start < 10
    finally:
        near.close()
        far.close()
    near, far = socket.socketpair()
    payload = bytes(range(256)) * 4096  # 1 MiB
    got = bytearray()

    def read_slowly() -> None:
        while len(got) < len(payload):
            chunk = far.recv(65536)
            if not chunk:
                return
            got.extend(chunk)
            time.sleep(0.001)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    near.settimeout(0.0)  # whatever mode the DUL thread left the socket in
    fastfind.send_within(near, payload, timeout_s=5.0)
    reader.join(timeout=30)
    near.close()
    far.close()
    assert bytes(got) == payload


def test_values_the_fast_encoder_cannot_write_go_to_pydicom():
    ds = Dataset()
    ds.PatientID = "P1"
    ds.BodyPartExamined = "CHÈST"  # not ASCII, and no character set says which
    with pytest.raises(fastfind.NotFlat):
        fastfind.encode_flat(ds, True)
    ds = Dataset()
    ds.add_new(0x00280010, "US", 70000)  # Rows out of range for US
    with pytest.raises(fastfind.NotFlat):
        fastfind.encode_flat(ds, True)
