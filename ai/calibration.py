"""Calibrated probabilities and the decision threshold, both fitted on the validation split.

Temperature scaling (Guo et al., 2017): one number ``T`` divides the network's logits, chosen to
minimise the negative log-likelihood on validation. Since ``log softmax(z) = z - const``, the
logits can be recovered from the probabilities up to a constant, so ``softmax(log(p) / T)`` is
the calibrated output of any softmax model; ``T > 1`` softens an overconfident model. The ranking
of the classes does not change, so AUC does not either.

The operating point: the threshold on the calibrated probability of the positive class (COVID-19)
chosen on validation as the highest one that still reaches the target sensitivity (0.95 by
default). A study whose probability reaches it is called positive; otherwise the most probable of
the other classes is the label. Both are stored in ``model.json`` and applied by every runtime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ai import metrics as m

T_RANGE = (0.05, 20.0)
DEFAULT_TARGET_SENSITIVITY = 0.95
RELIABILITY_BINS = 10


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p) / T)`` row by row; T = 1 returns *probs* (as float64) unchanged."""
    p = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0 or p.size == 0:
        return p
    logits = np.log(np.clip(p, 1e-12, 1.0)) / float(temperature)
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    p = np.asarray(probs, dtype=np.float64)
    rows = np.arange(len(p))
    return float(-np.mean(np.log(np.clip(p[rows, np.asarray(y, dtype=np.int64)], 1e-12, 1.0))))


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature in :data:`T_RANGE` minimising the NLL of *y* (golden-section search on
    log T; the NLL is convex in 1/T). Returns 1.0 for an empty set."""
    if len(y) == 0:
        return 1.0
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    ratio = (math.sqrt(5) - 1) / 2

    def loss(log_t: float) -> float:
        return nll(apply_temperature(probs, math.exp(log_t)), y)

    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(60):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(round(math.exp((lo + hi) / 2), 4))


def choose_threshold(
    scores: np.ndarray, positive: np.ndarray, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
) -> float:
    """The highest threshold t with sensitivity ``mean(scores[positive] >= t) >= target``.

    With no positive case the threshold is 0.5.
    """
    s = np.asarray(scores, dtype=np.float64)[np.asarray(positive, dtype=bool)]
    if s.size == 0:
        return 0.5
    ranked = np.sort(s)[::-1]
    needed = max(1, math.ceil(target_sensitivity * s.size - 1e-9))
    return float(ranked[needed - 1])


def decide(probs: np.ndarray, positive: int | None, threshold: float | None) -> np.ndarray:
    """The label of each row: *positive* when its probability reaches *threshold*, else the
    most probable other class. Without a threshold, the most probable class."""
    p = np.asarray(probs, dtype=np.float64)
    if positive is None or threshold is None or p.shape[1] < 2:
        return p.argmax(axis=1)
    others = p.copy()
    others[:, positive] = -1.0
    return np.where(p[:, positive] >= threshold, positive, others.argmax(axis=1))


def reliability(y: np.ndarray, probs: np.ndarray, n_bins: int = RELIABILITY_BINS) -> dict[str, Any]:
    """Per-bin mean confidence, accuracy and count of the top-class probability (the data of a
    reliability diagram), bins as :func:`ai.metrics.expected_calibration_error`."""
    p = np.asarray(probs, dtype=np.float64)
    yy = np.asarray(y).reshape(-1)
    confidence = p.max(axis=1) if len(p) else np.zeros(0)
    correct = (p.argmax(axis=1) == yy).astype(np.float64) if len(p) else np.zeros(0)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    conf = np.bincount(bins, weights=confidence, minlength=n_bins)
    acc = np.bincount(bins, weights=correct, minlength=n_bins)

    def mean(total: np.ndarray) -> list[float | None]:
        return [None if c == 0 else float(v / c) for v, c in zip(total, count, strict=True)]

    return {
        "edges": [i / n_bins for i in range(n_bins + 1)],
        "count": count.tolist(),
        "confidence": mean(conf),
        "accuracy": mean(acc),
    }


def calibration_summary(
    y: np.ndarray, raw: np.ndarray, temperature: float, names: Sequence[str]
) -> dict[str, Any]:
    """ECE and NLL before and after temperature scaling, with reliability data for both."""
    after = apply_temperature(raw, temperature)
    return {
        "temperature": temperature,
        "n": int(len(y)),
        "ece_before": m.expected_calibration_error(y, raw),
        "ece_after": m.expected_calibration_error(y, after),
        "nll_before": nll(raw, y) if len(y) else float("nan"),
        "nll_after": nll(after, y) if len(y) else float("nan"),
        "reliability_before": reliability(y, raw),
        "reliability_after": reliability(y, after),
        "classes": list(names),
    }
