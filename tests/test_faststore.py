"""The C-STORE requests the send role writes itself (pacs_node/faststore.py, issue 9) are byte
for byte the PDUs pynetdicom sends for the same file, fragmented or not; the node's real
results reach a dcmtk storescp whole over it, with a small maximum PDU; and where it does not
apply (a transfer syntax to convert to) pynetdicom sends."""

from __future__ import annotations

import pydicom
import pytest
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu import P_DATA_TF
from sqlalchemy import select

from pacs_node import faststore, sender
from pacs_node.ae import build_scu
from pacs_node.config import Peer
from storage.models import Instance, Series
from tests import scu
from tests.conftest import CR_CHEST, CT_SERIES, DICOM
from tests.orthanc import StoreScp, dcmtk_available

FILES = [CR_CHEST, CT_SERIES[0], sorted((DICOM / "sr").glob("*.dcm"))[0]]


def _pynetdicom_pdus(path, context_id: int, message_id: int, max_pdu: int) -> bytes:
    """What pynetdicom's send_c_store of a file path puts on the wire (chunked data set)."""
    meta, offset = split_dataset(path)
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.Priority = 2
    primitive.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
    primitive.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
    primitive._dataset_path = (path, offset)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    out = b""
    for pdata in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(pdata)
        out += pdu.encode()
    return out


@pytest.mark.parametrize("max_pdu", [0, 4096, 16384, 65542])
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name[:30])
def test_the_pdus_are_the_ones_pynetdicom_sends(path, max_pdu):
    meta, _ = split_dataset(path)
    ours = faststore.request_pdus(
        path,
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        5,
        321,
        max_pdu,
    )
    assert ours == _pynetdicom_pdus(path, 5, 321, max_pdu)


@pytest.fixture
def results(start_node):
    """The node's own results of the shared CR (SR, secondary capture, Parametric Map)."""
    node = start_node()
    assert scu.store(node.port, [CR_CHEST])[0].Status == 0
    assert node.worker.run_pending() == 1
    with node.db.read() as session:
        paths = session.scalars(
            select(Instance.path).join(Series).where(Series.generated.is_(True))
        ).all()
    assert len(paths) == 3
    return node, [node.files.abspath(p) for p in paths]


def test_the_node_s_results_arrive_whole_in_small_pdus(results, tmp_path):
    if not dcmtk_available("storescp"):
        pytest.skip("dcmtk not installed")
    node, paths = results
    with StoreScp(tmp_path / "received", None, "--max-pdu", "4096") as scp:
        peer = Peer("STORESCP", "127.0.0.1", scp.port)
        outcomes = sender.send(node.config, peer, list(enumerate(paths)))
        assert [o.ok for o in outcomes] == [True, True, True], outcomes
        received = {
            str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in scp.received()
        }
    assert len(received) == 3
    for path in paths:
        sent = pydicom.dcmread(path)
        got = received[str(sent.SOPInstanceUID)]
        assert got == sent  # every element of the data set, pixel data included


def test_it_sends_on_an_association_and_leaves_a_conversion_to_pynetdicom(results, tmp_path):
    if not dcmtk_available("storescp"):
        pytest.skip("dcmtk not installed")
    node, paths = results
    meta = pydicom.filereader.read_file_meta_info(paths[1])
    with StoreScp(tmp_path / "received") as scp:
        ae = build_scu(node.config, [str(meta.MediaStorageSOPClassUID)])
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="STORESCP")
        assert assoc.is_established
        try:
            sop_class = str(meta.MediaStorageSOPClassUID)
            context_id = faststore.unconverted_context(
                assoc, sop_class, str(meta.TransferSyntaxUID)
            )
            assert context_id is not None
            status = faststore.store(
                assoc, paths[1], sop_class, str(meta.MediaStorageSOPInstanceUID), context_id, 1
            )
            assert status is not None and status.Status == 0x0000
            # a transfer syntax the association did not accept for the class: not this path
            assert faststore.unconverted_context(assoc, sop_class, "1.2.840.10008.1.2.4.50") is None
        finally:
            assoc.release()
    assert len(scp.received()) == 1


def test_a_peer_that_aborts_during_the_c_store_gets_it_again_later(results):
    """A peer that aborts the association on receiving a C-STORE: the delivery is a failed
    attempt without an answer (sent again after the backoff), not a permanent failure; the
    next item of the batch is not sent on the dead association."""
    node, paths = results
    seen: list[str] = []

    def abort(event) -> int:
        seen.append(str(event.request.AffectedSOPInstanceUID))
        event.assoc.abort()
        return 0x0000

    with scu.storage_scp("ABORTS", abort) as port:
        outcomes = sender.send(
            node.config, Peer("ABORTS", "127.0.0.1", port), list(enumerate(paths))
        )
    assert len(seen) == 1 and len(outcomes) == 3
    assert not any(o.ok for o in outcomes) and not any(o.permanent for o in outcomes), outcomes
    assert outcomes[0].status is None
