"""The node: storage, the DICOM server and the worker, started and stopped together."""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

from pacs_node.ae import build_scp
from pacs_node.config import Config, TlsSettings
from pacs_node.handlers import Handlers
from pacs_node.worker import Worker
from storage import queue
from storage.db import Database
from storage.files import FileStore

log = logging.getLogger(__name__)


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """TLS 1.2+ with the node's certificate; client certificates checked against the CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.cert_file is not None and tls.key_file is not None
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(tls.ca_file)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        config.node.storage_dir.mkdir(parents=True, exist_ok=True)
        self.files = FileStore(config.node.storage_dir, config.node.min_free_mb * 2**20)
        self.db = Database(config.node.resolved_database_url)
        self.worker = Worker(self)
        self.handlers = Handlers(self)
        self.server: Any = None
        self.tls_server: Any = None
        self.scheduler: Any = None
        self._stopped = threading.Event()

    def recover(self) -> None:
        """After a crash: drop partial files, put every leased job and delivery back."""
        removed = self.files.clean_tmp()
        with self.db.session() as session:
            requeued = queue.requeue_all_running(session)
        if removed or requeued:
            log.warning(
                "recovered: %d partial files removed, %d jobs/deliveries requeued",
                removed,
                requeued,
            )

    def start_server(self) -> None:
        ae = build_scp(self.config)
        self.server = ae.start_server(
            (self.config.node.host, self.config.node.port),
            block=False,
            evt_handlers=self.handlers.bindings(),
        )
        tls = self.config.tls
        if tls.enabled:
            self.tls_server = ae.start_server(
                (self.config.node.host, tls.port),
                block=False,
                evt_handlers=self.handlers.bindings(),
                ssl_context=server_ssl_context(tls),
            )

    @property
    def tls_port(self) -> int:
        return int(self.tls_server.server_address[1]) if self.tls_server else self.config.tls.port

    @property
    def port(self) -> int:
        """The port actually bound (useful when the config asks for port 0)."""
        return int(self.server.server_address[1]) if self.server else self.config.node.port

    def start(self, *, scheduler: bool = True, preload_models: bool = True) -> None:
        self.recover()
        if preload_models:
            self.preload_models()
        self.start_server()
        if scheduler:
            from pacs_node.scheduler import start_scheduler

            self.scheduler = start_scheduler(self.worker, self.config.worker.poll_interval_s)

    def preload_models(self) -> None:
        """Load every configured model now, so a broken model stops start-up, not a job."""
        from ai.runtime import load_runtime_classifier

        for binding in self.config.models:
            if binding.enabled:
                classifier = load_runtime_classifier(binding.path or binding.name, binding.runtime)
                classifier.warm_up()
                log.info(
                    "model %s %s (%s) serves %s",
                    classifier.spec.name,
                    classifier.spec.version,
                    binding.runtime,
                    "/".join(binding.modalities),
                )

    def run_pending(self) -> int:
        return self.worker.run_pending()

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
            self.scheduler = None
        for server in (self.server, self.tls_server):
            if server is not None:
                server.shutdown()
        self.server = self.tls_server = None
        self.db.dispose()
        self._stopped.set()
