"""C-FIND pending responses written straight to the association's socket (issue 9).

pynetdicom spends about 0.45 ms on each C-FIND response: the identifier encoded by pydicom's
general writer, the command set built as a Dataset and encoded twice (once for its group
length), the message handed to the DUL thread through a queue and its state machine. Orthanc
answers 10 000 studies in a quarter of the node's time. Here the command set of a pending
C-FIND-RSP is a byte template, the identifier (flat: the text and number VRs the query keys
use) is encoded by :func:`encode_flat`, and both go out as P-DATA-TF PDUs (PS3.8 9.3.5) written
by the association thread itself, many per ``sendall``. The final response (success, failure,
cancel) still goes through pynetdicom, after every pending one is on the wire: the two never
write at the same time.

Used only where it is exact: a plain TCP socket (a TLS connection is not written by two threads),
a little-endian uncompressed transfer syntax; an identifier :func:`encode_flat` cannot encode
(a sequence, say) is encoded by pydicom and sent the same way. A test compares every byte with
what pynetdicom sends.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode

from pacs_node.reactor import response_command

C_FIND_RSP = 0x8020
DATASET_PRESENT = 0x0001
FLUSH_BYTES = 1 << 16  # PDUs gathered into one sendall, at most (the first goes at once)

TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
            "UI", "UR", "UT"}  # fmt: skip
NUMBER_VRS = {"US": "<H", "UL": "<L", "SS": "<h", "SL": "<l", "FL": "<f", "FD": "<d"}
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
SYNTAXES = {str(ImplicitVRLittleEndian): True, str(ExplicitVRLittleEndian): False}


class NotFlat(Exception):
    """The data set holds something :func:`encode_flat` does not write."""


class SendFailed(Exception):
    """The peer took no more bytes before the deadline, or the connection broke: the stream
    may end inside a PDU, so the association can only be aborted."""


def _codec(ds: Dataset) -> str:
    charset = ds.get("SpecificCharacterSet", "")
    charsets = list(charset) if isinstance(charset, (list, tuple)) else [charset]
    charsets = [str(c).strip() for c in charsets if str(c).strip()]
    if not charsets or charsets == ["ISO_IR 6"]:
        return "ascii"
    if charsets == ["ISO_IR 192"]:
        return "utf-8"
    if charsets == ["ISO_IR 100"]:
        return "latin-1"
    raise NotFlat(f"character set {charsets}")


def encode_flat(ds: Dataset, implicit: bool) -> bytes:
    """*ds* encoded in little endian, implicit or explicit VR, as pydicom would; a data set of
    text and number elements only (:class:`NotFlat` otherwise, also for a value its character
    set cannot hold or a number out of range: pydicom's writer decides those)."""
    try:
        return _encode_flat(ds, implicit)
    except (UnicodeError, struct.error, TypeError, ValueError) as exc:
        raise NotFlat(str(exc)) from None


def _encode_flat(ds: Dataset, implicit: bool) -> bytes:
    codec = _codec(ds)
    out = bytearray()
    for elem in sorted(ds.elements(), key=lambda e: e.tag):
        tag = int(elem.tag)
        if tag & 0xFFFF == 0:  # group lengths: pydicom drops them from data sets too
            continue
        vr, value = str(elem.VR), elem.value
        if vr in TEXT_VRS:
            if value is None or value == "":
                raw = b""
            elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
                raw = "\\".join(_text(v) for v in value).encode(codec)
            else:
                raw = _text(value).encode(codec)
            if len(raw) % 2:
                raw += b"\x00" if vr == "UI" else b" "
        elif vr in NUMBER_VRS:
            values = [] if value is None or value == "" else value
            if not isinstance(values, (list, tuple)) and type(values).__name__ != "MultiValue":
                values = [values]
            raw = b"".join(struct.pack(NUMBER_VRS[vr], v) for v in values)
        else:
            raise NotFlat(f"{vr} element {elem.tag}")
        group, element = tag >> 16, tag & 0xFFFF
        if implicit:
            out += struct.pack("<HHL", group, element, len(raw))
        elif vr in LONG_VRS:
            out += struct.pack("<HH2s2xL", group, element, vr.encode("ascii"), len(raw))
        else:
            if len(raw) > 0xFFFF:
                raise NotFlat(f"{elem.tag}: value too long for a short VR")
            out += struct.pack("<HH2sH", group, element, vr.encode("ascii"), len(raw))
        out += raw
    return bytes(out)


def _text(value: Any) -> str:
    original = getattr(value, "original_string", None)  # IS and DS keep the text they came in
    return original if isinstance(original, str) else str(value)


def command_set(sop_class_uid: str, message_id: int, status: int) -> bytes:
    """The command set of a C-FIND-RSP with an identifier (implicit VR little endian, as every
    command set), the way pynetdicom orders and pads it."""
    return response_command(C_FIND_RSP, sop_class_uid, message_id, DATASET_PRESENT, status)


def pdus(context_id: int, command: bytes, dataset: bytes, max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying a message: the command's fragments, then the data set's, each at
    most *max_pdu* - 6 bytes (0: no limit), one PDV per PDU as pynetdicom sends them."""
    out = bytearray()
    for payload, is_command in ((command, True), (dataset, False)):
        size = len(payload) if max_pdu == 0 else max(1, max_pdu - 6)
        chunks = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
        for n, chunk in enumerate(chunks):
            header = (0x01 if is_command else 0x00) | (0x02 if n == len(chunks) - 1 else 0x00)
            pdv = struct.pack(">LBB", len(chunk) + 2, context_id, header) + chunk
            out += struct.pack(">BxL", 0x04, len(pdv)) + pdv
    return bytes(out)


class Responder:
    """Sends pending C-FIND-RSPs for one request on *event*'s association, or says it cannot
    (:meth:`usable` False: the caller yields to pynetdicom as usual)."""

    def __init__(self, event: Any, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self.sock: Any = None
        self.implicit = True
        self.buffer = bytearray()
        context = event.context
        syntax = str(context.transfer_syntax)
        assoc_socket = getattr(event.assoc.dul, "socket", None)
        raw = getattr(assoc_socket, "socket", None)
        if raw is None or isinstance(raw, ssl.SSLSocket) or syntax not in SYNTAXES:
            return
        self.sock = raw
        self.implicit = SYNTAXES[syntax]
        self.context_id = int(context.context_id)
        self.max_pdu = int(event.assoc.requestor.maximum_length or 0)
        request = event.request
        self.sop_class = str(request.AffectedSOPClassUID)
        self.message_id = int(request.MessageID)
        self._commands: dict[int, bytes] = {}
        self.sent = 0

    @property
    def usable(self) -> bool:
        return self.sock is not None

    def identifier(self, ds: Dataset) -> bytes:
        try:
            return encode_flat(ds, self.implicit)
        except NotFlat:
            encoded = encode(ds, self.implicit, True, False)
            if not encoded:
                raise ValueError("the identifier could not be encoded") from None
            return bytes(encoded)

    def send(self, status: int, ds: Dataset) -> None:
        command = self._commands.get(status)
        if command is None:
            command = self._commands[status] = command_set(self.sop_class, self.message_id, status)
        self.buffer += pdus(self.context_id, command, self.identifier(ds), self.max_pdu)
        self.sent += 1
        if self.sent == 1 or len(self.buffer) >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the gathered PDUs (:func:`send_within`); nothing to do when none are."""
        if not self.buffer:
            return
        data, self.buffer = bytes(self.buffer), bytearray()
        send_within(self.sock, data, self.timeout_s)


def send_within(sock: Any, data: bytes, timeout_s: float) -> None:
    """Write *data* to *sock*, waiting at most *timeout_s* for the peer to take each part.

    The socket is shared with the DUL thread, which switches its timeout while it reads
    (pacs_node.guard): so no ``sendall``, but select and send what it takes, never a byte
    twice. :class:`SendFailed` when the peer stops taking them or the connection breaks.
    """
    view = memoryview(data)
    offset = 0
    deadline = time.monotonic() + timeout_s
    while offset < len(view):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SendFailed(f"the peer took no data for {timeout_s:g} s")
        try:
            _, writable, _ = select.select([], [sock], [], min(remaining, 1.0))
            if not writable:
                continue
            # MSG_DONTWAIT: a blocking send would wait until all of it is queued, past any
            # deadline; this takes what fits now
            sent = sock.send(view[offset : offset + FLUSH_BYTES], socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError, TimeoutError):
            continue
        except (OSError, ValueError) as exc:  # reset, or closed (fileno -1)
            raise SendFailed(str(exc)) from None
        if sent == 0:
            raise SendFailed("the connection is closed")
        offset += sent
        deadline = time.monotonic() + timeout_s  # progress: the deadline moves on
