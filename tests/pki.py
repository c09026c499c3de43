"""A small PKI for the TLS tests: a CA, a server and a client certificate it signed, a stranger."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest


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


def make_pki(tmp_path: Path) -> Path:
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


def tls_settings(pki: Path) -> Any:
    """TLS on (a free port) with the server certificate of :func:`make_pki`'s CA."""
    from pacs_node.config import TlsSettings

    return TlsSettings(
        enabled=True,
        port=0,
        cert_file=pki / "server.pem",
        key_file=pki / "server.key",
        ca_file=pki / "ca.pem",
    )
