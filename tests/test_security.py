"""Strangers: unknown AE titles, known titles from other addresses, and DICOM over TLS."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_node.config import Peer, TlsSettings
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


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _self_signed(folder: Path, name: str) -> None:
    """``name.pem`` and ``name.key``: a self-signed certificate with CN=name."""
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        cwd=folder,
    )


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server and a client certificate signed by it, and a self-signed stranger."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path / "pki"
    d.mkdir()
    _self_signed(d, "ca")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    _self_signed(d, "stranger")
    return d


def _client_context(pki: Path, cert: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if cert:
        context.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    return context


def test_tls_port_accepts_only_clients_with_a_trusted_certificate(start_node, tmp_path, pki):
    tls = TlsSettings(
        enabled=True,
        port=0,
        cert_file=pki / "server.pem",
        key_file=pki / "server.key",
        ca_file=pki / "ca.pem",
    )
    node = start_node(replace(make_config(tmp_path), tls=tls))
    port = node.tls_port
    assert port and port != node.port
    assert _associate(port, "TLSCLIENT", tls=(_client_context(pki, "client"), "127.0.0.1"))
    assert not _associate(port, "NOCERT", tls=(_client_context(pki, None), "127.0.0.1"))
    assert not _associate(port, "STRANGER", tls=(_client_context(pki, "stranger"), "127.0.0.1"))
    assert not _associate(port, "PLAIN")  # no TLS at all on the TLS port
    assert _associate(node.port, "PLAIN")  # the plain port still serves
