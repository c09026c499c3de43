"""Does the model hold up away from its training data? The evaluation sections behind issue 8.

* **per source**: for each hospital or collection in the test split and the held-out source,
  COVID-19 sensitivity (sources with COVID-19 images) and specificity (sources with others) at
  the model's operating point, with patient-level bootstrap intervals;
* **operating point** on the test split, and **calibration** there before and after the
  temperature fitted on validation (with a reliability diagram);
* **abstention**: how often the model declines on in-distribution test images, on the held-out
  source, and on probes that are not frontal chest radiographs (CT slices and figure crops fed
  to the X-ray model, a leg radiograph, an MR slice, a photograph), and the reverse for CT.

Pure numbers from arrays; :mod:`ai.evaluate` reads the images and writes the report.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ai import calibration as cal
from ai import metrics as m
from ai.dataset import Sample, read_samples

# DICOM probes in the shared data's dicom/ folder (dicom/manifest_dicom.csv categories and
# files): what each model must not mistake for its own kind of image.
DICOM_PROBES = {
    "cxr": {
        "CT slices (DICOM, lung window)": ("ct_series/", "ct_covid_slices/"),
        "leg radiograph (CR)": ("compressed/pydicom_data__RG3_J2KR.dcm",),
        "MR, photograph, other images": (
            "compressed/pydicom_wheel__MR_small_RLE.dcm",
            "compressed/dwv__leadtools-flowers-16-mono2-rle.dcm",
            "compressed/pydicom_wheel__image_dfl.dcm",
        ),
    },
    "ct": {
        "real DICOM CT slices (what the node receives)": ("ct_series/", "ct_covid_slices/"),
        "chest radiographs (DICOM)": ("cxr/",),
        "leg radiograph (CR)": ("compressed/pydicom_data__RG3_J2KR.dcm",),
        "MR, photograph, other images": (
            "compressed/pydicom_wheel__MR_small_RLE.dcm",
            "compressed/dwv__leadtools-flowers-16-mono2-rle.dcm",
            "compressed/pydicom_wheel__image_dfl.dcm",
        ),
    },
}
# Image-file probes: the other task's images in the same data folders.
OTHER_TASK = {"cxr": ("ct", "CT slices (figure crops)"), "ct": ("cxr", "chest radiographs")}


def _rate(called: np.ndarray) -> float:
    return float(np.mean(called)) if len(called) else float("nan")


def rate_with_ci(
    called: np.ndarray, groups: Sequence[str], n_bootstrap: int, seed: int
) -> dict[str, Any]:
    """The share of True in *called*, with a bootstrap interval over patient *groups*."""
    called = np.asarray(called, dtype=bool)
    value = _rate(called)
    entry: dict[str, Any] = {"value": None if math.isnan(value) else value, "n": int(called.size)}
    if n_bootstrap > 0 and called.size:
        ci = m.bootstrap_ci(
            lambda rows: _rate(called[rows]), list(groups), n=n_bootstrap, seed=seed
        )
        entry.update(
            ci_low=None if math.isnan(ci.low) else ci.low,
            ci_high=None if math.isnan(ci.high) else ci.high,
        )
    return entry


def per_source(
    samples: Sequence[Sample],
    split_of: Sequence[str],
    y: np.ndarray,
    probs: np.ndarray,
    names: Sequence[str],
    positive: str,
    threshold: float | None,
    *,
    n_bootstrap: int,
    seed: int,
) -> list[dict[str, Any]]:
    """One row per (split, source): COVID-19 sensitivity and specificity at the operating point
    (``threshold``; arg-max without one) and 3-class accuracy."""
    pos = names.index(positive) if positive in names else None
    decided = cal.decide(probs, pos, threshold)
    rows = []
    keys = sorted({(split_of[i], s.source) for i, s in enumerate(samples)})
    for split, source in keys:
        idx = [i for i, s in enumerate(samples) if s.source == source and split_of[i] == split]
        yy, dd = y[idx], decided[idx]
        groups = [samples[i].group for i in idx]
        row: dict[str, Any] = {
            "split": split,
            "source": source,
            "images": len(idx),
            "patients": len(set(groups)),
            "labels": {n: int(np.sum(yy == k)) for k, n in enumerate(names) if np.any(yy == k)},
            "accuracy": rate_with_ci(dd == yy, groups, n_bootstrap, seed),
        }
        if pos is not None:
            is_pos = yy == pos
            if is_pos.any():
                sel = np.flatnonzero(is_pos)
                row["sensitivity"] = rate_with_ci(
                    dd[sel] == pos, [groups[i] for i in sel], n_bootstrap, seed
                )
            if (~is_pos).any():
                sel = np.flatnonzero(~is_pos)
                row["specificity"] = rate_with_ci(
                    dd[sel] != pos, [groups[i] for i in sel], n_bootstrap, seed
                )
        rows.append(row)
    return rows


def operating_point(
    y: np.ndarray,
    probs: np.ndarray,
    groups: Sequence[str],
    names: Sequence[str],
    positive: str,
    threshold: float | None,
    *,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """Sensitivity and specificity of the positive class at *threshold* on one split."""
    if positive not in names:
        return {}
    pos = names.index(positive)
    called = cal.decide(probs, pos, threshold) == pos
    truth = y == pos
    g = np.asarray(groups, dtype=object)
    out: dict[str, Any] = {"threshold": threshold, **m.two_by_two(truth, called)}
    out["sensitivity"] = rate_with_ci(called[truth], list(g[truth]), n_bootstrap, seed)
    out["specificity"] = rate_with_ci(~called[~truth], list(g[~truth]), n_bootstrap, seed)
    decided = cal.decide(probs, pos, threshold)
    cm = m.confusion_matrix(y, decided, len(names))
    out["macro_f1"] = m.macro_f1(cm)
    out["confusion_matrix"] = cm.tolist()
    return out


def probe_sets(
    task: str, data_dirs: Sequence[Path], labels_of: Mapping[str, Sequence[str]]
) -> dict[str, list[Path]]:
    """Files of kinds the *task* model was not built for, found in the data folders."""
    out: dict[str, list[Path]] = {}
    other, label = OTHER_TASK[task]
    try:
        images = read_samples(data_dirs, other, labels_of[other])
    except ValueError:
        images = []
    if images:
        out[label] = [s.path for s in images]
    for directory in data_dirs:
        listing = Path(directory) / "dicom" / "manifest_dicom.csv"
        if not listing.is_file():
            continue
        with listing.open(newline="") as fh:
            files = [r["file"] for r in csv.DictReader(fh)]
        for name, prefixes in DICOM_PROBES[task].items():
            found = [
                Path(directory) / "dicom" / f
                for f in files
                if any(f == p or (p.endswith("/") and f.startswith(p)) for p in prefixes)
            ]
            if found:
                out.setdefault(name, []).extend(found)
    return out


def abstention_rates(scores: Mapping[str, np.ndarray], threshold: float) -> dict[str, Any]:
    """The share of each set above the abstention *threshold*."""
    return {
        name: {
            "n": int(len(s)),
            "abstained": int(np.sum(s > threshold)),
            "rate": _rate(np.asarray(s) > threshold),
            "median_distance": float(np.median(s)) if len(s) else None,
        }
        for name, s in scores.items()
    }
