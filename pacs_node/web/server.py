"""``pacs-node web``: the web application served by uvicorn until stopped.

:class:`WebServer` binds the socket itself (so ``port = 0`` takes a free one, and a port in use
is an error at once rather than inside uvicorn's loop) and serves it in a thread of its own;
the ``web`` role runs one in a process of its own (:func:`run`, as the receive role runs its
server), and :class:`pacs_node.node.Node` can run one beside its in-process receive role.
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn

from pacs_node.audit import AuditTrail
from pacs_node.config import Config
from pacs_node.errors import ConfigError
from pacs_node.process import Stop, file_store
from pacs_node.web.app import build_app
from storage.db import Database
from storage.files import FileStore

log = logging.getLogger(__name__)


class WebServer:
    def __init__(
        self, config: Config, db: Database, files: FileStore, trail: AuditTrail | None = None
    ) -> None:
        web, tls = config.web, config.tls
        self.trail = trail or AuditTrail(config, "web")
        self.scheme = "https" if tls.enabled else "http"
        self.sock = socket.socket(socket.AF_INET6 if ":" in web.host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((web.host, web.port))
        except OSError as exc:
            self.sock.close()
            raise ConfigError(f"web: cannot listen on {web.host}:{web.port}: {exc}") from None
        self.port = int(self.sock.getsockname()[1])
        self.url = f"{self.scheme}://{web.host}:{self.port}"
        settings = uvicorn.Config(
            build_app(config, db, files, base_url=self.url, trail=self.trail),
            log_level="warning",
            access_log=False,  # requests name studies by UID; the audit trail is their place
            limit_concurrency=web.max_connections,  # more at once are answered 503
            timeout_keep_alive=5,
            server_header=False,
            ssl_certfile=str(tls.cert_file) if tls.enabled and tls.cert_file else None,
            ssl_keyfile=str(tls.key_file) if tls.enabled and tls.key_file else None,
        )
        self.server = uvicorn.Server(settings)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Serve in a thread of its own; return once it accepts connections."""
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="web", daemon=True
        )
        self.thread.start()
        for _ in range(200):
            if self.server.started or not self.thread.is_alive():
                break
            threading.Event().wait(0.05)
        if not self.server.started:
            raise RuntimeError("the web server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.sock.close()


def run(config: Config, stop: Stop) -> None:
    """The ``web`` role: serve until *stop* (SIGTERM or SIGINT to this process)."""
    db = Database(config.node.resolved_database_url)
    web = WebServer(config, db, file_store(config))
    web.start()
    try:
        with web.trail.running():
            # logged, not printed: the receive role's "listening on" line is the one on stdout
            log.info("web role: DICOMweb on %s/dicomweb, dashboard on %s/", web.url, web.url)
            try:
                stop.event.wait()
            finally:
                web.stop()
    finally:
        db.dispose()
