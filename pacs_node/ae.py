"""Build the pynetdicom Application Entities: presentation contexts, timeouts, sockets.

Every socket the node opens, listening or calling, sets ``TCP_NODELAY``: pynetdicom writes a
P-DATA PDU in pieces, and with Nagle's algorithm on each C-STORE then waits ~40 ms for the
peer's delayed ACK (26 files/s instead of hundreds).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path
from typing import Any, cast

from pydicom import uid
from pynetdicom import AE, AllStoragePresentationContexts, VerificationPresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from pacs_node.config import Config
from pacs_node.reactor import wake_on_events
from storage.files import FileStore

# Every transfer syntax the node accepts for storage. Files are kept exactly as received; the
# worker decodes them with pylibjpeg's plugins (JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE).
STORAGE_TRANSFER_SYNTAXES = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
]


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # not a TCP socket: never on this path, never fatal
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NodelayAE(AE):
    """An AE whose outgoing associations set ``TCP_NODELAY`` and run event-driven loops
    (:mod:`pacs_node.reactor`)."""

    def _create_socket(self, assoc: Any, address: Any, tls_args: Any) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)
        if sock.socket is not None:
            _nodelay(sock.socket)
        wake_on_events(assoc)  # AE.associate starts the association after this
        return sock


class EventDrivenHandler(RequestHandler):
    """Accepted associations run event-driven loops (:mod:`pacs_node.reactor`), and stream
    received data sets into the server's ``stream_dir`` when it has one."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        server = cast(NodelayServer, self.server)
        wake_on_events(assoc, server.stream_dir, server.stream_prefix)
        return assoc


class NodelayServer(ThreadedAssociationServer):
    """The threaded association server, with ``TCP_NODELAY`` on every accepted connection
    and ``SO_REUSEPORT`` on the listening socket, so that several receive processes can listen
    on one port and the kernel spreads the associations over them."""

    connection_limits: Any = None  # a pacs_node.guard.ConnectionLimits, checked at accept
    stream_dir: Path | None = None  # where received data sets are streamed (else /tmp)
    stream_prefix = ""  # the names of those files start with it

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", EventDrivenHandler)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        limits = self.connection_limits
        return limits is None or bool(limits.admit(request, str(client_address[0])))

    def shutdown_request(self, request: Any) -> None:
        if self.connection_limits is not None:
            self.connection_limits.release(request)
        super().shutdown_request(request)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client_socket, address = super().get_request()
        _nodelay(client_socket)
        return client_socket, address


def start_server(
    ae: AE,
    address: tuple[str, int],
    *,
    connection_limits: Any = None,
    stream_to: FileStore | None = None,
    **kwargs: Any,
) -> NodelayServer:
    """What ``AE.start_server(block=False)`` does, with :class:`NodelayServer`; received data
    sets are streamed into *stream_to*'s ``tmp/`` as its partial files."""
    server = cast(NodelayServer, ae.make_server(address, server_class=NodelayServer, **kwargs))
    server.connection_limits = connection_limits
    if stream_to is not None:
        server.stream_dir, server.stream_prefix = stream_to.tmp_dir, stream_to.partial_prefix()
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{address[1]}")
    thread.daemon = True
    thread.start()
    ae._servers.append(server)
    return server


STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"


def build_scp(config: Config) -> AE:
    """The node's listening AE: C-ECHO, C-STORE of every storage class, Study Root and
    Patient Root C-FIND, C-GET and C-MOVE."""
    node = config.node
    ae = NodelayAE(ae_title=node.ae_title)
    for context in AllStoragePresentationContexts:
        # scu_role/scp_role: a C-GET requestor proposes to be the storage SCP on these
        # contexts (SCP/SCU Role Selection) and the node accepts, so that it can send
        # the retrieved instances back on the same association; storing keeps working
        ae.add_supported_context(
            str(context.abstract_syntax), STORAGE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
        )
    for context in VerificationPresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax))
    # a destination's Storage Commitment result (N-EVENT-REPORT) comes on an association it
    # opens, taking the SCP role by Role Selection (PS3.4 J.3.3): accepted
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
    for model in (
        StudyRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
        PatientRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
        PatientRootQueryRetrieveInformationModelMove,
    ):
        ae.add_supported_context(model)
    ae.maximum_pdu_size = node.max_pdu_bytes
    ae.network_timeout = node.network_timeout_s
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.maximum_associations = node.max_associations
    # called AE titles (node.called_ae_titles, the node's own by default), calling AE titles
    # and their addresses are checked in handlers.handle_requested, which sends the
    # A-ASSOCIATE-RJ; pynetdicom's own check knows one title only
    ae.require_called_aet = False
    return ae


def build_scu(config: Config, sop_classes: list[str]) -> AE:
    """An AE for sending results: one context per SOP class, in the syntaxes every peer reads."""
    node = config.node
    ae = NodelayAE(ae_title=node.ae_title)
    for sop_class in sorted(set(sop_classes)):
        ae.add_requested_context(
            sop_class, [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]
        )
    ae.network_timeout = node.network_timeout_s
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    return ae
