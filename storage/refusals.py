"""Refusals counted by what was refused and why (``storage.models.Refusal``).

A refused association or instance leaves nothing in the other tables, so the count is the only
trace the metrics have of it. :class:`Tally` counts in memory and writes the counts once a
second in one transaction (an upsert per reason, on SQLite and PostgreSQL alike): a flood of
refusals is not a flood of database writes, and no refusal waits on the database.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import Refusal, utcnow

log = logging.getLogger(__name__)


def count(session: Session, what: str, reason: str, now: datetime, n: int = 1) -> None:
    """*n* more refusals of *what* for *reason*."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(Refusal).values(what=what, reason=reason[:64], count=n, last_at=now)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["what", "reason"],
            set_={"count": Refusal.count + n, "last_at": now},
        )
    )


class Tally:
    """Refusals of one process, written to *db* every *every_s* by a thread of its own (and
    at :meth:`close`); a failed write keeps the counts for the next one."""

    def __init__(self, db: Database, every_s: float = 1.0) -> None:
        self.db, self.every_s = db, every_s
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, what: str, reason: str) -> None:
        with self._lock:
            self._counts[(what, reason[:64])] += 1
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="refusals", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, Counter()
        if not counts:
            return
        try:
            with self.db.session() as session:
                now = utcnow()
                for (what, reason), n in sorted(counts.items()):
                    count(session, what, reason, now, n)
        except Exception as exc:
            log.warning("refusal counts not written (kept for the next try): %s", exc)
            with self._lock:
                self._counts.update(counts)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()


def counts(session: Session) -> list[tuple[str, str, int]]:
    """(what, reason, count) for everything refused so far."""
    rows = session.execute(
        select(Refusal.what, Refusal.reason, Refusal.count).order_by(Refusal.what, Refusal.reason)
    ).all()
    return [(w, r, n) for w, r, n in rows]
