"""Limits on what a peer may make the node read, before anyone knows who the peer is.

pynetdicom reads a PDU by trusting its length field: an A-ASSOCIATE-RQ announcing 4 GiB is read
into memory whole, before the calling AE title is looked at, and a peer that sends a byte every
few seconds keeps its association (and the slot) as long as it likes, because each byte restarts
the network timeout. :func:`install` replaces the DUL's PDU reader with one that

- refuses an A-ASSOCIATE-RQ longer than ``associate_rq_bytes`` (the Standard's items fit in a
  few KiB) and any other PDU longer than the node's maximum PDU length (``node.max_pdu_bytes``,
  as the node announced it; PS3.8 9.3.1 forbids longer), aborting the association at once with
  nothing read past the 6-byte header;
- gives every PDU a deadline: its last byte must arrive within ``pdu_deadline_s`` of its first
  (``associate_rq_deadline_s`` for an A-ASSOCIATE-RQ), whatever the peer drips;
- reads in 64 KiB pieces instead of 4 KiB (fewer system calls per C-STORE).

It is pynetdicom's ``DULServiceProvider._read_pdu_data`` (3.0) with those checks added; the tests
in ``tests/test_security.py`` attack a real node with hand-built PDUs on a raw socket, so a
pynetdicom change that bypasses this reader fails them.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider

log = logging.getLogger(__name__)

PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)
CHUNK_BYTES = 65536
SMALL_PDU_BYTES = 65536  # A-ASSOCIATE-AC/RJ, A-RELEASE, A-ABORT: a few bytes to a few KiB


@dataclass(frozen=True)
class Limits:
    associate_rq_bytes: int = 65536
    max_pdu_bytes: int = 262144  # P-DATA-TF: what the node announced as its maximum
    pdu_deadline_s: float = 30.0
    associate_rq_deadline_s: float = 5.0


LIMITS = Limits()
HARD_MAX_PDU_BYTES = 16 * 2**20  # when the node announces no maximum (max_pdu_bytes = 0)


def install(limits: Limits) -> None:
    """Use the guarded reader, with *limits*, and the guarded request dispatch (see
    :func:`_guarded_serve_request`) for every association of this process."""
    global LIMITS
    LIMITS = limits
    DULServiceProvider._read_pdu_data = _guarded_read_pdu_data  # type: ignore[method-assign]
    Association._serve_request = _guarded_serve_request  # type: ignore[method-assign]
    DIMSEServiceProvider.receive_primitive = _guarded_receive_primitive  # type: ignore[method-assign]


_receive_primitive = DIMSEServiceProvider.receive_primitive


def _guarded_receive_primitive(self: DIMSEServiceProvider, primitive: Any) -> None:
    """A DIMSE message that cannot be decoded (an unknown command field, a C-STORE-RQ without
    its Affected SOP Instance UID) is treated as an invalid PDU: A-ABORT at once. Unguarded,
    the exception ends pynetdicom's DUL thread and the peer waits with no answer."""
    try:
        _receive_primitive(self, primitive)
    except Exception as exc:
        dul = self.assoc.dul
        log.warning(
            "undecodable DIMSE message from %s (%s: %s): aborted",
            _peer(dul),
            type(exc).__name__,
            exc,
        )
        dul.event_queue.put("Evt19")  # unrecognised or invalid PDU: A-ABORT


_serve_request = Association._serve_request


def _guarded_serve_request(self: Association, msg: Any, context_id: int) -> None:
    """A malformed DIMSE request to the node (a C-STORE-RQ without its Affected SOP Instance
    UID, say) is answered with an A-ABORT at once. pynetdicom ignores it, or its service
    class raises and the association thread dies, and the peer waits for its DIMSE timeout
    (60 s) with no answer. Associations the node opened itself are left as they are."""
    if not self.is_acceptor:
        _serve_request(self, msg, context_id)
        return
    if not msg.is_valid_request:
        missing = [k for k in msg.REQUEST_KEYWORDS if getattr(msg, k, None) is None]
        log.warning(
            "malformed %s from %s (no %s): aborted",
            msg.msg_type,
            _peer(self.dul),
            ", ".join(missing) or "valid command",
        )
        self.abort()
        return
    try:
        _serve_request(self, msg, context_id)
    except Exception as exc:  # a request pynetdicom's service class cannot handle
        log.warning("%s from %s not served (%s): aborted", msg.msg_type, _peer(self.dul), exc)
        self.abort()


def _peer(dul: Any) -> str:
    try:
        return str(dul.assoc.requestor.address)
    except Exception:
        return "?"


def _read_exactly(assoc_socket: Any, count: int, deadline: float) -> bytearray | None:
    """*count* bytes from the socket before *deadline*; None when the peer closed the
    connection or was too slow."""
    raw: socket.socket = assoc_socket.socket
    before = raw.gettimeout()
    out = bytearray(count)
    view = memoryview(out)
    got = 0
    try:
        while got < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            raw.settimeout(remaining if before is None else min(remaining, before))
            try:
                n = raw.recv_into(view[got:], min(CHUNK_BYTES, count - got))
            except (TimeoutError, ssl.SSLWantReadError):
                if time.monotonic() >= deadline:
                    return None
                continue
            if n == 0:
                return None
            got += n
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            raw.settimeout(before)
    return out


def _guarded_read_pdu_data(self: DULServiceProvider) -> None:
    limits = LIMITS
    sock = self.socket
    if sock is None or sock.socket is None:
        self.event_queue.put("Evt17")
        return
    if self.state_machine.current_state == "Sta13":
        # the association was aborted (perhaps by us, for the PDU it is still sending):
        # nothing it sends now is read; the connection is closed
        sock.close()
        return
    start = time.monotonic()
    header = _read_exactly(sock, 6, start + limits.pdu_deadline_s)
    if header is None or len(header) != 6:
        self.event_queue.put("Evt17")  # transport connection closed
        return
    pdu_type, _, pdu_length = struct.unpack(">BBL", header)
    if pdu_type not in PDU_TYPES:
        log.warning("unknown PDU type 0x%02X from %s: aborted", pdu_type, _peer(self))
        self.event_queue.put("Evt19")  # unrecognised or invalid PDU: A-ABORT
        return
    if pdu_type == 0x01:
        limit, deadline_s = limits.associate_rq_bytes, limits.associate_rq_deadline_s
    elif pdu_type == 0x04:
        limit, deadline_s = limits.max_pdu_bytes + 6, limits.pdu_deadline_s
    else:
        limit, deadline_s = SMALL_PDU_BYTES, limits.pdu_deadline_s
    if pdu_length > limit:
        log.warning(
            "PDU type 0x%02X of %d bytes from %s refused (limit %d): aborted, nothing read",
            pdu_type,
            pdu_length,
            _peer(self),
            limit,
        )
        self.event_queue.put("Evt19")
        return
    body = _read_exactly(sock, pdu_length, start + deadline_s)
    if body is None:
        log.warning(
            "PDU type 0x%02X of %d bytes from %s not received within %.0f s: closed",
            pdu_type,
            pdu_length,
            _peer(self),
            deadline_s,
        )
        self.event_queue.put("Evt17")
        return
    bytestream = header + body
    try:
        pdu, event = self._decode_pdu(bytestream)
        self.event_queue.put(event)
    except Exception as exc:
        log.warning("undecodable PDU from %s: %s", _peer(self), type(exc).__name__)
        self.event_queue.put("Evt19")
        return
    self._recv_pdu.put(pdu)


class ConnectionLimits:
    """Connections admitted at TCP accept, before a single byte is read.

    Addresses of configured peers share the association slots freely; any other address is a
    *stranger*, and strangers together may hold at most ``strangers`` connections, so that
    however many connections strangers open (silent ones, or ones dripping a request) the
    known PACS always finds a slot. No single address may hold more than ``per_address``. A
    connection over a limit is closed at once, unread (logged once a minute per address).
    """

    LOG_EVERY_S = 60.0

    def __init__(self, known: Any, *, strangers: int, per_address: int) -> None:
        self.known = known  # callable: address -> bool (a configured peer's address)
        self.strangers = strangers
        self.per_address = per_address
        self._lock = threading.Lock()
        self._by_address: dict[str, int] = {}
        self._stranger_count = 0
        # id(socket) -> (socket, address, stranger); a socket pynetdicom has closed (fileno
        # -1) no longer counts: it does not always tell the server when an association ends
        self._held: dict[int, tuple[Any, str, bool]] = {}
        self._last_log: dict[str, float] = {}

    def admit(self, request: Any, address: str) -> bool:
        stranger = not self.known(address)
        with self._lock:
            self._forget_closed()
            if self._by_address.get(address, 0) >= self.per_address:
                why = f"{self.per_address} connections from this address already"
            elif stranger and self._stranger_count >= self.strangers:
                why = f"{self.strangers} connections from unknown addresses already"
            else:
                self._by_address[address] = self._by_address.get(address, 0) + 1
                self._stranger_count += stranger
                self._held[id(request)] = (request, address, stranger)
                return True
            now = time.monotonic()
            if now - self._last_log.get(address, -1e9) >= self.LOG_EVERY_S:
                self._last_log[address] = now
                log.warning("connection from %s closed unread: %s", address, why)
        return False

    def release(self, request: Any) -> None:
        with self._lock:
            self._release(id(request))

    def _release(self, key: int) -> None:
        held = self._held.pop(key, None)
        if held is None:
            return
        _, address, stranger = held
        self._by_address[address] -= 1
        if not self._by_address[address]:
            del self._by_address[address]
        self._stranger_count -= stranger

    def _forget_closed(self) -> None:
        for key, (sock, _, _) in list(self._held.items()):
            try:
                closed = sock.fileno() == -1
            except OSError:
                closed = True
            if closed:
                self._release(key)

    def counts(self) -> tuple[int, int]:
        """(connections held, of which strangers')."""
        with self._lock:
            self._forget_closed()
            return len(self._held), self._stranger_count
