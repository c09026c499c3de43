"""Proves the Orthanc / dcmtk test harness in tests/orthanc.py works with the real programs."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.orthanc import (
    DCMTK,
    SHARED_DATA,
    OrthancServer,
    dcmtk_available,
    dcmtk_env,
    free_port,
    orthanc_available,
    port_open,
    storescp_cmd,
    wait_for,
)

_IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytestmark = [
    pytest.mark.orthanc,
    pytest.mark.dcmtk,
    # Outside CI a missing Orthanc/dcmtk skips; in CI it must fail loudly instead.
    pytest.mark.skipif(
        not _IN_CI and not (orthanc_available() and dcmtk_available()),
        reason="Orthanc (/usr/sbin/Orthanc) or dcmtk (/usr/bin/storescp...) not installed",
    ),
]

CXR = SHARED_DATA / "dicom" / "cxr" / "dwv__gdcm-CR-MONO1-10-chest.dcm"
CXR_STUDY_UID = "1.2.392.200036.9125.0.199302241758.16"
CXR_SOP_UID = "1.2.392.200036.9125.0.19950720112207"


def _dcmdump_tag(path: Path, keyword: str) -> str:
    out = subprocess.run(
        [DCMTK["dcmdump"], "-q", "+P", keyword, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=dcmtk_env(),
        check=True,
    ).stdout
    # e.g. (0008,0018) UI [1.2.3]   #  20, 1 SOPInstanceUID
    start, end = out.find("["), out.find("]")
    return out[start + 1 : end] if 0 <= start < end else ""


@pytest.fixture(scope="module")
def scp_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, scp_port: int) -> Iterator[OrthancServer]:
    workdir = tmp_path_factory.mktemp("orthanc")
    server = OrthancServer(workdir, modalities={"STORESCP": ("STORESCP", "127.0.0.1", scp_port)})
    with server:
        yield server


@pytest.fixture
def storescp(tmp_path: Path, scp_port: int) -> Iterator[Path]:
    """A dcmtk storescp on ``scp_port``; yields the folder files arrive in."""
    out_dir = tmp_path / "received"
    out_dir.mkdir()
    log = (tmp_path / "storescp.log").open("wb")
    proc = subprocess.Popen(
        storescp_cmd(out_dir, scp_port, aet="STORESCP"),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dcmtk_env(),
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: proc.poll() is None and port_open(scp_port),
            timeout_s=10,
            interval_s=0.05,
            what=f"storescp listening on port {scp_port}",
        )
        assert proc.poll() is None, "storescp exited early"
        yield out_dir
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        log.close()


def test_shared_data_present() -> None:
    assert CXR.is_file(), f"missing test data {CXR} (set PACS_NODE_SHARED_DATA?)"


def test_wait_for_times_out_with_clear_message() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="waiting for nothing"):
        wait_for(lambda: None, timeout_s=0.3, interval_s=0.05, what="nothing")
    assert time.monotonic() - start < 2.0
    assert wait_for(lambda: 42, timeout_s=1) == 42


def test_system_and_config(orthanc: OrthancServer) -> None:
    info = orthanc.get("/system")
    assert info["DicomAet"] == "ORTHANC"
    assert info["DicomPort"] == orthanc.dicom_port
    assert info["HttpPort"] == orthanc.http_port
    assert "STORESCP" in orthanc.get("/modalities")


def test_echoscu_against_orthanc(orthanc: OrthancServer) -> None:
    result = subprocess.run(
        [
            DCMTK["echoscu"],
            "-aet",
            "AINODE",
            "-aec",
            orthanc.aet,
            "-to",
            "10",
            "127.0.0.1",
            str(orthanc.dicom_port),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=dcmtk_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_upload_find_and_download(orthanc: OrthancServer) -> None:
    answer = orthanc.upload(CXR)
    assert answer["Status"] in ("Success", "AlreadyStored")
    study_id = orthanc.find_study_id(CXR_STUDY_UID)
    assert study_id == answer["ParentStudy"]
    assert study_id in orthanc.studies()
    assert orthanc.series_modalities(CXR_STUDY_UID) == ["CR"]
    series = orthanc.study_series(study_id)
    assert [s["ID"] for s in series] == [answer["ParentSeries"]]
    assert orthanc.instances_of_series(answer["ParentSeries"]) == [answer["ID"]]
    assert orthanc.get_file(answer["ID"]) == CXR.read_bytes()
    assert orthanc.find_study_id("1.2.3.4.5.6.7.8.9") is None
    assert orthanc.series_modalities("1.2.3.4.5.6.7.8.9") == []


def test_orthanc_cstore_to_storescp(orthanc: OrthancServer, storescp: Path) -> None:
    orthanc.upload(CXR)
    study_id = orthanc.wait_for_study(CXR_STUDY_UID, timeout_s=10)
    assert orthanc.echo_modality("STORESCP")

    result = orthanc.send_to_modality("STORESCP", [study_id], synchronous=True)
    assert result["InstancesCount"] == 1
    assert result["FailedInstancesCount"] == 0

    received = wait_for(
        lambda: sorted(p for p in storescp.iterdir() if p.is_file()),
        timeout_s=15,
        what="the study to arrive at storescp",
    )
    assert len(received) == 1
    assert _dcmdump_tag(received[0], "SOPInstanceUID") == CXR_SOP_UID
    assert _dcmdump_tag(received[0], "StudyInstanceUID") == CXR_STUDY_UID

    # Asynchronous variant: a job that must reach Success.
    job = orthanc.send_to_modality("STORESCP", [study_id], synchronous=False)
    done = orthanc.wait_job(job["ID"], timeout_s=30)
    assert done["Content"]["RemoteAet"] == "STORESCP"
