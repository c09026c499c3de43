"""The send role: deliver generated instances to the peers they are owed to.

``pacs-node send`` runs :func:`run`. Due deliveries are claimed in batches, one destination at a
time; the association to a destination stays open while more deliveries for it are due, so a
burst of results streams over one association instead of one association per poll. Each
outcome is recorded (``done``, a retry after backoff, or ``failed``) as soon as its batch is
answered.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select

from pacs_node import sender
from pacs_node.config import Config
from pacs_node.process import Stop, file_store, owner_id, run_loop
from storage import tasks
from storage.db import Database
from storage.files import FileStore
from storage.models import Delivery, utcnow

log = logging.getLogger(__name__)

BATCH = 32  # deliveries claimed (and recorded) at a time


class Sender:
    """Claims due deliveries and sends them, one association per destination."""

    def __init__(
        self, config: Config, db: Database, files: FileStore, *, owner: str | None = None
    ) -> None:
        self.config = config
        self.db = db
        self.files = files
        self.owner = owner or owner_id()

    def _claim(self, destination: str | None) -> list[tuple[int, str, Path]]:
        where = [] if destination is None else [Delivery.destination_ae == destination]
        with self.db.session() as session:
            claimed = tasks.claim(
                session,
                Delivery,
                owner=self.owner,
                lease_s=self.config.worker.lease_s,
                now=utcnow(),
                limit=BATCH,
                where=where,
            )
            return [(d.id, d.destination_ae, self.files.abspath(d.instance.path)) for d in claimed]

    def deliver_due(self) -> int:
        """Send every delivery due now; returns how many were tried."""
        tried = 0
        for _ in range(10_000):  # bounded: each round claims at least one delivery or stops
            first = self._claim(None)
            if not first:
                break
            by_destination: dict[str, list[tuple[int, Path]]] = {}
            for key, destination, path in first:
                by_destination.setdefault(destination, []).append((key, path))
            for destination, items in by_destination.items():
                tried += self._deliver(destination, items)
        return tried

    def _deliver(self, destination: str, items: list[tuple[int, Path]]) -> int:
        peer = self.config.peer(destination)
        if peer is None:
            outcomes = [
                sender.Outcome(k, None, f"{destination} is not a configured peer", permanent=True)
                for k, _ in items
            ]
            self._record(destination, outcomes)
            return len(items)

        def more() -> list[tuple[int, Path]]:
            return [(k, p) for k, _, p in self._claim(destination)]

        sent = tried = 0
        for outcomes in sender.stream(self.config, peer, items, more):
            self._record(destination, outcomes)
            tried += len(outcomes)
            sent += sum(o.ok for o in outcomes)
        log.info("sent %d of %d results to %s", sent, tried, destination)
        return tried

    def _record(self, destination: str, outcomes: Sequence[sender.Outcome]) -> None:
        settings = self.config.delivery
        now = utcnow()
        with self.db.session() as session:
            rows = {
                d.id: d
                for d in session.scalars(
                    select(Delivery).where(Delivery.id.in_([o.key for o in outcomes]))
                ).all()
            }
            for outcome in outcomes:
                delivery = rows.get(outcome.key)
                if delivery is None or not tasks.holds(delivery, self.owner):
                    continue  # taken back meanwhile; whoever holds it now records it
                delivery.last_status = outcome.status
                if outcome.ok:
                    tasks.succeed(session, delivery, now)
                    continue
                state = tasks.fail(
                    session, delivery, outcome.error, now=now, permanent=outcome.permanent
                )
                log.warning(
                    "delivery %d to %s: %s (%s, attempt %d of %d)",
                    outcome.key,
                    destination,
                    outcome.error,
                    state,
                    delivery.attempts,
                    delivery.max_attempts or settings.max_attempts,
                )

    def sweep(self) -> int:
        with self.db.session() as session:
            taken = tasks.expire(session, Delivery, now=utcnow())
        return len(taken)

    def run_pending(self) -> int:
        return self.deliver_due()


def run(config: Config, stop: Stop) -> None:
    """``pacs-node send``: deliver what is due until stopped."""
    db = Database(config.node.resolved_database_url)
    owner = owner_id()
    role = Sender(config, db, file_store(config), owner=owner)
    log.info("send role %s ready", owner)
    try:
        run_loop(
            role.deliver_due,
            config.worker.poll_interval_s,
            stop,
            sweep=role.sweep,
            sweep_every_s=max(1.0, config.worker.lease_s / 4),
        )
    finally:
        db.dispose()
