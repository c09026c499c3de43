"""The work role's cost per chest X-ray job against the raw model's forward pass, in one process.

    python benchmarks/jobs.py [--studies 60] [--rounds 3] [--profile out.prof]

Each round: *studies* CR studies (the shared CR with fresh UIDs) are stored into an in-process
node over C-STORE (no worker running), then the work role's loop runs every queued job (decode,
preprocess, forward pass, Grad-CAM, abstention, SR/SC/Parametric Map built, written, indexed and
owed to one peer). The peer in the same round: the shipped model's ONNX forward pass on the same
number of preprocessed images, one at a time. Reported: wall and CPU milliseconds per job, and
the ratio job / forward pass. ``--profile`` writes a cProfile of the jobs of the last round.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# as `pacs-node work` runs (pacs_node.cli): OpenBLAS threads spinning would double the CPU
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from benchmarks.burst import make_studies  # noqa: E402
from pacs_node.config import Peer  # noqa: E402
from pacs_node.node import Node  # noqa: E402
from storage.models import Job, TaskState  # noqa: E402
from tests import scu  # noqa: E402
from tests.conftest import CR_CHEST, make_config  # noqa: E402


def forward_ms(count: int) -> float:
    """The shipped CXR model alone: decode once, then *count* preprocess + forward passes."""
    from ai.analysis import read_dicom
    from ai.preprocess import batch, dicom_to_image
    from ai.runtime import load_runtime_classifier

    classifier = load_runtime_classifier("cxr", "onnx")
    spec = classifier.spec
    image = dicom_to_image(read_dicom(CR_CHEST), window=spec.window)
    x = batch([image], spec.input_size, spec.channels, spec.preprocessing)
    classifier.forward(x)  # warm
    started = time.perf_counter()
    for _ in range(count):
        classifier.forward(batch([image], spec.input_size, spec.channels, spec.preprocessing))
    return (time.perf_counter() - started) / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # the results are owed to a peer that is never reached (the send role does not run)
        peer = Peer(ae_title="PACS", host="127.0.0.1", port=9, send_results=True)
        node = Node(make_config(Path(tmp), peers=(peer,)))
        node.start(preload_models=True)
        try:
            rows = []
            for rnd in range(args.rounds):
                files = make_studies(Path(tmp) / f"in{rnd}", args.studies)  # the burst's
                answers = scu.store(node.port, files, calling="PACS")
                assert all(a.Status == 0 for a in answers)
                profiler = cProfile.Profile() if args.profile and rnd == args.rounds - 1 else None
                cpu0, wall0 = time.process_time(), time.perf_counter()
                if profiler:
                    profiler.enable()
                ran = node.worker.run_pending()
                if profiler:
                    profiler.disable()
                    profiler.dump_stats(args.profile)
                wall = (time.perf_counter() - wall0) / ran * 1000
                cpu = (time.process_time() - cpu0) / ran * 1000
                with node.db.read() as session:
                    done = session.query(Job).filter(Job.state == TaskState.DONE).count()
                assert done == args.studies * (rnd + 1), f"{done} jobs done"
                model = forward_ms(args.studies)
                rows.append((wall, cpu, model))
                print(
                    f"round {rnd + 1}: {ran} jobs, {wall:.1f} ms/job wall, {cpu:.1f} ms CPU; "
                    f"the model alone {model:.1f} ms/image: job/model {wall / model:.1f}x",
                    flush=True,
                )
            wall, cpu, model = (statistics.median(c) for c in zip(*rows, strict=True))
            print(
                f"median: {wall:.1f} ms/job wall ({cpu:.1f} CPU), model {model:.1f} ms/image, "
                f"{wall / model:.1f}x"
            )
        finally:
            node.stop()


if __name__ == "__main__":
    main()
