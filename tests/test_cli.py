"""The ``pacs-node`` command as a user runs it: help, serve, classify, status, bad config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests import scu
from tests.conftest import CR_CHEST, CT_SERIES, DICOM, SHARED_DATA
from tests.orthanc import free_port, wait_for

CLI = [sys.executable, "-m", "pacs_node.cli"]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


def test_help_lists_commands():
    run = run_cli("--help")
    assert run.returncode == 0
    for command in ("serve", "classify", "train", "status"):
        assert command in run.stdout
    assert "not for diagnostic use" in run.stdout
    serve = run_cli("serve", "--help")
    assert "AINODE" in serve.stdout and "--config" in serve.stdout


def test_bad_config_stops_startup_naming_the_key(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('[node]\nport = "eleven"\n')
    run = run_cli("serve", "--config", str(config))
    assert run.returncode == 2
    assert "node.port: expected a TCP port" in run.stderr


def test_serve_listens_answers_and_stops_cleanly(tmp_path):
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nport = {port}\nhost = "127.0.0.1"\nstorage_dir = "data"\n')
    proc = subprocess.Popen(
        [*CLI, "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        line = proc.stdout.readline()  # printed once the server is listening
        assert f"listening on 127.0.0.1:{port}" in line, proc.stderr.read() if proc.poll() else line
        assert scu.association_accepted(port, calling="ANYONE")
        assert scu.store(port, [CR_CHEST])[0].Status == 0
        db = tmp_path / "data" / "node.sqlite3"

        def result_listed() -> str | None:
            out = run_cli("status", "--config", str(config)).stdout
            return out if "latest results" in out else None

        status = wait_for(result_listed, timeout_s=120, what="a result")
        assert "jobs: queued 0, running 0, done 1" in status
        assert db.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_classify_dicom_and_jpeg_as_json():
    jpeg = next((SHARED_DATA / "cxr" / "covid").glob("*.jpg"))
    run = run_cli("classify", "--json", str(CR_CHEST), str(jpeg))
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["disclaimer"] == "AI-generated, not for diagnostic use"
    for record in out["results"]:
        assert record["label"] in {"covid", "pneumonia", "normal"}
        assert set(record["probabilities"]) == {"covid", "pneumonia", "normal"}
        assert abs(sum(record["probabilities"].values()) - 1) < 1e-3
        assert record["model"] and record["version"]


def test_classify_routes_a_ct_series_to_the_ct_model_with_one_result(tmp_path):
    """DICOM goes by Modality as in the node (--task says cxr here and is ignored for DICOM),
    grouped by series: one result for the 30 slices, with the slices that drove it, and the
    same SR and secondary captures the worker builds."""
    files = [str(p) for p in CT_SERIES]
    run = run_cli("classify", "--json", "--task", "cxr", "--output", str(tmp_path), *files)
    assert run.returncode == 0, run.stderr
    (record,) = json.loads(run.stdout)["results"]
    assert record["model"].startswith("ct-") and record["modality"] == "CT"
    assert len(record["files"]) == len(CT_SERIES) and record["most_likely"] in {"covid", "noncovid"}
    assert record["label"] == "indeterminate" and "real DICOM CT" in record["indeterminate"]
    assert 1 <= len(record["slices"]) <= 3 and all("probability" in s for s in record["slices"])
    sr = pydicom.dcmread(tmp_path / f"{CT_SERIES[0].stem}_sr.dcm")
    sc = pydicom.dcmread(tmp_path / f"{CT_SERIES[0].stem}_sc1.dcm")
    source = pydicom.dcmread(CT_SERIES[10], stop_before_pixels=True)
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == source.StudyInstanceUID
    assert len(sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
               .ReferencedSOPSequence) == len(CT_SERIES)  # fmt: skip
    assert sc.BurnedInAnnotation == "YES"
    text = run_cli("classify", *files)
    assert text.returncode == 0 and text.stdout.count("series ") == 1
    assert "(CT, 30 files)" in text.stdout and "slices that drove it" in text.stdout


def test_classify_reports_unusable_files_and_exits_nonzero(tmp_path):
    text = tmp_path / "note.txt"
    text.write_text("hello")
    missing = tmp_path / "gone.dcm"
    run = run_cli("classify", str(text), str(DICOM / "sr" / "dcmqi__sr.dcm"), str(missing))
    assert run.returncode == 1
    assert "gone.dcm: cannot classify: cannot read the file: No such file" in run.stdout
    assert "note.txt: cannot classify: note.txt: not a readable PNG or JPEG" in run.stdout
    assert "cannot classify: no model serves modality SR" in run.stdout


@pytest.mark.parametrize(
    "command", ["serve", "classify", "train", "fit-serving", "evaluate", "status", "retry"]
)
def test_each_subcommand_has_help(command):
    run = run_cli(command, "--help")
    assert run.returncode == 0 and "usage: pacs-node" in run.stdout


@pytest.mark.parametrize(
    ("fold", "message"),
    [("5/5", "cv_fold 5/5: need folds >= 2"), ("two", "--cv-fold 'two': expected I/K")],
)
def test_train_refuses_a_bad_cross_validation_fold(tmp_path, fold, message):
    run = run_cli(
        "train", "--task", "ct", "--data", str(SHARED_DATA), "--out", str(tmp_path / "m"),
        "--cv-fold", fold,
    )  # fmt: skip
    assert run.returncode == 2 and message in run.stderr
    assert not (tmp_path / "m").exists()
