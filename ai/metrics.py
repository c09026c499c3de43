"""Classification metrics and patient-level bootstrap intervals, in plain numpy.

Conventions:

* labels are class indices ``0..K-1``; probabilities have shape ``(N, K)``;
* a metric whose denominator is zero (e.g. precision of a class never predicted, AUC when one
  side is absent) is ``nan``, never an exception; F1 is ``2TP / (2TP + FP + FN)``, so it is
  ``nan`` only for a class absent from both the truth and the predictions;
* macro averages skip ``nan`` classes;
* bootstrap intervals resample whole patient groups (clusters) with replacement, never single
  images, so images of one patient move together; resamples where a metric is undefined are
  left out of that metric's interval (their count is reported as ``n_valid``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15
BOOTSTRAP_N = 1000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95


# ------------------------------------------------------------------------ confusion-based


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``cm[true, predicted]``, shape ``(K, K)``."""
    t = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape} vs {p.shape}")
    flat = np.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _div(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall (= sensitivity), specificity, F1 and support."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "support": cm.sum(axis=1),
    }


def accuracy(cm: np.ndarray) -> float:
    total = float(np.sum(cm))
    return float(np.trace(cm)) / total if total > 0 else float("nan")


def _nanmean(values: np.ndarray) -> float:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if finite.size else float("nan")


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 over the classes present (truth or prediction)."""
    return _nanmean(per_class(cm)["f1"])


# ------------------------------------------------------------------------------ ranking


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_rank = ends - (counts - 1) / 2.0
    return mean_rank[inverse]


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count 1/2); ``nan`` if a side is empty."""
    pos = np.asarray(positive, dtype=bool).reshape(-1)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(scores)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc_ovr(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC of each class, shape ``(K,)``."""
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    return np.array([roc_auc(y == k, p[:, k]) for k in range(p.shape[1])])


def macro_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    return _nanmean(roc_auc_ovr(y_true, probs))


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1).

    Tied scores form one step (a diagonal segment), matching :func:`roc_auc`.
    """
    pos = np.asarray(positive, dtype=bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]) * np.nan
    order = np.argsort(-s, kind="stable")
    s, pos = s[order], pos[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tps = np.cumsum(pos)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


# --------------------------------------------------------------------------- calibration


def expected_calibration_error(
    y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """ECE on the top-class probability: equal-width bins ``(i/n, (i+1)/n]``, weighted by count."""
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if y.size == 0:
        return float("nan")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    return float(np.abs(acc_sum - conf_sum).sum() / y.size)


# ------------------------------------------------------------------------ binary view


def two_by_two(truth: np.ndarray, called: np.ndarray) -> dict[str, int]:
    """``tp``, ``fp``, ``tn``, ``fn`` of boolean *called* against boolean *truth*."""
    t, c = np.asarray(truth, dtype=bool), np.asarray(called, dtype=bool)
    return {
        "tp": int(np.sum(t & c)),
        "fp": int(np.sum(~t & c)),
        "tn": int(np.sum(~t & ~c)),
        "fn": int(np.sum(t & ~c)),
    }


def binary_view(y_true: np.ndarray, probs: np.ndarray, positive: int) -> dict[str, float]:
    """Class *positive* versus all others, from the multi-class output.

    A case is called positive when *positive* is its most probable class (the label the node
    reports); the AUC ranks cases by ``P(positive)``.
    """
    y = np.asarray(y_true).reshape(-1) == positive
    p = np.asarray(probs, dtype=np.float64)
    counts = two_by_two(y, p.argmax(axis=1) == positive)
    tp, fp, tn, fn = (counts[k] for k in ("tp", "fp", "tn", "fn"))
    return {
        "sensitivity": _div(tp, tp + fn),
        "specificity": _div(tn, tn + fp),
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "auc": roc_auc(y, p[:, positive]),
        **counts,
    }


def pair_view(
    y_true: np.ndarray, probs: np.ndarray, positive: int, negative: int
) -> dict[str, float]:
    """Class *positive* versus class *negative*, on the cases that are truly one of the two.

    The question the research answered with a separate binary model ("normal vs pneumonia"),
    asked of the multi-class output: the score is ``P(positive) / (P(positive) + P(negative))``
    and a case is called positive when it is at least 0.5. Cases of any other class are left
    out, whatever the model called them.
    """
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    keep = (y == positive) | (y == negative)
    truth = y[keep] == positive
    both = p[keep][:, positive] + p[keep][:, negative]
    score = np.divide(p[keep][:, positive], both, out=np.full(both.shape, 0.5), where=both > 0)
    counts = two_by_two(truth, score >= 0.5)
    tp, fp, tn, fn = (counts[k] for k in ("tp", "fp", "tn", "fn"))
    return {
        "accuracy": _div(tp + tn, tp + tn + fp + fn),
        "sensitivity": _div(tp, tp + fn),
        "specificity": _div(tn, tn + fp),
        "auc": roc_auc(truth, score),
        **counts,
    }


# ---------------------------------------------------------------------- all point metrics


def point_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    positive: int | None,
    pair: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Every scalar metric, flat: ``accuracy``, ``covid/f1``, ``binary/auc``, ``pair/auc``..."""
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    cm = confusion_matrix(y, p.argmax(axis=1), len(class_names))
    out: dict[str, float] = {
        "accuracy": accuracy(cm),
        "macro_f1": macro_f1(cm),
        "macro_auc": macro_auc(y, p),
        "ece": expected_calibration_error(y, p),
    }
    stats = per_class(cm)
    aucs = roc_auc_ovr(y, p)
    for k, name in enumerate(class_names):
        for metric in ("precision", "recall", "specificity", "f1"):
            out[f"{name}/{metric}"] = float(stats[metric][k])
        out[f"{name}/auc"] = float(aucs[k])
    if positive is not None:
        view = binary_view(y, p, positive)
        for metric in ("sensitivity", "specificity", "ppv", "npv", "auc"):
            out[f"binary/{metric}"] = view[metric]
    if pair is not None:
        two = pair_view(y, p, *pair)
        for metric in ("accuracy", "sensitivity", "specificity", "auc"):
            out[f"pair/{metric}"] = two[metric]
    return out


# ---------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval; ``n_valid`` resamples had the metric defined."""

    low: float
    high: float
    n_valid: int


def group_rows(groups: Sequence[Hashable]) -> list[np.ndarray]:
    """Row indices of each distinct group, in order of first appearance."""
    index: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    return [np.array(rows, dtype=np.int64) for rows in index.values()]


def resample_groups(
    groups: Sequence[Hashable], n: int = BOOTSTRAP_N, seed: int = BOOTSTRAP_SEED
) -> Iterator[np.ndarray]:
    """*n* resamples of row indices: as many groups as there are, drawn with replacement."""
    clusters = group_rows(groups)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        picks = rng.integers(0, len(clusters), size=len(clusters))
        yield np.concatenate([clusters[i] for i in picks])


def percentile_interval(values: Sequence[float], level: float = CI_LEVEL) -> Interval:
    """The central *level* percentile interval of the finite *values* (``nan`` if none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Interval(float("nan"), float("nan"), 0)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(v, [tail, 100.0 - tail])
    return Interval(float(low), float(high), int(v.size))


def bootstrap_many(
    statistic: Callable[[np.ndarray], Mapping[str, float]],
    groups: Sequence[Hashable],
    *,
    n: int = BOOTSTRAP_N,
    seed: int = BOOTSTRAP_SEED,
    level: float = CI_LEVEL,
) -> dict[str, Interval]:
    """Intervals for every metric *statistic* returns, given the row indices of a resample."""
    draws: dict[str, list[float]] = {}
    for rows in resample_groups(groups, n, seed):
        for key, value in statistic(rows).items():
            draws.setdefault(key, []).append(float(value))
    return {key: percentile_interval(values, level) for key, values in draws.items()}


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    groups: Sequence[Hashable],
    *,
    n: int = BOOTSTRAP_N,
    seed: int = BOOTSTRAP_SEED,
    level: float = CI_LEVEL,
) -> Interval:
    """The interval of one metric; *statistic* maps row indices to a number."""
    result = bootstrap_many(
        lambda rows: {"value": statistic(rows)}, groups, n=n, seed=seed, level=level
    )
    return result.get("value", Interval(float("nan"), float("nan"), 0))


# ----------------------------------------------------------------------------- summary


def _entry(value: float, interval: Interval | None) -> dict[str, float | int | None]:
    def clean(x: float) -> float | None:
        return float(x) if np.isfinite(x) else None

    entry: dict[str, float | int | None] = {"value": clean(value)}
    if interval is not None:
        entry.update(
            ci_low=clean(interval.low), ci_high=clean(interval.high), n_valid=interval.n_valid
        )
    return entry


def summarize(
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: Sequence[Hashable],
    class_names: Sequence[str],
    positive: str | None = "covid",
    pair: tuple[str, str] | None = ("pneumonia", "normal"),
    *,
    n_bootstrap: int = BOOTSTRAP_N,
    seed: int = BOOTSTRAP_SEED,
    level: float = CI_LEVEL,
) -> dict[str, object]:
    """All metrics with patient-level bootstrap intervals, as JSON-ready nested dicts.

    Each metric is ``{"value", "ci_low", "ci_high", "n_valid"}``; undefined numbers are
    ``None``. *pair* (positive, negative) adds ``summary["pair"]`` when both classes exist.
    """
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    names = list(class_names)
    pos = names.index(positive) if positive in names else None
    two = (names.index(pair[0]), names.index(pair[1])) if pair and set(pair) <= set(names) else None
    point = point_metrics(y, p, names, pos, two)
    intervals: dict[str, Interval] = {}
    if n_bootstrap > 0:
        intervals = bootstrap_many(
            lambda rows: point_metrics(y[rows], p[rows], names, pos, two),
            list(groups),
            n=n_bootstrap,
            seed=seed,
            level=level,
        )
    metric = {k: _entry(v, intervals.get(k)) for k, v in point.items()}
    cm = confusion_matrix(y, p.argmax(axis=1), len(names))
    support = cm.sum(axis=1)
    summary: dict[str, object] = {
        "classes": names,
        "n_images": int(y.size),
        "n_patients": len(group_rows(list(groups))),
        "confusion_matrix": cm.tolist(),
        "overall": {k: metric[k] for k in ("accuracy", "macro_f1", "macro_auc", "ece")},
        "per_class": {
            name: {
                "support": int(support[k]),
                **{m: metric[f"{name}/{m}"] for m in ("precision", "recall", "specificity")},
                "f1": metric[f"{name}/f1"],
                "auc": metric[f"{name}/auc"],
            }
            for k, name in enumerate(names)
        },
        "bootstrap": {
            "n": n_bootstrap,
            "seed": seed,
            "level": level,
            "unit": "patient group",
            "method": "percentile",
        },
    }
    if pos is not None:
        counts = binary_view(y, p, pos)
        summary["binary"] = {
            "positive_class": names[pos],
            "rule": f"positive when '{names[pos]}' is the most probable class",
            **{m: metric[f"binary/{m}"] for m in ("sensitivity", "specificity", "ppv", "npv")},
            "auc": metric["binary/auc"],
            **{c: counts[c] for c in ("tp", "fp", "tn", "fn")},
        }
    if two is not None:
        counts = pair_view(y, p, *two)
        summary["pair"] = {
            "positive_class": names[two[0]],
            "negative_class": names[two[1]],
            "rule": f"only cases that are truly '{names[two[0]]}' or '{names[two[1]]}'; "
            f"positive when P({names[two[0]]}) / (P({names[two[0]]}) + P({names[two[1]]})) "
            ">= 0.5",
            **{m: metric[f"pair/{m}"] for m in ("accuracy", "sensitivity", "specificity", "auc")},
            **{c: counts[c] for c in ("tp", "fp", "tn", "fn")},
        }
    return summary
