"""Strangers: unknown AE titles, known titles from other addresses, and DICOM over TLS."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from pacs_node.config import Peer
from tests import scu
from tests.conftest import CR_CHEST, make_config


def _associate(port: int, calling: str, *, bind: str = "127.0.0.1", tls=None) -> bool:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE", bind_address=(bind, 0), tls_args=tls)
    accepted = assoc.is_established
    if accepted:
        assoc.release()
    return accepted


def test_known_title_from_another_address_is_refused(start_node, tmp_path):
    peers = (Peer("PACS", "127.0.0.1", 104), Peer("ANYWHERE", "127.0.0.1", 104, check_host=False))
    node = start_node(make_config(tmp_path, peers=peers, accept_unknown_peers=False))
    assert _associate(node.port, "PACS", bind="127.0.0.1")
    assert not _associate(node.port, "PACS", bind="127.0.0.2")  # same title, other host
    assert _associate(node.port, "ANYWHERE", bind="127.0.0.2")  # host check turned off
    assert not _associate(node.port, "STRANGER", bind="127.0.0.1")


def test_strangers_cannot_store_or_query(start_node, tmp_path):
    peers = (Peer("PACS", "127.0.0.1", 104),)
    node = start_node(make_config(tmp_path, peers=peers, accept_unknown_peers=False))
    with pytest.raises(AssertionError, match="association refused"):
        scu.store(node.port, [CR_CHEST], calling="STRANGER")
    with pytest.raises(AssertionError, match="association refused"):
        scu.find(node.port, scu.query("STUDY", StudyInstanceUID=""), calling="STRANGER")
    assert scu.store(node.port, [CR_CHEST], calling="PACS")[0].Status == 0
    matches, _ = scu.find(node.port, scu.query("STUDY", StudyInstanceUID=""), calling="PACS")
    assert len(matches) == 1


def _client_context(pki: Path, cert: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if cert:
        context.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    return context


def test_tls_port_accepts_only_clients_with_a_trusted_certificate(start_node, tmp_path, pki):
    from tests.pki import tls_settings

    tls = tls_settings(pki)
    node = start_node(replace(make_config(tmp_path), tls=tls))
    port = node.tls_port
    assert port and port != node.port
    assert _associate(port, "TLSCLIENT", tls=(_client_context(pki, "client"), "127.0.0.1"))
    assert not _associate(port, "NOCERT", tls=(_client_context(pki, None), "127.0.0.1"))
    assert not _associate(port, "STRANGER", tls=(_client_context(pki, "stranger"), "127.0.0.1"))
    assert not _associate(port, "PLAIN")  # no TLS at all on the TLS port
    assert _associate(node.port, "PLAIN")  # the plain port still serves
    # C-FIND over TLS: answered by pynetdicom's own path (fastfind writes plain sockets only)
    assert scu.store(node.port, [CR_CHEST])[0].Status == 0
    ae = AE(ae_title="TLSCLIENT")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="AINODE",
        tls_args=(_client_context(pki, "client"), "127.0.0.1"),
    )  # fmt: skip
    assert assoc.is_established
    try:
        identifier = scu.query("STUDY", StudyInstanceUID="", PatientName="")
        found = [
            i
            for s, i in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
            if s.Status == 0xFF00
        ]
    finally:
        assoc.release()
    assert len(found) == 1


# -- what a stranger may make the node read (issue 10) ----------------------------------------


def _rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _announce_4_gib_and_stream_zeros(port: int) -> int:
    """A stranger's A-ASSOCIATE-RQ header announcing 4 GiB, then zeros for up to 5 s or
    300 MiB; the bytes sent before the node closed the connection."""
    sock = _raw(port)
    sent = 0
    try:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0))
        zeros = bytes(1 << 20)
        start = time.monotonic()
        while time.monotonic() - start < 5 and sent < 300 * 2**20:
            try:
                sock.sendall(zeros)
            except (BrokenPipeError, ConnectionResetError):
                return sent
            sent += len(zeros)
    finally:
        sock.close()
    raise AssertionError(f"the node was still reading after {sent >> 20} MiB")


def _raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _closed_or_aborted(sock: socket.socket, timeout_s: float) -> bytes:
    """What the node sent before closing (an A-ABORT is b'\\x07...'), waiting at most
    *timeout_s*; fails the test if the connection is still open then."""
    sock.settimeout(timeout_s)
    received = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return received
        except TimeoutError:
            break
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the node kept the connection open for {timeout_s} s")


def _guarded_node(start_node, tmp_path, **node):
    peers = (Peer("PACS", "127.0.0.1", 104),)
    return start_node(make_config(tmp_path, peers=peers, accept_unknown_peers=False, **node))


def test_a_4_gib_association_request_is_aborted_unread(start_node, tmp_path):
    """A stranger announces a 4 GiB A-ASSOCIATE-RQ and streams zeros: the node aborts at the
    6-byte header, reads nothing more, and the known PACS is served meanwhile."""
    node = _guarded_node(start_node, tmp_path)
    before = _rss_kib()
    sent = _announce_4_gib_and_stream_zeros(node.port)
    grown_mib = (_rss_kib() - before) / 1024
    assert sent < 64 * 2**20, f"{sent >> 20} MiB accepted before the abort"
    assert grown_mib < 40, f"the node grew by {grown_mib:.0f} MiB"
    assert _associate(node.port, "PACS")


def test_an_association_request_dripped_byte_by_byte_is_closed_at_its_deadline(
    start_node, tmp_path
):
    node = _guarded_node(start_node, tmp_path, associate_rq_timeout_s=1.0)
    drippers = [_raw(node.port) for _ in range(3)]
    try:
        for sock in drippers:
            sock.sendall(struct.pack(">BBL", 0x01, 0, 205))  # a plausible length
        start = time.monotonic()
        closed = set()
        while len(closed) < len(drippers) and time.monotonic() - start < 10:
            for i, sock in enumerate(drippers):
                if i in closed:
                    continue
                try:
                    sock.sendall(b"\x00")
                except (BrokenPipeError, ConnectionResetError):
                    closed.add(i)
            assert _associate(node.port, "PACS")  # the PACS is served throughout
            time.sleep(0.2)
        elapsed = time.monotonic() - start
    finally:
        for sock in drippers:
            sock.close()
    assert len(closed) == len(drippers), "a dripping connection outlived its deadline"
    assert elapsed < 6


def test_a_known_peer_announcing_a_500_mb_pdu_is_aborted(start_node, tmp_path):
    node = _guarded_node(start_node, tmp_path, max_pdu_bytes=65536)
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 65536  # what the node announced
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 500_000_000) + bytes(4096))
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted, "the association outlived a PDU longer than the node's maximum"
    assert _associate(node.port, "PACS")


def _known_association(port: int):
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.dimse_timeout = 10
    ae.network_timeout = 60  # the node, not this SCU, must be the one that gives up
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    return assoc


def _poll_aborted(assocs, established_at: list[float], within_s: float) -> list[float]:
    ended: list[float | None] = [None] * len(assocs)
    deadline = time.monotonic() + within_s
    while any(e is None for e in ended) and time.monotonic() < deadline:
        for i, assoc in enumerate(assocs):
            if ended[i] is None and not assoc.is_established:
                ended[i] = time.monotonic()
        time.sleep(0.02)
    now = time.monotonic()
    return [(e if e is not None else now) - s for e, s in zip(ended, established_at, strict=True)]


def test_a_known_peer_that_goes_silent_is_aborted_at_the_idle_deadline(start_node, tmp_path):
    """Issue 10: idle deadline between PDUs (node.network_timeout_s) for known peers too; the
    slot comes back. Each association's idle time counts from its own establishment."""
    node = _guarded_node(start_node, tmp_path, network_timeout_s=1.5, max_connections_per_address=2)
    silent, established_at = [], []
    for _ in range(2):  # every slot of this address
        silent.append(_known_association(node.port))
        established_at.append(time.monotonic())
    idle = _poll_aborted(silent, established_at, 10)
    assert all(assoc.is_aborted for assoc in silent), "a silent association outlived its deadline"
    assert all(0.75 < took < 6 for took in idle), idle  # half the deadline: not at once
    assert _associate(node.port, "PACS")  # the slots are free again


def test_a_known_peer_dripping_a_pdu_is_aborted_at_the_pdu_deadline(start_node, tmp_path):
    """A known peer starts a P-DATA PDU after its association and sends a byte a second: it
    never goes idle, so the per-PDU deadline (node.pdu_timeout_s) is what ends it."""
    node = _guarded_node(start_node, tmp_path, pdu_timeout_s=2.0, network_timeout_s=30)
    assoc = _known_association(node.port)
    sock = assoc.dul.socket.socket
    sock.sendall(struct.pack(">BBL", 0x04, 0, 4096))
    start = time.monotonic()
    with pytest.raises(OSError):
        while time.monotonic() - start < 10:
            sock.sendall(b"\x00")
            time.sleep(0.5)
            if assoc.is_aborted:
                raise OSError("aborted")
    assert time.monotonic() - start < 6
    assert _associate(node.port, "PACS")


def test_strangers_get_a_real_association_reject_every_time(start_node, tmp_path):
    """Issue 10: the reject was lost in a race with the socket being closed (20 of 20)."""
    node = _guarded_node(start_node, tmp_path)
    outcomes = []
    for _ in range(20):
        ae = AE(ae_title="STRANGER")
        ae.acse_timeout = ae.network_timeout = 5
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
        rj = assoc.acceptor.primitive if assoc.is_rejected else None
        outcomes.append(
            (rj.result, rj.result_source, rj.diagnostic) if rj is not None else "no reject"
        )
    # rejected-permanent, by the DUL service-user, calling AE title not recognised
    assert outcomes == [(0x01, 0x01, 0x03)] * 20
    assert _associate(node.port, "PACS")


def test_strangers_cannot_take_the_slots_the_known_pacs_needs(start_node, tmp_path):
    """Issue 10: 40 silent connections took every association slot, and the known PACS was
    rejected ("local limit exceeded") for as long as they stayed. Strangers (here from
    127.0.0.2, which no peer is configured for) now share a few slots; the rest are closed at
    once, unread."""
    node = _guarded_node(start_node, tmp_path, max_stranger_connections=4)
    silent = []
    try:
        for _ in range(40):
            sock = socket.create_connection(
                ("127.0.0.1", node.port), timeout=5, source_address=("127.0.0.2", 0)
            )
            silent.append(sock)
        time.sleep(0.3)  # let the server accept (and refuse) them all
        closed = 0
        for sock in silent:
            sock.settimeout(0.2)
            try:
                if sock.recv(1) == b"":
                    closed += 1
            except TimeoutError:
                pass  # still open: one of the stranger slots
            except ConnectionResetError:
                closed += 1
        assert closed == 36, f"{closed} of 40 stranger connections closed"
        assert node.receiver.connection_limits.counts()[1] == 4
        for _ in range(5):
            assert _associate(node.port, "PACS")  # the known PACS, from its address
    finally:
        for sock in silent:
            sock.close()


def test_finished_associations_give_their_slot_back(start_node, tmp_path):
    """Sixty associations one after another from one address, with a limit of 4 at once: each
    ended association gives its slot back."""
    node = _guarded_node(start_node, tmp_path, max_connections_per_address=4)
    for _ in range(60):
        assert _associate(node.port, "PACS")
    assert scu.store(node.port, [CR_CHEST], calling="PACS")[0].Status == 0
    deadline = time.monotonic() + 10
    while node.receiver.connection_limits.counts()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.receiver.connection_limits.counts() == (0, 0)


@pytest.mark.slow
def test_a_large_instance_is_streamed_to_disk_not_held_in_memory(tmp_path):
    """Issue 10: a 500 MB C-STORE took the node from 242 MiB to 3.4 GiB. The data set now goes
    to disk fragment by fragment (benchmarks/memory.py: +3 MiB for 500 MiB; held: +1.5 GiB)."""
    from benchmarks.memory import big_ct
    from tests.orthanc import DCMTK, dcmtk_available, dcmtk_env, free_port
    from tests.processes import NodeProcess, peak_rss_mib

    if not dcmtk_available("storescu"):
        pytest.skip("dcmtk not installed")
    instance = tmp_path / "big.dcm"
    size = big_ct(instance, 96)
    port = free_port()
    (tmp_path / "node").mkdir()
    node = NodeProcess(
        tmp_path / "node", f'[node]\nport = {port}\nstorage_dir = "data"\n', "receive"
    )
    node.start()
    try:
        before = peak_rss_mib(node.proc.pid)
        run = subprocess.run(
            [DCMTK["storescu"], "-aec", "AINODE", "127.0.0.1", str(port), str(instance)],
            env=dcmtk_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-500:]
        grown = peak_rss_mib(node.proc.pid) - before
        stored = list((tmp_path / "node" / "data" / "instances").rglob("*.dcm"))
        assert len(stored) == 1 and abs(stored[0].stat().st_size - size) < 1024  # its own meta
        assert stored[0].read_bytes()[-4096:] == instance.read_bytes()[-4096:]
    finally:
        node.stop()
    assert grown < 24, f"peak RSS grew by {grown:.0f} MiB for a {size >> 20} MiB instance"


def test_a_data_set_above_the_maximum_is_refused_with_the_reason(start_node, tmp_path):
    from benchmarks.memory import big_ct

    node = _guarded_node(start_node, tmp_path, max_dataset_bytes=2 * 2**20)
    instance = tmp_path / "big.dcm"
    big_ct(instance, 3)
    answer = scu.store(node.port, [instance], calling="PACS")[0]
    assert answer.Status == 0xA700
    assert (
        answer.ErrorComment.startswith("data set of ") and "exceeds 2097152" in answer.ErrorComment
    )
    assert not list((node.files.root / "instances").rglob("*.dcm"))
    assert scu.store(node.port, [CR_CHEST], calling="PACS")[0].Status == 0


def test_a_malformed_dimse_command_is_aborted_at_once(start_node, tmp_path):
    """Issue 10: a C-STORE-RQ without AffectedSOPInstanceUID got no answer until a 60 s abort
    (pynetdicom's DUL thread died decoding it). Now: A-ABORT at once, the node goes on."""
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    node = _guarded_node(start_node, tmp_path)
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.is_established
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.Priority = 2
    request.DataSet = BytesIO(b"")  # and no AffectedSOPInstanceUID
    context_id = assoc.accepted_contexts[0].context_id
    start = time.monotonic()
    assoc.dimse.send_msg(request, context_id)
    while not assoc.is_aborted and time.monotonic() - start < 20:
        time.sleep(0.02)
    assert assoc.is_aborted and time.monotonic() - start < 3
    assert scu.store(node.port, [CR_CHEST], calling="PACS")[0].Status == 0


@pytest.mark.slow
def test_the_attacks_against_a_real_pacs_node_serve(tmp_path):
    """Issue 10, against ``pacs-node serve`` itself (supervisor and role processes): a
    stranger's 4 GiB association request is aborted unread (the receive process does not
    grow), the stranger gets a real A-ASSOCIATE-RJ with the reason logged, and the known PACS
    is served throughout. (Log escaping: test_serving's OneLineFormatter test.)"""
    from tests.orthanc import free_port
    from tests.processes import NodeProcess

    port = free_port()
    (tmp_path / "node").mkdir()
    node = NodeProcess(
        tmp_path / "node",
        f'[node]\nport = {port}\nstorage_dir = "data"\naccept_unknown_peers = false\n'
        '[[peers]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n',
    )
    node.start()
    try:
        [receive] = node.role_pids("receive[0]")
        assert _associate(port, "PACS")
        before = _rss_kib(receive)
        sent = _announce_4_gib_and_stream_zeros(port)
        grown_mib = (_rss_kib(receive) - before) / 1024
        assert sent < 64 * 2**20 and grown_mib < 40, (sent, grown_mib)

        ae = AE(ae_title="STRANGER")
        ae.acse_timeout = ae.network_timeout = 10
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
        assert assoc.is_rejected  # a real A-ASSOCIATE-RJ, not a dropped connection
        assert _associate(port, "PACS")  # served throughout
        deadline = time.monotonic() + 10
        while "STRANGER" not in node.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "calling AE title 'STRANGER' is not a configured peer" in node.log()
    finally:
        node.stop()
