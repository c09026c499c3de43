"""A PACS that goes away: results wait, retry with backoff, arrive when it is back; after the
configured attempts they are marked failed with the reason and ``pacs-node retry`` sends them."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from pacs_node.config import Peer
from storage.models import Delivery, TaskState
from tests import scu
from tests.conftest import CR_CHEST, make_config
from tests.orthanc import OrthancServer, free_port, orthanc_available, wait_for

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]


def _deliveries(node) -> list[Delivery]:
    with node.db.read() as session:
        return list(session.scalars(select(Delivery)).all())


def _gone_orthanc(tmp_path: Path, node_port: int) -> int:
    """Start and stop an Orthanc: the port of a PACS that has gone away."""
    orthanc = OrthancServer(
        tmp_path / "orthanc", modalities={"AINODE": ("AINODE", "127.0.0.1", node_port)}
    )
    orthanc.start()
    orthanc.stop()
    return orthanc.dicom_port


def _orthanc_back(tmp_path: Path, node_port: int, orthanc_port: int) -> OrthancServer:
    """The same Orthanc (same storage, same DICOM port) started again."""
    orthanc = OrthancServer(
        tmp_path / "orthanc", modalities={"AINODE": ("AINODE", "127.0.0.1", node_port)}
    )
    orthanc.dicom_port = orthanc_port
    return orthanc.start(attempts=1)


def _wait_results_back(orthanc: OrthancServer, node, study_uid: str, what: str) -> None:
    """Until the SR and heatmap are in Orthanc and the node has recorded them as sent."""
    wait_for(
        lambda: {"SR", "OT"} <= set(orthanc.series_modalities(study_uid)), timeout_s=120, what=what
    )
    wait_for(
        lambda: all(d.state == TaskState.DONE for d in _deliveries(node)),
        timeout_s=30,
        what="deliveries recorded as sent",
    )


def _write_config(path: Path, config) -> None:
    n = config.node
    path.write_text(
        f'[node]\nport = {n.port}\nstorage_dir = "{n.storage_dir}"\n'
        + "".join(
            f'[[peers]]\nae_title = "{p.ae_title}"\nhost = "{p.host}"\nport = {p.port}\n'
            for p in config.peers
        )
    )


def test_orthanc_down_then_back_and_retry_after_final_failure(tmp_path, start_node):
    if not orthanc_available():
        if os.environ.get("CI"):
            pytest.fail("Orthanc must be installed in CI")
        pytest.skip("needs Orthanc")
    node_port = free_port()
    orthanc_port = _gone_orthanc(tmp_path, node_port)  # away before the results are ready
    orthanc = None
    config = make_config(
        tmp_path, port=node_port, peers=(Peer("ORTHANC", "127.0.0.1", orthanc_port),)
    )
    config = replace(
        config,
        delivery=replace(config.delivery, max_attempts=3, backoff_initial_s=0.2, backoff_max_s=0.4),
    )
    node = start_node(config, scheduler=True)
    study_uid = str(pydicom.dcmread(CR_CHEST, stop_before_pixels=True).StudyInstanceUID)
    try:
        scu.store(node.port, [CR_CHEST], calling="ORTHANC")
        # 1. while it is down: attempts with backoff, then failed with the reason
        wait_for(
            lambda: (d := _deliveries(node)) and all(x.state == TaskState.FAILED for x in d),
            timeout_s=120,
            what="deliveries to give up",
        )
        failed = _deliveries(node)
        assert all(d.attempts == 3 for d in failed)
        assert all(f"ORTHANC@127.0.0.1:{orthanc_port}" in d.last_error for d in failed)
        _write_config(tmp_path / "node.toml", config)
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "pacs_node.cli",
                "status",
                "--config",
                str(tmp_path / "node.toml"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "failed deliveries:" in status.stdout
        assert "association with ORTHANC" in status.stdout

        # 2. it comes back on the same port; an operator runs pacs-node retry
        orthanc = _orthanc_back(tmp_path, node_port, orthanc_port)
        retry = subprocess.run(
            [
                sys.executable,
                "-m",
                "pacs_node.cli",
                "retry",
                "--config",
                str(tmp_path / "node.toml"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert retry.returncode == 0 and f"requeued {len(failed)} failed deliveries" in retry.stdout
        _wait_results_back(orthanc, node, study_uid, "results in Orthanc after retry")
    finally:
        if orthanc is not None:
            orthanc.stop()


def test_results_wait_while_the_peer_is_down_and_arrive_when_it_is_back(tmp_path, start_node):
    if not orthanc_available():
        pytest.skip("needs Orthanc")
    node_port = free_port()
    orthanc_port = _gone_orthanc(tmp_path, node_port)
    orthanc = None
    config = make_config(
        tmp_path, port=node_port, peers=(Peer("ORTHANC", "127.0.0.1", orthanc_port),)
    )
    config = replace(
        config,
        delivery=replace(
            config.delivery, max_attempts=50, backoff_initial_s=0.2, backoff_max_s=1.0
        ),
    )
    node = start_node(config, scheduler=True)
    study_uid = str(pydicom.dcmread(CR_CHEST, stop_before_pixels=True).StudyInstanceUID)
    try:
        scu.store(node.port, [CR_CHEST], calling="ORTHANC")
        wait_for(
            lambda: (d := _deliveries(node)) and all(x.attempts >= 2 for x in d),
            timeout_s=120,
            what="a few failed attempts",
        )
        assert all(d.state in (TaskState.QUEUED, TaskState.RUNNING) for d in _deliveries(node))
        orthanc = _orthanc_back(tmp_path, node_port, orthanc_port)
        _wait_results_back(orthanc, node, study_uid, "results in Orthanc once it is back")
    finally:
        if orthanc is not None:
            orthanc.stop()
