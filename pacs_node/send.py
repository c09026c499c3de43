"""The send role: deliver generated instances to the peers they are owed to.

``pacs-node send`` runs :func:`run`. Due deliveries are claimed in batches, one destination at a
time; the association to a destination stays open while more deliveries for it are due, so a
burst of results streams over one association instead of one association per poll. Each
outcome is recorded (``done``, a retry after backoff, or ``failed``) as soon as its batch is
answered. With ``peers[].confirm_deliveries`` (on by default) a batch the peer answered with
Success is checked first: a C-FIND (IMAGE level) for the instances sent. One the peer does not
hold is a failed attempt, sent again after the backoff; when the peer cannot be asked (it does
not answer C-FIND) the delivery is done and marked "unconfirmed" with the reason, for
``pacs-node status``. Storage Commitment (N-ACTION) is not implemented.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select

from pacs_node import sender
from pacs_node.config import Config, Peer
from pacs_node.process import Stop, file_store, owner_id, run_loop
from pacs_node.query_scu import find_at_peer
from storage import tasks
from storage.db import Database
from storage.files import FileStore
from storage.models import Delivery, Instance, Series, Study, utcnow

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
            confirmations: dict[int, str] = {}
            if peer.confirm_deliveries and any(o.ok for o in outcomes):
                outcomes, confirmations = self._confirm(peer, outcomes)
            self._record(destination, outcomes, confirmations)
            tried += len(outcomes)
            sent += sum(o.ok for o in outcomes)
        log.info("sent %d of %d results to %s", sent, tried, destination)
        return tried

    def _confirm(
        self, peer: Peer, outcomes: Sequence[sender.Outcome]
    ) -> tuple[list[sender.Outcome], dict[int, str]]:
        """Ask *peer* whether it holds what it accepted: outcomes it does not hold become
        failures; the others get their confirmation text."""
        ok = [o.key for o in outcomes if o.ok]
        with self.db.read() as session:
            rows = session.execute(
                select(
                    Delivery.id,
                    Study.study_instance_uid,
                    Series.series_instance_uid,
                    Instance.sop_instance_uid,
                )
                .join(Instance, Delivery.instance_pk == Instance.id)
                .join(Series, Instance.series_pk == Series.id)
                .join(Study, Series.study_pk == Study.id)
                .where(Delivery.id.in_(ok))
            ).all()
        by_series: dict[tuple[str, str], dict[str, int]] = {}
        for key, study, series, sop in rows:
            by_series.setdefault((study, series), {})[sop] = key
        held: set[int] = set()
        unasked = ""
        for (study, series), keys in by_series.items():
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = study
            query.SeriesInstanceUID = series
            query.SOPInstanceUID = list(keys) if len(keys) > 1 else next(iter(keys))
            found, why = find_at_peer(
                self.config, peer, query, self.config.worker.completeness_timeout_s
            )
            if found is None:
                unasked = why
                break
            held.update(keys[str(ds.SOPInstanceUID)] for ds in found if ds.get("SOPInstanceUID")
                        in keys)  # fmt: skip
        result: list[sender.Outcome] = []
        confirmations: dict[int, str] = {}
        for o in outcomes:
            if not o.ok:
                result.append(o)
            elif unasked:
                confirmations[o.key] = f"unconfirmed: {unasked}"
                result.append(o)
            elif o.key in held:
                confirmations[o.key] = "confirmed by C-FIND"
                result.append(o)
            else:
                error = (
                    f"{peer.ae_title} answered 0x{o.status or 0:04X} but does not hold the "
                    "instance (C-FIND): sent again"
                )
                result.append(sender.Outcome(o.key, o.status, error))
        return result, confirmations

    def _record(
        self,
        destination: str,
        outcomes: Sequence[sender.Outcome],
        confirmations: dict[int, str] | None = None,
    ) -> None:
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
                    confirmation = (confirmations or {}).get(outcome.key, "")
                    delivery.confirmation = confirmation
                    if confirmation.startswith("confirmed"):
                        delivery.confirmed_at = now
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
