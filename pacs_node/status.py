"""A plain-text view of the queue for operators: ``pacs-node status``."""

from __future__ import annotations

from sqlalchemy import func, select

from storage import queue
from storage.db import Database
from storage.models import Delivery, Job, Result, Series, TaskState


def render_status(db: Database, limit: int = 20) -> str:
    lines: list[str] = []
    with db.read() as session:
        jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        lines.append("jobs: " + ", ".join(f"{s.value} {jobs.get(s, 0)}" for s in TaskState))
        deliveries = dict(
            session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
        )
        lines.append(
            "deliveries: "
            + ", ".join(
                f"{s.value} {deliveries.get(s, 0)}" for s in TaskState if s != TaskState.SKIPPED
            )
        )
        if deliveries.get(TaskState.DONE):
            confirmed = session.scalar(
                select(func.count()).where(
                    Delivery.state == TaskState.DONE, Delivery.confirmed_at.is_not(None)
                )
            )
            unconfirmed = session.execute(
                select(Delivery.destination_ae, Delivery.confirmation, func.count())
                .where(Delivery.state == TaskState.DONE, Delivery.confirmation.like("unconfirmed%"))
                .group_by(Delivery.destination_ae, Delivery.confirmation)
            ).all()
            lines.append(
                f"delivered: confirmed at the destination {confirmed}, unconfirmed "
                f"{sum(n for _, _, n in unconfirmed)}"
            )
            lines += [f"  {n} to {ae} {why}" for ae, why, n in unconfirmed]
        problem_jobs = session.execute(
            select(Job, Series.series_instance_uid, Series.modality)
            .join(Series, Job.series_pk == Series.id)
            .where(
                Job.state.in_([TaskState.FAILED, TaskState.SKIPPED])
                | (Job.last_error != "")
                | (Job.warnings != "")
            )
            .order_by(Job.id.desc())
            .limit(limit)
        ).all()
        if problem_jobs:
            lines.append("")
            lines.append("jobs failed, skipped, retried or with warnings (newest first):")
            for job, series_uid, modality in problem_jobs:
                line = (
                    f"  job {job.id} {job.state.value} {modality or '-'} series {series_uid} "
                    f"attempts {job.attempts}"
                )
                lines.append(f"{line}: {job.last_error}" if job.last_error else line)
                lines += [f"    warning: {w}" for w in job.warnings.splitlines()]
        failed = queue.failed_deliveries(session, limit)
        if failed:
            lines.append("")
            lines.append("failed deliveries:")
            for delivery, sop_uid in failed:
                lines.append(
                    f"  delivery {delivery.id} to {delivery.destination_ae} instance {sop_uid} "
                    f"after {delivery.attempts} attempts: {delivery.last_error}"
                )
        results = session.execute(
            select(Result, Series.series_instance_uid)
            .join(Series, Result.series_pk == Series.id)
            .order_by(Result.id.desc())
            .limit(limit)
        ).all()
        if results:
            lines.append("")
            lines.append("latest results (AI-generated, not for diagnostic use):")
            for result, series_uid in results:
                replaced = (
                    f"; superseded by SR {result.superseded_by}" if result.superseded_by else ""
                )
                lines.append(
                    f"  series {series_uid}: {result.label} {result.probability:.3f} "
                    f"({result.model_name} {result.model_version}{replaced})"
                )
    return "\n".join(lines)
