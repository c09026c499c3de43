"""C-STORE SCU: send stored instances to a peer over one association, recording each answer."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from pacs_node import statuses
from pacs_node.ae import build_scu
from pacs_node.config import Config, Peer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    key: int  # the caller's identifier for the item (a delivery id)
    status: int | None  # DIMSE status, None when no answer came
    error: str = ""
    permanent: bool = False  # retrying cannot help (the peer refused this object)

    @property
    def ok(self) -> bool:
        return self.status is not None and not statuses.is_failure(self.status)


def send(config: Config, peer: Peer, items: Sequence[tuple[int, Path]]) -> list[Outcome]:
    """C-STORE each (key, file) to *peer*; one outcome per item, never raises for a peer fault."""
    if not items:
        return []
    datasets = []
    outcomes: list[Outcome] = []
    for key, path in items:
        try:
            datasets.append((key, pydicom.dcmread(path)))
        except Exception as exc:
            outcomes.append(Outcome(key, None, f"cannot read {path.name}: {exc}", permanent=True))
    if not datasets:
        return outcomes
    ae = build_scu(config, [str(ds.SOPClassUID) for _, ds in datasets])
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    except Exception as exc:  # e.g. a bad host name
        reason = f"cannot connect to {peer.ae_title}@{peer.host}:{peer.port}: {exc}"
        return outcomes + [Outcome(k, None, reason) for k, _ in datasets]
    if not assoc.is_established:
        reason = (
            f"association with {peer.ae_title}@{peer.host}:{peer.port} "
            f"{'rejected' if assoc.is_rejected else 'aborted' if assoc.is_aborted else 'failed'}"
        )
        return outcomes + [Outcome(k, None, reason) for k, _ in datasets]
    try:
        for key, ds in datasets:
            if not assoc.is_established:
                outcomes.append(Outcome(key, None, "association ended before sending"))
                continue
            try:
                answer = assoc.send_c_store(ds)
            except Exception as exc:  # e.g. no accepted presentation context for the class
                outcomes.append(Outcome(key, None, f"{type(exc).__name__}: {exc}", permanent=True))
                continue
            code = int(answer.Status) if "Status" in answer else None
            if code is None:
                outcomes.append(Outcome(key, None, "no answer (timeout or abort)"))
            elif statuses.is_failure(code):
                comment = str(answer.get("ErrorComment", "")).strip()
                outcomes.append(Outcome(key, code, f"status 0x{code:04X} {comment}".strip()))
            else:
                outcomes.append(Outcome(key, code))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes
