"""A burst of chest X-ray studies: Orthanc sends them, the node analyses them, every SR and SC
arrives at a storescp. Compared with the pure transfer of the same objects.

    python benchmarks/burst.py [--studies 60] [--rounds 2]

Each round: *studies* CR studies (the shared CR chest radiograph with fresh UIDs) are uploaded
to Orthanc; Orthanc C-STOREs all of them to the node (one call, one association) and the clock
runs until every result (an SR and an SC per study) has arrived at a dcmtk ``storescp``. The
node runs as ``pacs-node serve`` with its shipped models. The reference, in the same round: the
same inputs sent by Orthanc to a storescp, plus the node's results sent by dcmtk's storescu to a
storescp: the time the transfers alone take. Ratio = transfer / node (1.0 would mean the
analysis costs nothing; the issue's target is >= 0.25).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import CR_CHEST  # noqa: E402
from tests.orthanc import DCMTK, OrthancServer, StoreScp, dcmtk_env, free_port  # noqa: E402
from tests.processes import NodeProcess, peak_rss_mib  # noqa: E402


def make_studies(out: Path, count: int) -> list[Path]:
    template = pydicom.dcmread(CR_CHEST)
    out.mkdir(parents=True)
    files = []
    for i in range(count):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        # another patient and study each time, as a real burst has
        ds.PatientName, ds.PatientID = f"Burst^Patient{i:03d}", f"BURST{i:05d}"
        ds.AccessionNumber = f"ACC{i:05d}"
        ds.StudyDate, ds.StudyTime = f"2026{1 + i % 12:02d}{1 + i % 28:02d}", f"{i % 24:02d}1500"
        path = out / f"cr{i:03d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def role_pids(node: NodeProcess) -> dict[str, int]:
    found = re.findall(r"(\S+) started \(pid (\d+)\)", node.log())
    return {name: int(pid) for name, pid in found}  # the latest pid of each role


def count_results(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.name.startswith(("SR", "SC", "OT")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep-log", metavar="FILE", help="write the node's log here")
    parser.add_argument(
        "--node-config",
        default="",
        metavar="TOML",
        help='more node config, e.g. "[worker]\\nprocesses = 2"',
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        node_port, results_port, reference_port = free_port(), free_port(), free_port()
        with (
            OrthancServer(
                tmp / "orthanc",
                modalities={
                    "AINODE": ("AINODE", "127.0.0.1", node_port),
                    "REFERENCE": ("STORESCP", "127.0.0.1", reference_port),
                },
            ) as orthanc,
            StoreScp(tmp / "results", results_port) as results,
            StoreScp(tmp / "reference", reference_port),
        ):
            (tmp / "node").mkdir()
            node = NodeProcess(
                tmp / "node",
                f'[node]\nport = {node_port}\nstorage_dir = "data"\naccept_unknown_peers = false\n'
                f'[[peers]]\nae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\n'
                f"port = {orthanc.dicom_port}\nsend_results = false\n"
                f'[[peers]]\nae_title = "RESULTS"\nhost = "127.0.0.1"\nport = {results_port}\n'
                '[delivery]\nalso_send_to = ["RESULTS"]\n' + args.node_config.replace("\\n", "\n"),
            )
            node.start()
            try:
                for r in range(args.rounds):
                    files = make_studies(tmp / f"in{r}", args.studies)
                    ids = [i["ID"] for i in orthanc.upload_many(files)]
                    before = count_results(results.out_dir)
                    pids = role_pids(node)
                    cpu_before = {name: cpu_s(pid) for name, pid in pids.items()}
                    start = time.perf_counter()
                    orthanc.send_to_modality("AINODE", ids, timeout_s=600)
                    sent_s = time.perf_counter() - start
                    deadline = start + 900
                    while count_results(results.out_dir) < before + 2 * args.studies:
                        if time.perf_counter() > deadline:
                            raise TimeoutError("results did not all arrive")
                        time.sleep(0.01)
                    node_s = time.perf_counter() - start
                    cpu = {name: cpu_s(pid) - cpu_before[name] for name, pid in pids.items()}
                    # the reference: the same transfers, with nothing in between
                    start = time.perf_counter()
                    orthanc.send_to_modality("REFERENCE", ids, timeout_s=600)
                    inputs_s = time.perf_counter() - start
                    generated = sorted(
                        p
                        for p in (tmp / "node" / "data" / "instances").rglob("*.dcm")
                        if p.stat().st_mtime >= 0
                    )
                    generated = [p for p in generated if _is_result(p)]
                    start = time.perf_counter()
                    sent = subprocess.run(
                        [DCMTK["storescu"], "-R", "-aec", "STORESCP", "127.0.0.1",
                         str(reference_port), *map(str, generated)],
                        env=dcmtk_env(), capture_output=True, text=True,
                    )  # fmt: skip
                    if sent.returncode != 0:
                        raise RuntimeError(f"storescu failed: {sent.stderr[-800:]}")
                    outputs_s = (time.perf_counter() - start) * (2 * args.studies) / len(generated)
                    rows.append((node_s, sent_s, inputs_s, outputs_s))
                    print(
                        f"round {r + 1}: node {node_s:.2f} s (inputs accepted in {sent_s:.2f} s); "
                        f"transfer alone {inputs_s:.2f} + {outputs_s:.2f} s; ratio "
                        f"{(inputs_s + outputs_s) / node_s:.3f}; CPU s by role: "
                        + ", ".join(f"{name} {seconds:.2f}" for name, seconds in cpu.items())
                        + "; peak RSS MiB by role: "
                        + ", ".join(
                            f"{name} {peak_rss_mib(pid):.0f}" for name, pid in pids.items()
                        ),
                        flush=True,
                    )
            finally:
                node.stop()
                if args.keep_log:
                    Path(args.keep_log).write_text(node.log())
    node_s = statistics.median(r[0] for r in rows)
    transfer_s = statistics.median(r[2] + r[3] for r in rows)
    print(
        f"\n{args.studies} CR studies, median of {len(rows)} rounds: all results at the "
        f"destination {node_s:.2f} s after Orthanc began sending ({args.studies / node_s:.1f} "
        f"studies/s); the transfers alone {transfer_s:.2f} s; ratio {transfer_s / node_s:.3f} "
        f"(target >= 0.25)"
    )
    return 0


def _is_result(path: Path) -> bool:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.get("Modality", "")) in ("SR", "OT", "SC")


if __name__ == "__main__":
    sys.exit(main())
