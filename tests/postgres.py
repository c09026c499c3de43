"""A real PostgreSQL server for the tests: initdb in a temporary folder, started on a free
loopback port by the tests themselves, one fresh database per test.

``.ci/run`` installs Debian's ``postgresql`` package; the server runs as the ``postgres`` user
(initdb refuses root). Outside CI, tests marked ``postgres`` are skipped when it is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.orthanc import free_port, wait_for


def _bindir() -> Path | None:
    root = Path("/usr/lib/postgresql")
    if not root.is_dir():
        return None
    versions = sorted(
        (p for p in root.iterdir() if (p / "bin" / "postgres").exists()),
        key=lambda p: int(p.name) if p.name.isdigit() else 0,
    )
    return versions[-1] / "bin" if versions else None


def postgres_available() -> bool:
    return _bindir() is not None


def _as_postgres(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120, **kw)


@dataclass
class PostgresServer:
    bindir: Path
    datadir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        log = (self.datadir.parent / "postgres.log").open("w")
        cmd = [
            str(self.bindir / "postgres"),
            "-D", str(self.datadir),
            "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.datadir.parent}",
            "-c", "fsync=on",
            "-c", "max_connections=200",
        ]  # fmt: skip
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        isready = [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)]
        wait_for(
            lambda: subprocess.run(isready, capture_output=True).returncode == 0,
            timeout_s=60,
            what="PostgreSQL to accept connections",
        )

    def create_database(self) -> str:
        import sqlalchemy

        name = f"t_{uuid.uuid4().hex[:12]}"
        engine = sqlalchemy.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: "smart" shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = _bindir()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (.ci/run installs it)")
        pytest.skip("PostgreSQL is not installed")
    root = Path(tempfile.mkdtemp(prefix="pacs-node-pg-"))
    root.chmod(0o755)
    datadir = root / "data"
    datadir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(datadir, "postgres", "postgres")
    _as_postgres(
        [str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
    )
    server = PostgresServer(bindir, datadir, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the test server."""
    return postgres_server.create_database()
