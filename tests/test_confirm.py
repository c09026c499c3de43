"""After sending results the node checks they landed (C-FIND at IMAGE level for what it sent).

Three destinations, each over real associations: a real Orthanc, which holds what it accepted
(confirmed); dcmtk's storescp, which accepts and stores but answers no C-FIND (delivered,
"unconfirmed" with the reason, in ``pacs-node status``); and a peer that answers Success to
C-STORE and keeps nothing (a pynetdicom SCP written here: its C-FIND finds nothing), whose
deliveries are failed attempts, sent again, and failed in the end.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace

import pytest
from pydicom.multival import MultiValue
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import select

from pacs_node.config import DeliverySettings, Peer
from pacs_node.sender import GENERATED_SOP_CLASSES
from pacs_node.status import render_status
from storage.models import Delivery, TaskState
from tests import scu
from tests.conftest import CR_CHEST, make_config
from tests.orthanc import (
    OrthancServer,
    StoreScp,
    dcmtk_available,
    free_port,
    orthanc_available,
)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _deliveries(node) -> list[Delivery]:
    with node.db.read() as session:
        rows = session.scalars(select(Delivery).order_by(Delivery.id)).all()
        session.expunge_all()
    return list(rows)


def _node_sending_to(start_node, tmp_path, peer: Peer, **delivery):
    config = make_config(tmp_path, peers=(peer,))
    if delivery:
        config = replace(config, delivery=DeliverySettings(**delivery))
    node = start_node(config)
    assert scu.store(node.port, [CR_CHEST], calling=peer.ae_title)[0].Status == 0
    return node


@pytest.mark.orthanc
def test_orthanc_confirms_what_it_holds(start_node, tmp_path):
    if not orthanc_available():
        if IN_CI:
            pytest.fail("Orthanc must be installed in CI")
        pytest.skip("needs Orthanc")
    node_port = free_port()
    with OrthancServer(
        tmp_path / "orthanc", modalities={"AINODE": ("AINODE", "127.0.0.1", node_port)}
    ) as orthanc:
        peer = Peer("ORTHANC", "127.0.0.1", orthanc.dicom_port)
        config = make_config(tmp_path, port=node_port, peers=(peer,))
        node = start_node(config)
        assert scu.store(node.port, [CR_CHEST], calling="ORTHANC")[0].Status == 0
        node.run_pending()
        deliveries = _deliveries(node)
        assert len(deliveries) == 3  # SR, SC, Parametric Map
        for d in deliveries:
            assert d.state is TaskState.DONE, d.last_error
            assert d.confirmation == "confirmed by C-FIND" and d.confirmed_at is not None
        assert "delivered: confirmed at the destination 3, unconfirmed 0" in render_status(node.db)


@pytest.mark.dcmtk
def test_a_storescp_that_cannot_be_asked_leaves_the_delivery_unconfirmed(start_node, tmp_path):
    if not dcmtk_available("storescp"):
        pytest.skip("dcmtk not installed")
    with StoreScp(tmp_path / "received") as scp:
        node = _node_sending_to(start_node, tmp_path, Peer("STORESCP", "127.0.0.1", scp.port))
        node.run_pending()
        assert len(scp.received()) == 3
    deliveries = _deliveries(node)
    for d in deliveries:
        assert d.state is TaskState.DONE
        assert d.confirmation.startswith("unconfirmed: C-FIND association with STORESCP@")
        assert d.confirmed_at is None
    report = render_status(node.db)
    assert "delivered: confirmed at the destination 0, unconfirmed 3" in report
    assert "3 to STORESCP unconfirmed: C-FIND association with STORESCP@" in report


class ForgetfulPeer:
    """A DICOM peer that answers Success to every C-STORE, keeps nothing, and answers C-FIND
    (with no match): what the node's confirmation exists to catch."""

    def __init__(self) -> None:
        self.port = free_port()
        self.stores = 0
        self.finds = 0
        self._lock = threading.Lock()
        ae = AE(ae_title="FORGETFUL")
        for sop_class in GENERATED_SOP_CLASSES:
            ae.add_supported_context(sop_class)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae = ae

    def _store(self, event) -> int:
        with self._lock:
            self.stores += 1
        return 0x0000

    def _find(self, event):
        with self._lock:
            self.finds += 1
        yield 0x0000, None  # no match: it holds nothing

    def __enter__(self) -> ForgetfulPeer:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_C_FIND, self._find)],
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def test_a_peer_that_keeps_nothing_gets_the_results_again_then_they_fail(start_node, tmp_path):
    with ForgetfulPeer() as peer:
        node = _node_sending_to(
            start_node,
            tmp_path,
            Peer("FORGETFUL", "127.0.0.1", peer.port),
            max_attempts=2,
            backoff_initial_s=0.0,
        )
        node.run_pending()
        assert peer.stores == 3 * 2 and peer.finds >= 2  # every result sent twice, then given up
    for d in _deliveries(node):
        assert d.state is TaskState.FAILED and d.attempts == 2
        assert "answered 0x0000 but does not hold the instance (C-FIND)" in d.last_error
        assert d.last_status == 0x0000
    assert "FORGETFUL answered 0x0000 but does not hold" in render_status(node.db)


def test_confirmation_can_be_turned_off_per_peer(start_node, tmp_path):
    with ForgetfulPeer() as peer:
        node = _node_sending_to(
            start_node,
            tmp_path,
            Peer("FORGETFUL", "127.0.0.1", peer.port, confirm_deliveries=False),
        )
        node.run_pending()
        assert peer.stores == 3 and peer.finds == 0
    assert all(d.state is TaskState.DONE and d.confirmation == "" for d in _deliveries(node))


def test_the_confirming_query_names_the_instances_sent(start_node, tmp_path):
    """The IMAGE-level query carries the study, the series and the SOP Instance UIDs sent."""
    queries = []

    class Recording(ForgetfulPeer):
        def _find(self, event):
            queries.append(event.identifier)
            yield from super()._find(event)

    with Recording() as peer:
        node = _node_sending_to(
            start_node,
            tmp_path,
            Peer("FORGETFUL", "127.0.0.1", peer.port),
            max_attempts=1,
        )
        node.run_pending()
    with node.db.read() as session:
        sent = {d.instance.sop_instance_uid for d in session.scalars(select(Delivery)).all()}
    asked = set()
    for q in queries:
        assert q.QueryRetrieveLevel == "IMAGE"
        value = q.SOPInstanceUID
        asked |= {str(v) for v in (value if isinstance(value, MultiValue) else [value])}
    assert asked == sent
