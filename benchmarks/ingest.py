"""Ingest: C-STORE of CT slices into the node's receive role, Orthanc and dcmtk's storescp.

    python benchmarks/ingest.py [--files 500] [--rounds 3] [--associations 1 4]

The same files (real CT slices from ../shared/data with fresh UIDs per round and target) are
sent by dcmtk's ``storescu`` (TCP_NODELAY=1) over one association, and split over four
associations at once, to each target in turn, rounds interleaved so that the machine's noise
falls on all of them alike. Reported: files per second per target (median of the rounds), the
node's ratio to each peer, and the receive role's peak RSS. The node runs as ``pacs-node
receive`` (its real process, SQLite on the same disk, Success only once file and rows are
durable), and as two receive processes sharing the port (``node.receive_processes = 2``);
Orthanc 1.10 from Debian with its default storage settings; storescp writing files; and a
pynetdicom SCP built as the node builds its AE (pacs_node/reactor.py's loops included) whose
C-STORE handler does nothing: the ceiling of the node's receive path on pynetdicom.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import CT_SERIES  # noqa: E402
from tests.orthanc import (  # noqa: E402
    DCMTK,
    OrthancServer,
    StoreScp,
    dcmtk_env,
    free_port,
)
from tests.processes import NodeProcess, peak_rss_mib  # noqa: E402


def make_files(out: Path, count: int) -> list[Path]:
    templates = [pydicom.dcmread(p) for p in CT_SERIES]
    study, series = generate_uid(), generate_uid()
    out.mkdir(parents=True)
    files = []
    for i in range(count):
        ds = copy.deepcopy(templates[i % len(templates)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = out / f"{i:05d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files


def storescu(port: int, called: str, files: list[Path], associations: int) -> float:
    """Seconds to store *files* over *associations* parallel storescu processes."""
    chunks = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [DCMTK["storescu"], "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port),
             *map(str, chunk)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


NOOP_SCP = """
import sys, threading
from pynetdicom import evt
from pacs_node.ae import build_scp, start_server
from pacs_node.config import Config, NodeSettings
ae = build_scp(Config(node=NodeSettings(port=int(sys.argv[1]))))
start_server(ae, ("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)])
print("listening", flush=True)
threading.Event().wait()
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        node_port = free_port()
        nodes = []
        pair_port = free_port()
        for i, (port, storage) in enumerate(
            [(node_port, "node"), (pair_port, "node-pair"), (pair_port, "node-pair")]
        ):
            (tmp / f"node-run{i}").mkdir()
            config = f'[node]\nport = {port}\nstorage_dir = "{tmp / storage}"\n'
            nodes.append(NodeProcess(tmp / f"node-run{i}", config, "receive"))
        orthanc = OrthancServer(tmp / "orthanc")
        storescp_dir = tmp / "storescp"
        times: dict[tuple[str, int], list[float]] = {}
        with orthanc, StoreScp(storescp_dir) as scp:
            for node in nodes:
                node.start()
            noop_port = free_port()
            noop = subprocess.Popen(
                [sys.executable, "-c", NOOP_SCP, str(noop_port)], stdout=subprocess.PIPE
            )
            assert noop.stdout is not None and noop.stdout.readline()
            targets = {
                "pynetdicom": (noop_port, "AINODE"),
                "node": (node_port, "AINODE"),
                "node x2": (pair_port, "AINODE"),
                "orthanc": (orthanc.dicom_port, orthanc.aet),
                "storescp": (scp.port, "STORESCP"),
            }
            for round_no in range(args.rounds):
                for n in args.associations:
                    for name, (port, called) in targets.items():
                        files = make_files(tmp / f"in-{round_no}-{n}-{name}", args.files)
                        seconds = storescu(port, called, files, n)
                        times.setdefault((name, n), []).append(seconds)
                        shutil.rmtree(files[0].parent)
                        print(
                            f"round {round_no + 1} {name:8s} {n} assoc: "
                            f"{args.files / seconds:7.1f} files/s",
                            flush=True,
                        )
            rss = max(peak_rss_mib(n.proc.pid) for n in nodes if n.proc is not None)
            for node in nodes:
                node.stop()
            noop.kill()
        print(f"\n{args.files} CT slices per run, median of {args.rounds} rounds")
        for n in args.associations:
            rate = {name: args.files / statistics.median(times[(name, n)]) for name in targets}
            print(
                f"{n} association(s): node {rate['node']:.0f} files/s (two receive processes "
                f"{rate['node x2']:.0f}), Orthanc {rate['orthanc']:.0f}, storescp "
                f"{rate['storescp']:.0f}; node/Orthanc {rate['node'] / rate['orthanc']:.2f}x "
                f"({rate['node x2'] / rate['orthanc']:.2f}x), node/storescp "
                f"{rate['node'] / rate['storescp']:.2f}x; a no-op pynetdicom SCP "
                f"{rate['pynetdicom']:.0f} (the ceiling of the node's pynetdicom receive path)"
            )
        print(f"receive role peak RSS: {rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
