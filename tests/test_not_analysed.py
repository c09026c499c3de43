"""A series the node stores but does not analyse gets an SR back that says so, and why (issue 11).

So that a radiologist can tell "not analysed" from "not yet": no model for the modality (an MR),
not a frontal chest radiograph (a leg film), each through the real node path (C-STORE, queue,
work role, delivery owed to the peer). The SR passes dciodvfy. ``worker.report_not_analysed =
false`` turns it off.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from pacs_node.config import Peer
from storage.models import Delivery, Instance, Job, Result, Series, TaskState
from tests import scu
from tests.conftest import DICOM, make_config

MR = DICOM / "compressed" / "pydicom_wheel__MR_small_RLE.dcm"
LEG_CR = DICOM / "compressed" / "pydicom_data__RG3_J2KR.dcm"
DCIODVFY = Path("/usr/bin/dciodvfy")


def _node(start_node, tmp_path, **worker):
    config = make_config(tmp_path, peers=(Peer("STORER", "127.0.0.1", 104),))
    return start_node(replace(config, worker=replace(config.worker, **worker)))


def _reports(node) -> list[tuple[pydicom.Dataset, list[str]]]:
    """Each generated SR with the destinations its delivery is owed to."""
    with node.db.read() as session:
        rows = session.execute(
            select(Instance).join(Series).where(Series.generated.is_(True), Series.modality == "SR")
        ).scalars()
        out = []
        for instance in rows:
            owed = session.scalars(
                select(Delivery.destination_ae).where(Delivery.instance_pk == instance.id)
            ).all()
            out.append((pydicom.dcmread(node.files.abspath(instance.path)), list(owed)))
        return out


def _items(ds: pydicom.Dataset):
    """Every content item of the SR tree, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _texts(sr: pydicom.Dataset) -> list[str]:
    return [str(item.TextValue) for item in _items(sr) if "TextValue" in item]


def _codes(sr: pydicom.Dataset) -> set[tuple[str, str]]:
    return {
        (str(item.ConceptCodeSequence[0].CodingSchemeDesignator),
         str(item.ConceptCodeSequence[0].CodeValue))
        for item in _items(sr)
        if "ConceptCodeSequence" in item
    }  # fmt: skip


@pytest.mark.parametrize(
    ("path", "reason"),
    [(MR, "no model for modality MR"), (LEG_CR, "body part EXTREMITY")],
    ids=["mr-no-model", "leg-cr-not-a-chest"],
)
def test_a_series_not_analysed_gets_an_sr_that_says_why(start_node, tmp_path, path, reason):
    node = _node(start_node, tmp_path)
    assert scu.store(node.port, [path], calling="STORER")[0].Status == 0
    node.run_pending()
    source = pydicom.dcmread(path, stop_before_pixels=True)
    with node.db.read() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is TaskState.SKIPPED and reason in job.last_error
        result = session.scalars(select(Result)).one()
        assert result.label == "not_analysed" and result.probabilities == {}
    [(sr, owed)] = _reports(node)
    assert owed == ["STORER"]  # it goes back like any result
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SOPInstanceUID == result.sr_sop_instance_uid
    assert ("SCT", "262008008") in _codes(sr)  # Finding: "Not performed"
    texts = _texts(sr)
    assert any(t.startswith("Not analysed: ") and reason in t for t in texts)
    assert any("not for diagnostic use" in t for t in texts)
    assert "not for diagnostic use" in sr.SeriesDescription
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    if DCIODVFY.exists():
        written = tmp_path / "report.dcm"
        sr.save_as(written, enforce_file_format=True)
        run = subprocess.run([str(DCIODVFY), str(written)], capture_output=True, text=True)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
        assert errors == []


def test_the_report_is_made_once_and_can_be_turned_off(start_node, tmp_path):
    node = _node(start_node, tmp_path)
    assert scu.store(node.port, [MR, MR], calling="STORER")[1].Status == 0  # sent twice
    node.run_pending()
    assert len(_reports(node)) == 1

    quiet = _node(start_node, tmp_path / "quiet", report_not_analysed=False)
    assert scu.store(quiet.port, [MR], calling="STORER")[0].Status == 0
    with quiet.db.read() as session:  # skipped as it is stored, no job for the work role
        job = session.scalars(select(Job)).one()
        assert job.state is TaskState.SKIPPED and "no model for modality MR" in job.last_error
    quiet.run_pending()
    assert _reports(quiet) == []
