"""APScheduler wiring for the in-process node (:class:`pacs_node.node.Node` with
``scheduler=True``): each round every ``poll_interval_s``, one instance of it at a time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from apscheduler.schedulers.background import BackgroundScheduler

from pacs_node.logs import log_failure

log = logging.getLogger(__name__)


def start_scheduler(
    rounds: Sequence[tuple[str, Callable[[], object]]], poll_interval_s: float
) -> BackgroundScheduler:
    # "skipped: maximum number of running instances reached" is the intended back-pressure
    # while a long round runs, not a fault worth a warning every poll
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    scheduler = BackgroundScheduler(daemon=True)
    for name, fn in rounds:
        scheduler.add_job(
            _guarded(name, fn),
            "interval",
            seconds=poll_interval_s,
            id=name,
            max_instances=1,  # a long round delays the next one rather than overlapping it
            coalesce=True,
            misfire_grace_time=None,
        )
    scheduler.start()
    return scheduler


def _guarded(name: str, fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except Exception:  # the scheduler must keep running whatever one round did
            log_failure(log, "%s round failed", name)

    return run
