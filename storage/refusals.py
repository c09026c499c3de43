"""Refusals counted by what was refused and why (``storage.models.Refusal``).

A refused association or instance leaves nothing in the other tables, so the count is the only
trace the metrics have of it; one upsert per refusal, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.models import Refusal


def count(session: Session, what: str, reason: str, now: datetime) -> None:
    """One more refusal of *what* for *reason*."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(Refusal).values(what=what, reason=reason[:64], count=1, last_at=now)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["what", "reason"],
            set_={"count": Refusal.count + 1, "last_at": now},
        )
    )


def counts(session: Session) -> list[tuple[str, str, int]]:
    """(what, reason, count) for everything refused so far."""
    rows = session.execute(
        select(Refusal.what, Refusal.reason, Refusal.count).order_by(Refusal.what, Refusal.reason)
    ).all()
    return [(w, r, n) for w, r, n in rows]
