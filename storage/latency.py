"""How long each stage took for each result: one definition for the dashboard and ``/metrics``.

For a result: *received* (the series' first instance), *complete* (its last), *queued* (the job
started), *analysed* (the job finished), *delivered* (the last of the result's own outputs, its
SR and heatmaps, answered Success by a destination) and *confirmed* (the last of them the
destination confirmed holding). A stage not reached yet is None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.db import chunks
from storage.models import Delivery, Instance, Job, Result, Series, TaskState

STAGES = ("received", "complete", "queued", "analysed", "delivered", "confirmed")


@dataclass(frozen=True)
class StageTimes:
    result_pk: int
    modality: str
    times: tuple[datetime | None, ...]  # one per STAGES

    def seconds(self) -> dict[str, float]:
        """Each reached stage's seconds from the one before it (keyed by the later stage)."""
        out = {}
        for stage, a, b in zip(STAGES[1:], self.times[:-1], self.times[1:], strict=True):
            if a is not None and b is not None:
                out[stage] = max(0.0, (b - a).total_seconds())
        return out

    @property
    def receive_to_delivered_s(self) -> float | None:
        first, delivered = self.times[0], self.times[4]
        if first is None or delivered is None:
            return None
        return max(0.0, (delivered - first).total_seconds())


def stage_times(
    session: Session, result_pks: Sequence[int] | None = None, *, analysed_only: bool = False
) -> list[StageTimes]:
    """The stage times of the results *result_pks* (all when None); *analysed_only*: of the
    results of done jobs (not the reports of skipped ones). Reads the received times of the
    results' own series only, and the deliveries of their outputs in one pass."""
    statement = (
        select(
            Result.id,
            Result.series_pk,
            Series.modality,
            Result.sr_sop_instance_uid,
            Result.sc_sop_instance_uids,
            Job.started_at,
            Job.finished_at,
        )
        .join(Series, Series.id == Result.series_pk)
        .join(Job, Job.id == Result.job_pk)
    )
    if result_pks is not None:
        statement = statement.where(Result.id.in_(list(result_pks)))
    if analysed_only:
        statement = statement.where(Job.state == TaskState.DONE)
    rows = session.execute(statement).all()
    if not rows:
        return []
    received: dict[int, tuple[datetime | None, datetime | None]] = {}
    series = sorted({row[1] for row in rows})
    for chunk in chunks(series):
        for key, earliest, latest in session.execute(
            select(
                Instance.series_pk, func.min(Instance.received_at), func.max(Instance.received_at)
            )
            .where(Instance.series_pk.in_(chunk))
            .group_by(Instance.series_pk)
        ).all():
            received[key] = (earliest, latest)
    outputs = [uid for row in rows for uid in [row[3], *(row[4] or [])]]
    sent = _sent(session, outputs if result_pks is not None else None)
    out = []
    for pk, series_pk, modality, sr, heatmaps, started, finished in rows:
        mine = [sent[u] for u in [sr, *(heatmaps or [])] if u in sent]
        delivered = max((d for d, _ in mine if d is not None), default=None)
        confirmed = max((c for _, c in mine if c is not None), default=None)
        first, last = received.get(series_pk, (None, None))
        times = (first, last, started, finished, delivered, confirmed)
        out.append(StageTimes(pk, modality or "", times))
    return out


def _sent(
    session: Session, uids: Sequence[str] | None
) -> dict[str, tuple[datetime | None, datetime | None]]:
    """(last delivered, last confirmed) of each generated instance delivered (of *uids*, or
    of all of them in one query)."""
    base = (
        select(
            Instance.sop_instance_uid,
            func.max(Delivery.finished_at),
            func.max(Delivery.confirmed_at),
        )
        .join(Delivery, Delivery.instance_pk == Instance.id)
        .where(Delivery.state == TaskState.DONE)
        .group_by(Instance.sop_instance_uid)
    )
    if uids is None:
        return {uid: (d, c) for uid, d, c in session.execute(base).all()}
    out: dict[str, tuple[datetime | None, datetime | None]] = {}
    for chunk in chunks(uids):
        for uid, d, c in session.execute(base.where(Instance.sop_instance_uid.in_(chunk))).all():
            out[uid] = (d, c)
    return out
