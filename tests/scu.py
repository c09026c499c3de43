"""A small pynetdicom SCU for tests: store files, query, echo against a node on loopback."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)


def _ae(title: str) -> AE:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def store(
    port: int, items: Sequence[Path | Dataset], *, calling: str = "TESTSCU", called: str = "AINODE"
) -> list[Dataset]:
    """C-STORE each file or dataset in its own transfer syntax; the status datasets, in order."""
    datasets = [pydicom.dcmread(i) if isinstance(i, Path) else i for i in items]
    ae = _ae(calling)
    for ds in datasets:
        ts = ds.file_meta.TransferSyntaxUID
        if not any(
            c.abstract_syntax == ds.SOPClassUID and ts in c.transfer_syntax
            for c in ae.requested_contexts
        ):
            ae.add_requested_context(ds.SOPClassUID, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association refused"
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def find(
    port: int, identifier: Dataset, *, calling: str = "TESTSCU", called: str = "AINODE"
) -> tuple[list[Dataset], Dataset]:
    """C-FIND (Study Root); the matches and the final status."""
    ae = _ae(calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association refused"
    matches, final = [], Dataset()
    try:
        for status, ident in assoc.send_c_find(
            identifier, StudyRootQueryRetrieveInformationModelFind
        ):
            if status.Status in (0xFF00, 0xFF01):
                matches.append(ident)
            else:
                final = status
    finally:
        assoc.release()
    return matches, final


def association_accepted(port: int, *, calling: str, called: str = "AINODE") -> bool:
    ae = _ae(calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    accepted = assoc.is_established
    if accepted:
        assoc.release()
    return accepted


def query(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds
