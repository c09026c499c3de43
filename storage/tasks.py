"""The task state machine, the same for jobs and deliveries (the only writer of task state).

::

    queued --claim--> running --succeed--> done
       ^  ^              |  \\--skip-----> skipped
       |  \\--defer------|  (not an attempt: the input is not all there yet)
       |                 |---fail, attempts left (backoff)--> queued
       |                 |---fail, permanent or out of attempts--> failed
       \\--lease expired, attempts left (backoff)--/  (out of attempts: failed, "abandoned")

A claim counts an attempt and takes a lease (``lease_s``) in the holder's name; the holder renews
it with :func:`heartbeat` while it works. A lease that runs out means its holder died or hung:
:func:`expire` treats that as a failed attempt, so an input that kills its worker every time
ends ``failed`` after ``max_attempts`` instead of being claimed forever (rq's
``StartedJobRegistry.cleanup`` does the same). Attempts, their backoff and the deadline of one
attempt are stored on the row, so whichever process takes the task next applies the same rules.

Every function takes ``now`` (naive UTC), so the transitions are tested with a clock passed in.
Claims use ``SELECT ... FOR UPDATE SKIP LOCKED`` where the database has it (PostgreSQL), so
workers on several machines never take the same row and never wait on each other; SQLite's
writing sessions begin with ``BEGIN IMMEDIATE``, which serialises claims the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.models import Delivery, Job, TaskColumns, TaskState

ERROR_MAX = 2000

T = TypeVar("T", Job, Delivery)


def backoff_s(task: TaskColumns) -> float:
    """The wait before the next attempt, after ``task.attempts`` attempts have failed."""
    exponent = max(0, task.attempts - 1)
    return float(min(task.backoff_max_s, task.backoff_initial_s * 2.0 ** min(exponent, 30)))


def claim(
    session: Session,
    model: type[T],
    *,
    owner: str,
    lease_s: float,
    now: datetime,
    limit: int = 1,
    where: Iterable[Any] = (),
) -> list[T]:
    """Lease up to *limit* due tasks to *owner*: highest priority first, then oldest due."""
    rows = session.scalars(
        select(model)
        .where(model.state == TaskState.QUEUED, model.not_before <= now, *where)
        .order_by(model.priority.desc(), model.not_before, model.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for task in rows:
        task.state = TaskState.RUNNING
        task.attempts += 1
        task.claimed_by = owner
        task.lease_expires_at = now + timedelta(seconds=lease_s)
        task.heartbeat_at = now
        task.started_at = now
        task.updated_at = now
    session.flush()
    return list(rows)


def heartbeat(
    session: Session,
    model: type[T],
    ids: Sequence[int],
    *,
    owner: str,
    lease_s: float,
    now: datetime,
) -> int:
    """Renew *owner*'s leases on *ids*; returns how many it still holds (fewer: some expired
    and were taken back, and their work must not be recorded)."""
    if not ids:
        return 0
    result = session.execute(
        update(model)
        .where(model.id.in_(ids), model.state == TaskState.RUNNING, model.claimed_by == owner)
        .values(lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def holds(task: TaskColumns, owner: str) -> bool:
    """Whether *owner* holds the lease on *task*, as the row was read (read it in the
    transaction that records the outcome, so that no one can take it back meanwhile)."""
    return task.state == TaskState.RUNNING and task.claimed_by == owner


def succeed(session: Session, task: TaskColumns, now: datetime) -> None:
    """Done. The error of an earlier failed attempt, if any, is kept: an operator sees that
    it took a retry, and why."""
    _finish(task, TaskState.DONE, task.last_error, now)


def skip(session: Session, task: TaskColumns, reason: str, now: datetime) -> None:
    """The task will not be done, for a reason no retry changes (shown to operators)."""
    _finish(task, TaskState.SKIPPED, reason, now)


def fail(
    session: Session, task: TaskColumns, error: str, *, now: datetime, permanent: bool = False
) -> TaskState:
    """Record a failed attempt: back to ``queued`` after the backoff while attempts remain,
    else (or when *permanent*) ``failed``. Returns the new state."""
    if permanent or task.attempts >= task.max_attempts:
        _finish(task, TaskState.FAILED, error, now)
    else:
        task.state = TaskState.QUEUED
        task.last_error = error[:ERROR_MAX]
        task.claimed_by = ""
        task.lease_expires_at = None
        task.not_before = now + timedelta(seconds=backoff_s(task))
        task.updated_at = now
    return task.state


def defer(task: TaskColumns, not_before: datetime, now: datetime) -> None:
    """Back to ``queued`` until *not_before*, the attempt its claim counted given back: the
    holder found the task not ready (a series still arriving), which is no failure."""
    task.state = TaskState.QUEUED
    task.attempts = max(0, task.attempts - 1)
    task.claimed_by = ""
    task.lease_expires_at = None
    task.not_before = not_before
    task.updated_at = now


def expire(
    session: Session, model: type[T], *, now: datetime, owners: Sequence[str] | None = None
) -> list[T]:
    """Take back running tasks whose lease ran out, or (with *owners*) every lease those dead
    holders had; each counts as a failed attempt. Returns the tasks taken back."""
    condition = model.claimed_by.in_(owners) if owners is not None else model.lease_expires_at < now
    rows = session.scalars(
        select(model)
        .where(model.state == TaskState.RUNNING, condition)
        .with_for_update(skip_locked=True)
    ).all()
    for task in rows:
        holder = task.claimed_by or "its holder"
        if task.attempts >= task.max_attempts:
            fail(
                session,
                task,
                f"abandoned: {holder} stopped during attempt {task.attempts} of "
                f"{task.max_attempts} (the lease was not renewed)",
                now=now,
            )
        else:
            fail(
                session,
                task,
                f"lease expired: {holder} stopped during attempt {task.attempts} of "
                f"{task.max_attempts}",
                now=now,
            )
    session.flush()
    return list(rows)


def retry(task: TaskColumns, now: datetime) -> None:
    """A fresh set of attempts for a failed task (an operator's decision)."""
    task.state = TaskState.QUEUED
    task.attempts = 0
    task.claimed_by = ""
    task.lease_expires_at = None
    task.not_before = now
    task.finished_at = None
    task.updated_at = now


def _finish(task: TaskColumns, state: TaskState, reason: str, now: datetime) -> None:
    task.state = state
    task.last_error = reason[:ERROR_MAX]
    task.claimed_by = ""
    task.lease_expires_at = None
    task.finished_at = now
    task.updated_at = now
