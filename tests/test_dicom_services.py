"""C-ECHO, C-STORE and C-FIND over real associations on loopback, with pynetdicom and dcmtk."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from sqlalchemy import select, text

from pacs_node import statuses
from pacs_node.config import Peer
from storage.models import Instance, Job, Series, TaskState
from tests import scu
from tests.conftest import CR_CHEST, CT_SERIES, DICOM, make_config
from tests.orthanc import DCMTK, dcmtk_available, dcmtk_env, findscu

# The Leadtools RLE file has an empty SOP Instance UID: no SCU can send it (the C-STORE request
# needs one); the node's answer to a data set without one is tested below.
COMPRESSED = sorted(
    p for p in (DICOM / "compressed").glob("*.dcm") if "leadtools-flowers" not in p.name
)


def _jobs(node, series_uid: str) -> list[Job]:
    with node.db.read() as session:
        return list(
            session.scalars(
                select(Job).join(Series).where(Series.series_instance_uid == series_uid)
            ).all()
        )


def test_echo_with_dcmtk(start_node):
    if not dcmtk_available("echoscu"):
        pytest.skip("dcmtk not installed")
    node = start_node()
    run = subprocess.run(
        [DCMTK["echoscu"], "-aec", "AINODE", "-aet", "ECHOER", "127.0.0.1", str(node.port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr


def test_store_every_transfer_syntax_is_durable_and_indexed(start_node):
    node = start_node()
    files = [*COMPRESSED, CR_CHEST, *sorted((DICOM / "sr").glob("*.dcm"))]
    answers = scu.store(node.port, files)
    repaired = []
    with node.db.read() as session:
        rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance)).all()}
    for path, answer in zip(files, answers, strict=True):
        sent = pydicom.dcmread(path)
        if "StudyInstanceUID" not in sent:  # two pydicom test files lack this Type 1 UID
            assert answer.Status == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
            assert answer.ErrorComment == "StudyInstanceUID is missing"
            assert str(sent.SOPInstanceUID) not in rows
            repaired.append(sent)
            continue
        assert answer.Status == statuses.SUCCESS, path.name
        row = rows[str(sent.SOPInstanceUID)]
        assert row.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID
        stored = pydicom.dcmread(node.files.abspath(row.path))
        assert stored.SOPInstanceUID == sent.SOPInstanceUID
        assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        if "PixelData" in sent and sent.file_meta.TransferSyntaxUID.is_encapsulated:
            assert stored.PixelData == sent.PixelData  # compressed pixels kept bit for bit
    assert not list((node.files.root / "tmp").iterdir()), "temporary files left behind"
    # the same two (JPEG-LS and HTJ2K) with their UIDs supplied are stored as they are
    assert {r.file_meta.TransferSyntaxUID.name for r in repaired} == {
        "JPEG-LS Lossless Image Compression",
        "High-Throughput JPEG 2000 Image Compression (Lossless Only)",
    }
    for n, ds in enumerate(repaired):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = f"1.2.826.0.1.{n}", f"1.2.826.0.1.{n}.1"
    assert [a.Status for a in scu.store(node.port, repaired)] == [statuses.SUCCESS] * 2
    with node.db.read() as session:
        assert (
            session.scalar(
                select(Instance).where(Instance.sop_instance_uid == str(repaired[0].SOPInstanceUID))
            )
            is not None
        )
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_received_data_sets_stream_into_the_storage_folder_not_the_system_temp(
    start_node, tmp_path, monkeypatch
):
    """pynetdicom alone streams each data set into the system temp folder (a copy per file
    where that is a tmpfs); the node streams into its storage folder's tmp/, so it stores
    with the system temp folder gone."""
    import tempfile

    node = start_node()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-temp-folder"))
    files = [CR_CHEST, *CT_SERIES[:3]]
    assert [a.Status for a in scu.store(node.port, files)] == [statuses.SUCCESS] * len(files)
    with node.db.read() as session:
        stored = {i.sop_instance_uid for i in session.scalars(select(Instance)).all()}
    assert stored == {str(pydicom.dcmread(path).SOPInstanceUID) for path in files}
    assert not list((node.files.root / "tmp").iterdir()), "temporary files left behind"


def test_store_with_storescu_and_skip_reasons(start_node):
    if not dcmtk_available("storescu"):
        pytest.skip("dcmtk not installed")
    node = start_node()
    sr = DICOM / "sr" / "highdicom__sr_document.dcm"
    seg = DICOM / "seg_with_ct" / "dcmqi__liver.dcm"
    mr = DICOM / "compressed" / "pydicom_wheel__MR_small_RLE.dcm"
    run = subprocess.run(
        [
            DCMTK["storescu"],
            "-aec",
            "AINODE",
            "-aet",
            "STORER",
            "-R",
            "-xr",
            "127.0.0.1",
            str(node.port),
            str(sr),
            str(seg),
            str(mr),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    node.run_pending()  # the SEG and MR jobs (no model) are skipped by the work role
    expectations = {
        sr: "not an image",
        seg: "no model for modality SEG",
        mr: "no model for modality MR",
    }
    for path, reason in expectations.items():
        jobs = _jobs(node, str(pydicom.dcmread(path).SeriesInstanceUID))
        assert [j.state for j in jobs] == [TaskState.SKIPPED]
        assert reason in jobs[0].last_error


def test_cr_is_queued_at_once_and_ct_after_quiet_period(start_node, tmp_path):
    from dataclasses import replace

    config = make_config(tmp_path)
    config = replace(config, worker=replace(config.worker, ct_quiet_period_s=3600))
    node = start_node(config)
    scu.store(node.port, [CR_CHEST, *CT_SERIES[:3]])
    cr_job = _jobs(node, str(pydicom.dcmread(CR_CHEST).SeriesInstanceUID))
    ct_jobs = _jobs(node, str(pydicom.dcmread(CT_SERIES[0]).SeriesInstanceUID))
    assert [j.state for j in cr_job] == [TaskState.QUEUED]
    assert len(ct_jobs) == 1, "each slice must push the same job back, not add one"
    assert (ct_jobs[0].not_before - cr_job[0].not_before).total_seconds() > 3500


def test_refuses_mismatched_and_invalid_uids(start_node):
    node = start_node()
    ds = pydicom.dcmread(CR_CHEST)
    ds.StudyInstanceUID = "1.2.3/../../etc"
    missing = pydicom.dcmread(CR_CHEST)
    missing.SOPInstanceUID = "1.2.3.4"
    missing.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    del missing.SeriesInstanceUID
    answers = scu.store(node.port, [ds, missing])
    assert answers[0].Status == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "StudyInstanceUID" in answers[0].ErrorComment
    assert answers[1].Status == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "SeriesInstanceUID is missing" in answers[1].ErrorComment
    assert not list(node.files.root.rglob("*.dcm")), "a refused instance must leave no file"


def test_unknown_calling_ae_is_refused(start_node, tmp_path):
    peers = (Peer("ORTHANC", "127.0.0.1", 4242),)
    node = start_node(make_config(tmp_path, peers=peers, accept_unknown_peers=False))
    assert scu.association_accepted(node.port, calling="ORTHANC")
    assert not scu.association_accepted(node.port, calling="STRANGER")


def test_cfind_finds_received_instances_at_each_level(start_node):
    node = start_node()
    scu.store(node.port, [CR_CHEST, *CT_SERIES[:5]])
    ct = pydicom.dcmread(CT_SERIES[0])
    studies, final = scu.find(
        node.port,
        scu.query(
            "STUDY",
            StudyInstanceUID="",
            PatientID=ct.PatientID,
            ModalitiesInStudy="",
            NumberOfStudyRelatedInstances="",
        ),
    )
    assert final.Status == statuses.SUCCESS
    assert [s.StudyInstanceUID for s in studies] == [ct.StudyInstanceUID]
    assert studies[0].ModalitiesInStudy == "CT"
    assert int(studies[0].NumberOfStudyRelatedInstances) == 5
    series, _ = scu.find(
        node.port,
        scu.query(
            "SERIES", StudyInstanceUID=ct.StudyInstanceUID, SeriesInstanceUID="", Modality="CT"
        ),
    )
    assert [s.SeriesInstanceUID for s in series] == [ct.SeriesInstanceUID]

    def image_level(**keys: object) -> list:
        found, _ = scu.find(
            node.port,
            scu.query(
                "IMAGE",
                StudyInstanceUID=ct.StudyInstanceUID,
                SeriesInstanceUID=ct.SeriesInstanceUID,
                SOPInstanceUID="",
                **keys,
            ),
        )
        return found

    images = image_level(Rows=None, Columns=None, ContentDate="")
    assert len(images) == 5
    # IMAGE-level keys from the stored headers (issue 10: they came back empty)
    assert {(int(i.Rows), int(i.Columns)) for i in images} == {(int(ct.Rows), int(ct.Columns))}
    assert {str(i.ContentDate) for i in images} == {str(ct.get("ContentDate", ""))}
    assert len(image_level(Rows=int(ct.Rows))) == 5


def test_cfind_with_findscu_wildcards_and_dates(start_node, tmp_path: Path):
    if not dcmtk_available("findscu"):
        pytest.skip("dcmtk not installed")
    node = start_node()
    scu.store(node.port, [CR_CHEST, CT_SERIES[0]])
    ct = pydicom.dcmread(CT_SERIES[0])
    output = findscu(
        node.port,
        "QueryRetrieveLevel=STUDY",
        f"PatientID={ct.PatientID[:4]}*",
        f"StudyDate={ct.StudyDate}-",
        "StudyInstanceUID",
        "ModalitiesInStudy",
    )
    assert ct.StudyInstanceUID in output
    assert str(pydicom.dcmread(CR_CHEST).StudyInstanceUID) not in output


def test_cfind_declares_utf8_when_a_match_is_not_ascii(start_node):
    node = start_node()
    ds = pydicom.dcmread(CR_CHEST)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen"
    assert scu.store(node.port, [ds])[0].Status == statuses.SUCCESS
    matches, _ = scu.find(node.port, scu.query("STUDY", StudyInstanceUID="", PatientName="M*"))
    assert [str(m.PatientName) for m in matches] == ["Müller^Jürgen"]
    assert matches[0].SpecificCharacterSet == "ISO_IR 192"


def test_cfind_says_when_it_cannot_match_on_a_key(start_node):
    """Issue 10: keys the node cannot match were ignored and it returned too much, with a plain
    Pending. Now every response carries 0xFF01 (optional keys not supported)."""
    node = start_node()
    scu.store(node.port, [CR_CHEST])
    plain, _ = scu.find(node.port, scu.query("STUDY", StudyInstanceUID=""))
    request = scu.query("STUDY", StudyInstanceUID="", InstitutionName="NOWHERE*")
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.is_established
    answers = [
        (int(s.Status), i)
        for s, i in assoc.send_c_find(request, StudyRootQueryRetrieveInformationModelFind)
    ]
    assoc.release()
    assert [code for code, _ in answers] == [0xFF01] * len(plain) + [0x0000]
