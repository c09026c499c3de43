"""Did the results land? Asked of the destination after it answered Success.

Two ways, the first the destination supports (``peers[].confirm_deliveries``, on by default):

1. **Storage Commitment** (PS3.4 Annex J, Push Model): the send role asks, by N-ACTION on an
   association of its own, that the peer take responsibility for the instances, under a new
   Transaction UID stored on their deliveries (``commitment requested``). The peer answers later
   with an N-EVENT-REPORT, usually on an association it opens to the node, which the receive
   role records (:func:`storage.queue.record_commitment`): committed, or failed and sent again.
   A transaction with no answer after ``delivery.commitment_wait_s`` is checked by C-FIND.
2. **C-FIND** (IMAGE level, the SOP Instance UIDs sent): what the peer holds is confirmed; what
   it accepted and does not hold is a failed attempt, sent again; a peer that cannot be asked
   leaves the delivery done and "unconfirmed", with the reason (``pacs-node status``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from pacs_node.ae import STORAGE_COMMITMENT_PUSH
from pacs_node.config import Config, Peer
from pacs_node.query_scu import find_at_peer, open_association
from storage.db import Database
from storage.models import Delivery, Instance, Series, Study

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP Instance
REQUESTED = "commitment requested"
COMMITTED = "committed (storage commitment)"
FOUND = "confirmed by C-FIND"


@dataclass(frozen=True)
class Sent:
    """A delivery the destination accepted, with the UIDs that name what it holds."""

    key: int
    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str


def sent_items(db: Database, keys: Sequence[int]) -> list[Sent]:
    with db.read() as session:
        rows = session.execute(
            select(
                Delivery.id,
                Study.study_instance_uid,
                Series.series_instance_uid,
                Instance.sop_class_uid,
                Instance.sop_instance_uid,
            )
            .join(Instance, Delivery.instance_pk == Instance.id)
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .where(Delivery.id.in_(keys))
        ).all()
    return [Sent(*row) for row in rows]


def request_commitment(config: Config, db: Database, peer: Peer, items: Sequence[Sent]) -> str:
    """Ask *peer* to commit *items* (N-ACTION, action type 1). The transaction is written on
    the deliveries first (the answer may come before this returns). "" when the peer took the
    request; else why not (then the caller checks by C-FIND)."""
    transaction = generate_uid()
    with db.session() as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_([i.key for i in items]))
            .values(transaction_uid=transaction)
            .execution_options(synchronize_session=False)
        )
    assoc, where = open_association(
        config, peer, [STORAGE_COMMITMENT_PUSH], config.worker.completeness_timeout_s
    )
    if assoc is None:
        return f"Storage Commitment {where}"
    try:
        if not any(c.abstract_syntax == STORAGE_COMMITMENT_PUSH for c in assoc.accepted_contexts):
            return f"{where} does not offer Storage Commitment"
        action = Dataset()
        action.TransactionUID = transaction
        refs = []
        for item in items:
            ref = Dataset()
            ref.ReferencedSOPClassUID = item.sop_class_uid
            ref.ReferencedSOPInstanceUID = item.sop_instance_uid
            refs.append(ref)
        action.ReferencedSOPSequence = refs
        status, _ = assoc.send_n_action(
            action, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
        )
        code = int(status.Status) if status is not None and "Status" in status else None
        if code != 0x0000:
            return f"{where} answered the N-ACTION with " + (
                f"0x{code:04X}" if code is not None else "nothing"
            )
    except Exception as exc:
        return f"Storage Commitment with {where} failed: {type(exc).__name__}: {exc}"
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("storage commitment %s asked of %s for %d instances", transaction, where, len(items))
    return ""


def held_by_peer(config: Config, peer: Peer, items: Sequence[Sent]) -> tuple[set[int] | None, str]:
    """The keys of *items* that *peer* holds, by C-FIND; None and why when it cannot be asked."""
    by_series: dict[tuple[str, str], dict[str, int]] = {}
    for item in items:
        by_series.setdefault((item.study_uid, item.series_uid), {})[item.sop_instance_uid] = (
            item.key
        )
    held: set[int] = set()
    for (study, series), keys in by_series.items():
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study
        query.SeriesInstanceUID = series
        query.SOPInstanceUID = list(keys) if len(keys) > 1 else next(iter(keys))
        found, why = find_at_peer(config, peer, query, config.worker.completeness_timeout_s)
        if found is None:
            return None, why
        for ds in found:
            uid = str(ds.get("SOPInstanceUID", ""))
            if uid in keys:
                held.add(keys[uid])
    return held, ""


def not_held_error(peer: Peer, status: int | None) -> str:
    return (
        f"{peer.ae_title} answered 0x{status or 0:04X} but does not hold the instance "
        "(C-FIND): sent again"
    )
