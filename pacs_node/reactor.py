"""Event-driven loops for pynetdicom's two association threads (issue 9).

pynetdicom 3.0 runs each association on two threads that poll: the DUL thread sleeps 1 ms
whenever a pass found nothing to do (``_run_loop_delay``, with the library's own "TODO: try
and make this event based"), and the association thread sleeps 1 ms before *every* pass. A
C-STORE crosses both twice (request in, response out), so over one association each file
waits about 2-3 ms on those sleeps alone: a pynetdicom SCP whose handler does nothing stores
~360 CT slices per second where Orthanc stores ~330 and dcmtk's storescp ~1400.

:func:`wake_on_events` gives one association, before its threads start, loops that block
until there is work instead of sleeping:

- the DUL thread waits in ``select`` on its socket and on a wake-up socket that is written
  whenever a primitive is queued for it (the ``to_provider_queue``);
- the association thread waits on an event set whenever the DUL queues a DIMSE message or
  an ACSE primitive for it (``msg_queue``, ``to_user_queue``).

Both waits are bounded (:data:`MAX_WAIT_S`), so whatever the loops check without being
woken (the ARTIM and idle timers, a thread asked to stop, a dead DUL thread) is seen within
that time, as before within 1 ms. Everything else is pynetdicom's own code: the same state
machine, the same order of checks, the same pause protocol for the ``send_*`` methods (the
association thread counts as paused while it waits, which is true: it touches nothing until
it has passed the checkpoint again). The loops are copies of pynetdicom 3.0's
``DULServiceProvider.run_reactor`` and ``Association._run_reactor`` with the sleeps replaced;
another pynetdicom version keeps its own loops (:data:`SUPPORTED`).

The same association's C-STORE responses are encoded here too (:func:`_send_msg`): pynetdicom
builds each one's command set as a Dataset and encodes it twice with pydicom's general writer
(once for its group length), ~0.2 ms a file; :func:`encode_store_rsp` writes the same bytes
directly. Only for the plain response (no Error Comment or Offending Element, nobody bound to
``EVT_DIMSE_SENT``, a command set that fits one PDV); anything else goes through pynetdicom.
``tests/test_reactor.py`` compares the bytes.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import types
from collections.abc import Callable
from functools import partial
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA

LOGGER = logging.getLogger("pynetdicom.dul")  # the library's logger, as its loops use
SUPPORTED = pynetdicom.__version__.startswith("3.0.")
MAX_WAIT_S = 0.02  # the longest either thread waits without being woken


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls *wake* after every put."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._wake()


def wake_on_events(assoc: Any) -> None:
    """Replace *assoc*'s polling loops by event-driven ones; call before ``assoc.start()``."""
    if not SUPPORTED:
        return
    dul = assoc.dul
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)

    def wake_dul() -> None:
        with contextlib.suppress(OSError):  # full (already woken) or closed (thread ended)
            writer.send(b"\0")

    activity = threading.Event()
    dimse = assoc.dimse
    # nothing has been queued yet: the threads start after this
    dul.to_provider_queue = _WakingQueue(wake_dul)
    dul.to_user_queue = _WakingQueue(activity.set)
    dimse.msg_queue = _WakingQueue(activity.set)
    dul._wake_reader, dul._wake_writer = reader, writer
    dul.run = types.MethodType(_dul_run, dul)
    assoc._activity = activity
    assoc._run_reactor = types.MethodType(_association_run_reactor, assoc)
    dimse.send_msg = types.MethodType(partial(_send_msg, dimse.send_msg), dimse)


_ELEMENT = struct.Struct("<HHL")  # implicit VR: group, element, length
_US = struct.Struct("<HHLH")
C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101


def _ui(element: int, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\0"
    return _ELEMENT.pack(0, element, len(raw)) + raw


def response_command(
    command_field: int,
    sop_class_uid: str,
    message_id: int,
    data_set_type: int,
    status: int,
    sop_instance_uid: str = "",
) -> bytes:
    """The command set of a DIMSE-C response without Error Comment or Offending Element, in
    implicit VR little endian, ordered and padded as pynetdicom encodes it (PS3.7 9.3)."""
    body = b"".join(
        (
            _ui(0x0002, sop_class_uid),
            _US.pack(0, 0x0100, 2, command_field),
            _US.pack(0, 0x0120, 2, message_id),
            _US.pack(0, 0x0800, 2, data_set_type),
            _US.pack(0, 0x0900, 2, status),
            _ui(0x1000, sop_instance_uid) if sop_instance_uid else b"",
        )
    )
    return _ELEMENT.pack(0, 0x0000, 4) + struct.pack("<L", len(body)) + body


def encode_store_rsp(
    sop_class_uid: str, message_id: int, status: int, sop_instance_uid: str
) -> bytes:
    """The command set of a plain C-STORE-RSP (PS3.7 9.3.1.2)."""
    return response_command(C_STORE_RSP, sop_class_uid, message_id, NO_DATA_SET, status,
                            sop_instance_uid)  # fmt: skip


def _send_msg(original: Callable[..., None], self: Any, primitive: Any, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg``, with the plain C-STORE-RSP encoded by
    :func:`encode_store_rsp`."""
    if (
        type(primitive) is C_STORE
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.ErrorComment is None
        and primitive.OffendingElement is None
        and primitive.Status is not None
        and primitive.AffectedSOPClassUID
        and primitive.AffectedSOPInstanceUID
        and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
    ):
        command = encode_store_rsp(
            str(primitive.AffectedSOPClassUID),
            int(primitive.MessageIDBeingRespondedTo),
            int(primitive.Status),
            str(primitive.AffectedSOPInstanceUID),
        )
        limit = self.maximum_pdu_size
        if not limit or len(command) + 6 <= limit:
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
            self.dul.send_pdu(pdata)
            return
    original(primitive, context_id)


def _dul_wait(dul: Any) -> None:
    """Block until the DUL has something to do, or :data:`MAX_WAIT_S` has passed."""
    if dul.to_provider_queue.qsize() or dul.event_queue.qsize():
        return
    waits = [dul._wake_reader]
    transport = dul.socket.socket if dul.socket is not None else None
    if transport is not None and dul.socket._is_connected:
        if isinstance(transport, ssl.SSLSocket) and transport.pending():
            return  # buffered bytes select cannot see
        waits.append(transport)
    try:
        select.select(waits, [], [], MAX_WAIT_S)
    except (OSError, ValueError):  # the transport closed under us: the loop's check sees it
        return
    with contextlib.suppress(OSError):
        while dul._wake_reader.recv(4096):
            pass


def _dul_run(self: Any) -> None:
    """pynetdicom 3.0's ``DULServiceProvider.run_reactor``, waiting instead of sleeping."""
    try:
        self._idle_timer.start()
        wait = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                wait = True
            if wait:
                _dul_wait(self)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                LOGGER.error("Exception in DUL.run(), aborting association")
                LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                wait = True
                continue
            self.state_machine.do_action(event)
            wait = False
    finally:
        self._wake_reader.close()
        self._wake_writer.close()


def _association_run_reactor(self: Any) -> None:
    """pynetdicom 3.0's ``Association._run_reactor``, waiting instead of sleeping."""
    self._is_paused = False
    activity: threading.Event = self._activity
    while not self._kill:
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return

        if not msg:
            # idle: paused in truth (nothing is touched before the checkpoint above), so a
            # send_* method need not wait for this thread to reach it
            self._is_paused = True
            activity.wait(MAX_WAIT_S)
            activity.clear()
