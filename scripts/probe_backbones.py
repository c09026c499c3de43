"""Linear probes of the pretrained EfficientNet-Lite backbones on the chest X-ray data (issue 8).

Does a bigger backbone (Lite1, Lite2) carry features that separate the classes better, and do
they carry *less* of the hospital? Fine-tuning each backbone takes 20-40 minutes per run on two
cores, a leave-one-source-out table five times that; a linear probe on frozen ImageNet features
answers the first question in minutes and says which backbone is worth fine-tuning.

For each backbone (at its own resolution and at 224 px): pooled features of every chest X-ray,
prepared exactly as the shipped model prepares them (``--preprocess``), cached in ``--cache``.
Then a multinomial logistic regression on standardised features, its L2 strength chosen on the
patient-disjoint validation split (the split ``pacs-node train`` makes, seed 0):

* validation and test macro-F1 and COVID-19 AUC (every source in training);
* leave one source out: trained on every other source (the held-out source's patients removed),
  the held-out source's sensitivity (COVID-19 images) or specificity (the others) for COVID-19
  called by argmax;
* "source probe": how well the same features tell the *source* apart among images of one class
  (balanced accuracy over sources, 5-fold by patient group): a lower value means less hospital
  in the features.

    python scripts/probe_backbones.py --data ../shared/data --out build/probe
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ai import backbones, metrics  # noqa: E402
from ai.dataset import Sample, make_splits, read_samples  # noqa: E402
from ai.preprocess import parse_options, read_inputs  # noqa: E402

LABELS = ("covid", "pneumonia", "normal")
COVID = 0


def cache_slug(options: dict) -> str:
    """The preprocessing *options* as part of a cache file's name."""
    return "_".join(f"{k}{'' if v is True else v}" for k, v in sorted(options.items())) or "none"


def features(
    variant: str, size: int, samples: list[Sample], options: dict, cache: Path
) -> np.ndarray:
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{variant}_{size}_{cache_slug(options)}.npz"
    files = [str(s.path) for s in samples]
    if path.is_file():
        saved = np.load(path, allow_pickle=False)
        if list(saved["files"]) == files:
            return saved["features"]
    import keras

    model = backbones.efficientnet_lite(variant, (size, size, 3), weights="imagenet", pooling="avg")
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(files), 32):
        x = read_inputs(files[i : i + 32], size, 3, options)
        out.append(np.asarray(model(x, training=False)))
    feats = np.concatenate(out).astype(np.float32)
    print(f"  {variant} at {size}px: {len(files)} images in {time.perf_counter() - t0:.0f} s")
    keras.backend.clear_session()
    np.savez(path, features=feats, files=np.array(files))
    return feats


def fit_logistic(x: np.ndarray, y: np.ndarray, n: int, l2: float, w: np.ndarray) -> np.ndarray:
    """Multinomial logistic regression, weighted samples, L2 on the weights (not the bias)."""
    from scipy.optimize import minimize

    d = x.shape[1]
    onehot = np.eye(n)[y]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W = theta[: d * n].reshape(d, n)
        b = theta[d * n :]
        z = x @ W + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        nll = -(w * np.log(np.clip((p * onehot).sum(1), 1e-12, None))).sum() / w.sum()
        g = (p - onehot) * w[:, None] / w.sum()
        gW = x.T @ g + l2 * W
        return nll + 0.5 * l2 * float((W * W).sum()), np.concatenate([gW.ravel(), g.sum(0)])

    res = minimize(loss, np.zeros(d * n + n), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return res.x


def predict(theta: np.ndarray, x: np.ndarray, n: int) -> np.ndarray:
    d = x.shape[1]
    z = x @ theta[: d * n].reshape(d, n) + theta[d * n :]
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def class_weights(y: np.ndarray, n: int) -> np.ndarray:
    counts = np.bincount(y, minlength=n).astype(float)
    return (len(y) / (n * np.maximum(counts, 1)))[y]


class Probe:
    def __init__(self, feats: np.ndarray, samples: list[Sample]):
        self.f = feats
        self.index = {s.path.resolve(): i for i, s in enumerate(samples)}

    def rows(self, part: list[Sample]) -> np.ndarray:
        return np.array([self.index[s.path.resolve()] for s in part], dtype=int)

    def train(self, train: list[Sample], val: list[Sample], n: int = 3, labels=LABELS):
        """Standardise on train, choose L2 on validation macro-F1; returns a predict function."""
        tr, va = self.rows(train), self.rows(val)
        mu, sd = self.f[tr].mean(0), self.f[tr].std(0) + 1e-6
        x_tr, x_va = (self.f[tr] - mu) / sd, (self.f[va] - mu) / sd
        y_tr = np.array([labels.index(s.label) for s in train])
        y_va = np.array([labels.index(s.label) for s in val])
        best = None
        for l2 in (1e-3, 1e-2, 1e-1, 1.0):
            theta = fit_logistic(x_tr, y_tr, n, l2, class_weights(y_tr, n))
            p = predict(theta, x_va, n)
            f1 = metrics.macro_f1(metrics.confusion_matrix(y_va, p.argmax(1), n))
            if best is None or f1 > best[0]:
                best = (f1, l2, theta)
        f1, l2, theta = best
        return (lambda part: predict(theta, (self.f[self.rows(part)] - mu) / sd, n)), f1, l2


def scores(probs: np.ndarray, part: list[Sample]) -> dict[str, float]:
    y = np.array([LABELS.index(s.label) for s in part])
    cm = metrics.confusion_matrix(y, probs.argmax(1), 3)
    return {
        "macro_f1": round(metrics.macro_f1(cm), 3),
        "covid_auc": round(metrics.roc_auc(y == COVID, probs[:, COVID]), 3),
    }


def loso(probe: Probe, samples: list[Sample], source: str, settings: dict) -> dict:
    splits = make_splits({**settings, "hold_out_source": source}, LABELS)
    predict_fn, _, _ = probe.train(splits["train"], splits["validation"])
    return held_out_rates(predict_fn(splits["held_out"]), splits["held_out"])


def held_out_rates(probs: np.ndarray, held: list[Sample], threshold: float | None = None) -> dict:
    """COVID-19 called by argmax (or where its probability reaches *threshold*) on a held-out
    source: its sensitivity (COVID-19 images) and specificity (the others), where it has images
    of each."""
    called = probs.argmax(1) == COVID if threshold is None else probs[:, COVID] >= threshold
    is_covid = np.array([s.label == "covid" for s in held])
    out: dict = {"n": len(held)}
    if is_covid.any():
        out["sensitivity"] = round(float(called[is_covid].mean()), 3)
    if (~is_covid).any():
        out["specificity"] = round(float((~called[~is_covid]).mean()), 3)
    return out


def source_probe(probe: Probe, samples: list[Sample]) -> float:
    """Balanced accuracy of telling the source from the features within one class (normal and
    pneumonia have two or more sources), 5-fold by patient group, mean over classes."""
    accs = []
    for label in LABELS:
        part = [s for s in samples if s.label == label]
        sources = sorted({s.source for s in part})
        if len(sources) < 2:
            continue
        groups = sorted({s.group for s in part})
        rng = np.random.default_rng(0)
        fold_of = dict(zip(groups, rng.permutation(len(groups)) % 5, strict=True))
        truth, guess = [], []
        for k in range(5):
            test = [s for s in part if fold_of[s.group] == k]
            train = [s for s in part if fold_of[s.group] != k]
            tr, te = probe.rows(train), probe.rows(test)
            mu, sd = probe.f[tr].mean(0), probe.f[tr].std(0) + 1e-6
            y_tr = np.array([sources.index(s.source) for s in train])
            theta = fit_logistic(
                (probe.f[tr] - mu) / sd, y_tr, len(sources), 1e-1, class_weights(y_tr, len(sources))
            )
            p = predict(theta, (probe.f[te] - mu) / sd, len(sources))
            truth += [sources.index(s.source) for s in test]
            guess += list(p.argmax(1))
        cm = metrics.confusion_matrix(np.array(truth), np.array(guess), len(sources))
        accs.append(float(np.mean(np.diag(cm) / np.maximum(cm.sum(1), 1))))
    return round(float(np.mean(accs)), 3)


def add_common_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "probe")
    ap.add_argument("--preprocess", default="square,crop=0.8,mask_border=0.06,clahe")


def prepare(data: Path) -> tuple[dict, list[Sample], list[str], dict[str, list[Sample]]]:
    """The split settings of ``pacs-node train`` (seed 0, stratified by source), every chest
    X-ray, their sources and the splits."""
    settings = {
        "task": "cxr",
        "data_dir": str(data),
        "seed": 0,
        "stratify": "source",
        "manifest": str(data / "manifest.csv"),
    }
    samples = read_samples([data], "cxr", LABELS, data / "manifest.csv")
    sources = sorted({s.source for s in samples})
    return settings, samples, sources, make_splits(settings, LABELS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(ap)
    ap.add_argument("--variants", default="lite0,lite1,lite2")
    ap.add_argument("--sizes", default="224,native")
    args = ap.parse_args()
    options = parse_options(args.preprocess)
    settings, samples, sources, splits = prepare(args.data)
    rows = []
    for name in args.variants.split(","):
        v = backbones.variant(name)
        sizes = [v.input_size if s == "native" else int(s) for s in args.sizes.split(",")]
        for size in dict.fromkeys(sizes):
            probe = Probe(features(name, size, samples, options, args.out / "features"), samples)
            predict_fn, val_f1, l2 = probe.train(splits["train"], splits["validation"])
            row = {
                "backbone": f"efficientnet_{name}",
                "size": size,
                "l2": l2,
                "validation": scores(predict_fn(splits["validation"]), splits["validation"]),
                "test": scores(predict_fn(splits["test"]), splits["test"]),
                "loso": {s: loso(probe, samples, s, settings) for s in sources},
                "source_probe_balanced_accuracy": source_probe(probe, samples),
            }
            rows.append(row)
            print(json.dumps(row))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe.json").write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows, sources, ("Backbone", "Size"), lambda r: (r["backbone"], r["size"]))


def print_table(rows: list[dict], sources: list[str], heads: tuple[str, ...], first) -> None:  # type: ignore[no-untyped-def]
    """The rows as a Markdown table: the *heads* columns (their values from *first*), then
    validation and test scores, each held-out source's rate and the source probe."""
    print(
        "\n| "
        + " | ".join(heads)
        + " | Val macro-F1 | Test macro-F1 | Test COVID AUC | "
        + " | ".join(f"LOSO {s}" for s in sources)
        + " | Source probe |"
    )
    print(
        "|---" + "|---:" * (len(heads) - 1) + "|---:|---:|---:|" + "---|" * len(sources) + "---:|"
    )
    for r in rows:
        cells = []
        for s in sources:
            d = r["loso"][s]
            cells.append(
                ", ".join(f"{k[:4]} {d[k]:.2f}" for k in ("sensitivity", "specificity") if k in d)
            )
        print(
            "| " + " | ".join(str(v) for v in first(r)) + " | "
            f"{r['validation']['macro_f1']:.3f} | "
            f"{r['test']['macro_f1']:.3f} | {r['test']['covid_auc']:.3f} | "
            + " | ".join(cells)
            + f" | {r['source_probe_balanced_accuracy']:.3f} |"
        )


if __name__ == "__main__":
    main()
