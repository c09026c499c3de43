"""The SQLAlchemy engine and sessions.

SQLite gets WAL mode, ``synchronous=FULL`` (a committed row survives power loss, which is what a
C-STORE Success promises) and a busy timeout so the network threads and the worker can share it.
PostgreSQL (``postgresql://...``, through psycopg2) is the one to use when several machines
share the queue. The schema is brought up to date at start-up by :func:`migrate` (Alembic,
``storage/migrations``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from storage.errors import SchemaError
from storage.models import Base

T = TypeVar("T")

BUSY_TIMEOUT_MS = 30_000
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
HEAD_REVISION = "0007"  # the newest file in storage/migrations/versions (a test checks)
BASELINE_REVISION = "0001"  # the schema of 0.2.0, made before migrations existed
MIGRATION_LOCK_ID = 7_340_211  # a PostgreSQL advisory lock: one process migrates at a time


IN_LIST_MAX = 500  # values in one SQL IN list, well inside every database's parameter limit


def chunks(values: Sequence[T], size: int = IN_LIST_MAX) -> Iterator[list[T]]:
    """*values* in lists of at most *size*, for IN lists."""
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


def make_engine(url: str, *, immediate: bool = False) -> Engine:
    """An engine for *url*; for SQLite, *immediate* makes every transaction take the write lock
    at BEGIN, so two writers queue on the busy timeout instead of deadlocking on an upgrade."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # let SQLAlchemy issue BEGIN itself so that "BEGIN IMMEDIATE" below is honoured
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
            # SQLite's lower() folds ASCII only; C-FIND matches names in every alphabet
            dbapi_conn.create_function("unicode_lower", 1, _unicode_lower, deterministic=True)

        @event.listens_for(engine, "begin")
        def _begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True)


def _unicode_lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def revision(conn: Connection) -> str | None:
    """The schema revision of the database (None: no ``alembic_version`` table)."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine: Engine) -> str:
    """Bring the schema to :data:`HEAD_REVISION`; returns what was done.

    An empty database gets the tables at once (and is stamped); a 0.2.0 database (tables, no
    revision) is stamped with the baseline and upgraded; an older revision is upgraded. A
    revision this code does not know (a newer version made it) raises :class:`SchemaError`.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        current = revision(conn)
        if current == HEAD_REVISION:
            return "up to date"
        if current is None and not inspect(conn).has_table("jobs"):
            Base.metadata.create_all(conn)
            conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
            conn.execute(text("INSERT INTO alembic_version VALUES (:r)"), {"r": HEAD_REVISION})
            return "created"
        _upgrade(conn, current)
        return f"upgraded from {current or '0.2.0'} to {HEAD_REVISION}"


def _upgrade(conn: Connection, current: str | None) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    if current is not None and current not in known:
        raise SchemaError(
            f"the database is at schema revision {current!r}, which this version of pacs-node "
            f"does not know (it knows up to {HEAD_REVISION}): a newer version made it"
        )
    if current is None:
        command.stamp(config, BASELINE_REVISION)
    command.upgrade(config, "head")


class WriteLock:
    """One SQLite writer at a time, queued in the kernel instead of in SQLite's busy handler.

    SQLite lets one transaction write; the others wait in its busy handler, which sleeps 1, 2,
    5, 10 ... 100 ms between tries, so under load (four associations, a worker, a sender) most
    of the time goes to sleeping. Writers here first take a thread lock (threads of one
    process) and an ``flock`` on a file beside the database (processes of one machine), and are
    woken the moment the holder is done. The busy timeout still covers any other writer.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Database:
    """Engines, tables and sessions: :meth:`session` for writing, :meth:`read` for queries."""

    def __init__(self, url: str, *, upgrade: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url, immediate=True)
        is_sqlite = make_url(url).get_backend_name() == "sqlite"
        self.read_engine = make_engine(url) if is_sqlite else self.engine
        if upgrade:
            migrate(self.engine)
        else:
            with self.engine.connect() as conn:
                current = revision(conn)
            if current != HEAD_REVISION:
                raise SchemaError(
                    f"the database schema is at {current or 'none (0.2.0 or empty)'}, not "
                    f"{HEAD_REVISION}: run `pacs-node migrate`"
                )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.read_engine, expire_on_commit=False)
        database = make_url(url).database
        self._write_lock: WriteLock | contextlib.nullcontext[None] = (
            WriteLock(Path(f"{database}.lock"))
            if is_sqlite and database and database != ":memory:"
            else contextlib.nullcontext()
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A writing session: commits on success, rolls back on error."""
        with self._write_lock, self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A reading session that does not hold the write lock."""
        with self._read_sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
        self.read_engine.dispose()
        if isinstance(self._write_lock, WriteLock):
            self._write_lock.close()
