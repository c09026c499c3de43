"""The receive role: the DICOM services (C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE), nothing more.

``pacs-node receive`` runs :func:`run`. It writes received files and their rows; the queue rows
it adds are the only thing it hands to the other roles. It never imports TensorFlow, ONNX
Runtime or OpenCV (a test checks the process's loaded libraries), so it starts in a second and
stays small.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import pydicom
from pynetdicom import _config as pynetdicom_config

from pacs_node import __version__, guard
from pacs_node.ae import build_scp, start_server
from pacs_node.audit import AuditTrail
from pacs_node.config import Config, TlsSettings
from pacs_node.handlers import bindings, resolve
from pacs_node.process import Stop, file_store
from storage import refusals
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


class Receiver:
    """The listening sockets (plain, and TLS when configured) and their handlers."""

    def __init__(
        self, config: Config, files: FileStore, db: Database, trail: AuditTrail | None = None
    ) -> None:
        self.config = config
        self.files = files
        self.db = db
        self.trail = trail or AuditTrail(config, "receive")
        self.refused = refusals.Tally(db)
        self.server: Any = None
        self.tls_server: Any = None
        self.connection_limits: guard.ConnectionLimits | None = None

    def start(self) -> None:
        node = self.config.node
        guard.install(
            guard.Limits(
                associate_rq_bytes=node.max_associate_rq_bytes,
                max_pdu_bytes=node.max_pdu_bytes or guard.HARD_MAX_PDU_BYTES,
                pdu_deadline_s=node.pdu_timeout_s,
                associate_rq_deadline_s=node.associate_rq_timeout_s,
            )
        )
        # a received data set goes to a file fragment by fragment instead of into memory
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = node.stream_to_disk
        ae = build_scp(self.config)
        handlers = bindings(self.config, self.files, self.db, self.trail, self.refused)
        limits = guard.ConnectionLimits(
            self.known_address,
            strangers=node.max_stranger_connections,
            per_address=node.max_connections_per_address,
        )
        self.connection_limits = limits
        stream_to = self.files if node.stream_to_disk else None
        self.server = start_server(
            ae,
            (node.host, node.port),
            evt_handlers=handlers,
            connection_limits=limits,
            stream_to=stream_to,
        )
        tls = self.config.tls
        if tls.enabled:
            self.tls_server = start_server(
                ae,
                (node.host, tls.port),
                evt_handlers=handlers,
                ssl_context=server_ssl_context(tls),
                connection_limits=limits,
                stream_to=stream_to,
            )

    def known_address(self, address: str) -> bool:
        """Whether *address* is a configured peer's (names looked up every five minutes); with
        ``accept_unknown_peers`` every address is welcome and none is a stranger."""
        if self.config.node.accept_unknown_peers:
            return True
        return any(address in resolve(peer.host) for peer in self.config.peers)

    @property
    def port(self) -> int:
        """The port actually bound (useful when the config asks for port 0)."""
        return int(self.server.server_address[1]) if self.server else self.config.node.port

    @property
    def tls_port(self) -> int:
        return int(self.tls_server.server_address[1]) if self.tls_server else self.config.tls.port

    def stop(self) -> None:
        for server in (self.server, self.tls_server):
            if server is not None:
                server.shutdown()
                server.server_close()
        self.server = self.tls_server = None
        self.refused.close()


def describe(config: Config, port: int) -> str:
    n = config.node
    peers = ", ".join(f"{p.ae_title}@{p.host}:{p.port}" for p in config.peers) or "none"
    return (
        f"pacs-node {__version__}: AE title {n.ae_title} listening on {n.host}:{port}; "
        f"data in {n.storage_dir.resolve()}; database {n.resolved_database_url}; "
        f"peers: {peers}; "
        f"{'any calling AE accepted' if n.accept_unknown_peers else 'only known peers accepted'}"
    )


def run(config: Config, stop: Stop) -> None:
    """``pacs-node receive``: listen until stopped."""
    # the handlers check what they rely on (UIDs, the SOP class, pixel data) themselves;
    # pydicom's regular-expression check of every value read costs more than the indexing
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    files = file_store(config)
    removed = files.clean_tmp()
    if removed:
        log.warning("removed %d partial files left by a crash", removed)
    db = Database(config.node.resolved_database_url)
    receiver = Receiver(config, files, db)
    receiver.start()
    try:
        with receiver.trail.running():
            print(describe(config, receiver.port), flush=True)
            try:
                stop.event.wait()
            finally:
                receiver.stop()
    finally:
        db.dispose()
