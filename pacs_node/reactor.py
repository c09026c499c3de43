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

An accepted association given a *stream_dir* (the storage folder's ``tmp/``) also streams
each received C-STORE data set there (:func:`_decode_msg`), named with the storage folder's
partial-file prefix, instead of into a ``NamedTemporaryFile`` in the system temp folder:
moving it into place is then a rename on one file system (where ``/tmp`` is a tmpfs, every
file was copied), a crash leaves it where ``FileStore.clean_tmp`` finds it, and a data set cut
off by an abort is removed when the association ends. Its file meta is written as bytes
(byte-compared with pynetdicom's ``create_file_meta`` and pydicom's writer).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import select
import socket
import ssl
import struct
import threading
import types
from collections.abc import Callable
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pynetdicom
from pydicom.uid import UID
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom.dimse_messages import _MESSAGE_TYPES, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
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


def wake_on_events(assoc: Any, stream_dir: Path | None = None, prefix: str = "") -> None:
    """Replace *assoc*'s polling loops by event-driven ones; call before ``assoc.start()``.
    With *stream_dir*, received C-STORE data sets are streamed into files there whose names
    start with *prefix* and end in ``.part`` (when pynetdicom streams at all:
    ``STORE_RECV_CHUNKED_DATASET``)."""
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
    if stream_dir is not None:
        receive = partial(_receive_primitive, dimse.receive_primitive, Path(stream_dir), prefix)
        dimse.receive_primitive = types.MethodType(receive, dimse)


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
    return command_set(
        (0x0002, sop_class_uid),
        (0x0100, command_field),
        (0x0120, message_id),
        (0x0800, data_set_type),
        (0x0900, status),
        (0x1000, sop_instance_uid),
    )


def command_set(*elements: tuple[int, str | int]) -> bytes:
    """A command set (group 0000, implicit VR little endian) of *elements* (element number,
    value) in the order given: a str is a UI value (left out when empty), an int a US value;
    the Command Group Length first, as pynetdicom encodes it."""
    body = b"".join(
        _US.pack(0, element, 2, value) if isinstance(value, int) else _ui(element, value)
        for element, value in elements
        if value != ""
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


def _receive_primitive(
    original: Callable[[Any], None], stream_dir: Path, prefix: str, self: Any, primitive: Any
) -> None:
    """``DIMSEServiceProvider.receive_primitive``, with a new message decoded by
    :func:`_decode_msg` (an attribute of the instance, so it survives the message's change of
    class once its command set is known)."""
    if self.message is None:
        message: Any = DIMSEMessage()
        message.decode_msg = types.MethodType(partial(_decode_msg, stream_dir, prefix), message)
        self.message = message
    original(primitive)


_EXPLICIT = struct.Struct("<HH2sH")  # explicit VR, 2-byte length


def _meta_element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 2, element, vr, len(value)) + value
    return _EXPLICIT.pack(2, element, vr, len(value)) + value


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the file meta of a streamed data set: what pynetdicom 3.0
    writes there (``create_file_meta`` and pydicom's ``write_file_meta_info``)."""
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01", b"\0"),
            _meta_element(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\0"),
            _meta_element(0x0003, b"UI", sop_instance_uid.encode("ascii"), b"\0"),
            _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\0"),
            _meta_element(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode("ascii"), b"\0"),
            _meta_element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode(), b" "),
        )
    )
    group_length = _EXPLICIT.pack(2, 0x0000, b"UL", 4) + struct.pack("<L", len(body))
    return b"\0" * 128 + b"DICM" + group_length + body


def _decode_msg(
    stream_dir: Path, prefix: str, self: Any, primitive: P_DATA, assoc: Any = None
) -> bool:
    """pynetdicom 3.0's ``DIMSEMessage.decode_msg``, streaming a C-STORE data set into
    *stream_dir* (see the module's docstring)."""
    if primitive.__class__ != P_DATA or primitive is None:
        return False
    for context_id, data in primitive.presentation_data_value_list:
        control = data[0]
        if control & 1:  # command set
            self.encoded_command_set.write(data[1:])
            if control & 2:  # its last fragment
                self.context_id = context_id
                self.command_set = decode(self.encoded_command_set, True, True)
                self.__class__ = _MESSAGE_TYPES[self.command_set.CommandField][1]
                if self.command_set.CommandDataSetType == 0x0101:
                    return True  # no data set
                if _config.STORE_RECV_CHUNKED_DATASET and isinstance(self, C_STORE_RQ):
                    command = self.command_set
                    syntax = assoc._accepted_cx[context_id].transfer_syntax[0]
                    path = stream_dir / f"{prefix}{secrets.token_hex(8)}.part"
                    part = open(path, "xb")  # noqa: SIM115 (pynetdicom closes it)
                    part.write(
                        file_meta_bytes(
                            str(UID(command.AffectedSOPClassUID)),
                            str(UID(command.AffectedSOPInstanceUID)),
                            str(syntax),
                        )
                    )
                    self._data_set_file, self._data_set_path = cast(Any, part), path
        else:  # data set
            if self._data_set_file:
                self._data_set_file.write(data[1:])
            else:
                self.data_set.write(data[1:])
            if control & 2:  # its last fragment
                if self._data_set_file:
                    self._data_set_file.flush()  # read by path in the handler
                return True
    return False


def _discard_partial(dimse: Any) -> None:
    """Close and remove the file of a data set that never arrived whole (the association
    ended part-way through it); a complete one was handed on and is not here."""
    message: Any = getattr(dimse, "message", None)
    part = getattr(message, "_data_set_file", None)
    if part is None or not isinstance(getattr(part, "name", None), str):
        return
    with contextlib.suppress(OSError):
        part.close()
    with contextlib.suppress(OSError):
        os.unlink(part.name)
    message._data_set_file = None
    message.data_set = BytesIO()


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
        _discard_partial(self.assoc.dimse)


def _association_run_reactor(self: Any) -> None:
    """pynetdicom 3.0's ``Association._run_reactor``, waiting instead of sleeping."""
    self._is_paused = False
    activity: threading.Event = self._activity
    while not self._kill:
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        if not self._reactor_checkpoint.is_set():
            # a send_* method cleared the checkpoint after this thread passed it, and may
            # have read the flag before it fell: it is sending and will read the reply
            # itself, so touch nothing and pause again. (pynetdicom's own loop has this
            # window: it took a C-ECHO-RSP from a waiting send_c_echo on a loaded machine.)
            continue

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
