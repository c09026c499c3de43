"""Which images and series a model reads: the rules of ai.selection, in the config, the node,
``classify`` and the ``select`` dry run.

The study: the real 30-slice lung-cancer CT (soft kernel B40f), the same slices as a second series
reconstructed "in a lung kernel" (B70f), a coronal reformat, a localizer and a dose page, each
its own series of the one study, sent to the node over real associations.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from ai.selection import (
    DEFAULT_RULES,
    Candidate,
    RuleError,
    choose_series,
    orientation,
    rule,
    rule_from_table,
    select_images,
    skip_rule,
)
from pacs_node.config import Peer, load
from pacs_node.errors import ConfigError
from storage.models import Job, Result, Series, TaskState
from tests import scu
from tests.conftest import CT_SERIES, make_config
from tests.test_cli import run_cli

SLICES = CT_SERIES[:8]


def _series(tmp: Path, name: str, edit, slices=SLICES) -> list[Path]:
    """Copies of *slices* as a new series of the same study, changed by *edit*."""
    uid = generate_uid()
    out = tmp / name
    out.mkdir()
    paths = []
    for i, source in enumerate(slices):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        edit(ds)
        path = out / f"{i:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def _lung(ds):
    ds.ConvolutionKernel = "B70f"
    ds.SeriesDescription = "Thorax 1.0 B70f lung"


def _coronal(ds):
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.ConvolutionKernel = "B70f"


def _localizer(ds):
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesDescription = "Topogram 0.6 T20s"


def _dose(ds):
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.SeriesDescription = "Patient Protocol"


@pytest.fixture
def study(tmp_path) -> dict[str, list[Path]]:
    return {
        "soft": list(SLICES),
        "lung": _series(tmp_path, "lung", _lung),
        "coronal": _series(tmp_path, "coronal", _coronal),
        "localizer": _series(tmp_path, "localizer", _localizer, SLICES[:1]),
        "dose": _series(tmp_path, "dose", _dose, SLICES[:1]),
    }


def _uid(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def _header(paths: list[Path]) -> pydicom.Dataset:
    return pydicom.dcmread(paths[0], stop_before_pixels=True)


# -- the rules themselves ----------------------------------------------------------------


def test_default_rules_skip_localizers_and_dose_pages_and_keep_the_slices(study):
    assert skip_rule(_header(study["localizer"]), DEFAULT_RULES).name == "localizer"
    assert skip_rule(_header(study["dose"]), DEFAULT_RULES).name == "dose report"
    for name in ("soft", "lung", "coronal"):
        assert skip_rule(_header(study[name]), DEFAULT_RULES) is None, name
    kept, skipped = select_images(
        [_header(study["soft"]), _header(study["localizer"])], DEFAULT_RULES
    )
    assert len(kept) == 1 and skipped[0][1] == "rule 'localizer'"
    with pytest.raises(Exception, match="every image matches rule 'dose report'"):
        select_images([_header(study["dose"])], DEFAULT_RULES)


def test_orientation_from_the_direction_cosines(study):
    assert orientation(_header(study["soft"])) == "AXIAL"
    assert orientation(_header(study["coronal"])) == "CORONAL"
    ds = _header(study["soft"])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    assert orientation(ds) == "SAGITTAL"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.7071, -0.7071]
    assert orientation(ds) == "OBLIQUE"
    del ds.ImageOrientationPatient
    assert orientation(ds) == ""


def test_the_axial_lung_kernel_series_is_chosen(study):
    candidates = [
        Candidate(_uid(study[n]), _header(study[n]), len(study[n]))
        for n in ("soft", "coronal", "lung", "localizer")
    ]
    assert choose_series(candidates, DEFAULT_RULES).series_uid == _uid(study["lung"])
    # without the lung series, axial beats the coronal reformat's lung kernel
    assert choose_series(
        [c for c in candidates if c.series_uid != _uid(study["lung"])], DEFAULT_RULES
    ).series_uid == _uid(study["soft"])


def test_rules_are_checked_when_read():
    with pytest.raises(RuleError, match="not a DICOM keyword"):
        rule("x", "skip", ImageTyp="*")
    with pytest.raises(RuleError, match="action"):
        rule("x", "drop", ImageType="*")
    with pytest.raises(RuleError, match="needs a name"):
        rule_from_table({"action": "skip", "ImageType": "*"}, "models[0].rules[0]")
    r = rule_from_table(
        {"name": "mpr", "action": "skip", "SeriesDescription": ["*MPR*", "*REFORMAT*"]}, "here"
    )
    ds = pydicom.Dataset()
    ds.SeriesDescription = "cor mpr 3 mm"  # case is ignored
    assert r.matches(ds)
    ds.SeriesDescription = "Thorax 1.0"
    assert not r.matches(ds)


def test_rules_in_the_config_replace_the_defaults(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(
        '[[models]]\nname = "ct"\nmodalities = ["CT"]\n'
        'rules = [ { name = "thick", action = "skip", SliceThickness = "5*" },\n'
        '          { name = "axial", action = "prefer", Orientation = "AXIAL" } ]\n'
    )
    (binding,) = load(path).models
    assert [r.name for r in binding.rules] == ["thick", "axial"]
    assert binding.one_series_per_study  # a CT model reads one series per study by default
    path.write_text(
        '[[models]]\nname = "ct"\nmodalities = ["CT"]\n'
        'rules = [ { name = "bad", action = "skip", NoSuchKeyword = "x" } ]\n'
    )
    with pytest.raises(ConfigError, match=r"models\[0\].rules\[0\].*NoSuchKeyword"):
        load(path)


# -- through the node, classify and select ---------------------------------------------


def test_the_node_analyses_the_chosen_series_and_says_why_it_skipped_the_others(
    study, start_node, tmp_path
):
    config = make_config(tmp_path, peers=(Peer("STORER", "127.0.0.1", 104),))
    node = start_node(replace(config, worker=replace(config.worker, ct_quiet_period_s=0.0)))
    for paths in study.values():
        statuses = scu.store(node.port, paths, calling="STORER")
        assert all(s.Status == 0 for s in statuses)
    node.run_pending()
    with node.db.read() as session:
        jobs = {
            uid: job
            for job, uid in session.execute(
                select(Job, Series.series_instance_uid).join(Series, Job.series_pk == Series.id)
            ).all()
        }
        results = session.execute(
            select(Result.label, Series.series_instance_uid).join(
                Series, Result.series_pk == Series.id
            )
        ).all()
    lung = _uid(study["lung"])
    assert jobs[lung].state is TaskState.DONE
    for name in ("soft", "coronal"):
        job = jobs[_uid(study[name])]
        assert job.state is TaskState.SKIPPED
        assert f"another series of the study was chosen: {lung} (axial, lung kernel)" in (
            job.last_error
        )
    assert "rule 'localizer'" in jobs[_uid(study["localizer"])].last_error
    assert "rule 'dose report'" in jobs[_uid(study["dose"])].last_error
    # one result for the study, and no "not analysed" report for what the rules left out
    assert [uid for _, uid in results] == [lung]


def test_classify_and_select_make_the_same_choice(study):
    files = [str(p) for paths in study.values() for p in paths]
    run = run_cli("classify", "--json", *files)
    assert run.returncode == 0, run.stderr
    records = {r["series"]: r for r in json.loads(run.stdout)["results"]}
    lung = _uid(study["lung"])
    assert "label" in records[lung]
    assert "another series of the study was chosen" in records[_uid(study["soft"])]["skipped"]
    assert "rule 'localizer'" in records[_uid(study["localizer"])]["skipped"]

    run = run_cli("select", *files)
    assert run.returncode == 0, run.stderr
    lines = {line.split(":")[0]: line for line in run.stdout.splitlines()}
    assert "analysed (prefers: axial, lung kernel)" in lines[str(study["lung"][0])]
    assert (
        "skipped by rule skip 'localizer' (ImageType *LOCALIZER*)"
        in (lines[str(study["localizer"][0])])
    )
    assert "series not analysed: another series" in lines[str(study["soft"][0])]
    assert "skipped by rule skip 'dose report'" in lines[str(study["dose"][0])]
