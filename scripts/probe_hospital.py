"""Remove the hospital from frozen features, then probe again (issue 8).

Every fine-tuned and frozen model so far tells the hospital apart within one class (the "source
probe" of ``probe_backbones.py``: 0.71-0.74 balanced accuracy, chance 0.5), and its leave-one-
source-out rows are poor. This asks whether taking out the directions that carry the hospital
helps a model on a hospital it never saw, before spending hours of fine-tuning on the idea.

The method is iterative nullspace projection (Ravfogel et al., 2020), aimed at what is purely
hospital: among images *of the same class*, a linear classifier of the source is fitted, its
weight directions are projected out of the features, and again, ``k`` times. What separates,
say, NIH's normal films from the teaching set's normal films is not the diagnosis, so it can go
without taking the diagnosis with it (a direction that separates whole classes is never fitted).
Then the same logistic regression as ``probe_backbones.py`` (L2 chosen on validation).

Everything is fitted on the training split of each fold only: the held-out source takes no part
in the projection, the standardisation or the choice of L2. Reported per ``k``: validation and
test macro-F1 (all sources seen), each held-out source's sensitivity or specificity for COVID-19
called by argmax, and the source probe after the projection.

    python scripts/probe_hospital.py --data ../shared/data --out build/probe
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from probe_backbones import (  # noqa: E402
    LABELS,
    Probe,
    add_common_arguments,
    class_weights,
    features,
    fit_logistic,
    held_out_rates,
    loso,
    parse_options,
    prepare,
    print_table,
    scores,
)

from ai import metrics  # noqa: E402
from ai.dataset import Sample, make_splits  # noqa: E402


def hospital_directions(x: np.ndarray, part: list[Sample], k: int) -> np.ndarray:
    """An orthonormal basis (d x m) of the directions that tell the source apart within a
    class, found *k* rounds deep on *x* (standardised rows of *part*)."""
    d = x.shape[1]
    basis = np.zeros((d, 0))
    for _ in range(k):
        proj = x - (x @ basis) @ basis.T
        found = []
        for label in LABELS:
            rows = [i for i, s in enumerate(part) if s.label == label]
            sources = sorted({part[i].source for i in rows})
            if len(sources) < 2:
                continue
            y = np.array([sources.index(part[i].source) for i in rows])
            n = len(sources)
            theta = fit_logistic(proj[rows], y, n, 1e-1, class_weights(y, n))
            weights = theta[: d * n].reshape(d, n)
            found.append(weights - weights.mean(1, keepdims=True))  # n - 1 directions
        if not found:
            break
        new = np.concatenate(found, axis=1)
        new -= basis @ (basis.T @ new)
        u, sv, _ = np.linalg.svd(new, full_matrices=False)
        basis = np.concatenate([basis, u[:, sv > 1e-6 * sv.max()]], axis=1)
    return basis


class ProjectedProbe(Probe):
    """:class:`Probe` whose standardised features lose the hospital directions of the
    training split before the logistic regression."""

    def __init__(self, feats: np.ndarray, samples: list[Sample], k: int):
        super().__init__(feats, samples)
        self.k = k
        self.raw = feats

    def train(self, train, val, n=3, labels=LABELS):  # type: ignore[no-untyped-def]
        tr = self.rows(train)
        mu, sd = self.raw[tr].mean(0), self.raw[tr].std(0) + 1e-6
        basis = hospital_directions((self.raw[tr] - mu) / sd, train, self.k)
        z = (self.raw - mu) / sd
        self.f = z - (z @ basis) @ basis.T
        self.dims_removed = basis.shape[1]
        return super().train(train, val, n, labels)


def source_probe_held_out(feats: np.ndarray, samples: list[Sample], k: int) -> float:
    """The source probe of ``probe_backbones.py`` (balanced accuracy of the source within a
    class, 5-fold by patient group, mean over classes) with the projection fitted, like the
    source classifier, on each fold's training part only: the same number measured on the
    projection's own training images is meaningless (it falls below chance)."""
    groups = sorted({s.group for s in samples})
    rng = np.random.default_rng(0)
    fold_of = dict(zip(groups, rng.permutation(len(groups)) % 5, strict=True))
    truth: dict[str, list[int]] = {label: [] for label in LABELS}
    guess: dict[str, list[int]] = {label: [] for label in LABELS}
    for fold in range(5):
        train = [s for s in samples if fold_of[s.group] != fold]
        probe = Probe(feats, samples)  # for its rows(); the projection is fitted here
        tr = probe.rows(train)
        mu, sd = feats[tr].mean(0), feats[tr].std(0) + 1e-6
        z = (feats - mu) / sd
        basis = hospital_directions(z[tr], train, k)
        z = z - (z @ basis) @ basis.T
        for label in LABELS:
            part = [s for s in samples if s.label == label]
            sources = sorted({s.source for s in part})
            if len(sources) < 2:
                continue
            fit = [s for s in part if fold_of[s.group] != fold]
            test = [s for s in part if fold_of[s.group] == fold]
            y = np.array([sources.index(s.source) for s in fit])
            n = len(sources)
            theta = fit_logistic(z[probe.rows(fit)], y, n, 1e-1, class_weights(y, n))
            d = z.shape[1]
            logits = z[probe.rows(test)] @ theta[: d * n].reshape(d, n) + theta[d * n :]
            truth[label] += [sources.index(s.source) for s in test]
            guess[label] += list(logits.argmax(1))
    accs = []
    for label in LABELS:
        if not truth[label]:
            continue
        n = max(truth[label]) + 1
        cm = metrics.confusion_matrix(np.array(truth[label]), np.array(guess[label]), n)
        accs.append(float(np.mean(np.diag(cm) / np.maximum(cm.sum(1), 1))))
    return round(float(np.mean(accs)), 3)


def nested_loso(feats: np.ndarray, samples: list[Sample], settings: dict, grid: list[int]) -> dict:
    """Leave one source out with *k* chosen without the held-out source: for each candidate k,
    every other source is held out in turn from the rest (the outer source excluded as well),
    and the k with the best mean held-out rate is the one used on the outer source."""
    sources = sorted({s.source for s in samples})
    out = {}
    for outer in sources:
        inner_mean = {}
        for k in grid:
            rates = []
            for inner in (s for s in sources if s != outer):
                split = make_splits(
                    {**settings, "hold_out_source": inner, "exclude_sources": [outer]}, LABELS
                )
                predict_fn, _, _ = ProjectedProbe(feats, samples, k).train(
                    split["train"], split["validation"]
                )
                held = held_out_rates(predict_fn(split["held_out"]), split["held_out"])
                rates += [held[key] for key in ("sensitivity", "specificity") if key in held]
            inner_mean[k] = round(float(np.mean(rates)), 3)
        best = max(grid, key=lambda k: (inner_mean[k], -k))
        row = loso(ProjectedProbe(feats, samples, best), samples, outer, settings)
        out[outer] = {"k": best, "inner_mean_rate": inner_mean, **row}
        print(json.dumps({"outer": outer, **out[outer]}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(ap)
    ap.add_argument("--variant", default="lite0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", default="0,1,2,5,10,20")
    ap.add_argument(
        "--nested",
        default="",
        help="k values to choose from by nested leave-one-source-out (e.g. 0,5,10); "
        "then only that is run",
    )
    args = ap.parse_args()
    options = parse_options(args.preprocess)
    settings, samples, sources, splits = prepare(args.data)
    feats = features(args.variant, args.size, samples, options, args.out / "features")
    if args.nested:
        grid = [int(v) for v in args.nested.split(",")]
        result = nested_loso(feats, samples, settings, grid)
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"hospital_nested_{args.variant}_{args.size}.json"
        (args.out / name).write_text(json.dumps(result, indent=1) + "\n")
        return
    rows = []
    for k in (int(v) for v in args.rounds.split(",")):
        probe = ProjectedProbe(feats, samples, k)
        predict_fn, _, l2 = probe.train(splits["train"], splits["validation"])
        row = {
            "k": k,
            "dims_removed": probe.dims_removed,
            "l2": l2,
            "validation": scores(predict_fn(splits["validation"]), splits["validation"]),
            "test": scores(predict_fn(splits["test"]), splits["test"]),
            "source_probe_balanced_accuracy": source_probe_held_out(feats, samples, k),
            "loso": {
                s: loso(ProjectedProbe(feats, samples, k), samples, s, settings) for s in sources
            },
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"hospital_{args.variant}_{args.size}.json"
    (args.out / name).write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows, sources, ("Rounds k", "Dims removed"), lambda r: (r["k"], r["dims_removed"]))


if __name__ == "__main__":
    main()
