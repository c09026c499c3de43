"""``pacs-node serve``: every role in a process of its own on this machine, restarted when it
dies.

The supervisor brings the database schema up to date, takes back the leases of processes of
this machine that are gone, then starts ``receive``, ``worker.processes`` times ``work``,
``send`` and (when ``web.enabled``) ``web``, each as ``python -m pacs_node.cli ROLE`` with the
same config. A child that dies is started again (after 1 s, doubling to 30 s while it keeps
dying quickly), and the leases it held are taken back at once, each counting as a failed
attempt, so its tasks do not wait for their lease to run out. A child that exits with status 2
in its first seconds met a problem no restart fixes (a bad config, a broken model): the
supervisor stops everything and exits with it. On SIGTERM or SIGINT the children are asked to
stop, then killed after a grace period. Each child asks the kernel to kill it if the supervisor
dies (``PR_SET_PDEATHSIG``), so a SIGKILL of ``serve`` takes the whole node down as a power cut
would, and nothing keeps running unwatched.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pacs_node.config import Config
from pacs_node.process import Stop, Watchdog, dead_local_owners, owner_id, release_leases
from storage.db import Database

log = logging.getLogger(__name__)

FATAL_EXIT = 2  # a role that cannot start (config, model): restarting will not help
STARTUP_S = 20.0
GRACE_S = 15.0
SWEEP_S = 5.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


@dataclass
class Child:
    role: str
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 1.0
    restart_at: float = 0.0

    @property
    def name(self) -> str:
        return self.role if self.role in ("send", "web") else f"{self.role}[{self.index}]"


class Supervisor:
    def __init__(self, config: Config, config_path: str | None, log_level: str) -> None:
        self.config = config
        args = ["--log-level", log_level]
        if config_path is not None:
            args += ["--config", str(Path(config_path).resolve())]
        self.args = args
        roles = [("receive", i) for i in range(config.node.receive_processes)]
        roles += [("work", i) for i in range(config.worker.processes)]
        roles.append(("send", 0))
        if config.web.enabled:
            roles.append(("web", 0))
        self.children = [Child(role, i) for role, i in roles]

    def command(self, child: Child) -> list[str]:
        return [sys.executable, "-m", "pacs_node.cli", child.role, *self.args]

    def spawn(self, child: Child) -> None:
        child.proc = subprocess.Popen(self.command(child), preexec_fn=_die_with_parent)
        child.started_at = time.monotonic()
        log.info("%s started (pid %d)", child.name, child.proc.pid)

    def run(self, stop: Stop) -> int:
        db = Database(self.config.node.resolved_database_url)  # migrates the schema
        try:
            taken = release_leases(db, dead_local_owners(db))
            if taken:
                log.warning("took back %d tasks from processes that died before this start", taken)
            for child in self.children:
                self.spawn(child)
            status = self._watch(db, stop)
        finally:
            self._stop_all()
            db.dispose()
        return status

    def _watch(self, db: Database, stop: Stop) -> int:
        last_sweep = time.monotonic()
        while not stop:
            now = time.monotonic()
            if now - last_sweep > SWEEP_S:  # a process that outlived its parent, since gone
                release_leases(db, dead_local_owners(db))
                last_sweep = now
            for child in self.children:
                proc = child.proc
                if proc is None:
                    if now >= child.restart_at:
                        self.spawn(child)
                    continue
                code = proc.poll()
                if code is None:
                    continue
                ran_s = now - child.started_at
                child.proc = None
                release_leases(db, [owner_id(proc.pid)])
                if code == FATAL_EXIT and ran_s < STARTUP_S:
                    log.error(
                        "%s cannot start (exit status %d): stopping the node", child.name, code
                    )
                    return FATAL_EXIT
                child.restarts += 1
                if ran_s > 60:  # it had been running fine: this is not a crash loop
                    child.backoff_s = 1.0
                # a worker its watchdog stopped at a deadline is started again at once
                delay = 0.0 if code == Watchdog.EXIT_STATUS else child.backoff_s
                child.backoff_s = min(30.0, child.backoff_s * 2)
                child.restart_at = now + delay
                log.warning(
                    "%s (pid %d) exited with status %d after %.0f s; restart %d in %.0f s",
                    child.name,
                    proc.pid,
                    code,
                    ran_s,
                    child.restarts,
                    delay,
                )
            stop.wait(0.2)
        return 0

    def _stop_all(self) -> None:
        running = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for child in running:
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for child in running:
            assert child.proc is not None
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s: killed", child.name, GRACE_S)
                child.proc.kill()
                child.proc.wait()
