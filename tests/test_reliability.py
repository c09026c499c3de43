"""Nothing lost: a full disk, hostile and broken input, many senders, patient data kept out of logs.

Each test does the damage for real: it fills the disk, sends the broken bytes over a real
association, or runs the node as a process and reads what it logged.
"""

from __future__ import annotations

import copy
import errno
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pacs_node import statuses
from storage.errors import OutOfSpaceError
from storage.files import FileStore
from storage.models import Instance, Job, Series, TaskState
from tests import scu
from tests.conftest import CR_CHEST, CT_SERIES, make_config
from tests.orthanc import free_port, wait_for

MB = 2**20


def _copy(path: Path, **changes: object) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    if "SOPInstanceUID" in changes:
        ds.file_meta.MediaStorageSOPInstanceUID = changes["SOPInstanceUID"]
    return ds


def _job_state(node, series_uid: str) -> tuple[TaskState, str]:
    with node.db.read() as session:
        job = session.scalars(
            select(Job)
            .join(Series)
            .where(Series.series_instance_uid == series_uid)
            .order_by(Job.id.desc())
        ).first()
        return job.state, job.last_error


def _instance_count(node) -> int:
    with node.db.read() as session:
        return session.scalar(select(func.count()).select_from(Instance))


# -- a full disk ------------------------------------------------------------------------------


def test_below_the_free_space_floor_store_is_refused_then_recovers(start_node, tmp_path):
    free_mb = shutil.disk_usage(tmp_path).free // MB
    if free_mb < 2000:
        pytest.skip("needs 2 GB free to fill and empty the disk safely")
    node = start_node(make_config(tmp_path, min_free_mb=free_mb - 300))
    assert scu.store(node.port, [CR_CHEST])[0].Status == statuses.SUCCESS
    filler = tmp_path / "filler.bin"
    with filler.open("wb") as fh:  # take real blocks, so the free space really drops
        os.posix_fallocate(fh.fileno(), 0, 600 * MB)
    try:
        second = _copy(CR_CHEST, SOPInstanceUID=generate_uid())
        answer = scu.store(node.port, [second])[0]
        assert answer.Status == statuses.OUT_OF_RESOURCES
        assert "below the floor" in answer.ErrorComment
        assert not list((node.files.root / "tmp").iterdir())
        assert not list(node.files.root.rglob(f"{second.SOPInstanceUID}.dcm"))
        assert _instance_count(node) == 1
    finally:
        filler.unlink()
    assert scu.store(node.port, [second])[0].Status == statuses.SUCCESS  # space is back
    assert _instance_count(node) == 2


def test_a_write_that_hits_enospc_leaves_nothing_behind(tmp_path):
    files = FileStore(tmp_path / "store")

    def write_to_full_device(fh) -> None:
        fh.write(b"DICM" * 100)
        with open("/dev/full", "wb") as full:  # the kernel's own "no space left" device
            full.write(b"x" * 4096)
            full.flush()

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with pytest.raises(OutOfSpaceError, match="storage is full"):
        files.write_atomic("instances/1/2/3.dcm", write_to_full_device)
    assert not list((files.root / "tmp").iterdir())
    assert not (files.root / "instances/1/2/3.dcm").exists()
    assert errno.ENOSPC == 28


# -- hostile and broken input -----------------------------------------------------------------


def test_truncated_files_get_an_answer_and_the_next_association_is_served(start_node, tmp_path):
    node = start_node()
    raw = CR_CHEST.read_bytes()
    header = pydicom.dcmread(CR_CHEST, stop_before_pixels=True)
    for cut in (len(raw) // 2, 900):  # inside the pixel data, and inside the header
        truncated = tmp_path / f"truncated_{cut}.dcm"
        truncated.write_bytes(raw[:cut])
        answer = scu.store(node.port, [truncated], raw=True)[0]
        if answer.Status == statuses.SUCCESS:  # the header decodes: stored, then skipped
            node.run_pending()
            state, reason = _job_state(node, str(header.SeriesInstanceUID))
            assert state == TaskState.SKIPPED and "cannot be decoded" in reason
        else:
            assert answer.Status in (
                statuses.CANNOT_UNDERSTAND,
                statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            )
            assert answer.ErrorComment
    assert scu.store(node.port, [CR_CHEST])[0].Status == statuses.SUCCESS


def test_sop_instance_uid_differing_from_the_request_is_refused(start_node, tmp_path):
    node = start_node()
    ds = pydicom.dcmread(CR_CHEST)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # the command will carry this
    liar = tmp_path / "liar.dcm"
    ds.save_as(liar)
    answer = scu.store(node.port, [liar], raw=True)[0]
    assert answer.Status == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert answer.ErrorComment == "SOPInstanceUID differs from the request's"
    assert _instance_count(node) == 0


@pytest.mark.parametrize(
    ("changes", "comment"),
    [
        ({"StudyInstanceUID": "1.2.3.4/../../../etc"}, "StudyInstanceUID is not a valid UID"),
        ({"SeriesInstanceUID": ".."}, "SeriesInstanceUID is not a valid UID"),
        ({"StudyInstanceUID": "1." * 40 + "1"}, "StudyInstanceUID is 81 characters long"),
    ],
    ids=["dotdot-study", "dotdot-series", "absurd-length"],
)
def test_uids_built_to_escape_the_storage_folder_are_refused(start_node, changes, comment):
    node = start_node()
    ds = _copy(CR_CHEST, **changes)
    answer = scu.store(node.port, [ds])[0]
    assert answer.Status == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert answer.ErrorComment.startswith(comment)
    outside = node.files.root.parent
    assert not [p for p in outside.rglob("*.dcm") if node.files.root not in p.parents]
    assert _instance_count(node) == 0


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"Rows": 4000}, "cannot be decoded"),  # pixel data shorter than Rows x Columns
        ({"Rows": 65535, "Columns": 65535, "NumberOfFrames": 60000}, "too large to decode"),
    ],
    ids=["short-pixel-data", "absurd-dimensions"],
)
def test_lying_image_headers_are_stored_and_skipped(start_node, changes, reason):
    node = start_node()
    ds = _copy(CR_CHEST, SOPInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(), **changes)
    assert scu.store(node.port, [ds])[0].Status == statuses.SUCCESS
    node.run_pending()
    state, error = _job_state(node, str(ds.SeriesInstanceUID))
    assert state == TaskState.SKIPPED
    assert reason in error


def test_the_same_instance_twice_is_stored_once_and_analysed_once(start_node):
    node = start_node()
    first = scu.store(node.port, [CR_CHEST])
    node.run_pending()
    again = scu.store(node.port, [CR_CHEST])
    node.run_pending()
    assert first[0].Status == again[0].Status == statuses.SUCCESS
    assert _instance_count(node) == 4  # the CR, its SR, its heatmap as SC and as PM
    with node.db.read() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1


def test_ten_senders_at_once_lose_nothing(start_node):
    node = start_node()
    template = pydicom.dcmread(CT_SERIES[0])
    study = generate_uid()
    sent: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def sender(n: int) -> None:
        try:
            series = generate_uid()
            batch = []
            for _ in range(10):
                ds = copy.deepcopy(template)
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                batch.append(ds)
            answers = scu.store(node.port, batch, calling=f"SENDER{n}")
            sent[n] = [
                str(d.SOPInstanceUID)
                for d, a in zip(batch, answers, strict=True)
                if a.Status == statuses.SUCCESS
            ]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and all(not t.is_alive() for t in threads)
    acknowledged = {uid for uids in sent.values() for uid in uids}
    assert len(acknowledged) == 100
    with node.db.read() as session:
        rows = session.scalars(select(Instance)).all()
    assert {r.sop_instance_uid for r in rows} == acknowledged
    for row in rows:
        assert pydicom.dcmread(node.files.abspath(row.path)).SOPInstanceUID == row.sop_instance_uid


# -- patient data stays out of the logs -------------------------------------------------------


def test_no_patient_name_or_id_in_any_log_line(tmp_path):
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nport = {port}\nstorage_dir = "data"\n')
    log_path = tmp_path / "node.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pacs_node.cli", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        wait_for(
            lambda: "listening on" in log_path.read_text(), timeout_s=120, what="the node to listen"
        )
        name, patient_id = "Zyxwvut^Qponmlk", "PID-8675309-ZQX"
        cr = _copy(CR_CHEST, PatientName=name, PatientID=patient_id)
        bad = _copy(
            CR_CHEST,
            PatientName=name,
            PatientID=patient_id,
            SOPInstanceUID=generate_uid(),
            SeriesInstanceUID=generate_uid(),
            Rows=4000,
        )
        assert [a.Status for a in scu.store(port, [cr, bad])] == [0, 0]
        scu.find(port, scu.query("STUDY", PatientName="Zyx*", PatientID=""))
        wait_for(lambda: "job 2" in log_path.read_text(), timeout_s=120, what="both jobs")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    text = log_path.read_text()
    assert "stored" in text and "C-FIND" in text  # the log does describe what happened
    for secret in ("Zyxwvut", "Qponmlk", "8675309"):
        assert secret not in text


def test_worker_round_survives_a_broken_job(start_node, tmp_path):
    config = make_config(tmp_path)
    node = start_node(replace(config, worker=replace(config.worker, max_attempts=2)))
    scu.store(node.port, [CR_CHEST])
    with node.db.read() as session:
        path = node.files.abspath(session.scalars(select(Instance.path)).one())
    path.write_bytes(b"not DICOM any more")  # the file rots on disk after it was acknowledged
    node.run_pending()
    state, reason = _job_state(node, str(pydicom.dcmread(CR_CHEST).SeriesInstanceUID))
    assert state == TaskState.SKIPPED and "no readable instance" in reason


def test_a_pixel_data_length_that_lies_is_refused_and_nothing_kept(start_node, tmp_path):
    """Issue 10: Pixel Data claiming 500,000,000 bytes with 4 KiB following was answered
    Success and an unreadable file kept."""
    node = start_node()
    ds = pydicom.dcmread(CR_CHEST)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    at = raw.find(b"\xe0\x7f\x10\x00OW")  # (7FE0,0010) OW, explicit VR little endian
    assert at > 0
    liar = tmp_path / "liar.dcm"
    liar.write_bytes(raw[: at + 8] + struct.pack("<I", 500_000_000) + raw[at + 12 : at + 12 + 4096])
    answer = scu.store(node.port, [liar], raw=True)[0]
    assert answer.Status == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert answer.ErrorComment == "PixelData declares 500000000 bytes, 4096 received"
    assert _instance_count(node) == 0
    assert not list((node.files.root / "instances").rglob("*.dcm"))
    assert scu.store(node.port, [CR_CHEST])[0].Status == statuses.SUCCESS  # and it goes on
