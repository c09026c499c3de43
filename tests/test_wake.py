"""Wake-ups between the roles of one machine (pacs_node.wake)."""

from __future__ import annotations

import copy
import threading
import time

import pydicom
import pytest
from pydicom.uid import generate_uid

from pacs_node import wake
from tests import scu
from tests.conftest import CR_CHEST
from tests.orthanc import StoreScp, free_port, wait_for
from tests.processes import NodeProcess


def test_a_nudge_reaches_every_listener_of_the_role_and_only_those(tmp_path):
    work, send = threading.Event(), threading.Event()
    listener = wake.Listener(tmp_path, wake.WORK, work)
    other = wake.Listener(tmp_path, wake.SEND, send)
    nudger = wake.Nudger(tmp_path, wake.WORK)
    try:
        assert (tmp_path / "run" / listener.name).exists()
        nudger.nudge()
        assert work.wait(5)
        assert not send.is_set()
    finally:
        listener.close()
        other.close()
    assert not (tmp_path / "run" / listener.name).exists()
    # a process that died without closing: its registration goes at the next nudge that finds
    # nobody listening; another host's registrations are none of this host's business
    stale = tmp_path / "run" / f"{wake._host()}-work-999999999"
    foreign = tmp_path / "run" / "another-host-work-123"
    stale.touch()
    foreign.touch()
    nudger = wake.Nudger(tmp_path, wake.WORK)
    nudger.nudge()
    nudger.close()
    assert not stale.exists() and foreign.exists()


@pytest.mark.slow
def test_a_stored_radiograph_is_analysed_and_sent_without_waiting_for_a_poll(tmp_path):
    """With a 60 s poll interval, the SR and SC are at the destination within seconds of
    the C-STORE: the receive role nudged the worker, the worker the sender."""
    port = free_port()
    with StoreScp(tmp_path / "results") as results:
        node = NodeProcess(
            tmp_path,
            f'[node]\nport = {port}\nstorage_dir = "data"\n'
            "[worker]\npoll_interval_s = 60\n"
            f'[[peers]]\nae_title = "RESULTS"\nhost = "127.0.0.1"\nport = {results.port}\n'
            "confirm_deliveries = false\n"
            '[delivery]\nalso_send_to = ["RESULTS"]\n',
        )
        node.start()
        try:
            wait_for(
                lambda: "work role" in node.log() and "send role" in node.log(),
                timeout_s=120,
                what="roles ready",
            )
            time.sleep(1.0)  # both are in their first wait now
            ds = copy.deepcopy(pydicom.dcmread(CR_CHEST))
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            start = time.monotonic()
            assert scu.store(port, [ds])[0].Status == 0
            wait_for(
                lambda: (
                    sum(1 for p in results.out_dir.iterdir() if p.name[:2] in ("SR", "SC")) >= 2
                ),
                timeout_s=20,
                what="SR and SC at the destination well before the next poll",
            )
            took = time.monotonic() - start
        finally:
            node.stop()
    print(f"\nCR stored to SR and SC at the destination: {took:.2f} s (poll interval 60 s)")
    assert not list((tmp_path / "data" / "run").iterdir())  # every role unregistered
