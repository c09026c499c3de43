"""Is a series all here? Asked of the peer that sent it, rather than guessed from a timer.

A CT series arrives slice by slice, and a PACS may send it in parts (two C-MOVEs, a send
interrupted and resumed). Before the work role analyses a multi-image series it asks the
sender by C-FIND (Study Root, SERIES level) how many instances it holds for the series
(NumberOfSeriesRelatedInstances, PS3.4 C.3.4) and waits until the node has them all, for at
most ``worker.completeness_wait_s`` without a new instance. A peer with ``ask_completeness =
false``, one that cannot be asked (no host, refused, no answer) or that does not return the
count falls back to the quiet period (``worker.ct_quiet_period_s`` after the last instance).
Instances that arrive after all this still come in: their series is analysed again, and the
new SR supersedes the earlier one (:mod:`pacs_node.work`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from pydicom.dataset import Dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from pacs_node import statuses
from pacs_node.ae import build_scu
from pacs_node.config import Config, Peer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """Whether to analyse now; if not, ask again in *wait_s*. *warning*: analysed although
    the peer holds more (it goes on the job and into the log)."""

    ready: bool
    wait_s: float = 0.0
    note: str = ""  # how it was decided, for the log
    warning: str = ""


Counter = Callable[[Config, Peer, str, str], "tuple[int | None, str]"]


def peer_instance_count(
    config: Config, peer: Peer, study_uid: str, series_uid: str
) -> tuple[int | None, str]:
    """The number of instances *peer* holds for the series, or None and why it cannot tell."""
    timeout = config.worker.completeness_timeout_s
    ae = build_scu(config, [str(StudyRootQueryRetrieveInformationModelFind)])
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = min(
        timeout, config.node.dimse_timeout_s
    )
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.NumberOfSeriesRelatedInstances = None
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    except Exception as exc:  # e.g. a bad host name
        return None, f"cannot connect to {where}: {type(exc).__name__}"
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        return None, f"C-FIND association with {where} {how}"
    counts: list[int] = []
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
                value = identifier.get("NumberOfSeriesRelatedInstances")
                if value not in (None, ""):
                    counts.append(int(value))
    except Exception as exc:
        failure = f"C-FIND failed: {type(exc).__name__}: {exc}"
    finally:
        if assoc.is_established:
            assoc.release()
    if failure:
        return None, f"{where}: {failure}"
    if not counts:
        return None, f"{where} does not hold the series or gave no NumberOfSeriesRelatedInstances"
    return max(counts), f"{where} holds {max(counts)}"


def judge(
    config: Config,
    peer: Peer | None,
    *,
    held: int,
    study_uid: str,
    series_uid: str,
    last_received_at: datetime,
    now: datetime,
    count: Counter = peer_instance_count,
) -> Verdict:
    """Analyse the series now, or wait for more of it?"""
    settings = config.worker
    silent_s = max(0.0, (now - last_received_at).total_seconds())

    def quiet_period(why: str) -> Verdict:
        left = settings.ct_quiet_period_s - silent_s
        if left > 0:
            return Verdict(False, left, f"{why}; quiet period")
        return Verdict(True, note=f"{why}; no new instance for {silent_s:.1f} s")

    if peer is None or not peer.ask_completeness or not peer.host:
        return quiet_period("sender not asked")
    expected, why = count(config, peer, study_uid, series_uid)
    if expected is None:
        log.info("series %s: completeness unknown (%s)", series_uid, why)
        return quiet_period(why)
    if held >= expected:
        return Verdict(True, note=f"complete: {held} here, {why}")
    if silent_s >= settings.completeness_wait_s:
        return Verdict(
            True,
            note=why,
            warning=(
                f"incomplete: analysed {held} of the {expected} instances that "
                f"{peer.ae_title} holds; none arrived for {silent_s:.0f} s"
            ),
        )
    wait = min(settings.completeness_settle_s, settings.completeness_wait_s - silent_s)
    return Verdict(False, max(wait, 0.05), f"{held} of {expected} here ({why})")
