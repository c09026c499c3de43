"""Complete series, known rather than guessed: a real Orthanc sends a CT series in two parts.

Orthanc holds all 30 slices of the lung-cancer CT and sends them to the node in two C-STOREs a
few seconds apart, longer than the node's quiet period. With ``ask_completeness`` (the default)
the node asks Orthanc by C-FIND how many instances the series has, waits for the rest, and
analyses the series once. Without it the node analyses the first half after its quiet period and
the second half makes a new analysis whose SR supersedes the first (Predecessor Documents
Sequence; the earlier result marked in the node's records). With a short
``completeness_wait_s`` and the second half never sent, the node analyses what it has and says so.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from pacs_node.config import Peer
from pacs_node.status import render_status
from storage.models import Job, Result, Series, TaskState
from tests.conftest import CT_SERIES, make_config
from tests.orthanc import wait_for

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

DCIODVFY = "/usr/bin/dciodvfy"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SERIES_UID = str(pydicom.dcmread(CT_SERIES[0], stop_before_pixels=True).SeriesInstanceUID)
STUDY_UID = str(pydicom.dcmread(CT_SERIES[0], stop_before_pixels=True).StudyInstanceUID)
QUIET_S = 1.0


@pytest.fixture
def orthanc_with_ct(orthanc_peer):
    orthanc, node_port = orthanc_peer
    orthanc.upload_many(CT_SERIES)
    study_id = orthanc.find_study_id(STUDY_UID)
    assert study_id is not None
    (series,) = orthanc.study_series(study_id)
    return orthanc, node_port, sorted(series["Instances"])


def _node(tmp_path, start_node, orthanc, port, *, ask: bool, wait_s: float = 60.0):
    config = make_config(
        tmp_path,
        port=port,
        accept_unknown_peers=False,
        peers=(Peer("ORTHANC", "127.0.0.1", orthanc.dicom_port, ask_completeness=ask),),
    )
    worker = replace(
        config.worker,
        ct_quiet_period_s=QUIET_S,
        completeness_settle_s=0.3,
        completeness_wait_s=wait_s,
        poll_interval_s=0.05,
    )
    return start_node(replace(config, worker=worker), scheduler=True, preload=True)


def _series_jobs_and_results(node) -> tuple[list[Job], list[Result]]:
    with node.db.session() as session:
        series_pk = session.scalar(
            select(Series.id).where(Series.series_instance_uid == SERIES_UID)
        )
        jobs = session.scalars(select(Job).where(Job.series_pk == series_pk)).all()
        results = session.scalars(
            select(Result).where(Result.series_pk == series_pk).order_by(Result.id)
        ).all()
        session.expunge_all()
    return list(jobs), list(results)


def _stored_sr(node, sop_uid: str) -> pydicom.Dataset:
    (path,) = node.config.node.storage_dir.rglob(f"{sop_uid}.dcm")
    return pydicom.dcmread(path)


def _evidence(sr: pydicom.Dataset) -> set[str]:
    return {
        str(sop.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }


def _orthanc_srs(orthanc) -> list[str]:
    study_id = orthanc.find_study_id(STUDY_UID)
    return [
        instance
        for series in orthanc.study_series(study_id)
        if series["MainDicomTags"].get("Modality") == "SR"
        for instance in series["Instances"]
    ]


def _send_in_two_parts(orthanc, instances: list[str], pause_s: float) -> None:
    half = len(instances) // 2
    orthanc.send_to_modality("AINODE", instances[:half])
    time.sleep(pause_s)  # longer than the quiet period: a timer would call the series complete
    orthanc.send_to_modality("AINODE", instances[half:])


def test_the_node_asks_orthanc_and_analyses_the_whole_series_once(
    orthanc_with_ct, tmp_path, start_node
):
    orthanc, port, instances = orthanc_with_ct
    node = _node(tmp_path, start_node, orthanc, port, ask=True)
    _send_in_two_parts(orthanc, instances, pause_s=QUIET_S + 2.0)
    wait_for(lambda: _orthanc_srs(orthanc), timeout_s=120, what="the SR in Orthanc")
    time.sleep(1.0)  # a second SR, if the node made one, would follow within this
    jobs, results = _series_jobs_and_results(node)
    assert [j.state for j in jobs] == [TaskState.DONE], [(j.state, j.last_error) for j in jobs]
    assert jobs[0].attempts == 1  # waiting for the rest is not an attempt
    assert jobs[0].warnings == ""
    (result,) = results
    assert len(_evidence(_stored_sr(node, result.sr_sop_instance_uid))) == len(CT_SERIES)
    assert len(_orthanc_srs(orthanc)) == 1


def test_without_asking_late_instances_make_a_new_sr_that_supersedes_the_first(
    orthanc_with_ct, tmp_path, start_node
):
    orthanc, port, instances = orthanc_with_ct
    node = _node(tmp_path, start_node, orthanc, port, ask=False)
    half = len(instances) // 2
    orthanc.send_to_modality("AINODE", instances[:half])
    wait_for(lambda: _orthanc_srs(orthanc), timeout_s=120, what="the first SR in Orthanc")
    orthanc.send_to_modality("AINODE", instances[half:])
    wait_for(
        lambda: len(_orthanc_srs(orthanc)) == 2, timeout_s=120, what="the second SR in Orthanc"
    )
    jobs, results = _series_jobs_and_results(node)
    assert [j.state for j in jobs] == [TaskState.DONE, TaskState.DONE]
    first, second = results
    assert first.superseded_by == second.sr_sop_instance_uid
    assert second.superseded_by == ""
    sr = _stored_sr(node, second.sr_sop_instance_uid)
    assert len(_evidence(sr)) == len(CT_SERIES)
    assert len(_evidence(_stored_sr(node, first.sr_sop_instance_uid))) == half
    (predecessor,) = sr.PredecessorDocumentsSequence
    assert predecessor.StudyInstanceUID == STUDY_UID
    (ref_series,) = predecessor.ReferencedSeriesSequence
    (ref,) = ref_series.ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID == first.sr_sop_instance_uid
    assert ref.ReferencedSOPClassUID == _stored_sr(node, first.sr_sop_instance_uid).SOPClassUID
    assert ref_series.SeriesInstanceUID == (
        _stored_sr(node, first.sr_sop_instance_uid).SeriesInstanceUID
    )
    # what Orthanc holds of the new SR says the same, and passes dciodvfy
    (new_id,) = [i for i in _orthanc_srs(orthanc) if orthanc.tags(i)["SOPInstanceUID"]
                 == second.sr_sop_instance_uid]  # fmt: skip
    target = tmp_path / "second_sr.dcm"
    target.write_bytes(orthanc.get_file(new_id))
    assert "PredecessorDocumentsSequence" in pydicom.dcmread(target)
    if Path(DCIODVFY).exists():
        run = subprocess.run([DCIODVFY, str(target)], capture_output=True, text=True, timeout=60)
        assert [ln for ln in (run.stdout + run.stderr).splitlines() if "Error" in ln] == []
    report = render_status(node.db)
    assert f"superseded by SR {second.sr_sop_instance_uid}" in report


def test_a_series_the_peer_never_finishes_is_analysed_after_the_bound_with_a_warning(
    orthanc_with_ct, tmp_path, start_node
):
    orthanc, port, instances = orthanc_with_ct
    node = _node(tmp_path, start_node, orthanc, port, ask=True, wait_s=2.0)
    half = len(instances) // 2
    started = time.monotonic()
    orthanc.send_to_modality("AINODE", instances[:half])
    wait_for(lambda: _orthanc_srs(orthanc), timeout_s=120, what="the SR in Orthanc")
    assert time.monotonic() - started >= 2.0  # it waited for the bound, not the quiet period
    jobs, results = _series_jobs_and_results(node)
    (job,) = jobs
    assert job.state == TaskState.DONE
    assert job.attempts == 1
    assert f"incomplete: analysed {half} of the {len(CT_SERIES)} instances" in job.warnings
    (result,) = results
    assert len(_evidence(_stored_sr(node, result.sr_sop_instance_uid))) == half
