"""The only writer of job and delivery state.

Jobs: ``queued -> running -> done | skipped | failed``; a running job holds a lease, and a lease
that expires (the process died mid-job) puts the job back in the queue. Deliveries work the same
way with ``pending -> sending -> sent | failed`` and exponential backoff between attempts.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.models import Delivery, DeliveryState, Job, JobState, Series, utcnow

ERROR_MAX = 2000


def active_job(session: Session, series_pk: int) -> Job | None:
    """The series' job that has not finished yet, if any."""
    return session.scalar(
        select(Job)
        .where(Job.series_pk == series_pk, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
        .order_by(Job.id.desc())
    )


def latest_job(session: Session, series_pk: int) -> Job | None:
    return session.scalar(select(Job).where(Job.series_pk == series_pk).order_by(Job.id.desc()))


def enqueue(
    session: Session, series: Series, *, model_name: str, not_before: datetime, max_attempts: int
) -> Job:
    """Queue the series for analysis at *not_before*; a queued job only has its start moved."""
    job = active_job(session, series.id)
    if job is not None and job.state == JobState.QUEUED:
        job.not_before = not_before
        job.model_name = model_name
        return job
    job = Job(
        series_pk=series.id,
        model_name=model_name,
        state=JobState.QUEUED,
        not_before=not_before,
        max_attempts=max_attempts,
    )
    session.add(job)
    session.flush()
    return job


def skip(session: Session, series: Series, reason: str) -> Job:
    """Record that the series will not be analysed, and why (visible to operators)."""
    job = latest_job(session, series.id)
    if job is not None and job.state == JobState.SKIPPED and job.last_error == reason:
        return job
    now = utcnow()
    job = Job(
        series_pk=series.id,
        state=JobState.SKIPPED,
        last_error=reason[:ERROR_MAX],
        finished_at=now,
        not_before=now,
    )
    session.add(job)
    session.flush()
    return job


def claim(session: Session, lease_s: float, now: datetime | None = None) -> Job | None:
    """Take the oldest due job and lease it; None when nothing is due."""
    now = now or utcnow()
    candidates = session.scalars(
        select(Job.id)
        .where(Job.state == JobState.QUEUED, Job.not_before <= now)
        .order_by(Job.not_before, Job.id)
        .limit(5)
    ).all()
    for job_id in candidates:
        taken = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED)
            .values(
                state=JobState.RUNNING,
                attempts=Job.attempts + 1,
                lease_expires_at=now + timedelta(seconds=lease_s),
                started_at=now,
                updated_at=now,
            )
        )
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            return session.get(Job, job_id, populate_existing=True)
    return None


def complete(session: Session, job: Job) -> None:
    _finish(session, job, JobState.DONE, "")


def skip_running(session: Session, job: Job, reason: str) -> None:
    _finish(session, job, JobState.SKIPPED, reason)


def fail(session: Session, job: Job, error: str, retry_backoff_s: float) -> JobState:
    """Record a failed attempt; requeue with backoff while attempts remain."""
    job = session.get(Job, job.id, populate_existing=True) or job
    if job.attempts < job.max_attempts:
        job.state = JobState.QUEUED
        job.last_error = error[:ERROR_MAX]
        job.lease_expires_at = None
        job.not_before = utcnow() + timedelta(seconds=retry_backoff_s * 2 ** (job.attempts - 1))
    else:
        _finish(session, job, JobState.FAILED, error)
    return job.state


def _finish(session: Session, job: Job, state: JobState, reason: str) -> None:
    job = session.get(Job, job.id, populate_existing=True) or job
    job.state = state
    job.last_error = reason[:ERROR_MAX]
    job.lease_expires_at = None
    job.finished_at = utcnow()


def requeue_expired(
    session: Session, now: datetime | None = None, *, every_lease: bool = False
) -> int:
    """Put back jobs and deliveries whose lease ran out (their process died); with
    *every_lease*, all that are leased (at start-up no lease can belong to a live worker)."""
    now = now or utcnow()
    cutoff = datetime.max if every_lease else now
    jobs = session.execute(
        update(Job)
        .where(Job.state == JobState.RUNNING, Job.lease_expires_at < cutoff)
        .values(
            state=JobState.QUEUED,
            lease_expires_at=None,
            not_before=now,
            last_error="lease expired: the worker stopped during the job",
        )
    ).rowcount  # type: ignore[attr-defined]
    deliveries = session.execute(
        update(Delivery)
        .where(Delivery.state == DeliveryState.SENDING, Delivery.lease_expires_at < cutoff)
        .values(state=DeliveryState.PENDING, lease_expires_at=None, next_attempt_at=now)
    ).rowcount  # type: ignore[attr-defined]
    return int(jobs) + int(deliveries)


def requeue_all_running(session: Session) -> int:
    """At start-up nothing can be running: every lease belongs to a dead process."""
    return requeue_expired(session, every_lease=True)


# -- deliveries ------------------------------------------------------------------------------


def add_delivery(session: Session, instance_pk: int, destination_ae: str) -> Delivery:
    delivery = session.scalar(
        select(Delivery).where(
            Delivery.instance_pk == instance_pk, Delivery.destination_ae == destination_ae
        )
    )
    if delivery is None:
        delivery = Delivery(instance_pk=instance_pk, destination_ae=destination_ae)
        session.add(delivery)
        session.flush()
    elif delivery.state == DeliveryState.FAILED:
        reset_delivery(delivery)
    return delivery


def reset_delivery(delivery: Delivery) -> None:
    delivery.state = DeliveryState.PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = utcnow()


def claim_deliveries(
    session: Session, lease_s: float, limit: int = 50, now: datetime | None = None
) -> Sequence[Delivery]:
    """Lease due deliveries, grouped so that one association can carry them."""
    now = now or utcnow()
    ids = session.scalars(
        select(Delivery.id)
        .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
        .order_by(Delivery.destination_ae, Delivery.id)
        .limit(limit)
    ).all()
    if not ids:
        return []
    session.execute(
        update(Delivery)
        .where(Delivery.id.in_(ids), Delivery.state == DeliveryState.PENDING)
        .values(
            state=DeliveryState.SENDING,
            attempts=Delivery.attempts + 1,
            lease_expires_at=now + timedelta(seconds=lease_s),
        )
    )
    return session.scalars(
        select(Delivery)
        .where(Delivery.id.in_(ids), Delivery.state == DeliveryState.SENDING)
        .execution_options(populate_existing=True)
    ).all()


def delivered(session: Session, delivery_id: int, status: int) -> None:
    delivery = session.get(Delivery, delivery_id, populate_existing=True)
    if delivery is None:
        return
    delivery.state = DeliveryState.SENT
    delivery.last_status = status
    delivery.last_error = ""
    delivery.lease_expires_at = None
    delivery.sent_at = utcnow()


def delivery_failed(
    session: Session,
    delivery_id: int,
    error: str,
    *,
    status: int | None,
    max_attempts: int,
    backoff_initial_s: float,
    backoff_max_s: float,
    permanent: bool = False,
) -> DeliveryState:
    delivery = session.get(Delivery, delivery_id, populate_existing=True)
    if delivery is None:
        return DeliveryState.FAILED
    delivery.last_status = status
    delivery.last_error = error[:ERROR_MAX]
    delivery.lease_expires_at = None
    if permanent or delivery.attempts >= max_attempts:
        delivery.state = DeliveryState.FAILED
    else:
        delay = min(backoff_max_s, backoff_initial_s * 2 ** (delivery.attempts - 1))
        delivery.state = DeliveryState.PENDING
        delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
    return delivery.state


def retry_failed(
    session: Session,
    *,
    delivery_ids: Sequence[int] | None = None,
    job_ids: Sequence[int] | None = None,
) -> tuple[int, int]:
    """Give failed deliveries and jobs a fresh set of attempts (all when no ids are given).

    Returns (deliveries, jobs) requeued. What is not failed is left alone.
    """
    deliveries = select(Delivery).where(Delivery.state == DeliveryState.FAILED)
    jobs = select(Job).where(Job.state == JobState.FAILED)
    if delivery_ids is not None or job_ids is not None:
        deliveries = deliveries.where(Delivery.id.in_(delivery_ids or []))
        jobs = jobs.where(Job.id.in_(job_ids or []))
    n_deliveries = n_jobs = 0
    for delivery in session.scalars(deliveries).all():
        reset_delivery(delivery)
        n_deliveries += 1
    now = utcnow()
    for job in session.scalars(jobs).all():
        job.state = JobState.QUEUED
        job.attempts = 0
        job.not_before = now
        job.finished_at = None
        n_jobs += 1
    return n_deliveries, n_jobs
