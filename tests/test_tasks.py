"""The task state machine (``storage.tasks``), transition by transition, with the clock passed
in; the watchdog that renews leases and stops a task at its deadline."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from pacs_node.process import Watchdog
from storage import queue, tasks
from storage.db import Database
from storage.models import Delivery, Instance, Job, Series, Study, TaskState, utcnow

T0 = datetime(2026, 12, 1, 8, 0, 0)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request, tmp_path: Path) -> Database:
    """Every transition on both databases the node supports."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'tasks.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_url")
    database = Database(url)
    yield database
    database.dispose()


def _series(session, uid: str, modality: str = "CR") -> Series:
    study = Study(study_instance_uid=f"{uid}.0")
    session.add(study)
    session.flush()
    series = Series(series_instance_uid=uid, study_pk=study.id, modality=modality)
    session.add(series)
    session.flush()
    return series


def _job(db: Database, uid: str, *, priority: int = 0, at: datetime = T0, **schedule) -> int:
    with db.session() as session:
        job = queue.enqueue(
            session,
            _series(session, uid).id,
            model_name="cxr",
            not_before=at,
            schedule=queue.Schedule(priority=priority, **schedule),
        )
        return job.id


def _get(db: Database, job_id: int) -> Job:
    with db.read() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _claim(db: Database, owner: str = "host:1", now: datetime = T0, **kw) -> list[int]:
    with db.session() as session:
        return [t.id for t in tasks.claim(session, Job, owner=owner, lease_s=30, now=now, **kw)]


def test_claim_takes_the_highest_priority_then_the_oldest_due(db):
    ct = _job(db, "1.1", priority=0, at=T0 - timedelta(minutes=5))
    cr_late = _job(db, "1.2", priority=10, at=T0 - timedelta(seconds=1))
    cr_early = _job(db, "1.3", priority=10, at=T0 - timedelta(seconds=2))
    future = _job(db, "1.4", priority=99, at=T0 + timedelta(seconds=1))
    assert _claim(db) == [cr_early]
    assert _claim(db, limit=5) == [cr_late, ct]  # the future one is not due yet
    assert _claim(db) == []
    assert _claim(db, now=T0 + timedelta(seconds=1)) == [future]
    job = _get(db, cr_early)
    assert (job.state, job.attempts, job.claimed_by) == (TaskState.RUNNING, 1, "host:1")
    assert job.lease_expires_at == T0 + timedelta(seconds=30) and job.heartbeat_at == T0


def test_heartbeat_renews_only_the_holders_lease(db):
    job_id = _job(db, "2.1")
    _claim(db, owner="host:1")
    later = T0 + timedelta(seconds=20)
    with db.session() as session:
        assert tasks.heartbeat(session, Job, [job_id], owner="host:2", lease_s=30, now=later) == 0
        assert tasks.heartbeat(session, Job, [job_id], owner="host:1", lease_s=30, now=later) == 1
    assert _get(db, job_id).lease_expires_at == later + timedelta(seconds=30)
    with db.session() as session:  # renewed: not expired at the first lease's end
        assert tasks.expire(session, Job, now=T0 + timedelta(seconds=31)) == []


def test_failed_attempts_back_off_then_fail(db):
    job_id = _job(db, "3.1", max_attempts=3, backoff_initial_s=10, backoff_max_s=15)
    now = T0
    waits = []
    for _ in range(3):
        assert _claim(db, now=now) == [job_id]
        with db.session() as session:
            state = tasks.fail(session, session.get(Job, job_id), "decoder error", now=now)
        job = _get(db, job_id)
        if state == TaskState.QUEUED:
            waits.append((job.not_before - now).total_seconds())
            assert _claim(db, now=job.not_before - timedelta(seconds=1)) == []  # backoff holds
            now = job.not_before
    assert waits == [10.0, 15.0]  # 10, then 20 capped at 15
    job = _get(db, job_id)
    assert (job.state, job.attempts, job.last_error) == (TaskState.FAILED, 3, "decoder error")
    assert job.lease_expires_at is None and job.claimed_by == "" and job.finished_at == now


def test_a_permanent_failure_does_not_retry(db):
    job_id = _job(db, "4.1", max_attempts=5)
    _claim(db)
    with db.session() as session:
        state = tasks.fail(session, session.get(Job, job_id), "no model", now=T0, permanent=True)
    assert state == TaskState.FAILED and _get(db, job_id).attempts == 1


def test_an_expired_lease_is_a_failed_attempt_and_the_last_one_is_abandoned(db):
    """The poison case at the level of the rows: a worker that dies on the job every time."""
    job_id = _job(db, "5.1", max_attempts=2, backoff_initial_s=5)
    _claim(db, owner="host:11")
    with db.session() as session:  # the lease is still good: nothing to take back
        assert tasks.expire(session, Job, now=T0 + timedelta(seconds=29)) == []
    with db.session() as session:
        taken = tasks.expire(session, Job, now=T0 + timedelta(seconds=31))
        assert [t.id for t in taken] == [job_id]
    job = _get(db, job_id)
    assert job.state == TaskState.QUEUED and job.attempts == 1
    assert job.last_error.startswith("lease expired: host:11 stopped during attempt 1 of 2")
    assert job.not_before == T0 + timedelta(seconds=36)  # the backoff applies
    second = T0 + timedelta(seconds=40)
    assert _claim(db, owner="host:12", now=second) == [job_id]
    with db.session() as session:
        tasks.expire(session, Job, now=second + timedelta(seconds=31))
    job = _get(db, job_id)
    assert (job.state, job.attempts) == (TaskState.FAILED, 2)
    assert job.last_error.startswith("abandoned: host:12 stopped during attempt 2 of 2")
    assert _claim(db, now=second + timedelta(hours=1)) == []  # never claimed again


def test_leases_of_named_dead_owners_are_taken_back_at_once(db):
    mine, theirs = _job(db, "6.1"), _job(db, "6.2")
    _claim(db, owner="host:21")
    _claim(db, owner="host:22")
    with db.session() as session:
        taken = tasks.expire(session, Job, now=T0, owners=["host:21"])
    assert [t.id for t in taken] == [mine]
    assert _get(db, mine).state == TaskState.QUEUED
    assert _get(db, theirs).state == TaskState.RUNNING


def test_succeed_skip_and_retry(db):
    done, skipped = _job(db, "7.1"), _job(db, "7.2")
    _claim(db, limit=2)
    with db.session() as session:
        tasks.succeed(session, session.get(Job, done), T0)
        tasks.skip(session, session.get(Job, skipped), "not a chest radiograph", T0)
    assert _get(db, done).state == TaskState.DONE and _get(db, done).lease_expires_at is None
    assert (_get(db, skipped).state, _get(db, skipped).last_error) == (
        TaskState.SKIPPED,
        "not a chest radiograph",
    )
    failing = _job(db, "7.3", max_attempts=1)
    _claim(db)
    with db.session() as session:
        tasks.fail(session, session.get(Job, failing), "boom", now=T0)
    with db.session() as session:
        assert queue.retry_failed(session) == (0, 1)
    job = _get(db, failing)
    assert (job.state, job.attempts, job.finished_at) == (TaskState.QUEUED, 0, None)


def test_deliveries_follow_the_same_machine(db):
    with db.session() as session:
        series = _series(session, "8.1", modality="SR")
        instance = Instance(
            sop_instance_uid="8.1.1", sop_class_uid="1.2", series_pk=series.id, path="x"
        )
        session.add(instance)
        session.flush()
        schedule = queue.Schedule(max_attempts=2, backoff_initial_s=1, priority=10)
        delivery = queue.add_delivery(session, instance.id, "PACS", schedule)
        delivery.not_before = T0
        delivery_id = delivery.id
    with db.session() as session:
        (claimed,) = tasks.claim(session, Delivery, owner="host:1", lease_s=30, now=T0)
        assert claimed.priority == 10
        tasks.fail(session, claimed, "association rejected", now=T0)
    with db.session() as session:
        (claimed,) = tasks.claim(
            session, Delivery, owner="host:1", lease_s=30, now=T0 + timedelta(seconds=1)
        )
        tasks.fail(session, claimed, "association rejected", now=T0)
    with db.read() as session:
        delivery = session.get(Delivery, delivery_id)
        assert (delivery.state, delivery.attempts) == (TaskState.FAILED, 2)
    with db.session() as session:  # owed again (a retried job made it again): starts over
        again = queue.add_delivery(session, instance.id, "PACS", schedule)
        assert (again.id, again.state, again.attempts) == (delivery_id, TaskState.QUEUED, 0)


def test_the_watchdog_renews_leases_and_records_a_task_past_its_deadline(db):
    job_id = _job(db, "9.1", at=utcnow() - timedelta(seconds=1))
    with db.session() as session:
        tasks.claim(session, Job, owner="host:31", lease_s=30, now=utcnow())
    before = _get(db, job_id).lease_expires_at
    stopped: list[tuple[list[int], float]] = []
    watchdog = Watchdog(
        db,
        Job,
        owner="host:31",
        lease_s=600,
        on_deadline=lambda ids, elapsed: stopped.append((ids, elapsed)),
        exit_on_deadline=False,
    )
    watchdog.hold([job_id], deadline_s=3600)
    watchdog.check()
    assert _get(db, job_id).lease_expires_at > before + timedelta(seconds=500)
    assert stopped == []
    watchdog.hold([job_id], deadline_s=0.0)
    watchdog.check()
    assert [ids for ids, _ in stopped] == [[job_id]]


def test_a_hung_task_is_stopped_at_its_deadline_and_its_process_exits(tmp_path):
    """A decode that never returns (here: a sleep the thread cannot interrupt) is stopped by
    ending the process, with the reason recorded first; the supervisor starts a new one."""
    url = f"sqlite:///{tmp_path / 'hung.sqlite3'}"
    db = Database(url)
    job_id = _job(db, "10.1", at=datetime(2000, 1, 1))
    db.dispose()
    script = textwrap.dedent(
        f"""
        import time
        from pacs_node.process import Watchdog, owner_id
        from storage import tasks
        from storage.db import Database
        from storage.models import Job, utcnow
        db = Database({url!r})
        with db.session() as s:
            (job,) = tasks.claim(s, Job, owner=owner_id(), lease_s=1, now=utcnow())
        def record(ids, elapsed):
            with db.session() as s:
                tasks.fail(s, s.get(Job, ids[0]), f"deadline exceeded after {{elapsed:.1f}} s",
                           now=utcnow())
        w = Watchdog(db, Job, owner=owner_id(), lease_s=0.2, on_deadline=record).start()
        w.hold([job.id], deadline_s=0.5)
        time.sleep(60)  # the hung decode
        """
    )
    run = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
    assert run.returncode == Watchdog.EXIT_STATUS, run.stderr.decode()[-2000:]
    db = Database(url)
    try:
        job = _get(db, job_id)
        assert job.state == TaskState.QUEUED and job.last_error.startswith("deadline exceeded")
    finally:
        db.dispose()


@pytest.mark.postgres
def test_on_postgresql_concurrent_claims_skip_each_others_rows(postgres_url):
    """Two workers claim at the same moment: the second neither waits for the first's open
    transaction nor takes its row (FOR UPDATE SKIP LOCKED)."""
    db = Database(postgres_url)
    try:
        ids = [_job(db, f"11.{i}") for i in range(3)]
        with db.session() as first:
            taken_first = tasks.claim(first, Job, owner="host:41", lease_s=30, now=T0)
            assert [t.id for t in taken_first] == [ids[0]]
            # the first transaction is still open and holds its row lock
            with db.session() as second:
                second.execute(text("SET LOCAL lock_timeout = '2s'"))
                taken_second = tasks.claim(
                    second, Job, owner="host:42", lease_s=30, now=T0, limit=5
                )
                assert [t.id for t in taken_second] == ids[1:]
        with db.read() as session:
            owners = dict(session.execute(select(Job.id, Job.claimed_by)).all())
        assert owners == {ids[0]: "host:41", ids[1]: "host:42", ids[2]: "host:42"}
    finally:
        db.dispose()


def test_postpone_moves_a_queued_job_only_and_the_new_start_holds(db):
    """``queue.postpone`` runs a statement compiled once and passed to the driver
    (``storage.prepared``): the start it writes must read back and compare as SQLAlchemy's own
    writes do (SQLite keeps DateTime as text), and a job that is no longer queued is left."""
    job_id = _job(db, "1.2.7", at=T0)
    later = T0 + timedelta(seconds=90, microseconds=250)
    with db.session() as session:
        assert queue.postpone(session, job_id, later) is True
    assert _get(db, job_id).not_before == later
    assert _claim(db, now=later - timedelta(microseconds=1)) == []  # not before its new start
    assert _claim(db, now=later) == [job_id]
    with db.session() as session:  # claimed: running, not queued
        assert queue.postpone(session, job_id, later + timedelta(seconds=5)) is False
    assert _get(db, job_id).not_before == later
