"""A small pynetdicom SCU for tests: store files, query, echo against a node on loopback; and
a pynetdicom storage SCP to stand for a destination that behaves in a way of the test's."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

PATIENT_ROOT = PatientRootQueryRetrieveInformationModelFind
STUDY_ROOT = StudyRootQueryRetrieveInformationModelFind


def _ae(title: str) -> AE:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def store(
    port: int,
    items: Sequence[Path | Dataset],
    *,
    calling: str = "TESTSCU",
    called: str = "AINODE",
    raw: bool = False,
) -> list[Dataset]:
    """C-STORE each file or dataset in its own transfer syntax; the status datasets, in order.

    With *raw*, files are sent as their bytes (pynetdicom takes the SOP Class and Instance
    UIDs of the command from the file meta), so broken files reach the node as they are.
    """
    payload: list[Path | Dataset]
    if raw:
        metas = [pydicom.dcmread(i, stop_before_pixels=True, force=True).file_meta for i in items]
        keys = [(m.MediaStorageSOPClassUID, m.TransferSyntaxUID) for m in metas]
        payload = list(items)
    else:
        datasets = [pydicom.dcmread(i) if isinstance(i, Path) else i for i in items]
        keys = [(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets]
        payload = list(datasets)
    ae = _ae(calling)
    for sop_class, ts in keys:
        if not any(
            c.abstract_syntax == sop_class and ts in c.transfer_syntax
            for c in ae.requested_contexts
        ):
            ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association refused"
    chunked = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = raw  # raw: the file's bytes, not a re-encoding
    try:
        return [assoc.send_c_store(item) for item in payload]
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


def find(
    port: int,
    identifier: Dataset,
    *,
    calling: str = "TESTSCU",
    called: str = "AINODE",
    model: str = STUDY_ROOT,
) -> tuple[list[Dataset], Dataset]:
    """C-FIND (Study Root unless *model* says otherwise); the matches and the final status."""
    ae = _ae(calling)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association refused"
    matches, final = [], Dataset()
    try:
        for status, ident in assoc.send_c_find(identifier, model):
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


def echo(port: int, *, calling: str = "TESTSCU", called: str = "AINODE") -> int | None:
    """C-ECHO: the status, or None when no association or no answer."""
    ae = _ae(calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def query(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@contextlib.contextmanager
def storage_scp(title: str, on_store: Callable[..., int]) -> Iterator[int]:
    """A pynetdicom SCP of every storage class on a free loopback port, whose C-STORE handler
    is *on_store* (it gets pynetdicom's event and returns the status); yields the port."""
    from pynetdicom import AllStoragePresentationContexts, evt

    ae = AE(ae_title=title)
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
