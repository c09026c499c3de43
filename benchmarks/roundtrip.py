"""Round trip through a real Orthanc: send a study, wait until its SR and heatmap are back.

    python benchmarks/roundtrip.py [--rounds 3]

For each round the CR chest X-ray and a CT series (the 30 real slices repeated to
``--ct-slices``, 64 by default) get fresh UIDs (so the node
analyses them anew), are uploaded to Orthanc and sent to the node. Reported per study: the time
from Orthanc's send to the SR and SC being in Orthanc, and, as the in-run reference that makes
numbers comparable across noisy machines, the time Orthanc's synchronous C-STORE itself took.
The node runs as ``pacs-node serve`` (its real processes, shipped models, the default poll interval,
1 s CT quiet period: the CT figure includes that wait, which is how the node decides today that
a CT series is complete).
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import CR_CHEST, CT_SERIES  # noqa: E402
from tests.orthanc import OrthancServer, free_port, wait_for  # noqa: E402
from tests.processes import NodeProcess  # noqa: E402

QUIET_S = 1.0


def fresh_copy(paths: list[Path], out: Path) -> tuple[str, list[Path]]:
    """Copies of *paths* as a new study and series; returns (StudyInstanceUID, files)."""
    study, series = generate_uid(), generate_uid()
    out.mkdir(parents=True)
    files = []
    for number, path in enumerate(paths, start=1):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        target = out / f"{number:04d}.dcm"
        ds.save_as(target)
        files.append(target)
    return study, files


STAGES = (
    "first received",
    "last received",
    "job queued",
    "job started",
    "job done",
    "delivery queued",
    "delivery started",
    "delivered",
)


def stage_times(db_path: Path, study_uid: str, epoch: float) -> list[float]:
    """Seconds after *epoch* (a ``time.time()``) of each of STAGES, from the node's database."""
    sql = """
        SELECT min(i.received_at), max(i.received_at), min(j.created_at), min(j.started_at),
               max(j.finished_at), min(d.created_at), min(d.started_at), max(d.finished_at)
        FROM studies s JOIN series se ON se.study_pk = s.id
        LEFT JOIN instances i ON i.series_pk = se.id AND NOT se.generated
        LEFT JOIN jobs j ON j.series_pk = se.id
        LEFT JOIN results r ON r.series_pk = se.id
        LEFT JOIN deliveries d ON d.instance_pk IN (
            SELECT i2.id FROM instances i2 JOIN series s2 ON i2.series_pk = s2.id
            WHERE s2.study_pk = s.id AND s2.generated)
        WHERE s.study_instance_uid = ?
    """
    with sqlite3.connect(db_path) as con:
        row = con.execute(sql, (study_uid,)).fetchone()
    return [
        datetime.fromisoformat(v).replace(tzinfo=UTC).timestamp() - epoch if v else float("nan")
        for v in row
    ]


def deliveries_pending(db_path: Path, study_uid: str) -> int:
    """Deliveries of *study_uid*'s results not yet finished (or not yet queued: -1)."""
    sql = """
        SELECT count(d.id), count(d.id) - count(d.finished_at)
        FROM deliveries d JOIN instances i ON d.instance_pk = i.id
        JOIN series se ON i.series_pk = se.id JOIN studies s ON se.study_pk = s.id
        WHERE s.study_instance_uid = ?
    """
    with sqlite3.connect(db_path) as con:
        total, pending = con.execute(sql, (study_uid,)).fetchone()
    return pending if total else -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--ct-slices",
        type=int,
        default=64,
        help="slices of the CT series (the 30 real ones, repeated)",
    )
    parser.add_argument(
        "--poll",
        type=float,
        default=0.2,
        help="worker.poll_interval_s (0.2 s, the default; the roles of one machine wake each "
        "other, so it only bounds a lost wake-up)",
    )
    parser.add_argument(
        "--no-parametric-map",
        action="store_true",
        help="worker.parametric_map = false (the heatmap as a secondary capture only)",
    )
    args = parser.parse_args()
    pm = "false" if args.no_parametric_map else "true"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        node_port = free_port()
        with OrthancServer(
            tmp / "orthanc", modalities={"AINODE": ("AINODE", "127.0.0.1", node_port)}
        ) as orthanc:
            (tmp / "node").mkdir()
            node = NodeProcess(
                tmp / "node",
                f'[node]\nport = {node_port}\nstorage_dir = "data"\naccept_unknown_peers = false\n'
                f'[[peers]]\nae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\n'
                f"port = {orthanc.dicom_port}\n"
                f"[worker]\npoll_interval_s = {args.poll}\nct_quiet_period_s = {QUIET_S}\n"
                f"parametric_map = {pm}\n",
            )
            node.start()
            db_path = tmp / "node" / "data" / "node.sqlite3"
            wait_for(lambda: "work role" in node.log(), timeout_s=120, what="models loaded")
            rows: dict[str, list[tuple[float, float]]] = {"CR": [], "CT": []}
            stages: dict[str, list[list[float]]] = {"CR": [], "CT": []}
            try:
                for r in range(args.rounds):
                    ct = [CT_SERIES[i % len(CT_SERIES)] for i in range(args.ct_slices)]
                    for kind, paths in (("CR", [CR_CHEST]), ("CT", ct)):
                        uid, files = fresh_copy(paths, tmp / f"{kind}{r}")
                        orthanc.upload_many(files)
                        study_id = orthanc.find_study_id(uid)
                        epoch, start = time.time(), time.monotonic()
                        orthanc.send_to_modality("AINODE", [study_id])
                        sent = time.monotonic() - start
                        wait_for(
                            lambda u=uid: {"SR", "OT"} <= set(orthanc.series_modalities(u)),
                            timeout_s=300,
                            interval_s=0.05,
                            what=f"{kind} results",
                        )
                        rows[kind].append((time.monotonic() - start, sent))
                        wait_for(
                            lambda u=uid: deliveries_pending(db_path, u) == 0,
                            timeout_s=60,
                            what="every delivery finished",
                        )
                        stages[kind].append(stage_times(db_path, uid, epoch))
                        times = stages[kind][-1]
                        print(
                            f"round {r + 1} {kind}: {rows[kind][-1][0]:.2f} s; job "
                            f"{times[4] - times[3]:.3f} s, delivery {times[7] - times[6]:.3f} s",
                            flush=True,
                        )
            finally:
                node.stop()
    print(
        f"{'study':6} {'round trip s':>13} {'C-STORE s':>10} {'ratio':>7}  (median of "
        f"{args.rounds}; the round trip ends when the SR and SC are in Orthanc)"
    )
    for kind, values in rows.items():
        total = statistics.median(v[0] for v in values)
        send = statistics.median(v[1] for v in values)
        print(f"{kind:6} {total:13.2f} {send:10.2f} {total / send:7.1f}")
    print("\nstages, seconds after Orthanc began sending (median):")
    print(f"{'':18}" + "".join(f"{kind:>8}" for kind in stages))
    for i, name in enumerate(STAGES):
        cells = "".join(f"{statistics.median(r[i] for r in v):8.3f}" for v in stages.values())
        print(f"{name:18}{cells}")
    after = statistics.median(v[0] - v[1] - QUIET_S for v in rows["CT"])
    print(
        f"CT: results in Orthanc {after:.2f} s after the series counted as complete (its last "
        f"slice acknowledged plus the {QUIET_S:.0f} s quiet period)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
