"""Shared fixtures: real data, a real node on a free loopback port with a real SQLite file."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pacs_node.config import Config, NodeSettings, Peer, WorkerSettings  # noqa: E402
from pacs_node.node import Node  # noqa: E402
from tests.orthanc import SHARED_DATA  # noqa: E402

pytest_plugins = ["tests.postgres"]

DICOM = SHARED_DATA / "dicom"
CR_CHEST = DICOM / "cxr" / "dwv__gdcm-CR-MONO1-10-chest.dcm"
CT_SERIES = sorted((DICOM / "ct_series" / "lung_pet_ct_dx_A0002_B40f").glob("*.dcm"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set PACS_NODE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def strict_pydicom() -> Iterator[None]:
    """Write DICOM strictly, as highdicom's own tests do (not around SCUs that send odd
    third-party files: pynetdicom would refuse to encode their command sets)."""
    settings = pydicom.config.settings
    before = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom.config.RAISE
    yield
    settings.writing_validation_mode = before


def make_config(tmp_path: Path, *, peers: tuple[Peer, ...] = (), **node: object) -> Config:
    settings = NodeSettings(host="127.0.0.1", port=0, storage_dir=tmp_path / "var")
    settings = replace(settings, **node)  # type: ignore[arg-type]
    return Config(
        node=settings,
        peers=peers,
        worker=WorkerSettings(poll_interval_s=0.2, ct_quiet_period_s=0.0, retry_backoff_s=0.0),
    )


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start nodes on free ports; every one is stopped at teardown."""
    nodes: list[Node] = []

    def start(
        config: Config | None = None,
        *,
        scheduler: bool = False,
        preload: bool = False,
        web: bool = False,
    ) -> Node:
        node = Node(config or make_config(tmp_path))
        node.start(scheduler=scheduler, preload_models=preload, web=web)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture
def orthanc_peer(tmp_path: Path):
    """A real Orthanc that knows the node as AINODE on a free port: (orthanc, node_port).
    Skipped where Orthanc is missing, a failure in CI."""
    from tests.orthanc import OrthancServer, free_port, orthanc_available

    if not orthanc_available():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("Orthanc must be installed in CI")
        pytest.skip("needs Orthanc")
    node_port = free_port()
    with OrthancServer(
        tmp_path / "orthanc", modalities={"AINODE": ("AINODE", "127.0.0.1", node_port)}
    ) as orthanc:
        yield orthanc, node_port


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, server and client certificates it signed (for 127.0.0.1), a self-signed stranger."""
    from tests.pki import make_pki

    return make_pki(tmp_path)
