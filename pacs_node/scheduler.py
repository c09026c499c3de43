"""APScheduler wiring: the worker's round every ``poll_interval_s``, one round at a time."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler

from pacs_node.logs import log_failure

if TYPE_CHECKING:
    from pacs_node.worker import Worker

log = logging.getLogger(__name__)


def start_scheduler(worker: Worker, poll_interval_s: float) -> BackgroundScheduler:
    # "skipped: maximum number of running instances reached" is the intended back-pressure
    # while a long job runs, not a fault worth a warning every poll
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    scheduler = BackgroundScheduler(daemon=True)
    scheduler.add_job(
        _guarded(worker.tick),
        "interval",
        seconds=poll_interval_s,
        id="worker",
        max_instances=1,  # a long inference delays the next round rather than overlapping it
        coalesce=True,
        misfire_grace_time=None,
    )
    scheduler.start()
    return scheduler


def _guarded(fn):  # type: ignore[no-untyped-def]
    def run() -> None:
        try:
            fn()
        except Exception:  # the scheduler must keep running whatever one round did
            log_failure(log, "worker round failed")

    return run
