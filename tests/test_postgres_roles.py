"""Several machines' worth of roles on one PostgreSQL and one storage folder.

``pacs-node receive``, ``send`` and two ``work`` processes run separately (as they would on
separate machines: no supervisor takes leases back for them), all pointed at one real
PostgreSQL server and one storage folder. A burst of studies arrives; one worker is killed with
SIGKILL while it holds a job. The other worker takes the dead one's lease back once it runs out
(a failed attempt) and finishes the work: every series is analysed once (one result each),
every result reaches the destination.
"""

from __future__ import annotations

import copy
import os
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from storage.db import Database
from storage.models import Delivery, Job, Result, TaskState
from tests import scu
from tests.conftest import CR_CHEST, CT_SERIES
from tests.orthanc import StoreScp, dcmtk_available, free_port, wait_for
from tests.processes import NodeProcess

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _studies(cr_count: int) -> list[list[pydicom.Dataset]]:
    template = pydicom.dcmread(CR_CHEST)
    studies = []
    for _ in range(cr_count):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        studies.append([ds])
    ct = [pydicom.dcmread(p) for p in CT_SERIES[:20]]
    study, series = generate_uid(), generate_uid()
    for ds in ct:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    studies.append(ct)
    return studies


def test_two_workers_on_postgresql_one_killed_mid_burst(tmp_path: Path, postgres_url: str):
    if not dcmtk_available("storescp"):
        pytest.skip("dcmtk not installed")
    port, dest_port = free_port(), free_port()
    storage = tmp_path / "shared-storage"
    config = (
        f'[node]\nport = {port}\nstorage_dir = "{storage}"\ndatabase_url = "{postgres_url}"\n'
        f'[[peers]]\nae_title = "STORESCP"\nhost = "127.0.0.1"\nport = {dest_port}\n'
        "[worker]\nlease_s = 2\npoll_interval_s = 0.05\nct_quiet_period_s = 0.5\n"
        "retry_backoff_s = 0.2\n[delivery]\nbackoff_initial_s = 0.5\n"
    )
    roles = {}
    for name, command in (("receive", "receive"), ("a", "work"), ("b", "work"), ("send", "send")):
        workdir = tmp_path / name
        workdir.mkdir()
        roles[name] = NodeProcess(workdir, config, command)
    received = tmp_path / "received"
    db = Database(postgres_url)
    kill: dict[str, str] = {}
    with StoreScp(received, dest_port, "--unique-filenames"):
        try:
            roles["receive"].start()
            for name in ("a", "b", "send"):
                roles[name].start(wait="ready")
            victim = roles["a"]
            assert victim.proc is not None
            victim_owner = f"{os.uname().nodename[:40]}:{victim.proc.pid}"

            def kill_mid_job(stop: threading.Event) -> None:
                while not stop.wait(0.01):
                    with db.read() as session:
                        done = session.scalar(
                            select(func.count()).where(Job.state == TaskState.DONE)
                        )
                        holding = session.scalar(
                            select(Job.id).where(
                                Job.state == TaskState.RUNNING, Job.claimed_by == victim_owner
                            )
                        )
                    if done >= 3 and holding:
                        victim.kill()
                        kill["job"] = str(holding)
                        return

            stop = threading.Event()
            killer = threading.Thread(target=kill_mid_job, args=(stop,), daemon=True)
            killer.start()
            studies = _studies(20)
            for study in studies:
                assert all(a.Status == 0 for a in scu.store(port, study, calling="STORESCP"))

            def all_delivered() -> bool:
                with db.read() as session:
                    jobs = session.scalars(select(Job.state)).all()
                    deliveries = session.scalars(select(Delivery.state)).all()
                return (
                    len(jobs) == len(studies)
                    and all(s == TaskState.DONE for s in jobs)
                    and bool(deliveries)
                    and all(s == TaskState.DONE for s in deliveries)
                )

            wait_for(all_delivered, timeout_s=300, what="every study analysed and delivered")
            stop.set()
            killer.join(timeout=10)
        finally:
            for node in roles.values():
                node.stop()
    try:
        assert kill, "the worker was never caught holding a job"
        with db.read() as session:
            results = session.scalars(select(Result)).all()
            killed_job = session.get(Job, int(kill["job"]))
            assert killed_job is not None
            assert killed_job.attempts == 2 and killed_job.state == TaskState.DONE
            assert killed_job.last_error.startswith("lease expired:")
        assert len(results) == len(studies)
        assert len({r.series_pk for r in results}) == len(studies)  # each analysed once
        generated = {r.sr_sop_instance_uid for r in results} | {
            uid for r in results for uid in r.sc_sop_instance_uids
        }
        arrived = [
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in received.iterdir()
        ]
        assert set(arrived) == generated
        print(
            f"\n{len(studies)} studies on PostgreSQL, worker killed holding job {kill['job']}; "
            f"{len(results)} results, {len(arrived)} files received for {len(generated)} UIDs"
        )
    finally:
        db.dispose()
