"""Run a model folder on real DICOM files the training data does not resemble, as the node would.

Usage: ``python scripts/probe_dicom.py MODEL_DIR [--series] FILE...``

Each file is classified on its own (``ai.analysis.analyse_datasets``, the node's path, with the
model's preprocessing); with ``--series`` the files are also scored together as one series (for
CT: the mean of the top 10 % of slices by P(covid)). Used for the failure-mode checks in the
model cards: adult chest X-rays without COVID-19, and real DICOM CT against the figure crops the
CT model was trained on.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pydicom  # noqa: E402

from ai import DISCLAIMER  # noqa: E402
from ai.analysis import analyse_datasets  # noqa: E402
from ai.errors import UnusableInputError  # noqa: E402
from ai.model import Classifier  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--series", action="store_true", help="also score all files as a series")
    args = parser.parse_args()
    classifier = Classifier(args.model_dir)
    names = [c.name for c in classifier.spec.classes]
    datasets = []
    for path in args.files:
        ds = pydicom.dcmread(path)
        try:
            p = analyse_datasets([ds], classifier).prediction
        except UnusableInputError as exc:
            print(f"{path.name}: not classified: {exc}")
            continue
        datasets.append(ds)
        probs = "  ".join(f"{n}={v:.3f}" for n, v in zip(names, p.probabilities, strict=True))
        print(f"{path.name[:60]}: {p.label.name}  ({probs})")
    if args.series and datasets:
        p = analyse_datasets(datasets, classifier).prediction
        probs = "  ".join(f"{n}={v:.3f}" for n, v in zip(names, p.probabilities, strict=True))
        print(f"series of {len(datasets)}: {p.label.name}  ({probs})")
    print(f"-- {DISCLAIMER}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
