"""The node used as a hospital would: a real Orthanc sends a CR and a CT study; results come back.

Orthanc (from apt-get) holds the CR chest X-ray and the 30-slice CT series and is told to
C-STORE both studies to the node. The node runs with its scheduler and the shipped models, as
``pacs-node serve`` does. The test waits, with a deadline, until Orthanc holds an SR and a
heatmap SC in each study, then asks the node with dcmtk's ``findscu`` and checks both objects
with ``dciodvfy`` and ``dsrdump``.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

from pacs_node.config import Peer
from tests.conftest import CR_CHEST, CT_SERIES, make_config
from tests.orthanc import (
    DCMTK,
    OrthancServer,
    dcmtk_available,
    findscu,
    free_port,
    orthanc_available,
    wait_for,
)

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk, pytest.mark.slow]

DCIODVFY = "/usr/bin/dciodvfy"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def orthanc_and_node(tmp_path: Path, start_node):
    if not (
        orthanc_available() and dcmtk_available("findscu", "dsrdump") and Path(DCIODVFY).exists()
    ):
        if IN_CI:
            pytest.fail("Orthanc, dcmtk and dicom3tools must be installed in CI")
        pytest.skip("needs Orthanc, dcmtk and dicom3tools")
    node_port = free_port()
    orthanc = OrthancServer(
        tmp_path / "orthanc", modalities={"AINODE": ("AINODE", "127.0.0.1", node_port)}
    )
    with orthanc:
        config = make_config(
            tmp_path,
            port=node_port,
            accept_unknown_peers=False,
            peers=(Peer("ORTHANC", "127.0.0.1", orthanc.dicom_port),),
        )
        config = replace(config, worker=replace(config.worker, ct_quiet_period_s=1.0))
        node = start_node(config, scheduler=True, preload=True)
        yield orthanc, node


def _dciodvfy_errors(data: bytes, tmp_path: Path, name: str) -> list[str]:
    path = tmp_path / name
    path.write_bytes(data)
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def test_orthanc_sends_studies_and_receives_sr_and_heatmaps(orthanc_and_node, tmp_path):
    orthanc, node = orthanc_and_node
    orthanc.upload_many([CR_CHEST, *CT_SERIES])
    cr_uid = str(pydicom.dcmread(CR_CHEST, stop_before_pixels=True).StudyInstanceUID)
    ct_uid = str(pydicom.dcmread(CT_SERIES[0], stop_before_pixels=True).StudyInstanceUID)
    cr_id, ct_id = orthanc.find_study_id(cr_uid), orthanc.find_study_id(ct_uid)
    assert cr_id and ct_id

    sent_at = time.monotonic()
    orthanc.send_to_modality("AINODE", [cr_id, ct_id])
    arrived: dict[str, float] = {}

    def results_back() -> bool:
        for uid in (cr_uid, ct_uid):
            if uid not in arrived and {"SR", "OT"} <= set(orthanc.series_modalities(uid)):
                arrived[uid] = time.monotonic() - sent_at
        return len(arrived) == 2

    wait_for(results_back, timeout_s=180, interval_s=0.2, what="SR and SC back in Orthanc")
    print(
        f"\nOrthanc send -> SR+SC in Orthanc: CR {arrived[cr_uid]:.1f} s, "
        f"CT (30 slices, 1 s quiet period) {arrived[ct_uid]:.1f} s"
    )

    # C-FIND to the node: both studies list SR among their modalities
    output = findscu(
        node.port,
        "QueryRetrieveLevel=STUDY",
        "StudyInstanceUID",
        "ModalitiesInStudy=SR",
        calling="ORTHANC",
    )
    assert cr_uid in output and ct_uid in output

    # every result object in Orthanc passes dciodvfy; the SR renders with dsrdump
    for uid in (cr_uid, ct_uid):
        study_id = orthanc.find_study_id(uid)
        for series in orthanc.study_series(study_id):
            modality = series["MainDicomTags"].get("Modality")
            if modality not in ("SR", "OT"):
                continue
            for instance_id in series["Instances"]:
                data = orthanc.get_file(instance_id)
                assert _dciodvfy_errors(data, tmp_path, f"{instance_id}.dcm") == []
                ds = pydicom.dcmread(tmp_path / f"{instance_id}.dcm")
                assert ds.StudyInstanceUID == uid
                assert "not for diagnostic use" in ds.SeriesDescription.lower()
                if modality == "SR":
                    dump = subprocess.run(
                        [DCMTK["dsrdump"], str(tmp_path / f"{instance_id}.dcm")],
                        capture_output=True,
                        text=True,
                        timeout=30,
                    )
                    assert dump.returncode == 0, dump.stderr
                    assert "Imaging Measurement Report" in dump.stdout
