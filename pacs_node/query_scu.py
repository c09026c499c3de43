"""C-FIND SCU: the node asks a peer what it holds (Study Root), with a bounded wait.

Used before analysing a series (how many instances has its sender? :mod:`pacs_node.completeness`)
and after sending results (does the peer hold them now? :mod:`pacs_node.send`).
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from pacs_node import statuses
from pacs_node.ae import build_scu
from pacs_node.config import Config, Peer


def open_association(
    config: Config, peer: Peer, sop_classes: list[str], timeout_s: float
) -> tuple[Any, str]:
    """An association with *peer* for *sop_classes* whose every wait is bounded by
    *timeout_s*: (association, where) or (None, why not)."""
    ae = build_scu(config, sop_classes)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = min(
        timeout_s, config.node.dimse_timeout_s
    )
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    except Exception as exc:  # e.g. a bad host name
        return None, f"cannot connect to {where}: {type(exc).__name__}"
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        return None, f"association with {where} {how}"
    return assoc, where


def find_at_peer(
    config: Config, peer: Peer, query: Dataset, timeout_s: float
) -> tuple[list[Dataset] | None, str]:
    """The identifiers *peer* answers to *query*, or None and why it could not be asked (no
    connection, association refused, a failure status, no answer within *timeout_s*)."""
    assoc, where = open_association(
        config, peer, [str(StudyRootQueryRetrieveInformationModelFind)], timeout_s
    )
    if assoc is None:
        return None, f"C-FIND {where}"
    found: list[Dataset] = []
    failure = ""
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = int(status.Status) if "Status" in status else None
            if code is None:
                failure = "no C-FIND answer (timeout or abort)"
                break
            if statuses.is_failure(code):
                failure = f"C-FIND status 0x{code:04X}"
                break
            if identifier is not None and code in (0xFF00, 0xFF01):
                found.append(identifier)
    except Exception as exc:
        failure = f"C-FIND failed: {type(exc).__name__}: {exc}"
    finally:
        if assoc.is_established:
            assoc.release()
    if failure:
        return None, f"{where}: {failure}"
    return found, where
