"""How far simple image statistics, with no disease in them, separate the CT classes.

Usage: ``python scripts/ct_confounds.py [DATA_DIR]`` (default ``../shared/data``). For every CT
image of the manifest it computes a few numbers that say nothing about COVID-19 (brightness of
the image centre, share of near-black pixels there, aspect ratio of the figure crop, overall
contrast) and prints each one's ROC AUC for COVID-19 vs not (folded to >= 0.5, so 0.5 = no
information). Anything well above 0.5 is a shortcut a CNN can take: the display window the
paper's authors chose, the shape of their figure crop.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import cv2
import numpy as np

from ai import metrics

FEATURES = {
    "centre brightness (mean of the central half)": lambda im, c: float(c.mean()),
    "share of near-black pixels in the centre (< 30 of 255)": lambda im, c: float((c < 30).mean()),
    "aspect ratio (width / height)": lambda im, c: im.shape[1] / im.shape[0],
    "contrast (standard deviation)": lambda im, c: float(im.std()),
}


def main(argv: list[str]) -> int:
    data = Path(argv[0]) if argv else Path(__file__).resolve().parents[2] / "shared" / "data"
    with (data / "manifest.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["task"] == "ct"]
    covid = np.array([r["label"] == "covid" for r in rows])
    values: dict[str, list[float]] = {name: [] for name in FEATURES}
    for r in rows:
        image = cv2.imread(str(data / r["file"]), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise SystemExit(f"{r['file']}: cannot be read")
        h, w = image.shape
        centre = image[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].astype(np.float32)
        for name, feature in FEATURES.items():
            values[name].append(feature(image.astype(np.float32), centre))
    print(f"{covid.sum()} COVID-19 and {(~covid).sum()} other CT images")
    print("| Statistic | AUC (folded) | COVID-19 mean | other mean |")
    print("|---|---:|---:|---:|")
    for name, v in values.items():
        x = np.array(v)
        auc = metrics.roc_auc(covid, x)
        print(
            f"| {name} | {max(auc, 1 - auc):.3f} | {x[covid].mean():.3f} | {x[~covid].mean():.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
