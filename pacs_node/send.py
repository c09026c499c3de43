"""The send role: deliver generated instances to the peers they are owed to.

``pacs-node send`` runs :func:`run`. Due deliveries are claimed in batches, one destination at a
time; the association to a destination stays open while more deliveries for it are due, so a
burst of results streams over one association instead of one association per poll. Each
outcome is recorded (``done``, a retry after backoff, or ``failed``) as soon as its C-STORE is
answered, before the next is sent: a send role killed mid-batch sends again only the one that
was in flight (the peer keeps one copy of a SOP Instance UID). With
``peers[].confirm_deliveries`` (on by default) a batch the peer answered with Success is
confirmed (:mod:`pacs_node.confirm`): by Storage Commitment where the peer offers
it, else by a C-FIND (IMAGE level) for the instances sent. One the peer does not hold is a
failed attempt, sent again after the backoff; when the peer cannot be asked the delivery is done
and marked "unconfirmed" with the reason, for ``pacs-node status``. A peer that could not be
asked is not asked again for :data:`ASK_AGAIN_S` (a burst would otherwise open two refused
associations after every batch).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select, update

from pacs_node import audit, confirm, sender, wake
from pacs_node.audit import AuditTrail
from pacs_node.config import Config, Peer
from pacs_node.logs import log_failure
from pacs_node.process import Stop, file_store, owner_id, run_loop
from storage import query, tasks
from storage.db import Database
from storage.files import FileStore
from storage.models import Delivery, Instance, TaskState, utcnow

log = logging.getLogger(__name__)

BATCH = 32  # deliveries claimed at a time (each recorded as it is answered)
ASK_AGAIN_S = 60.0  # after a peer could not confirm deliveries (neither way)
LINGER_S = 0.5  # an association with nothing more to send waits this long for more


class Sender:
    """Claims due deliveries and sends them, one association per destination."""

    def __init__(
        self,
        config: Config,
        db: Database,
        files: FileStore,
        *,
        owner: str | None = None,
        trail: AuditTrail | None = None,
        nudged: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.files = files
        self.owner = owner or owner_id()
        self.trail = trail or AuditTrail(config, "send")
        self.nudged = nudged  # set when results are owed (pacs_node.wake): worth lingering for
        # peer -> (monotonic time until which it is not asked to confirm, why not)
        self._unconfirmable: dict[str, tuple[float, str]] = {}

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
            # with nothing due, the association is kept for up to LINGER_S while a work role
            # may still owe more (it nudges): a burst of results goes over one association
            # instead of one per finished job
            deadline = time.monotonic() + (LINGER_S if self.nudged is not None else 0.0)
            while True:
                batch = [(k, p) for k, _, p in self._claim(destination)]
                left = deadline - time.monotonic()
                if batch or left <= 0 or self.nudged is None:
                    return batch
                self.nudged.wait(left)
                self.nudged.clear()

        tried = 0
        delivered: list[int] = []
        refused: dict[int, str] = {}
        for outcomes in sender.stream(self.config, peer, items, more):
            self._record(destination, outcomes)
            tried += len(outcomes)
            delivered += [o.key for o in outcomes if o.ok]
            refused.update((o.key, o.error) for o in outcomes if not o.ok)
        sent = len(delivered)
        log.info("sent %d of %d results to %s", sent, tried, destination)
        self._audit(peer, delivered, refused)
        if peer.confirm_deliveries and delivered:
            # after the store association is released: a peer that serves one association
            # at a time (dcmtk's storescp) could not answer while it was open
            self._confirm(peer, delivered)
        return tried

    def _audit(self, peer: Peer, delivered: Sequence[int], refused: dict[int, str]) -> None:
        """Results exported: DICOM Instances Transferred (read) per study, from the node to
        *peer*; a study with an instance that did not go counts as a minor failure."""
        if not self.trail.enabled or not (delivered or refused):
            return
        try:
            with self.db.read() as session:
                keys = [*delivered, *refused]
                uids = dict(
                    session.execute(
                        select(Delivery.id, Instance.sop_instance_uid)
                        .join(Instance, Instance.id == Delivery.instance_pk)
                        .where(Delivery.id.in_(keys))
                    ).all()
                )
                subjects = {
                    s.sop_instance_uid: s for s in query.subjects(session, list(uids.values()))
                }
        except Exception:
            log_failure(log, "results sent to %s not audited", peer.ae_title)
            return
        studies: dict[str, audit.StudyRecord] = {}
        for key, uid in uids.items():
            subject = subjects.get(uid)
            if subject is None:
                continue
            record = studies.get(subject.study_instance_uid)
            if record is None:
                record = studies[subject.study_instance_uid] = audit.StudyRecord.of(subject)
            if key in refused:
                record.refuse(refused[key])
            else:
                record.tally(subject.sop_class_uid)
        self.trail.transferred(
            studies.values(),
            action=audit.READ,
            source=self.trail.node(requestor=True, role=audit.SOURCE),
            destination=audit.Participant(
                peer.ae_title, False, audit.DESTINATION, address=peer.host
            ),
        )

    def _confirm(self, peer: Peer, keys: Sequence[int]) -> None:
        """Ask *peer* to confirm the deliveries it accepted (:mod:`pacs_node.confirm`): by
        Storage Commitment where it offers it (the answer comes later, to the receive role),
        else by C-FIND; what it does not hold is sent again (done -> queued)."""
        until, why = self._unconfirmable.get(peer.ae_title, (0.0, ""))
        if time.monotonic() < until:
            self._confirmed(keys, f"unconfirmed: {why}", utcnow(), stamp=False)
            return
        items = confirm.sent_items(self.db, keys)
        why_not = (
            confirm.request_commitment(self.config, self.db, peer, items)
            if peer.storage_commitment
            else "storage commitment off for this peer"
        )
        now = utcnow()
        if not why_not:
            self._confirmed(keys, confirm.REQUESTED, now, stamp=False)
            return
        held, unasked = confirm.held_by_peer(self.config, peer, items)
        if held is None:
            self._unconfirmable[peer.ae_title] = (
                time.monotonic() + ASK_AGAIN_S,
                f"{unasked} (asked again after {ASK_AGAIN_S:.0f} s)",
            )
            log.info("%s cannot confirm deliveries (%s; %s)", peer.ae_title, why_not, unasked)
            self._confirmed(keys, f"unconfirmed: {unasked}", now, stamp=False)
            return
        self._confirmed(sorted(held), confirm.FOUND, now, stamp=True)
        self._not_held(peer, [k for k in keys if k not in held], "", now)

    def _confirmed(self, keys: Sequence[int], text: str, now: datetime, *, stamp: bool) -> None:
        """Write *text* on the deliveries that no commitment report has answered yet."""
        with self.db.session() as session:
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_(keys), Delivery.confirmed_at.is_(None))
                .where(Delivery.confirmation.in_(["", confirm.REQUESTED]))
                .values(confirmation=text, confirmed_at=now if stamp else None)
                .execution_options(synchronize_session=False)
            )

    def _not_held(self, peer: Peer, keys: Sequence[int], why: str, now: datetime) -> None:
        """Deliveries *peer* accepted and does not hold: failed attempts, sent again."""
        if not keys:
            return
        with self.db.session() as session:
            for delivery in session.scalars(select(Delivery).where(Delivery.id.in_(keys))):
                if delivery.state != TaskState.DONE:
                    continue
                error = confirm.not_held_error(peer, delivery.last_status)
                delivery.confirmation = ""
                state = tasks.fail(session, delivery, f"{why}{error}", now=now)
                log.warning("delivery %d to %s: %s (%s)", delivery.id, peer.ae_title, error, state)

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
        self.check_unanswered_commitments()
        return len(taken)

    def check_unanswered_commitments(self) -> int:
        """Deliveries whose Storage Commitment request got no answer within
        ``delivery.commitment_wait_s``: checked by C-FIND instead. Returns how many."""
        wait_s = self.config.delivery.commitment_wait_s
        now = utcnow()
        with self.db.read() as session:
            rows = session.execute(
                select(Delivery.id, Delivery.destination_ae).where(
                    Delivery.state == TaskState.DONE,
                    Delivery.confirmation == confirm.REQUESTED,
                    Delivery.finished_at < now - timedelta(seconds=wait_s),
                )
            ).all()
        by_peer: dict[str, list[int]] = {}
        for key, destination in rows:
            by_peer.setdefault(destination, []).append(key)
        late = f"no Storage Commitment report within {wait_s:g} s"
        for destination, keys in by_peer.items():
            peer = self.config.peer(destination)
            if peer is None:
                self._confirmed(keys, f"unconfirmed: {late}; no longer a peer", now, stamp=False)
                continue
            held, why = confirm.held_by_peer(self.config, peer, confirm.sent_items(self.db, keys))
            if held is None:
                self._confirmed(keys, f"unconfirmed: {late}; C-FIND: {why}", now, stamp=False)
                continue
            self._confirmed(sorted(held), f"{confirm.FOUND} ({late})", now, stamp=True)
            self._not_held(peer, [k for k in keys if k not in held], f"{late}; ", now)
            log.info("%d deliveries to %s: no commitment report, checked", len(keys), destination)
        return len(rows)

    def run_pending(self) -> int:
        return self.deliver_due()


def run(config: Config, stop: Stop) -> None:
    """``pacs-node send``: deliver what is due until stopped."""
    db = Database(config.node.resolved_database_url)
    owner = owner_id()
    files = file_store(config)
    nudged = threading.Event()
    listener = wake.listen(files.root, wake.SEND, nudged)  # the work roles nudge it
    role = Sender(config, db, files, owner=owner, nudged=nudged if listener else None)
    log.info("send role %s ready", owner)
    try:
        with role.trail.running():
            run_loop(
                role.deliver_due,
                config.worker.poll_interval_s,
                stop,
                sweep=role.sweep,
                sweep_every_s=max(1.0, config.worker.lease_s / 4),
                wake=nudged,
            )
    finally:
        if listener is not None:
            listener.close()
        db.dispose()
