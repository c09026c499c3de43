"""How far simple image statistics, with no disease in them, separate the classes.

Usage: ``python scripts/confounds.py [DATA_DIR]`` (default ``../shared/data``). For every image
of the manifest it computes numbers that say nothing about COVID-19 or pneumonia (aspect ratio
and size of the source image, brightness of its centre, contrast) and prints, per task and
question, each one's ROC AUC (folded to >= 0.5, so 0.5 = no information). Anything well above
0.5 is a shortcut a CNN can take: the source, the display window its authors chose, the shape of
a figure crop, the body of a child.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from ai import metrics

Feature = Callable[[np.ndarray, np.ndarray], float]
FEATURES: dict[str, Feature] = {
    "aspect ratio (width / height)": lambda im, c: im.shape[1] / im.shape[0],
    "pixels in the source image": lambda im, c: float(im.size),
    "centre brightness (mean of the central half)": lambda im, c: float(c.mean()),
    "contrast (standard deviation)": lambda im, c: float(im.std()),
}
# (task, positive class, negative class or None for "every other class")
QUESTIONS = (("cxr", "covid", None), ("cxr", "pneumonia", "normal"), ("ct", "covid", None))


def main(argv: list[str]) -> int:
    data = Path(argv[0]) if argv else Path(__file__).resolve().parents[2] / "shared" / "data"
    with (data / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    values: dict[str, list[float]] = {name: [] for name in FEATURES}
    for r in rows:
        image = cv2.imread(str(data / r["file"]), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise SystemExit(f"{r['file']}: cannot be read")
        h, w = image.shape
        grey = image.astype(np.float32)
        centre = grey[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
        for name, feature in FEATURES.items():
            values[name].append(feature(grey, centre))
    task = np.array([r["task"] for r in rows])
    label = np.array([r["label"] for r in rows])
    print("| Task | Question | Statistic | AUC (folded) | mean, positive | mean, negative |")
    print("|---|---|---|---:|---:|---:|")
    for t, pos, neg in QUESTIONS:
        keep = (task == t) & ((label == pos) | (label == neg) if neg else True)
        positive = label[keep] == pos
        question = f"{pos} vs {neg or 'not'} ({positive.sum()} / {(~positive).sum()})"
        for name, v in values.items():
            x = np.array(v)[keep]
            auc = metrics.roc_auc(positive, x)
            print(
                f"| {t} | {question} | {name} | {max(auc, 1 - auc):.3f} | "
                f"{x[positive].mean():.4g} | {x[~positive].mean():.4g} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
