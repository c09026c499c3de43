"""Building and encoding the results of one analysis: filled from a template against highdicom.

    python benchmarks/results.py [--rounds 30] [--source FILE]

The shipped chest X-ray model analyses a radiograph (the shared CR by default) once; then,
rounds interleaved, its SR, secondary capture and Parametric Map are built and encoded to bytes
(what the worker writes) the node's way (``ai.results.build_results``: each object filled in from
the bytes of the first of its shape, :mod:`ai.templates`) and highdicom's way (the same builders
with ``use_template=False``, encoded by pydicom). Each round is a new study of the same shape
(new UIDs and patient). Prints the median time of each and the ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ai.analysis import analyse_datasets  # noqa: E402
from ai.outputs import (  # noqa: E402
    Region,
    build_pm,
    build_sc,
    build_sr,
    hot_spot,
    overlay_lines,
    render_overlay,
)
from ai.results import build_results  # noqa: E402
from ai.runtime import load_runtime_classifier  # noqa: E402
from ai.templates import encoded  # noqa: E402
from tests.conftest import CR_CHEST  # noqa: E402


def highdicom_way(analysis, source) -> list[bytes]:  # type: ignore[no-untyped-def]
    """The same three objects, built by highdicom and encoded by pydicom."""
    prediction = analysis.prediction
    item = analysis.explained[0]
    box = hot_spot(item.heatmap)
    kwargs = dict(series_instance_uid=generate_uid(), software_version="bench")
    sr = build_sr(
        [source], prediction, sop_instance_uid=generate_uid(), use_template=False,
        regions=[Region(source, box)] if box else [], **kwargs,
    )  # fmt: skip
    overlay = render_overlay(item.image, item.heatmap, overlay_lines(prediction))
    sc = build_sc(
        source, overlay, prediction, sop_instance_uid=generate_uid(), use_template=False, **kwargs
    )
    pm = build_pm(
        source, item.heatmap, prediction, sop_instance_uid=generate_uid(), use_template=False,
        **kwargs,
    )  # fmt: skip
    return [encoded(ds) for ds in (sr, sc, pm)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--source", type=Path, default=CR_CHEST)
    args = parser.parse_args()
    template = pydicom.dcmread(args.source)
    classifier = load_runtime_classifier("cxr")
    node_s, highdicom_s = [], []
    for r in range(args.rounds + 2):  # the first two make and check the templates
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID = f"Bench^Patient{r}", f"B{r:04d}"
        analysis = analyse_datasets([ds], classifier)
        start = time.perf_counter()
        files = [encoded(o) for o in build_results(analysis, software_version="bench")]
        mid = time.perf_counter()
        theirs = highdicom_way(analysis, ds)
        end = time.perf_counter()
        assert len(files) == len(theirs) == 3
        if r >= 2:
            node_s.append(mid - start)
            highdicom_s.append(end - mid)
    node, peer = statistics.median(node_s), statistics.median(highdicom_s)
    print(
        f"SR + SC + Parametric Map of one CR, median of {args.rounds}: node {1000 * node:.1f} ms, "
        f"highdicom + pydicom {1000 * peer:.1f} ms (overlay included in both); "
        f"{peer / node:.1f}x faster"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
