"""After sending results the node checks they landed: Storage Commitment where the peer offers
it, else C-FIND at IMAGE level for what it sent.

Destinations, each over real associations: a real Orthanc, which commits what it holds by
Storage Commitment (its N-EVENT-REPORT comes to the node on an association of its own) and, with
commitment off, answers the C-FIND; dcmtk's storescp, which stores but offers neither (delivered,
"unconfirmed" with the reason, in ``pacs-node status``); and peers written here with pynetdicom
for what Orthanc will not do: answer Success to C-STORE and keep nothing (its C-FIND finds
nothing: sent again, failed in the end), report a failed commitment (sent again), or take a
commitment request and never answer it (checked by C-FIND after ``commitment_wait_s``).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace

import pydicom
import pytest
from pydicom.multival import MultiValue
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import select

from pacs_node.ae import STORAGE_COMMITMENT_PUSH
from pacs_node.config import DeliverySettings, Peer
from pacs_node.confirm import STORAGE_COMMITMENT_INSTANCE as COMMITMENT_INSTANCE
from pacs_node.sender import GENERATED_SOP_CLASSES
from pacs_node.status import render_status
from storage.models import Delivery, TaskState
from tests import scu
from tests.conftest import CR_CHEST, make_config
from tests.orthanc import (
    StoreScp,
    dcmtk_available,
    free_port,
    wait_for,
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
@pytest.mark.parametrize("commitment", [True, False], ids=["storage-commitment", "c-find"])
def test_orthanc_confirms_what_it_holds(start_node, tmp_path, orthanc_peer, commitment):
    orthanc, node_port = orthanc_peer
    peer = Peer("ORTHANC", "127.0.0.1", orthanc.dicom_port, storage_commitment=commitment)
    node = start_node(make_config(tmp_path, port=node_port, peers=(peer,)))
    assert scu.store(node.port, [CR_CHEST], calling="ORTHANC")[0].Status == 0
    node.run_pending()
    expected = "committed (storage commitment)" if commitment else "confirmed by C-FIND"
    # Orthanc's N-EVENT-REPORT comes on its own association, a moment after the request
    wait_for(
        lambda: all(d.confirmation == expected for d in _deliveries(node)),
        timeout_s=30,
        what=f"every delivery {expected}",
    )
    deliveries = _deliveries(node)
    assert len(deliveries) == 3  # SR, SC, Parametric Map
    for d in deliveries:
        assert d.state is TaskState.DONE, d.last_error
        assert d.confirmed_at is not None
        assert bool(d.transaction_uid) is commitment
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
        assert d.confirmation.startswith("unconfirmed: C-FIND association with STORESCP@"), (
            d.confirmation
        )
        assert d.confirmed_at is None
    report = render_status(node.db)
    assert "delivered: confirmed at the destination 0, unconfirmed 3" in report
    assert "3 to STORESCP unconfirmed: C-FIND association with STORESCP@" in report


class ForgetfulPeer:
    """A DICOM peer that answers Success to every C-STORE, keeps nothing, and answers C-FIND
    (with no match): what the node's confirmation exists to catch."""

    title = "FORGETFUL"

    def __init__(self) -> None:
        self.port = free_port()
        self.stores = 0
        self.finds = 0
        self._lock = threading.Lock()
        ae = AE(ae_title=self.title)
        for sop_class in GENERATED_SOP_CLASSES:
            ae.add_supported_context(sop_class)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae = ae

    def handlers(self) -> list:
        return [(evt.EVT_C_STORE, self._store), (evt.EVT_C_FIND, self._find)]

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
            ("127.0.0.1", self.port), block=False, evt_handlers=self.handlers()
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


class CommittingPeer(ForgetfulPeer):
    """A peer that keeps what it is sent, answers C-FIND from it, and takes Storage Commitment
    requests: *report* "fail" answers each with an N-EVENT-REPORT (event type 2, every instance
    failed) on an association it opens to the node, as Orthanc does for its successes; "never"
    does not answer at all."""

    title = "COMMITTER"

    def __init__(self, node_port_of: dict[str, int], report: str) -> None:
        super().__init__()
        self.node_port_of = node_port_of
        self.report = report
        self.held: dict[str, object] = {}
        self.requests: list[str] = []
        self.ae.add_supported_context(STORAGE_COMMITMENT_PUSH)

    def handlers(self) -> list:
        return [*super().handlers(), (evt.EVT_N_ACTION, self._action)]

    def _store(self, event) -> int:
        self.held[str(event.request.AffectedSOPInstanceUID)] = event.dataset
        return 0x0000

    def _find(self, event):
        wanted = event.identifier.SOPInstanceUID
        wanted = {str(u) for u in (wanted if isinstance(wanted, MultiValue) else [wanted])}
        for uid in sorted(wanted & set(self.held)):
            answer = pydicom.Dataset()
            answer.QueryRetrieveLevel = "IMAGE"
            answer.SOPInstanceUID = uid
            yield 0xFF00, answer
        yield 0x0000, None

    def _action(self, event):
        info = event.action_information
        self.requests.append(str(info.TransactionUID))
        if self.report == "fail":
            threading.Thread(target=self._report_failure, args=(info,), daemon=True).start()
        return 0x0000, None

    def _report_failure(self, info) -> None:
        report = pydicom.Dataset()
        report.TransactionUID = info.TransactionUID
        failed = []
        for ref in info.ReferencedSOPSequence:
            item = pydicom.Dataset()
            item.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
            item.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
            item.FailureReason = 0x0110
            failed.append(item)
        report.FailedSOPSequence = failed
        ae = AE(ae_title="COMMITTER")
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        assoc = ae.associate(
            "127.0.0.1",
            self.node_port_of["node"],
            ae_title="AINODE",
            ext_neg=[build_role(STORAGE_COMMITMENT_PUSH, scp_role=True)],
        )
        if assoc.is_established:
            assoc.send_n_event_report(report, 2, STORAGE_COMMITMENT_PUSH, COMMITMENT_INSTANCE)
            assoc.release()


def test_a_failed_commitment_report_sends_the_results_again(start_node, tmp_path):
    ports: dict[str, int] = {}
    with CommittingPeer(ports, report="fail") as peer:
        node = _node_sending_to(
            start_node,
            tmp_path,
            Peer("COMMITTER", "127.0.0.1", peer.port),
            max_attempts=2,
            backoff_initial_s=0.0,
        )
        ports["node"] = node.port
        for attempt in (1, 2):
            node.run_pending()
            wait_for(
                lambda: all(d.state != TaskState.DONE for d in _deliveries(node)),
                timeout_s=30,
                what=f"the failure report for attempt {attempt}",
            )
        assert len(peer.requests) == 2  # one commitment request per attempt
    for d in _deliveries(node):
        assert d.state is TaskState.FAILED and d.attempts == 2
        assert "COMMITTER did not commit the instance (failure reason 0x0110)" in d.last_error
        assert d.confirmation.startswith("commitment failed")


def test_an_unanswered_commitment_is_checked_by_c_find(start_node, tmp_path):
    ports: dict[str, int] = {}
    with CommittingPeer(ports, report="never") as peer:
        node = _node_sending_to(
            start_node,
            tmp_path,
            Peer("COMMITTER", "127.0.0.1", peer.port),
            commitment_wait_s=0.2,
        )
        node.run_pending()
        assert {d.confirmation for d in _deliveries(node)} == {"commitment requested"}
        assert node.sender.check_unanswered_commitments() == 0  # not yet overdue
        time.sleep(0.3)
        assert node.sender.check_unanswered_commitments() == 3
    for d in _deliveries(node):
        assert d.state is TaskState.DONE and d.confirmed_at is not None
        assert d.confirmation == ("confirmed by C-FIND (no Storage Commitment report within 0.2 s)")
