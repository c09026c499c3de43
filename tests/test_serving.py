"""Issue 8: training on several folders with a source held out, calibration, the operating
point, abstention, and the same result objects from the worker and from ``classify``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from ai import abstention as ab
from ai import calibration as cal
from ai import metrics as m
from ai.dataset import make_splits, read_samples, source_name
from ai.outputs import INDETERMINATE, ClassCode, Prediction, build_sr
from ai.train import CLASSES
from tests.conftest import CR_CHEST, SHARED_DATA

CXR = [c.name for c in CLASSES["cxr"]]
BASE = {
    "task": "cxr",
    "data_dir": str(SHARED_DATA),
    "seed": 0,
    "validation_fraction": 0.15,
    "test_fraction": 0.15,
    "stratify": "source",
}


def _overconfident(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from known probabilities, reported sharpened (as if T = 1/3): a model that
    is right as often as ``p`` says but claims more confidence."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, size=(n, 3))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    sharp = p**3 / (p**3).sum(axis=1, keepdims=True)
    return sharp, y


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_ece():
    probs, y = _overconfident()
    t = cal.fit_temperature(probs, y)
    assert 2.6 < t < 3.4  # the sharpening undone
    after = cal.apply_temperature(probs, t)
    before_ece, after_ece = (m.expected_calibration_error(y, p) for p in (probs, after))
    assert after_ece < 0.03 < before_ece and after_ece < before_ece / 3
    assert cal.nll(after, y) < cal.nll(probs, y)
    assert (after.argmax(axis=1) == probs.argmax(axis=1)).all()  # ranking unchanged
    summary = cal.calibration_summary(y, probs, t, CXR)
    assert summary["ece_after"] < summary["ece_before"]
    assert sum(summary["reliability_after"]["count"]) == len(y)


def test_threshold_is_the_highest_reaching_the_target_sensitivity():
    rng = np.random.default_rng(1)
    scores = rng.random(400)
    positive = rng.random(400) < scores  # higher score, more often positive
    t = cal.choose_threshold(scores, positive, 0.95)
    assert np.mean(scores[positive] >= t) >= 0.95
    assert np.mean(scores[positive] > t) < 0.95  # any higher threshold misses the target
    probs = np.array([[0.2, 0.7, 0.1], [0.05, 0.15, 0.8]])
    assert cal.decide(probs, 0, 0.15).tolist() == [0, 2]  # 0.2 >= 0.15: COVID-19
    assert cal.decide(probs, 0, None).tolist() == [1, 2]


def test_prediction_follows_its_operating_point_and_the_sr_says_so(strict_pydicom):
    classes = CLASSES["cxr"]
    p = Prediction("m", "1", "cxr", classes, (0.2, 0.5, 0.3), positive_class="covid",
                   threshold=0.15, operating_point_note="Chosen on validation.")  # fmt: skip
    assert p.label.name == "covid" and p.probability == pytest.approx(0.2)
    plain = Prediction("m", "1", "cxr", classes, (0.2, 0.5, 0.3))
    assert plain.label.name == "pneumonia"
    unsure = Prediction("m", "1", "cxr", classes, (0.2, 0.5, 0.3), positive_class="covid",
                        threshold=0.15, indeterminate="unlike the training data")  # fmt: skip
    assert unsure.label == INDETERMINATE and unsure.decided.name == "covid"
    source = pydicom.dcmread(CR_CHEST, stop_before_pixels=True)
    for prediction, finding in ((p, "COVID-19"), (unsure, "Undetermined")):
        sr = build_sr([source], prediction, series_instance_uid="1.2.3.4",
                      sop_instance_uid="1.2.3.4.5", software_version="t")  # fmt: skip
        text = _content_text(sr)
        assert finding in text and "at least 0.150" in text
        assert ("Chosen on validation" in text) == bool(prediction.operating_point_note)
        assert ("Not determined: unlike the training data" in text) == bool(
            prediction.indeterminate
        )
    with pytest.raises(ValueError, match="positive_class"):
        Prediction("m", "1", "cxr", classes, (0.2, 0.5, 0.3), threshold=0.5)


def _content_text(ds: pydicom.Dataset) -> str:
    out = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if "TextValue" in item:
                out.append(str(item.TextValue))
            if "ConceptCodeSequence" in item:
                out.append(str(item.ConceptCodeSequence[0].CodeMeaning))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return "\n".join(out)


def test_feature_density_scores_far_vectors_above_the_validation_quantile():
    """Post-ReLU features as a network gives them: training images use one set of channels,
    images of another kind light up others."""
    rng = np.random.default_rng(2)

    def images(n: int, active: slice) -> np.ndarray:
        v = np.zeros((n, 40))
        v[:, active] = np.maximum(0, rng.normal(1.0, 0.5, (n, active.stop - active.start)))
        return v + np.maximum(0, rng.normal(0, 0.1, (n, 40)))

    density = ab.fit_density(images(400, slice(0, 25)))
    val = density.score(images(200, slice(0, 25)))
    limit = ab.threshold_at(val, 0.98)
    far = density.score(images(50, slice(15, 40)))
    assert np.mean(val > limit) <= 0.03 and np.mean(far > limit) == 1.0
    with pytest.raises(ab.AbstentionError, match="do not fit"):
        density.score(np.zeros((1, 3)))


def test_sources_are_named_and_a_held_out_source_leaves_every_split(tmp_path):
    assert source_name({"source_repo": "ml-workgroup/covid-19-image-repository"}, "x") == "hannover"
    assert source_name({"source": "Site A", "source_repo": "a/b"}, "x") == "Site A"
    # a second folder without a manifest: class subfolders, each image its own group
    extra = tmp_path / "site_b"
    for label in ("normal", "covid"):
        (extra / label).mkdir(parents=True)
        for f in sorted((SHARED_DATA / "cxr_adult" / label).glob("*.jpg"))[:4]:
            (extra / label / f.name).write_bytes(f.read_bytes())
    samples = read_samples([SHARED_DATA, extra], "cxr", CXR)
    sources = {s.source for s in samples}
    assert {"nih", "hannover", "cohen", "kermany", "figure1", "teaching", "site_b"} <= sources
    settings = {**BASE, "extra_data": [str(extra)], "hold_out_source": "hannover",
                "exclude_sources": ["teaching"]}  # fmt: skip
    splits = make_splits(settings, CXR)
    held = splits["held_out"]
    assert held and {s.source for s in held} == {"hannover"}
    held_groups = {s.group for s in held}
    for name in ("train", "validation", "test"):
        split = splits[name]
        assert not {s.source for s in split} & {"hannover", "teaching"}
        assert not {s.group for s in split} & held_groups  # its patients' other images too
    groups = [{s.group for s in splits[k]} for k in ("train", "validation", "test")]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    for name in ("train", "validation", "test"):  # stratified by source: every source in each
        assert {"nih", "cohen", "kermany"} <= {s.source for s in splits[name]}
    assert any(s.source == "site_b" for s in splits["train"])
    assert make_splits(settings, CXR) == splits  # reproducible
    with pytest.raises(ValueError, match="no source 'nowhere'"):
        make_splits({**BASE, "hold_out_source": "nowhere"}, CXR)


@pytest.mark.slow
def test_train_command_takes_two_folders_and_holds_a_source_out(tmp_path):
    extra = tmp_path / "clinic"
    for label in ("normal", "pneumonia", "covid"):
        (extra / label).mkdir(parents=True)
        for f in sorted((SHARED_DATA / "cxr" / label).glob("*.jpg"))[:3]:
            (extra / label / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "model"
    run = subprocess.run(
        [sys.executable, "-m", "pacs_node.cli", "train", "--task", "cxr",
         "--data", str(SHARED_DATA), "--data", str(extra), "--out", str(out),
         "--hold-out-source", "figure1", "--exclude-source", "teaching",
         "--limit-per-class", "12", "--image-size", "32", "--epochs", "1",
         "--balance", "source", "--blur", "1", "--erase", "0.3"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    training = json.loads((out / "training.json").read_text())
    sources = training["metrics"]["split_sources"]
    assert set(sources["held_out"]) == {"figure1"}
    for split in ("train", "validation", "test"):
        assert "figure1" not in sources[split] and "teaching" not in sources[split]
    assert training["settings"]["extra_data"] == [str(extra)]
    spec = json.loads((out / "model.json").read_text())
    assert spec["operating_point"]["class"] == "covid"
    assert spec["operating_point"]["validation_sensitivity"] >= 0.95
    assert spec["temperature"] > 0 and spec["abstention"]["threshold"] > 0
    assert (out / "abstention.npz").is_file() and (out / "serving.json").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "pacs_node.cli", "train", "--task", "cxr", "--data",
         str(SHARED_DATA), "--out", str(tmp_path / "m2"), "--hold-out-source", "nowhere"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "no source 'nowhere'" in bad.stderr


def test_every_class_code_is_distinct_from_indeterminate():
    for classes in CLASSES.values():
        assert all((c.scheme, c.value) != (INDETERMINATE.scheme, INDETERMINATE.value)
                   for c in classes)  # fmt: skip
    assert isinstance(INDETERMINATE, ClassCode)


def _sr_content(ds: pydicom.Dataset) -> list:
    """The SR's content tree without its creation times: what a reader of the report sees."""
    skip = {"ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
            "SeriesDate", "SeriesTime", "ContributionDateTime"}  # fmt: skip
    return [
        (elem.keyword, str(elem.value) if elem.VR != "SQ" else None)
        for elem in ds.iterall()
        if elem.keyword not in skip
    ]


def _node_results(node) -> list[pydicom.Dataset]:
    from sqlalchemy import select

    from storage.models import Instance, Series

    with node.db.read() as session:
        paths = session.scalars(
            select(Instance.path).join(Series).where(Series.generated.is_(True))
        ).all()
    return [pydicom.dcmread(node.files.abspath(p)) for p in paths]


@pytest.mark.slow
def test_worker_and_classify_make_the_same_sr_for_the_same_input(start_node, tmp_path):
    from tests import scu
    from tests.conftest import make_config

    node = start_node(make_config(tmp_path))
    assert scu.store(node.port, [CR_CHEST])[0].Status == 0
    assert node.run_pending() == 1
    by_node = {str(ds.SOPInstanceUID): ds for ds in _node_results(node)}
    out = tmp_path / "classify"
    run = subprocess.run(
        [sys.executable, "-m", "pacs_node.cli", "classify", "--output", str(out), str(CR_CHEST)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    by_classify = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, out.glob("*.dcm"))}
    assert set(by_classify) == set(by_node)  # same UIDs: the same objects
    for uid, ds in by_classify.items():
        if ds.Modality == "SR":
            assert _sr_content(ds) == _sr_content(by_node[uid])
        else:
            assert ds.pixel_array.tobytes() == by_node[uid].pixel_array.tobytes()


@pytest.mark.slow
def test_node_answers_indeterminate_for_a_leg_film_and_a_ct_slice_sent_as_xrays(
    start_node, tmp_path
):
    """Through the real node path (C-STORE, queue, worker, SR): images that pass the header
    rules but are not chest radiographs (a leg CR whose header names no body part, a CT slice
    relabelled DX) reach the chest X-ray model, which declines: finding "Undetermined", the
    reason in the SR, the probabilities still reported."""
    from sqlalchemy import select

    from storage.models import Result, Series
    from tests import scu
    from tests.conftest import CT_SERIES, DICOM, make_config

    leg = pydicom.dcmread(DICOM / "compressed" / "pydicom_data__RG3_J2KR.dcm")
    del leg.BodyPartExamined
    ct = pydicom.dcmread(CT_SERIES[15])
    ct.Modality = "DX"
    node = start_node(make_config(tmp_path))
    assert [s.Status for s in scu.store(node.port, [leg, ct])] == [0, 0]
    assert node.run_pending() == 2
    with node.db.read() as session:
        rows = session.execute(select(Result, Series).join(Series)).all()
    assert {series.series_instance_uid for _, series in rows} == {
        str(leg.SeriesInstanceUID),
        str(ct.SeriesInstanceUID),
    }
    for result, _ in rows:
        assert result.label == "indeterminate"
        assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    srs = [ds for ds in _node_results(node) if ds.Modality == "SR"]
    assert len(srs) == 2
    for sr in srs:
        text = _content_text(sr)
        assert "Undetermined" in text and "Not determined: the image is unlike" in text
        assert "not for diagnostic use" in text


def test_a_source_with_an_empty_character_set_still_gets_results(strict_pydicom, tmp_path):
    """Issue 10: SpecificCharacterSet present but empty failed every job ("'' is not a valid
    SpecificCharacterSetValues"); empty means the default repertoire."""
    from ai.analysis import analyse_datasets
    from ai.results import build_results
    from ai.runtime import load_runtime_classifier

    source = pydicom.dcmread(CR_CHEST)
    source.SpecificCharacterSet = ""
    analysis = analyse_datasets([source], load_runtime_classifier("cxr"))
    assert analysis.warnings == [
        "empty Specific Character Set: text read in the default repertoire"
    ]
    outputs = build_results(analysis, software_version="test")
    assert len(outputs) == 3  # SR, SC, Parametric Map
    for i, ds in enumerate(outputs):
        ds.save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)
        back = pydicom.dcmread(tmp_path / f"{i}.dcm")
        assert (
            "SpecificCharacterSet" not in back and back.StudyInstanceUID == source.StudyInstanceUID
        )


def test_a_source_with_an_unknown_character_set_gets_results_in_utf8(tmp_path, caplog):
    """Issue 10: an unknown SpecificCharacterSet ('ISO_IR 999') failed the job in highdicom;
    the text pydicom decoded (with the default repertoire) is copied as UTF-8 instead."""
    from ai.analysis import analyse_datasets
    from ai.results import build_results
    from ai.runtime import load_runtime_classifier

    source = pydicom.dcmread(CR_CHEST)
    source.SpecificCharacterSet = "ISO_IR 999"
    source.PatientName = "Östlund^Åsa"
    written = tmp_path / "source.dcm"
    source.save_as(written, enforce_file_format=True)
    with pytest.warns(UserWarning, match="Unknown encoding 'ISO_IR 999'"):
        received = pydicom.dcmread(written)
        analysis = analyse_datasets([received], load_runtime_classifier("cxr"))
        outputs = build_results(analysis, software_version="test")
    assert len(outputs) == 3  # SR, SC, Parametric Map
    assert "unknown character set ISO_IR 999" in caplog.text
    for i, ds in enumerate(outputs):
        ds.save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)
        back = pydicom.dcmread(tmp_path / f"{i}.dcm")
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert str(back.PatientName) == str(received.PatientName)


@pytest.mark.slow
def test_the_character_set_warning_is_on_the_task(start_node, tmp_path):
    """Issue 10: an unknown character set is a warning on the job (and in `pacs-node status`),
    not a failure: the job is done and the results are sent."""
    from sqlalchemy import select

    from pacs_node.status import render_status
    from storage.models import Job, TaskState
    from tests import scu
    from tests.conftest import make_config

    source = pydicom.dcmread(CR_CHEST)
    source.SpecificCharacterSet = "ISO_IR 999"
    written = tmp_path / "odd-charset.dcm"
    source.save_as(written, enforce_file_format=True)
    node = start_node(make_config(tmp_path))
    assert scu.store(node.port, [written], raw=True)[0].Status == 0
    with pytest.warns(UserWarning, match="Unknown encoding"):
        assert node.run_pending() == 1
    with node.db.read() as session:
        job = session.scalars(select(Job)).one()
        assert job.state is TaskState.DONE and job.last_error == ""
        assert job.warnings == (
            "unknown Specific Character Set ISO_IR 999: text read in the default repertoire, "
            "results written in UTF-8"
        )
    status = render_status(node.db)
    assert "warning: unknown Specific Character Set ISO_IR 999" in status
    assert {ds.Modality for ds in _node_results(node)} == {"SR", "OT"}


def test_log_records_stay_one_line_whatever_a_peer_sends():
    """Issue 10: a calling AE title with a newline forged a log line; a NUL made the log binary."""
    import logging

    from pacs_node.logs import OneLineFormatter

    record = logging.LogRecord(
        "pacs_node", logging.WARNING, __file__, 1, "refused %s", ("EVIL\nFORGED\x00",), None
    )
    line = OneLineFormatter("%(levelname)s %(message)s").format(record)
    assert line == "WARNING refused EVIL\\nFORGED\\x00" and "\n" not in line


def test_an_association_for_another_called_ae_title_is_refused(start_node, tmp_path):
    """Issue 10: any called AE title was accepted."""
    from tests import scu
    from tests.conftest import make_config

    node = start_node(make_config(tmp_path))
    assert scu.association_accepted(node.port, calling="ANYONE")
    assert not scu.association_accepted(node.port, calling="ANYONE", called="SOMEONEELSE")
    # a configured list replaces the node's own title
    other = start_node(make_config(tmp_path / "b", called_ae_titles=("AI_CXR", "AI_CT")))
    assert scu.association_accepted(other.port, calling="ANYONE", called="AI_CT")
    assert not scu.association_accepted(other.port, calling="ANYONE", called="AINODE")
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="ANYONE")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", other.port, ae_title="ELSEWHERE")
    assert assoc.is_rejected  # a real A-ASSOCIATE-RJ: "called AE title not recognised"
    assert (assoc.acceptor.primitive.result_source, assoc.acceptor.primitive.diagnostic) == (1, 7)
