"""The roles as processes: what the receive role loads, what the supervisor does when a role
dies, and the poison input that kills its worker every time."""

from __future__ import annotations

import copy
import os
import signal
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from storage.models import Job, Series, TaskState
from tests import scu
from tests.conftest import CR_CHEST
from tests.orthanc import free_port, wait_for
from tests.processes import NodeProcess

pytestmark = pytest.mark.slow

HEAVY_LIBRARIES = ("libtensorflow", "_pywrap_tensorflow", "onnxruntime", "cv2", "libopencv")


def _cr_study() -> pydicom.Dataset:
    ds = pydicom.dcmread(CR_CHEST)
    ds = copy.deepcopy(ds)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_receive_role_serves_without_loading_any_model_library(tmp_path):
    port = free_port()
    node = NodeProcess(tmp_path, f'[node]\nport = {port}\nstorage_dir = "data"\n', "receive")
    node.start()
    try:
        assert scu.store(port, [_cr_study()])[0].Status == 0
        assert scu.find(port, scu.query("STUDY", StudyInstanceUID=""))
        maps = _mapped(node.proc.pid)
        loaded = sorted({lib for lib in HEAVY_LIBRARIES if lib in maps})
        assert loaded == [], f"the receive role loaded {loaded}"
        rss_kib = int(
            next(
                line.split()[1]
                for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines()
                if line.startswith("VmRSS:")
            )
        )
        db = node.db()
        with db.read() as session:  # stored and queued for a worker that is not running
            assert [j.state for j in session.scalars(select(Job)).all()] == [TaskState.QUEUED]
        db.dispose()
    finally:
        assert node.stop() == 0
    print(f"\nreceive role RSS {rss_kib / 1024:.0f} MiB, no model library mapped")


def test_an_input_that_kills_its_worker_every_time_ends_failed_and_the_rest_are_done(tmp_path):
    """The poison case for real: whenever the poison study's job is running, the process that
    holds it is killed with SIGKILL, as a decoder crash would. The supervisor restarts the
    worker and takes its lease back (a failed attempt); after max_attempts the job is failed
    ("abandoned") and never claimed again, and the other studies are analysed."""
    port = free_port()
    node = NodeProcess(
        tmp_path,
        f'[node]\nport = {port}\nstorage_dir = "data"\n'
        "[worker]\nmax_attempts = 2\nretry_backoff_s = 0.2\npoll_interval_s = 0.1\nlease_s = 600\n"
        "nice = 10\n",
    )
    node.start()
    poison, *others = [_cr_study() for _ in range(4)]
    db = node.db()
    kills: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.wait(0.02):
            with db.read() as session:
                holder = session.scalar(
                    select(Job.claimed_by)
                    .join(Series, Job.series_pk == Series.id)
                    .where(
                        Series.series_instance_uid == poison.SeriesInstanceUID,
                        Job.state == TaskState.RUNNING,
                    )
                )
            if holder:
                pid = int(holder.rpartition(":")[2])
                if pid not in kills:
                    kills.append(pid)
                    os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        assert all(a.Status == 0 for a in scu.store(port, [poison, *others]))

        def finished() -> list[tuple[str, TaskState, int, str]] | None:
            with db.read() as session:
                rows = session.execute(
                    select(
                        Series.series_instance_uid, Job.state, Job.attempts, Job.last_error
                    ).join(Series, Job.series_pk == Series.id)
                ).all()
            done = all(state in (TaskState.DONE, TaskState.FAILED) for _, state, _, _ in rows)
            return [tuple(r) for r in rows] if len(rows) == 4 and done else None

        rows = wait_for(finished, timeout_s=240, what="every job finished")
        workers = wait_for(
            lambda: (lambda pids: pids if len(pids) == 3 else None)(node.role_pids("work[0]")),
            timeout_s=60,
            what="the worker restarted after the second kill",
        )
        wait_for(lambda: f":{workers[-1]} ready" in node.log(), timeout_s=120, what="ready")
        niceness = [
            os.getpriority(os.PRIO_PROCESS, workers[-1]),
            os.getpriority(os.PRIO_PROCESS, node.role_pids("receive[0]")[-1]),
        ]
    finally:
        stop.set()
        thread.join(timeout=10)
        node.stop()
        db.dispose()
    by_series = {uid: (state, attempts, error) for uid, state, attempts, error in rows}
    state, attempts, error = by_series[str(poison.SeriesInstanceUID)]
    assert (state, attempts) == (TaskState.FAILED, 2)
    assert error.startswith("abandoned:") and "attempt 2 of 2" in error
    assert len(kills) == 2
    for ds in others:
        assert by_series[str(ds.SeriesInstanceUID)][0] == TaskState.DONE
    assert set(kills) == set(workers[:2])  # restarted after each kill
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert niceness[0] == min(19, base + 10)  # worker.nice: analysis yields the CPU ...
    assert niceness[1] == base  # ... to the DICOM services
    assert "work[0] (pid" in node.log() and "exited with status -9" in node.log()


def test_a_role_that_cannot_start_stops_the_node_with_the_reason(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model.json").write_text("{not json")
    port = free_port()
    node = NodeProcess(
        tmp_path,
        f'[node]\nport = {port}\nstorage_dir = "data"\n'
        f'[[models]]\nname = "cxr"\nmodalities = ["CR"]\npath = "{broken}"\n',
    )
    node.start(wait="")
    assert node.proc is not None
    assert node.proc.wait(timeout=120) == 2
    log = node.log()
    assert "invalid model metadata" in log or "model.json" in log
    assert "cannot start (exit status 2): stopping the node" in log
