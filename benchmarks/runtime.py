"""Keras versus ONNX Runtime: prediction and Grad-CAM time for the shipped models.

    python benchmarks/runtime.py [--runs 30] [--threads N]

Both shipped models are exported into a temporary copy of their folders (the repository is not
written to). Inputs are real and preprocessed as the node does: for batch size 1 one chest X-ray
JPEG or one CT DICOM slice; for batch size 30 the 30-slice CT series (CT model) or 30 chest
X-ray JPEGs (CXR model). After warm-up, each measurement is the median of ``--runs`` timings,
with Keras and ONNX Runtime alternating in blocks of 5 so that both see the same machine load. The
machine is shared and noisy: compare the ONNX/Keras ratios within one run, not absolute times
across runs.

* predict: Keras ``model.predict_on_batch(x)`` against ``OnnxClassifier.predict(x)``;
* Grad-CAM: ``Classifier.heatmaps(x, c)`` (TensorFlow autodiff) against
  ``OnnxClassifier.heatmaps(x, c)`` (one ONNX pass and the closed form in numpy); both include
  their forward pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402

from ai.model import BUILTIN_DIR, Classifier  # noqa: E402
from ai.preprocess import batch, dicom_to_image, read_image_file  # noqa: E402
from ai.runtime import OnnxClassifier, default_threads, export_onnx  # noqa: E402
from tests.orthanc import SHARED_DATA  # noqa: E402

CT_SERIES = SHARED_DATA / "dicom" / "ct_series" / "lung_pet_ct_dx_A0002_B40f"


def real_images(task: str, window: tuple[float, float] | None, n: int) -> list[np.ndarray]:
    if task == "ct":
        slices = sorted(CT_SERIES.glob("*.dcm"))[:n]
        return [dicom_to_image(pydicom.dcmread(p), window=window) for p in slices]
    folders = sorted(p for p in (SHARED_DATA / "cxr").iterdir() if p.is_dir())
    files = [f for i in range(n) for f in sorted(folders[i % 3].glob("*.jpg"))[i // 3 : i // 3 + 1]]
    return [read_image_file(f) for f in files[:n]]


def paired_medians(
    a: Callable[[], object], b: Callable[[], object], runs: int, block: int = 5
) -> tuple[float, float]:
    """Median seconds of *a* and of *b* over *runs* timed calls each, in alternating blocks of
    *block* calls (a-block, b-block, ...) so that both see the same machine load. Each block
    starts with an untimed call after a short pause: TensorFlow's and ONNX Runtime's worker
    threads keep spinning for a while after a call and would slow the other runtime's first one.
    """
    ta: list[float] = []
    tb: list[float] = []
    while len(ta) < runs:
        for fn, out in ((a, ta), (b, tb)):
            time.sleep(0.05)
            fn()
            for _ in range(min(block, runs - len(out))):
                start = time.perf_counter()
                fn()
                out.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per cell (median)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()

    import keras
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    threads = args.threads or default_threads()
    print(
        f"tensorflow {tf.__version__}, keras {keras.__version__}, tf2onnx {tf2onnx.__version__}, "
        f"onnxruntime {onnxruntime.__version__}; ONNX Runtime intra-op threads {threads}, "
        f"CPUs available {len(os.sched_getaffinity(0))}; median of {args.runs} runs"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        for task in ("cxr", "ct"):
            directory = Path(tmp_name) / task
            shutil.copytree(BUILTIN_DIR / task, directory)
            start = time.perf_counter()
            export_onnx(directory)
            export_s = time.perf_counter() - start
            k = Classifier(directory)
            o = OnnxClassifier(directory, threads=threads)
            spec = k.spec
            images = real_images(task, spec.window, 30)
            positive = spec.class_index(spec.positive_class)
            for n in (1, 30):
                x = batch(images[:n], spec.input_size, spec.channels)
                c = np.full(n, positive)
                kp, op = paired_medians(
                    partial(k.model.predict_on_batch, x), partial(o.predict, x), args.runs
                )
                kg, og = paired_medians(
                    partial(k.heatmaps, x, c), partial(o.heatmaps, x, c), args.runs
                )
                diff = float(np.abs(k.predict(x) - o.predict(x)).max())
                rows.append((spec.name, n, kp, op, kg, og, diff, export_s))

    header = (
        f"{'model':<14} {'batch':>5} | {'predict ms':>10} {'':>8} {'ONNX/':>6} | "
        f"{'Grad-CAM ms':>11} {'':>8} {'ONNX/':>6} | {'max |dp|':>8} {'export s':>8}"
    )
    sub = (
        f"{'':<14} {'':>5} | {'Keras':>10} {'ONNX':>8} {'Keras':>6} | "
        f"{'TF':>11} {'ONNX':>8} {'TF':>6} |"
    )
    print()
    print(header)
    print(sub)
    print("-" * len(header))
    for name, n, kp, op, kg, og, diff, export_s in rows:
        print(
            f"{name:<14} {n:>5} | {kp * 1e3:>10.2f} {op * 1e3:>8.2f} {op / kp:>6.2f} | "
            f"{kg * 1e3:>11.2f} {og * 1e3:>8.2f} {og / kg:>6.2f} | {diff:>8.1e} {export_s:>8.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
