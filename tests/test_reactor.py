"""The event-driven association loops (pacs_node/reactor.py, issue 9): every association the
node accepts or opens runs them, over real associations; messages, release, a peer's abort,
an acceptor's own C-STORE sub-operations (C-GET) and the idle deadline still work; both
threads and their wake-up sockets end with the association."""

from __future__ import annotations

import threading
import time

import pydicom
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_node import reactor
from pacs_node.ae import NodelayAE, build_scp, start_server
from pacs_node.config import Config, NodeSettings
from tests.conftest import CT_SERIES
from tests.orthanc import free_port


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _acceptor(handlers, network_timeout_s: float = 30.0):
    """The node's SCP on a free port; returns (server, port, accepted associations)."""
    port = free_port()
    ae = build_scp(Config(node=NodeSettings(port=port, network_timeout_s=network_timeout_s)))
    accepted: list = []
    opened = (evt.EVT_CONN_OPEN, lambda event: accepted.append(event.assoc))
    server = start_server(ae, ("127.0.0.1", port), evt_handlers=[opened, *handlers])
    return server, port, accepted


def _requestor(ae_class=NodelayAE):
    ae = ae_class(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    return ae


def test_the_pinned_pynetdicom_gets_the_event_driven_loops():
    assert reactor.SUPPORTED, "pynetdicom changed: port pacs_node/reactor.py's loops to it"


def test_accepted_and_opened_associations_answer_many_messages_and_end_cleanly():
    server, port, accepted = _acceptor([(evt.EVT_C_ECHO, lambda event: 0x0000)])
    try:
        threads_before = threading.active_count()
        assoc = _requestor().associate("127.0.0.1", port, ae_title="AINODE")
        assert assoc.is_established
        assert _wait_for(lambda: bool(accepted))
        theirs = accepted[0]
        for side in (assoc, theirs):
            assert side.dul.run.__func__ is reactor._dul_run
            assert side._run_reactor.__func__ is reactor._association_run_reactor
        statuses = [assoc.send_c_echo().Status for _ in range(300)]
        assert statuses == [0] * 300
        assoc.release()
        assert assoc.is_released
        assert _wait_for(lambda: not theirs.is_alive() and not theirs.dul.is_alive())
        for side in (assoc, theirs):
            assert side.dul._wake_reader.fileno() == -1  # closed with its thread
        assert _wait_for(lambda: threading.active_count() <= threads_before)
    finally:
        server.shutdown()


def test_a_plain_pynetdicom_peer_is_served_and_its_abort_ends_the_association():
    server, port, accepted = _acceptor([(evt.EVT_C_ECHO, lambda event: 0x0000)])
    try:
        assoc = _requestor(AE).associate("127.0.0.1", port, ae_title="AINODE")
        assert assoc.send_c_echo().Status == 0
        assoc.abort()
        assert _wait_for(lambda: bool(accepted) and not accepted[0].is_alive())
        assert accepted[0].is_aborted
    finally:
        server.shutdown()


def test_a_silent_peer_is_still_released_at_the_idle_deadline():
    """The idle timer is checked by the loops without anything waking them."""
    server, port, accepted = _acceptor([], network_timeout_s=1.0)
    try:
        assoc = _requestor(AE).associate("127.0.0.1", port, ae_title="AINODE")
        assert assoc.is_established
        started = time.monotonic()
        assert _wait_for(lambda: bool(accepted) and not accepted[0].is_alive(), 15)
        assert time.monotonic() - started >= 0.9  # not before the deadline
        assert _wait_for(lambda: not assoc.is_established, 5)
    finally:
        server.shutdown()


def test_c_store_sub_operations_on_the_accepted_association(tmp_path):
    """C-GET: the acceptor's handler sends C-STOREs on its own association (the reactor
    paused by pynetdicom's send_* protocol), then the final response."""
    from pynetdicom import build_role
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelGet,
    )

    datasets = [pydicom.dcmread(path) for path in CT_SERIES[:5]]

    def on_get(event):
        yield len(datasets)
        for ds in datasets:
            yield 0xFF00, ds

    server, port, _ = _acceptor([(evt.EVT_C_GET, on_get)])
    received: list[str] = []

    def on_store(event):
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    try:
        ae = NodelayAE(ae_title="TESTSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(CTImageStorage)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
        assoc = ae.associate(
            "127.0.0.1",
            port,
            ae_title="AINODE",
            ext_neg=[build_role(CTImageStorage, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        assert assoc.is_established
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = datasets[0].StudyInstanceUID
        query.SeriesInstanceUID = datasets[0].SeriesInstanceUID
        final = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))[-1]
        assoc.release()
        assert final[0].Status == 0x0000
        assert received == [str(ds.SOPInstanceUID) for ds in datasets]
    finally:
        server.shutdown()


def test_the_c_store_response_bytes_are_pynetdicoms():
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    cases = [
        ("1.2.840.10008.5.1.4.1.1.2", 1, 0x0000, "1.2.3.4"),  # odd and even UID lengths
        ("1.2.840.10008.5.1.4.1.1.1", 65535, 0xB000, "1.2.826.0.1.3680043.8.498.123"),
        ("1.2.840.10008.5.1.4.1.1.88.22", 7, 0xA700, "2.25.1234567890123456789012345"),
    ]
    for sop_class, message_id, status, sop_instance in cases:
        primitive = C_STORE()
        primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = sop_class, sop_instance
        primitive.MessageIDBeingRespondedTo, primitive.Status = message_id, status
        message = C_STORE_RSP()
        message.primitive_to_message(primitive)
        expected = encode(message.command_set, True, True)
        assert reactor.encode_store_rsp(sop_class, message_id, status, sop_instance) == expected


def test_stores_over_the_fast_response_and_a_refusal_with_its_comment(monkeypatch):
    """Success answered by the fast path; a refusal's Error Comment still goes through
    pynetdicom and arrives."""
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    fast: list[str] = []
    encoder = reactor.encode_store_rsp

    def counted(*args):
        fast.append(args[3])
        return encoder(*args)

    monkeypatch.setattr(reactor, "encode_store_rsp", counted)
    # as pacs-node sets it (pacs_node/cli.py): pynetdicom's logging handlers, bound to
    # EVT_DIMSE_SENT otherwise, would want the message pynetdicom builds
    monkeypatch.setattr("pynetdicom._config.LOG_HANDLER_LEVEL", "none")

    def on_store(event):
        if event.request.AffectedSOPInstanceUID.endswith("9"):
            status = pydicom.Dataset()
            status.Status, status.ErrorComment = 0xA700, "refused for the test"
            return status
        return 0x0000

    server, port, _ = _acceptor([(evt.EVT_C_STORE, on_store)])
    try:
        ae = NodelayAE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
        assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
        answers = []
        for path in CT_SERIES[:6]:
            ds = pydicom.dcmread(path)
            answers.append((str(ds.SOPInstanceUID), assoc.send_c_store(ds)))
        assoc.release()
        for uid, status in answers:
            if uid.endswith("9"):
                assert (status.Status, status.ErrorComment) == (0xA700, "refused for the test")
            else:
                assert status.Status == 0 and "ErrorComment" not in status
        assert fast == [uid for uid, _ in answers if not uid.endswith("9")]  # 5 fast, 1 not
    finally:
        server.shutdown()


def test_the_streamed_file_meta_bytes_are_pynetdicoms():
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    cases = [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2"),  # odd and even lengths
        ("1.2.840.10008.5.1.4.1.1.1", "1.2.826.0.1.3680043.8.498.123", "1.2.840.10008.1.2.1"),
        ("1.2.840.10008.5.1.4.1.1.88.22", "2.25.12345678901234567890", "1.2.840.10008.1.2.4.50"),
    ]
    for sop_class, sop_instance, syntax in cases:
        expected = BytesIO()
        expected.write(b"\0" * 128 + b"DICM")
        meta = create_file_meta(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax
        )
        write_file_meta_info(expected, meta)
        assert reactor.file_meta_bytes(sop_class, sop_instance, syntax) == expected.getvalue()


def _streaming_acceptor(tmp_path, handlers):
    """The node's SCP streaming received data sets into a storage folder's tmp/."""
    from storage.files import FileStore

    files = FileStore(tmp_path / "storage")
    port = free_port()
    ae = build_scp(Config(node=NodeSettings(port=port)))
    accepted: list = []
    opened = (evt.EVT_CONN_OPEN, lambda event: accepted.append(event.assoc))
    server = start_server(
        ae, ("127.0.0.1", port), evt_handlers=[opened, *handlers], stream_to=files
    )
    return server, port, files, accepted


def test_received_data_sets_stream_into_the_storage_folder_as_pynetdicom_writes_them(
    tmp_path, monkeypatch
):
    """Each data set arrives as a partial file of the storage folder (its prefix, .part), with
    the bytes pynetdicom's own stream to /tmp has for the same C-STORE; the file is gone once
    the handler has returned (pynetdicom removes it when the handler did not move it)."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    monkeypatch.setattr("pynetdicom._config.STORE_RECV_CHUNKED_DATASET", True)
    seen: dict[str, list] = {"node": [], "plain": []}

    def recorder(key):
        def on_store(event):
            path = event.dataset_path
            seen[key].append((path, path.read_bytes()))
            return 0x0000

        return on_store

    server, port, files, _ = _streaming_acceptor(tmp_path, [(evt.EVT_C_STORE, recorder("node"))])
    plain_port = free_port()
    plain = AE(ae_title="AINODE")
    plain.add_supported_context(CTImageStorage)
    plain_server = plain.start_server(
        ("127.0.0.1", plain_port), block=False, evt_handlers=[(evt.EVT_C_STORE, recorder("plain"))]
    )
    try:
        for which in (port, plain_port):
            ae = NodelayAE(ae_title="TESTSCU")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)  # both accept it
            ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
            assoc = ae.associate("127.0.0.1", which, ae_title="AINODE")
            for path in CT_SERIES[:3]:
                assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
            assoc.release()
        assert len(seen["node"]) == len(seen["plain"]) == 3
        for (path, data), (_, expected) in zip(seen["node"], seen["plain"], strict=True):
            assert path.parent == files.tmp_dir
            assert path.name.startswith(files.partial_prefix()) and path.name.endswith(".part")
            assert data == expected
            assert not path.exists()
        assert list(files.tmp_dir.iterdir()) == []
    finally:
        server.shutdown()
        plain_server.shutdown()


def test_a_data_set_cut_off_by_an_abort_leaves_no_partial_file(tmp_path, monkeypatch):
    """The requestor sends a C-STORE's command and the first fragment of its data set, then
    aborts: the acceptor removes the partial file when the association ends."""
    from io import BytesIO

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    monkeypatch.setattr("pynetdicom._config.STORE_RECV_CHUNKED_DATASET", True)
    stored: list = []
    handlers = [(evt.EVT_C_STORE, lambda event: stored.append(event) or 0x0000)]
    server, port, files, accepted = _streaming_acceptor(tmp_path, handlers)
    try:
        ae = NodelayAE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
        assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
        ds = pydicom.dcmread(CT_SERIES[0])
        request = C_STORE()
        request.MessageID, request.Priority = 1, 2
        request.AffectedSOPClassUID = ds.SOPClassUID
        request.AffectedSOPInstanceUID = ds.SOPInstanceUID
        context = assoc.accepted_contexts[0]
        syntax = context.transfer_syntax[0]
        request.DataSet = BytesIO(encode(ds, syntax.is_implicit_VR, syntax.is_little_endian))
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        pdus = list(message.encode_msg(context.context_id, 16382))
        assert len(pdus) > 3  # a CT slice spans many fragments
        for pdu in pdus[:3]:  # the command and the first data set fragments
            assoc.dul.send_pdu(pdu)
        assert _wait_for(lambda: any(files.tmp_dir.iterdir()))
        assoc.abort()
        assert _wait_for(lambda: bool(accepted) and not accepted[0].dul.is_alive())
        assert list(files.tmp_dir.iterdir()) == []
        assert stored == []
    finally:
        server.shutdown()
