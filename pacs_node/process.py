"""What every role process shares: its name on a lease, its loop, its stop signal, its
watchdog, and how leases of dead processes on this machine are taken back."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from pacs_node.config import Config
from storage import tasks
from storage.db import Database
from storage.files import FileStore, pid_alive
from storage.models import Delivery, Job, TaskState, utcnow

log = logging.getLogger(__name__)

HOST = socket.gethostname()[:40]


def owner_id(pid: int | None = None) -> str:
    """The name a process holds leases under: ``host:pid``."""
    return f"{HOST}:{pid if pid is not None else os.getpid()}"


def dead_local_owners(db: Database) -> list[str]:
    """Lease holders on this machine whose process is gone."""
    with db.read() as session:
        owners = set(
            session.scalars(select(Job.claimed_by).where(Job.state == TaskState.RUNNING)).all()
        ) | set(
            session.scalars(
                select(Delivery.claimed_by).where(Delivery.state == TaskState.RUNNING)
            ).all()
        )
    dead = []
    for owner in owners:
        host, _, pid = owner.rpartition(":")
        if host == HOST and pid.isdigit() and not pid_alive(int(pid)):
            dead.append(owner)
    return sorted(dead)


def release_leases(db: Database, owners: list[str]) -> int:
    """Take back every lease *owners* (dead processes) held, each a failed attempt."""
    if not owners:
        return 0
    now = utcnow()
    with db.session() as session:
        taken = tasks.expire(session, Job, now=now, owners=owners)
        taken += tasks.expire(session, Delivery, now=now, owners=owners)  # type: ignore[arg-type]
    for task in taken:
        log.warning(
            "%s %d taken back from %s: %s",
            type(task).__name__.lower(),
            task.id,
            ", ".join(owners),
            task.state,
        )
    return len(taken)


class Stop:
    """Set by SIGTERM or SIGINT; the role finishes the task in hand and exits."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.wakes: list[threading.Event] = []  # set too, so that a waiting loop sees it

    def install(self) -> Stop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        self.event.set()
        for event in self.wakes:
            event.set()

    def wait(self, seconds: float) -> bool:
        return self.event.wait(seconds)

    def __bool__(self) -> bool:
        return self.event.is_set()


def file_store(config: Config) -> FileStore:
    """The storage folder of *config*, with its free-space floor."""
    return FileStore(config.node.storage_dir, config.node.min_free_mb * 2**20)


def run_loop(
    step: Callable[[], int],
    poll_interval_s: float,
    stop: Stop,
    *,
    sweep: Callable[[], object] | None = None,
    sweep_every_s: float = 1.0,
    wake: threading.Event | None = None,
) -> None:
    """Call *step* until *stop*; straight again while it finds work, else after the poll
    interval or as soon as *wake* is set (:mod:`pacs_node.wake`); *sweep* (taking back
    expired leases) first, at most every *sweep_every_s*. A failing round is logged and the
    loop goes on."""
    last_sweep = -sweep_every_s
    if wake is not None:
        stop.wakes.append(wake)
    while not stop:
        if wake is not None:
            wake.clear()  # before the step: a nudge during it makes the next one come at once
        try:
            if sweep is not None and time.monotonic() - last_sweep >= sweep_every_s:
                last_sweep = time.monotonic()
                sweep()
            did = step()
        except Exception:
            log.exception("round failed; going on")
            did = 0
        if not did:
            (stop.event if wake is None else wake).wait(poll_interval_s)


class Watchdog:
    """Renews the leases of the tasks in hand and enforces their deadline.

    A thread wakes every ``lease_s / 4``: it renews the leases (so a long analysis keeps its
    job), and when the task in hand has run past its deadline it calls *on_deadline* (which
    records the failure) and ends the process with exit status 70: a hung decoder in C code
    cannot be interrupted any other way. The supervisor starts a new process, which goes on
    with the other tasks (rq's "death penalty", at the level of the process).
    """

    EXIT_STATUS = 70

    def __init__(
        self,
        db: Database,
        model: type[Job] | type[Delivery],
        *,
        owner: str,
        lease_s: float,
        on_deadline: Callable[[list[int], float], None],
        exit_on_deadline: bool = True,
    ) -> None:
        self.db, self.model, self.owner, self.lease_s = db, model, owner, lease_s
        self.on_deadline = on_deadline
        self.exit_on_deadline = exit_on_deadline
        self._lock = threading.Lock()
        self._ids: list[int] = []
        self._deadline: float | None = None
        self._started = 0.0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def hold(self, ids: list[int], deadline_s: float) -> None:
        with self._lock:
            self._ids, self._deadline, self._started = list(ids), deadline_s, time.monotonic()

    def release(self) -> None:
        with self._lock:
            self._ids, self._deadline = [], None

    def check(self) -> None:
        """One round (the thread's body; tests call it directly)."""
        with self._lock:
            ids, deadline, started = list(self._ids), self._deadline, self._started
        if not ids:
            return
        elapsed = time.monotonic() - started
        if deadline is not None and elapsed > deadline:
            log.error("tasks %s ran %.0f s, past their deadline of %.0f s", ids, elapsed, deadline)
            try:
                self.on_deadline(ids, elapsed)
            finally:
                if self.exit_on_deadline:
                    logging.shutdown()
                    os._exit(self.EXIT_STATUS)
            return
        with self.db.session() as session:
            held = tasks.heartbeat(
                session,
                self.model,  # type: ignore[type-var]
                ids,
                owner=self.owner,
                lease_s=self.lease_s,
                now=utcnow(),
            )
        if held < len(ids):
            log.warning("lost the lease on some of tasks %s; their work will be dropped", ids)

    def _run(self) -> None:
        interval = max(0.05, self.lease_s / 4)
        while not self._stopped.wait(interval):
            try:
                self.check()
            except Exception:
                log.exception("watchdog round failed")
