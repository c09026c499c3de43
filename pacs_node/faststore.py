"""C-STORE requests of stored files written straight to the association's socket (issue 9).

For each result the send role delivers, pynetdicom's C-STORE SCU builds the command set as a
Dataset and encodes it, reads the file in fragments and hands every P-DATA-TF PDU to the DUL
thread through a queue, where its state machine turns it into bytes: for a secondary capture
of 800 KB in the 16 KiB PDUs most peers take, 50 trips through Python per result. Here the
command set comes from bytes (:func:`request_command`), the data set is the file's own bytes
after its File Meta Information, and the PDUs go out from the calling thread with
:func:`pacs_node.fastfind.send_within`, as :mod:`pacs_node.fastfind` sends C-FIND responses.
The response is taken from the DIMSE queue with the association's reactor paused, as
``Association.send_c_store`` takes it.

Used only where it is exact: a plain TCP socket, the file's own transfer syntax accepted for
its SOP class, a file of at most :data:`MAX_BYTES`; otherwise :func:`store` returns None and
the caller sends through pynetdicom. A test compares the PDUs with pynetdicom's.
"""

from __future__ import annotations

import logging
import ssl
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.dsutils import split_dataset

from pacs_node.fastfind import SendFailed, pdus, send_within
from pacs_node.reactor import command_set

log = logging.getLogger(__name__)

C_STORE_RQ = 0x0001
DATA_SET_PRESENT = 0x0001
PRIORITY_LOW = 0x0002  # what pynetdicom's send_c_store sends by default
MAX_BYTES = 64 * 2**20  # a larger file is streamed by pynetdicom, not read whole
PAUSE_S = 5.0  # the association's reactor acknowledges a pause within this, or no fast path


def request_command(
    sop_class_uid: str, sop_instance_uid: str, message_id: int, priority: int = PRIORITY_LOW
) -> bytes:
    """The command set of a C-STORE-RQ with a data set and no Move Originator (PS3.7 9.3.1.1),
    in implicit VR little endian, ordered and padded as pynetdicom encodes it."""
    return command_set(
        (0x0002, sop_class_uid),
        (0x0100, C_STORE_RQ),
        (0x0110, message_id),
        (0x0700, priority),
        (0x0800, DATA_SET_PRESENT),
        (0x1000, sop_instance_uid),
    )


def request_pdus(
    path: Path,
    sop_class_uid: str,
    sop_instance_uid: str,
    context_id: int,
    message_id: int,
    max_pdu: int,
) -> bytes:
    """The P-DATA-TF PDUs of a C-STORE-RQ carrying the data set of the file at *path* as it
    lies there (after its File Meta Information), fragmented for a peer taking *max_pdu*."""
    _, offset = split_dataset(path)
    with path.open("rb") as fh:
        fh.seek(offset)
        data = fh.read()
    command = request_command(sop_class_uid, sop_instance_uid, message_id)
    return pdus(context_id, command, data, max_pdu)


def unconverted_context(assoc: Any, sop_class_uid: str, transfer_syntax: str) -> int | None:
    """The ID of the accepted presentation context that carries *sop_class_uid* in
    *transfer_syntax* (a file sent as it lies), as pynetdicom would choose it; None if none."""
    for context in assoc.accepted_contexts:
        if (
            context.abstract_syntax == sop_class_uid
            and context.transfer_syntax[0] == transfer_syntax
            and context.as_scu
        ):
            return int(context.context_id)
    return None


def store(
    assoc: Any,
    path: Path,
    sop_class_uid: str,
    sop_instance_uid: str,
    context_id: int,
    message_id: int,
) -> Dataset | None:
    """C-STORE the data set of the file at *path* on *assoc* (the node is the requestor) on
    presentation context *context_id* (:func:`unconverted_context`); the status data set as
    ``send_c_store`` returns it (empty when no answer came), or None when this path does not
    apply and pynetdicom must send it."""
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if raw is None or isinstance(raw, ssl.SSLSocket) or path.stat().st_size > MAX_BYTES:
        return None
    max_pdu = int(assoc.acceptor.maximum_length or 0)
    wire = request_pdus(path, sop_class_uid, sop_instance_uid, context_id, message_id, max_pdu)
    # as send_c_store: the reactor paused, so that it does not take the response itself
    assoc._reactor_checkpoint.clear()
    deadline = time.monotonic() + PAUSE_S
    while not assoc._is_paused:
        if not assoc.is_established:  # ended meanwhile: no answer, as pynetdicom would say
            assoc._reactor_checkpoint.set()
            return Dataset()
        if time.monotonic() > deadline:
            assoc._reactor_checkpoint.set()
            return None
        time.sleep(0.0001)
    try:
        try:
            send_within(raw, wire, float(assoc.dimse_timeout or 60))
        except SendFailed as exc:
            # the stream may end inside a PDU: the association cannot go on
            log.warning("C-STORE to %s cut off: %s", assoc.acceptor.ae_title, exc)
            assoc.abort()
            return Dataset()
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if response is None:  # the DIMSE timeout: pynetdicom aborts
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(response)  # type: ignore[no-any-return]
