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
from dataclasses import dataclass
from datetime import datetime

from pydicom.dataset import Dataset

from pacs_node.config import Config, Peer
from pacs_node.query_scu import find_at_peer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """Whether to analyse now; if not, ask again in *wait_s*. *warning*: analysed although
    the peer holds more (it goes on the job and into the log)."""

    ready: bool
    wait_s: float = 0.0
    note: str = ""  # how it was decided, for the log
    warning: str = ""


def peer_instance_count(
    config: Config, peer: Peer, study_uid: str, series_uid: str
) -> tuple[int | None, str]:
    """The number of instances *peer* holds for the series, or None and why it cannot tell."""
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.NumberOfSeriesRelatedInstances = None
    found, where = find_at_peer(config, peer, query, config.worker.completeness_timeout_s)
    if found is None:
        return None, where
    counts = [
        int(ds.NumberOfSeriesRelatedInstances)
        for ds in found
        if ds.get("NumberOfSeriesRelatedInstances") not in (None, "")
    ]
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
    expected, why = peer_instance_count(config, peer, study_uid, series_uid)
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
