"""Store -> job -> model -> SR + SC -> delivery, in one process, with real peers on loopback.

The worker runs in burst mode (``run_pending``), so each test is deterministic; the scheduler is
covered by the Orthanc end-to-end test.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from pacs_node.config import Peer
from pacs_node.process import owner_id
from storage import tasks
from storage.models import Delivery, Instance, Job, Result, Series, TaskState, utcnow
from tests import scu
from tests.conftest import CR_CHEST, CT_SERIES, DICOM, make_config
from tests.orthanc import StoreScp, dcmtk_available, free_port, wait_for

pytestmark = pytest.mark.usefixtures("strict_pydicom")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A dcmtk storescp destination on a free port; yields (port, folder it writes to)."""
    if not dcmtk_available("storescp"):
        pytest.skip("dcmtk not installed")
    with StoreScp(tmp_path / "received") as scp:
        yield scp.port, scp.out_dir


def _results(node) -> list[tuple[Result, Series]]:
    with node.db.read() as session:
        return list(
            session.execute(
                select(Result, Series).join(Series, Result.series_pk == Series.id)
            ).all()
        )


def _job_states(node) -> dict[str, tuple[TaskState, str]]:
    with node.db.read() as session:
        rows = session.execute(select(Job, Series).join(Series)).all()
        return {s.series_instance_uid: (j.state, j.last_error) for j, s in rows}


def test_cr_gets_sr_and_sc_delivered_to_its_sender(start_node, tmp_path, storescp):
    port, received = storescp
    peers = (Peer("STORESCP", "127.0.0.1", port),)
    node = start_node(make_config(tmp_path, peers=peers))
    assert scu.store(node.port, [CR_CHEST], calling="STORESCP")[0].Status == 0
    assert node.run_pending() == 1
    ((result, series),) = _results(node)
    source = pydicom.dcmread(CR_CHEST)
    assert series.series_instance_uid == source.SeriesInstanceUID
    assert result.label in {"covid", "pneumonia", "normal"}
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    expected = {result.sr_sop_instance_uid, *result.sc_sop_instance_uids}
    with node.db.read() as session:  # the heatmap as a secondary capture and a parametric map
        classes = session.scalars(
            select(Instance.sop_class_uid).where(Instance.sop_instance_uid.in_(expected))
        ).all()
    assert sorted(classes) == sorted(
        ["1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.30"]
    )
    files = wait_for(
        lambda: (
            list(received.iterdir()) if len(list(received.iterdir())) == len(expected) else None
        ),
        timeout_s=10,
        what="results at storescp",
    )
    got = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f) for f in files}
    assert set(got) == expected
    for ds in got.values():
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription.upper()
    with node.db.read() as session:
        states = session.scalars(select(Delivery.state)).all()
    assert states and all(s == TaskState.DONE for s in states)


def test_results_are_found_by_cfind_and_list_sr(start_node):
    node = start_node()
    scu.store(node.port, [CR_CHEST])
    node.run_pending()
    study_uid = str(pydicom.dcmread(CR_CHEST).StudyInstanceUID)
    studies, _ = scu.find(
        node.port, scu.query("STUDY", StudyInstanceUID=study_uid, ModalitiesInStudy="")
    )
    assert set(studies[0].ModalitiesInStudy) == {"CR", "SR", "OT"}
    srs, _ = scu.find(
        node.port,
        scu.query(
            "SERIES",
            StudyInstanceUID=study_uid,
            Modality="SR",
            SeriesInstanceUID="",
            SeriesDescription="",
        ),
    )
    assert len(srs) == 1 and "NOT FOR DIAGNOSTIC USE" in srs[0].SeriesDescription.upper()


def test_ct_series_gives_one_sr_over_all_slices_and_few_heatmaps(start_node):
    node = start_node()
    scu.store(node.port, CT_SERIES)
    assert node.run_pending() == 1
    ((result, _),) = _results(node)
    # the shipped CT model is no better than chance on real DICOM, so it says so on every scan
    assert result.label == "indeterminate"
    assert set(result.probabilities) == {"covid", "noncovid"}
    assert 2 <= len(result.sc_sop_instance_uids) <= 6  # an SC and a PM per explained slice
    with node.db.read() as session:
        from storage.models import Instance

        sr_row = session.scalar(
            select(Instance).where(Instance.sop_instance_uid == result.sr_sop_instance_uid)
        )
        sr_path = node.files.abspath(sr_row.path)
    sr = pydicom.dcmread(sr_path)
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == {str(pydicom.dcmread(p).SOPInstanceUID) for p in CT_SERIES}


def test_retry_of_a_job_makes_the_same_instances(start_node):
    node = start_node()
    scu.store(node.port, [CR_CHEST])
    node.run_pending()
    ((first, _),) = _results(node)
    with node.db.session() as session:  # run the analysis again, as after a crash
        job = session.scalars(select(Job)).one()
        job.state = TaskState.QUEUED
    node.run_pending()
    results = _results(node)
    assert len(results) == 2
    assert results[1][0].sr_sop_instance_uid == first.sr_sop_instance_uid
    assert results[1][0].sc_sop_instance_uids == first.sc_sop_instance_uids


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        (DICOM / "format_only" / "highdicom__dx_image.dcm", "not to be human"),
        (DICOM / "compressed" / "pydicom_data__RG3_J2KR.dcm", "body part EXTREMITY"),
    ],
    ids=["lateral-animal-thorax", "leg-cr"],
)
def test_images_the_model_was_not_built_for_are_skipped(start_node, path, reason):
    node = start_node()
    assert scu.store(node.port, [path])[0].Status == 0
    node.run_pending()
    state, error = _job_states(node)[str(pydicom.dcmread(path).SeriesInstanceUID)]
    assert state == TaskState.SKIPPED
    assert reason in error
    # no finding; only the report that says it was not analysed (issue 11)
    assert [r.label for r, _ in _results(node)] == ["not_analysed"]


def test_undecodable_12bit_jpeg_is_stored_and_skipped_with_reason(start_node):
    # An NM whole-body bone scan in 12-bit JPEG that pylibjpeg cannot decode: stored, findable,
    # and skipped (no model reads NM; the decoder's own refusal is tested in test_preprocess).
    node = start_node()
    path = DICOM / "compressed" / "pydicom_wheel__JPEG-lossy.dcm"
    assert scu.store(node.port, [path])[0].Status == 0
    node.run_pending()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    state, error = _job_states(node)[str(ds.SeriesInstanceUID)]
    assert (state, error) == (TaskState.SKIPPED, "no model for modality NM: stored, not analysed")
    images, _ = scu.find(
        node.port,
        scu.query(
            "IMAGE",
            StudyInstanceUID=ds.StudyInstanceUID,
            SeriesInstanceUID=ds.SeriesInstanceUID,
            SOPInstanceUID="",
        ),
    )
    assert [i.SOPInstanceUID for i in images] == [ds.SOPInstanceUID]


def test_delivery_to_a_dead_peer_backs_off_then_fails_with_reason(start_node, tmp_path):
    dead = Peer("GONE", "127.0.0.1", free_port())
    config = make_config(tmp_path, peers=(dead,))
    config = replace(
        config, delivery=replace(config.delivery, max_attempts=2, backoff_initial_s=0.0)
    )
    node = start_node(config)
    scu.store(node.port, [CR_CHEST], calling="GONE")
    node.run_pending()
    with node.db.read() as session:
        deliveries = session.scalars(select(Delivery)).all()
    assert deliveries and all(d.state == TaskState.FAILED for d in deliveries)
    assert all(d.attempts == 2 and "GONE@127.0.0.1" in d.last_error for d in deliveries)


def test_delivery_waits_with_backoff_and_arrives_when_the_peer_is_back(start_node, tmp_path):
    port = free_port()
    config = make_config(tmp_path, peers=(Peer("STORESCP", "127.0.0.1", port),))
    config = replace(config, delivery=replace(config.delivery, backoff_initial_s=60.0))
    node = start_node(config)
    scu.store(node.port, [CR_CHEST], calling="STORESCP")
    node.run_pending()  # the peer is down: first attempt fails, next one in 60 s
    with node.db.read() as session:
        waiting = session.scalars(select(Delivery)).all()
    assert waiting and all(d.state == TaskState.QUEUED and d.attempts == 1 for d in waiting)
    assert all(55 < (d.not_before - d.created_at).total_seconds() < 70 for d in waiting)
    assert all("STORESCP@127.0.0.1" in d.last_error for d in waiting)
    if not dcmtk_available("storescp"):
        pytest.skip("dcmtk not installed")
    with StoreScp(tmp_path / "received", port) as scp:
        assert node.sender.deliver_due() == 0  # not due yet: the backoff holds
        with node.db.session() as session:  # let the 60 s pass
            for d in session.scalars(select(Delivery)).all():
                d.not_before = d.created_at
        node.run_pending()
        with node.db.read() as session:
            sent = session.scalars(select(Delivery)).all()
        assert all(d.state == TaskState.DONE and d.attempts == 2 for d in sent)
        assert len(scp.received()) == len(sent)


def test_a_job_running_when_the_process_died_runs_again(start_node, tmp_path):
    config = make_config(tmp_path)
    node = start_node(config)
    scu.store(node.port, [CR_CHEST])
    gone = subprocess.Popen(["true"])  # a process of this machine that is gone
    gone.wait()
    with node.db.session() as session:  # it claimed the job, then died holding the lease
        assert tasks.claim(session, Job, owner=owner_id(gone.pid), lease_s=3600, now=utcnow())
    node.stop()
    restarted = start_node(config)
    assert restarted.run_pending() == 1
    ((job_state, _),) = _job_states(restarted).values()
    assert job_state == TaskState.DONE


def test_each_delivery_is_recorded_before_the_next_is_sent(start_node, tmp_path):
    """A send role killed mid-batch sends again only the C-STORE in flight: the peer (a
    pynetdicom SCP that reads the node's database as each C-STORE arrives) sees every earlier
    delivery already done."""
    done_when_sent: list[int] = []
    holder: dict[str, object] = {}

    def on_store(event: object) -> int:
        with holder["node"].db.read() as session:  # type: ignore[attr-defined]
            states = session.scalars(select(Delivery.state)).all()
        done_when_sent.append(sum(s == TaskState.DONE for s in states))
        return 0x0000

    with scu.storage_scp("PEER", on_store) as port:
        peer = Peer("PEER", "127.0.0.1", port, confirm_deliveries=False)
        node = start_node(make_config(tmp_path, peers=(peer,)))
        holder["node"] = node
        studies = _cr_studies(3, 0)
        assert all(a.Status == 0 for a in scu.store(node.port, studies, calling="PEER"))
        assert node.worker.run_pending() == 3
        sent = node.sender.deliver_due()
        assert sent == 9  # SR, SC and Parametric Map of each study, over one association
        assert done_when_sent == list(range(sent))


def _cr_studies(count: int, tag: int) -> list[pydicom.Dataset]:
    out = []
    for i in range(count):
        ds = pydicom.dcmread(CR_CHEST)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = f"1.2.3.{tag}.{i}.1", f"1.2.3.{tag}.{i}.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.{tag}.{i}.3"
        out.append(ds)
    return out


def test_radiographs_are_claimed_in_batches_and_a_retry_runs_alone(start_node, tmp_path):
    peer = Peer("PACS", "127.0.0.1", free_port())  # owed the results; no send role runs here
    config = make_config(tmp_path, peers=(peer,))
    node = start_node(replace(config, worker=replace(config.worker, batch_size=3)))
    assert all(a.Status == 0 for a in scu.store(node.port, _cr_studies(5, 1), calling="PACS"))
    assert [node.worker.run_next(), node.worker.run_next(), node.worker.run_next()] == [3, 2, 0]
    with node.db.read() as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        results = session.scalars(select(Result)).all()
        deliveries = session.scalars(select(Delivery)).all()
        made = session.execute(
            select(Instance.sop_instance_uid, Series.modality, Series.generated)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.generated.is_(True))
        ).all()
    assert [j.state for j in jobs] == [TaskState.DONE] * 5
    assert len({j.started_at for j in jobs[:3]}) == 1  # claimed together
    assert len({j.started_at for j in jobs}) == 2
    assert len(results) == 5
    owed = {u for r in results for u in (r.sr_sop_instance_uid, *r.sc_sop_instance_uids)}
    assert {uid for uid, _, _ in made} == owed and len(owed) == 15
    assert sorted(m for _, m, _ in made) == ["OT"] * 10 + ["SR"] * 5  # SC and PM: OT
    assert len(deliveries) == 15 and {d.destination_ae for d in deliveries} == {"PACS"}
    assert all(d.state == TaskState.QUEUED and d.priority == jobs[0].priority for d in deliveries)
    # a retry (it had an attempt that failed, as when its worker died) is claimed alone
    with node.db.session() as session:
        job = session.get(Job, jobs[0].id)
        job.state, job.attempts, job.not_before = TaskState.QUEUED, 1, job.created_at
    assert all(a.Status == 0 for a in scu.store(node.port, _cr_studies(2, 2), calling="PACS"))
    assert [node.worker.run_next(), node.worker.run_next()] == [1, 2]
    with node.db.read() as session:
        assert len(session.scalars(select(Delivery)).all()) == 21  # the retry owes no more
        assert {j.state for j in session.scalars(select(Job))} == {TaskState.DONE}


def test_results_indexed_together_as_one_at_a_time(tmp_path):
    """``record_made`` (a batch's results in four statements) writes the rows that
    ``record_instance`` writes for the same instances, and updates them on a retry."""
    from storage.db import Database
    from storage.ingest import Made, record_instance, record_made

    source = pydicom.dcmread(CR_CHEST)
    outputs = []
    for n, (modality, sop_class) in enumerate([("SR", "1.2.840.10008.5.1.4.1.1.88.33")] * 2):
        ds = pydicom.dcmread(CR_CHEST, stop_before_pixels=True)
        ds.Modality, ds.SOPClassUID, ds.SeriesNumber = modality, sop_class, 900 + n
        ds.SeriesInstanceUID, ds.SOPInstanceUID = f"1.2.3.9.{n}", f"1.2.3.9.{n}.1"
        ds.SeriesDescription, ds.InstanceNumber = "AI result, not for diagnostic use", 1
        outputs.append(ds)
    outputs.append(pydicom.dcmread(CR_CHEST, stop_before_pixels=True))
    # an image result (as the SC), in a series of its own
    outputs[2].SeriesInstanceUID, outputs[2].SOPInstanceUID = "1.2.3.9.2", "1.2.3.9.2.1"
    tables = []
    for way in ("one", "together"):
        db = Database(f"sqlite:///{tmp_path / way}.db")
        with db.session() as session:
            study_pk = record_instance(
                session,
                source,
                relpath="in.dcm",
                size_bytes=1,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
            ).study_pk
            for attempt in range(2):  # a retry indexes the same instances again
                if way == "one":
                    for i, ds in enumerate(outputs):
                        record_instance(
                            session,
                            ds,
                            relpath=f"out{i}.dcm",
                            size_bytes=10 + attempt,
                            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                            generated=True,
                        )
                else:
                    made = [
                        Made(ds, f"out{i}.dcm", 10 + attempt, study_pk)
                        for i, ds in enumerate(outputs)
                    ]
                    keys = record_made(session, made)
                    assert len(set(keys)) == 3
        with db.read() as session:
            series = session.execute(
                select(
                    Series.series_instance_uid,
                    Series.study_pk,
                    Series.modality,
                    Series.series_number,
                    Series.series_description,
                    Series.body_part_examined,
                    Series.source_ae,
                    Series.generated,
                ).order_by(Series.series_instance_uid)
            ).all()
            instances = session.execute(
                select(
                    Instance.sop_instance_uid,
                    Instance.sop_class_uid,
                    Instance.instance_number,
                    Instance.transfer_syntax_uid,
                    Instance.path,
                    Instance.size_bytes,
                    Instance.rows,
                    Instance.columns,
                    Instance.content_date,
                    Series.series_instance_uid,
                )
                .join(Series)
                .order_by(Instance.sop_instance_uid)
            ).all()
        db.dispose()
        tables.append((series, instances))
    assert tables[0] == tables[1]
    made_rows = [row for row in tables[0][1] if row[4] != "in.dcm"]
    assert len(made_rows) == 3 and {row[5] for row in made_rows} == {11}  # the retry's size


def test_a_batch_leaves_no_cycle_holding_its_arrays(start_node, tmp_path):
    """A job's images, heatmaps and results are freed when the batch is recorded, not at the
    cycle collector's next full pass (a cycle through an Outcome grew the work role by
    ~2 MB a job)."""
    import gc

    from ai.analysis import Analysis
    from pacs_node.work import Outcome

    peer = Peer("PACS", "127.0.0.1", free_port())
    node = start_node(make_config(tmp_path, peers=(peer,)))
    assert all(a.Status == 0 for a in scu.store(node.port, _cr_studies(3, 3), calling="PACS"))
    gc.collect()
    gc.disable()
    try:
        assert node.worker.run_next() == 3
        alive = [o for o in gc.get_objects() if isinstance(o, Outcome | Analysis)]
    finally:
        gc.enable()
    assert alive == []


def test_a_batch_job_whose_results_cannot_be_written_fails_alone(start_node, tmp_path):
    """The results of a batch are written by a thread while the next job is analysed; one
    job whose SR cannot be written (a file stands where its series folder goes) fails with
    the reason after its attempts, and the other jobs of the batch are done."""
    from ai.results import derived_uid
    from ai.runtime import load_runtime_classifier

    config = make_config(tmp_path)
    config = replace(config, worker=replace(config.worker, max_attempts=2, retry_backoff_s=0.0))
    node = start_node(config)
    studies = _cr_studies(3, 4)
    spec = load_runtime_classifier("cxr", "onnx").spec
    blocked = studies[1]
    key = [spec.name, spec.version, str(blocked.SOPInstanceUID)]
    study_dir = node.files.root / "instances" / str(blocked.StudyInstanceUID)
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / derived_uid("sr-series", *key)).write_bytes(b"not a folder")
    assert all(a.Status == 0 for a in scu.store(node.port, studies))
    assert node.worker.run_next() == 3
    states = _job_states(node)
    assert states[str(studies[0].SeriesInstanceUID)][0] == TaskState.DONE
    assert states[str(studies[2].SeriesInstanceUID)][0] == TaskState.DONE
    state, error = states[str(blocked.SeriesInstanceUID)]
    assert state == TaskState.QUEUED and error.startswith("storing results failed")
    node.worker.run_pending()  # its retry, alone: fails again, out of attempts
    state, error = _job_states(node)[str(blocked.SeriesInstanceUID)]
    assert state == TaskState.FAILED and "storing results failed" in error
    assert len(_results(node)) == 2
