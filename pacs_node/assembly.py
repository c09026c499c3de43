"""When a series is ready for analysis, decided as each instance is stored.

A CR or DX image is complete on arrival: its series is queued at once. A CT series arrives slice
by slice, so its job waits until no new slice has come for a while (each slice pushes the start
back): ``worker.completeness_settle_s`` when its sender answers C-FIND, after which the work role
asks the sender how many slices the series has (:mod:`pacs_node.completeness`), else the quiet
period ``worker.ct_quiet_period_s``. Objects without pixels are stored and their series gets
a ``skipped`` job with the reason.
A series of a modality no model serves is queued all the same (a job without a model), so that
the work role reports it "not analysed" (``worker.report_not_analysed``; off: skipped here).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy.orm import Session

from ai.eligibility import has_pixels
from pacs_node.config import Config
from storage import queue
from storage.ingest import IndexCache, Indexed
from storage.models import TaskState
from storage.queue import Schedule

SINGLE_IMAGE_MODALITIES = {"CR", "DX", "MG", "XA", "RF", "OT"}


def sop_class_name(ds: Dataset) -> str:
    value = ds.get("SOPClassUID")
    return UID(str(value)).name if value else "unknown SOP class"


def schedule(
    session: Session,
    indexed: Indexed,
    ds: Dataset,
    config: Config,
    now: datetime,
    cache: IndexCache | None = None,
) -> datetime | None:
    """Queue or skip the series of a newly stored instance; the start of the job it queued or
    moved (None: none). With *cache*, the next slice of a series whose job is still queued
    only moves that job's start (one statement)."""
    if indexed.generated:
        return None
    not_before = now + timedelta(seconds=start_delay_s(config, indexed.modality, indexed.source_ae))
    if cache is not None and indexed.is_new:
        job_id = cache.queued_job(indexed.series_pk)
        if job_id is not None and queue.postpone(session, job_id, not_before):
            return not_before
    modality = indexed.modality or "(none)"
    if not has_pixels(ds):
        queue.skip(
            session,
            indexed.series_pk,
            f"not an image ({sop_class_name(ds)}): stored, not analysed",
        )
        return None
    binding = config.model_for(indexed.modality)
    if binding is None and not config.worker.report_not_analysed:
        queue.skip(
            session, indexed.series_pk, f"no model for modality {modality}: stored, not analysed"
        )
        return None
    # no model: still a job (model_name ""), which the work role skips with an SR that says
    # so; this role builds no DICOM objects
    if not indexed.is_new:
        latest = queue.latest_job(session, indexed.series_pk)
        if latest is not None and latest.state != TaskState.FAILED:
            return None  # the same instance again: its series is queued or already analysed
    job = queue.enqueue(
        session,
        indexed.series_pk,
        model_name=binding.name if binding is not None else "",
        not_before=not_before,
        schedule=job_schedule(config, indexed.modality, indexed.source_ae),
    )
    if cache is not None:
        cache.put_queued_job(indexed.series_pk, job.id)
    return not_before


def start_delay_s(config: Config, modality: str, source_ae: str) -> float:
    """How long after its newest instance a series is first looked at by the work role."""
    if modality in SINGLE_IMAGE_MODALITIES:
        return 0.0
    peer = config.peer(source_ae) if source_ae else None
    quiet = config.worker.ct_quiet_period_s
    if peer is not None and peer.ask_completeness:  # never later than without asking
        return min(config.worker.completeness_settle_s, quiet)
    return quiet


def job_schedule(config: Config, modality: str, source_ae: str) -> Schedule:
    """Attempts, backoff, deadline and priority lane of a job: the modality's priority plus
    its sender's."""
    worker = config.worker
    peer = config.peer(source_ae) if source_ae else None
    return Schedule(
        max_attempts=worker.max_attempts,
        backoff_initial_s=worker.retry_backoff_s,
        backoff_max_s=max(worker.retry_backoff_s, 3600.0),
        deadline_s=worker.deadline_s,
        priority=worker.priority(modality) + (peer.priority if peer else 0),
    )
