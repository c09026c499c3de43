"""Jobs and deliveries: what is queued, for whom, with which schedule.

The state transitions themselves are in :mod:`storage.tasks`; this module makes the rows
(a job per series to analyse, a delivery per generated instance and destination) and answers
the questions the roles ask about them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from storage import tasks
from storage.ingest import dialect_insert
from storage.models import Delivery, Instance, Job, TaskState, utcnow
from storage.prepared import Prepared, prepare


@dataclass(frozen=True)
class Schedule:
    """How a task is retried, how long one attempt may take, and where it stands in line."""

    max_attempts: int = 3
    backoff_initial_s: float = 10.0
    backoff_max_s: float = 600.0
    deadline_s: float = 600.0
    priority: int = 0

    def apply(self, task: Job | Delivery) -> None:
        task.max_attempts = self.max_attempts
        task.backoff_initial_s = self.backoff_initial_s
        task.backoff_max_s = self.backoff_max_s
        task.deadline_s = self.deadline_s
        task.priority = self.priority


def active_job(session: Session, series_pk: int) -> Job | None:
    """The series' job that has not finished yet, if any."""
    return session.scalar(
        select(Job)
        .where(Job.series_pk == series_pk, Job.state.in_([TaskState.QUEUED, TaskState.RUNNING]))
        .order_by(Job.id.desc())
    )


def latest_job(session: Session, series_pk: int) -> Job | None:
    return session.scalar(select(Job).where(Job.series_pk == series_pk).order_by(Job.id.desc()))


def enqueue(
    session: Session, series_pk: int, *, model_name: str, not_before: datetime, schedule: Schedule
) -> Job:
    """Queue the series for analysis at *not_before*; a queued job only has its start moved."""
    job = active_job(session, series_pk)
    if job is not None and job.state == TaskState.QUEUED:
        job.not_before = not_before
        job.model_name = model_name
        return job
    job = Job(series_pk=series_pk, model_name=model_name, state=TaskState.QUEUED)
    job.not_before = not_before
    schedule.apply(job)
    session.add(job)
    session.flush()
    return job


def postpone(session: Session, job_id: int, not_before: datetime) -> bool:
    """Move a still-queued job's start to *not_before* (a new slice of its series arrived);
    False when it is no longer queued. One statement, compiled once: the hot path of a CT
    series' ingest."""
    conn = session.connection()
    result = _postpone_statement(conn.dialect).run(
        conn,
        {
            "job_id": job_id,
            "queued": TaskState.QUEUED,
            "new_start": not_before,
            "updated_at": utcnow(),
        },
    )
    return bool(result.rowcount)


@functools.cache
def _postpone_statement(dialect: Dialect) -> Prepared:
    statement = (
        update(Job)
        .where(Job.id == bindparam("job_id"), Job.state == bindparam("queued"))
        .values(not_before=bindparam("new_start"))
    )  # updated_at (set on every update) is a parameter too
    return prepare(statement, dialect)


def skip(session: Session, series_pk: int, reason: str) -> Job:
    """Record that the series will not be analysed, and why (visible to operators)."""
    job = latest_job(session, series_pk)
    if job is not None and job.state == TaskState.SKIPPED and job.last_error == reason:
        return job
    now = utcnow()
    job = Job(
        series_pk=series_pk,
        state=TaskState.SKIPPED,
        last_error=reason[: tasks.ERROR_MAX],
        finished_at=now,
        not_before=now,
    )
    session.add(job)
    session.flush()
    return job


def add_delivery(
    session: Session, instance_pk: int, destination_ae: str, schedule: Schedule
) -> Delivery:
    """Owe *instance_pk* to *destination_ae* (once: the same pair again changes nothing, unless
    the earlier delivery failed, which then starts over)."""
    delivery = session.scalar(
        select(Delivery).where(
            Delivery.instance_pk == instance_pk, Delivery.destination_ae == destination_ae
        )
    )
    if delivery is None:
        delivery = Delivery(instance_pk=instance_pk, destination_ae=destination_ae)
        schedule.apply(delivery)
        delivery.not_before = utcnow()
        session.add(delivery)
        session.flush()
    elif delivery.state == TaskState.FAILED:
        tasks.retry(delivery, utcnow())
    return delivery


def owe(
    session: Session, instance_pks: Sequence[int], destinations: Sequence[str], schedule: Schedule
) -> None:
    """:func:`add_delivery` of every (instance, destination) pair, in two statements for any
    number of them: a pair owed already is left alone, unless its delivery failed, which then
    starts over."""
    if not instance_pks or not destinations:
        return
    conn = session.connection()
    now = utcnow()
    rows = [
        {
            "instance_pk": pk,
            "destination_ae": ae_title,
            "max_attempts": schedule.max_attempts,
            "backoff_initial_s": schedule.backoff_initial_s,
            "backoff_max_s": schedule.backoff_max_s,
            "deadline_s": schedule.deadline_s,
            "priority": schedule.priority,
            "not_before": now,
        }
        for pk in instance_pks
        for ae_title in destinations
    ]
    conn.execute(
        dialect_insert(conn.dialect)(Delivery).on_conflict_do_nothing(
            index_elements=[Delivery.instance_pk, Delivery.destination_ae]
        ),
        rows,
    )
    for delivery in session.scalars(
        select(Delivery).where(
            Delivery.instance_pk.in_(list(instance_pks)),
            Delivery.destination_ae.in_(list(destinations)),
            Delivery.state == TaskState.FAILED,
        )
    ):
        tasks.retry(delivery, now)


def failed_deliveries(session: Session, limit: int) -> list[tuple[Delivery, str]]:
    """The newest failed deliveries, each with the SOP Instance UID it carries."""
    rows = session.execute(
        select(Delivery, Instance.sop_instance_uid)
        .join(Instance, Delivery.instance_pk == Instance.id)
        .where(Delivery.state == TaskState.FAILED)
        .order_by(Delivery.id.desc())
        .limit(limit)
    ).all()
    return [(delivery, uid) for delivery, uid in rows]


def retry_failed(
    session: Session,
    *,
    delivery_ids: Sequence[int] | None = None,
    job_ids: Sequence[int] | None = None,
) -> tuple[int, int]:
    """Give failed deliveries and jobs a fresh set of attempts (all when no ids are given).

    Returns (deliveries, jobs) requeued. What is not failed is left alone.
    """
    deliveries = select(Delivery).where(Delivery.state == TaskState.FAILED)
    jobs = select(Job).where(Job.state == TaskState.FAILED)
    if delivery_ids is not None or job_ids is not None:
        deliveries = deliveries.where(Delivery.id.in_(delivery_ids or []))
        jobs = jobs.where(Job.id.in_(job_ids or []))
    now = utcnow()
    n_deliveries = n_jobs = 0
    for delivery in session.scalars(deliveries).all():
        tasks.retry(delivery, now)
        n_deliveries += 1
    for job in session.scalars(jobs).all():
        tasks.retry(job, now)
        n_jobs += 1
    return n_deliveries, n_jobs


def record_commitment(
    session: Session,
    transaction_uid: str,
    committed: Sequence[str],
    failed: Sequence[tuple[str, int | None]],
    *,
    peer: str,
    now: datetime,
) -> int:
    """A destination's Storage Commitment answer (N-EVENT-REPORT) for *transaction_uid*: the
    SOP Instance UIDs it took responsibility for, and those it did not (with its Failure
    Reason), which are sent again. Only deliveries of that transaction to that destination
    change; returns how many."""
    rows = session.execute(
        select(Delivery, Instance.sop_instance_uid)
        .join(Instance, Delivery.instance_pk == Instance.id)
        .where(Delivery.transaction_uid == transaction_uid, Delivery.destination_ae == peer)
    ).all()
    reasons = dict(failed)
    changed = 0
    for delivery, sop_uid in rows:
        if sop_uid in committed:
            delivery.confirmation = "committed (storage commitment)"
            delivery.confirmed_at = now
        elif sop_uid in reasons:
            code = reasons[sop_uid]
            why = f"{peer} did not commit the instance" + (
                f" (failure reason 0x{int(code):04X})" if code is not None else ""
            )
            delivery.confirmation = f"commitment failed: {why}"
            # sent again after the backoff while attempts remain (done -> queued)
            tasks.fail(session, delivery, f"{why}: sent again", now=now)
        else:
            continue
        changed += 1
    return changed
