"""The three roles in one process: for tests, for embedding, and for burst runs.

``pacs-node serve`` runs each role in a process of its own (:mod:`pacs_node.supervisor`);
:class:`Node` runs the receive role's server in this process and leaves work and delivery to
:meth:`Node.run_pending`, which runs everything due, synchronously (rq's "burst" mode), so a
test decides when analysis and delivery happen.
"""

from __future__ import annotations

import logging
from typing import Any

from pacs_node import work
from pacs_node.audit import AuditTrail
from pacs_node.config import Config
from pacs_node.process import dead_local_owners, file_store, release_leases
from pacs_node.receive import Receiver
from pacs_node.send import Sender
from pacs_node.work import Worker
from storage.db import Database

log = logging.getLogger(__name__)


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        config.node.storage_dir.mkdir(parents=True, exist_ok=True)
        self.files = file_store(config)
        self.db = Database(config.node.resolved_database_url)
        self.trail = AuditTrail(config, "node")  # the roles of this process share one trail
        self.receiver = Receiver(config, self.files, self.db, self.trail)
        self.worker = Worker(config, self.db, self.files, trail=self.trail)
        self.sender = Sender(config, self.db, self.files, owner=self.worker.owner, trail=self.trail)
        self.scheduler: Any = None
        self.web: Any = None

    def recover(self) -> None:
        """After a crash: drop partial files, take back the leases of dead processes."""
        removed = self.files.clean_tmp()
        taken = release_leases(self.db, dead_local_owners(self.db))
        if removed or taken:
            log.warning("recovered: %d partial files removed, %d tasks taken back", removed, taken)

    def start(
        self, *, scheduler: bool = False, preload_models: bool = True, web: bool = False
    ) -> None:
        """Listen; with *scheduler*, also run work and delivery rounds in the background
        (APScheduler threads, each round one at a time); with *web*, serve the web application
        (``[web]``) in a thread."""
        self.recover()
        if preload_models:
            work.preload_models(self.config)
        self.receiver.start()
        if web:
            from pacs_node.web.server import WebServer

            self.web = WebServer(self.config, self.db, self.files, self.trail)
            self.web.start()
        if scheduler:
            from pacs_node.scheduler import start_scheduler

            self.scheduler = start_scheduler(
                [
                    ("work", lambda: (self.worker.sweep(), self.worker.run_pending())),
                    ("send", lambda: (self.sender.sweep(), self.sender.deliver_due())),
                ],
                self.config.worker.poll_interval_s,
            )

    @property
    def port(self) -> int:
        return self.receiver.port

    @property
    def tls_port(self) -> int:
        return self.receiver.tls_port

    def run_pending(self, max_rounds: int = 1000) -> int:
        """Run every job and delivery due now, synchronously; returns jobs run."""
        ran = 0
        for _ in range(max_rounds):
            jobs = self.worker.run_pending()
            ran += jobs
            sent = self.sender.deliver_due()
            if not jobs and not sent:
                break
        return ran

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
            self.scheduler = None
        if self.web is not None:
            self.web.stop()
            self.web = None
        self.receiver.stop()
        self.worker.close()
        self.trail.close()
        self.db.dispose()
