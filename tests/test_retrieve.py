"""C-GET and C-MOVE from the node (issue 11): dcmtk's getscu and movescu pull the sources and the
AI results the node holds; a dcmtk storescp is the move destination.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pydicom
import pytest

from pacs_node.config import Peer
from tests.conftest import CR_CHEST, make_config
from tests.orthanc import DCMTK, dcmtk_available, dcmtk_env, free_port, wait_for

pytestmark = [pytest.mark.dcmtk]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def analysed(start_node, tmp_path):
    """A node holding a CR study and its SR and heatmap; a storescp as peer DEST."""
    if not dcmtk_available("getscu", "movescu", "storescp"):
        if IN_CI:
            pytest.fail("dcmtk must be installed in CI")
        pytest.skip("needs dcmtk")
    dest_port = free_port()
    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    storescp = subprocess.Popen(
        [DCMTK["storescp"], "-aet", "DEST", "-od", str(dest_dir), "+B", str(dest_port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peers = (
        Peer("GETTER", "127.0.0.1", 104, send_results=False),
        Peer("DEST", "127.0.0.1", dest_port, send_results=False),
    )
    node = start_node(make_config(tmp_path, peers=peers, accept_unknown_peers=False))
    from tests import scu

    source = pydicom.dcmread(CR_CHEST)
    source.PatientID = "PAT-1"  # the shared file has none
    source.save_as(tmp_path / "cr.dcm", enforce_file_format=True)
    assert scu.store(node.port, [tmp_path / "cr.dcm"], calling="GETTER")[0].Status == 0
    assert node.run_pending() == 1
    try:
        yield node, str(source.StudyInstanceUID), dest_dir
    finally:
        storescp.terminate()
        storescp.wait(timeout=10)


def _tool(name: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [DCMTK[name], "-aet", "GETTER", "-aec", "AINODE", *args, "127.0.0.1", str(port)]
    return subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True, timeout=60)


def _modalities(folder: Path) -> list[str]:
    return sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in folder.glob("*")
    )


def test_getscu_pulls_the_study_with_its_ai_results(analysed, tmp_path):
    node, study, _ = analysed
    out = tmp_path / "got"
    out.mkdir()
    run = _tool("getscu", node.port, "-S", "-od", str(out),
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}")  # fmt: skip
    assert run.returncode == 0, run.stderr
    # the source, the heatmap's secondary capture, the SR; getscu does not propose Parametric
    # Map Storage, so that one sub-operation fails (the C-MOVE below carries all four)
    assert _modalities(out) == ["CR", "OT", "SR"]
    got = {pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()}
    assert str(pydicom.dcmread(CR_CHEST).SOPInstanceUID) in got


def test_getscu_patient_root_and_series_level(analysed, tmp_path):
    node, study, _ = analysed
    out = tmp_path / "patient"
    out.mkdir()
    run = _tool("getscu", node.port, "-P", "-od", str(out),
                "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=PAT-1")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert _modalities(out) == ["CR", "OT", "SR"]
    source_series = str(pydicom.dcmread(CR_CHEST, stop_before_pixels=True).SeriesInstanceUID)
    out = tmp_path / "series"
    out.mkdir()
    keys = ["-k", f"StudyInstanceUID={study}", "-k", f"SeriesInstanceUID={source_series}"]
    run = _tool(
        "getscu", node.port, "-S", "-od", str(out), "-k", "QueryRetrieveLevel=SERIES", *keys
    )
    assert run.returncode == 0, run.stderr
    assert _modalities(out) == ["CR"]


def test_a_retrieve_without_its_unique_key_is_refused(analysed, tmp_path):
    node, _, _ = analysed
    out = tmp_path / "none"
    out.mkdir()
    run = _tool("getscu", node.port, "-S", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                "-k", "PatientName=*")  # fmt: skip
    # 0xA900, as dcmtk names it
    assert "DataSetDoesNotMatchSOPClass" in run.stdout + run.stderr
    assert list(out.iterdir()) == []  # not "everything"


def test_movescu_sends_the_study_to_a_configured_peer(analysed):
    node, study, dest_dir = analysed
    run = _tool("movescu", node.port, "-S", "-aem", "DEST",
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}")  # fmt: skip
    assert run.returncode == 0, run.stderr
    wait_for(lambda: len(list(dest_dir.iterdir())) == 4, timeout_s=30, what="4 files at DEST")
    assert _modalities(dest_dir) == ["CR", "OT", "OT", "SR"]
    # audited: DICOM Instances Transferred (read), the node the source, DEST the destination,
    # GETTER the requestor; the study's four instances
    from tests.test_audit import messages, objects, of, participants

    docs = of(messages(node.config.node.storage_dir / "audit" / "audit.log"), "110104")
    (moved,) = [d for d in docs if "DEST" in participants(d)]
    who = participants(moved)
    assert who["GETTER"].get("UserIsRequestor") == "true"
    assert who["DEST"].find("RoleIDCode").get("csd-code") == "110152"
    assert who["AINODE"].find("RoleIDCode").get("csd-code") == "110153"
    sop = objects(moved)["110180"].findall("ParticipantObjectDescription/SOPClass")
    assert sum(int(s.get("NumberOfInstances")) for s in sop) == 4
    assert objects(moved)["2"].get("ParticipantObjectID") == "PAT-1"


def test_a_move_to_an_unknown_destination_is_refused(analysed):
    node, study, dest_dir = analysed
    run = _tool("movescu", node.port, "-S", "-aem", "NOBODY",
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}")  # fmt: skip
    assert "MoveDestinationUnknown" in run.stdout + run.stderr  # 0xA801
    assert list(dest_dir.iterdir()) == []
