"""Fit what serving needs beyond the weights, on the model's own validation split.

:func:`fit_serving` (``pacs-node fit-serving MODEL_DIR``; run at the end of every training):

1. **temperature** (:mod:`ai.calibration`) minimising the validation NLL;
2. **operating point**: the threshold on the calibrated COVID-19 probability reaching the target
   sensitivity (0.95) on validation, with the validation sensitivity and specificity it gives;
3. **abstention** (:mod:`ai.abstention`): feature statistics of the training split and the
   distance threshold at a quantile of the validation distances.

All three go into ``model.json`` (the statistics into ``abstention.npz``) and a summary with the
calibration error before and after into ``serving.json``. The test split and any held-out source
are never looked at.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ai import abstention as ab
from ai import calibration as cal
from ai import metrics as m
from ai.dataset import Sample, make_splits
from ai.model import Classifier, ModelError, read_spec
from ai.preprocess import batch, read_inputs

BATCH_SIZE = 32
SUMMARY_FILE = "serving.json"


def _forward(
    classifier: Any, count: int, inputs: Callable[[int, int], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Raw probabilities and pooled feature vectors of *count* images, *inputs(start, stop)*
    giving each batch of model inputs."""
    probs, vectors = [], []
    for i in range(0, count, BATCH_SIZE):
        p, f = classifier.forward(inputs(i, i + BATCH_SIZE))
        probs.append(p)
        vectors.append(ab.embed(f))
    if not probs:
        return np.zeros((0, len(classifier.spec.classes))), np.zeros((0, 0))
    return np.concatenate(probs), np.concatenate(vectors)


def forward_samples(classifier: Any, samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """Raw probabilities (N, classes) and pooled feature vectors (N, m) of image samples."""
    spec = classifier.spec
    return _forward(
        classifier,
        len(samples),
        lambda a, b: read_inputs(
            [s.path for s in samples[a:b]], spec.input_size, spec.channels, spec.preprocessing
        ),
    )


def forward_images(classifier: Any, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The same for 2-D [0, 1] images already decoded."""
    spec = classifier.spec
    return _forward(
        classifier,
        len(images),
        lambda a, b: batch(images[a:b], spec.input_size, spec.channels, spec.preprocessing),
    )


def fit_serving(
    model_dir: Path,
    *,
    data_dirs: Sequence[Path] | None = None,
    manifest: Path | None = None,
    target_sensitivity: float = cal.DEFAULT_TARGET_SENSITIVITY,
    quantile: float = ab.DEFAULT_QUANTILE,
) -> dict[str, Any]:
    """Fit temperature, operating point and abstention for the model in *model_dir* (see the
    module docstring); returns the summary also written to ``serving.json``."""
    model_dir = Path(model_dir)
    training_path = model_dir / "training.json"
    if not training_path.is_file():
        raise ModelError(f"{model_dir}: no training.json (needed to rebuild the split)")
    settings = json.loads(training_path.read_text())["settings"]
    spec = read_spec(model_dir)
    names = [c.name for c in spec.classes]
    splits = make_splits(settings, names, data_dirs=data_dirs, manifest=manifest)
    if not splits["validation"] or not splits["train"]:
        raise ModelError(f"{model_dir}: the rebuilt split has no training or validation images")
    # forward() gives the network's raw probabilities whatever model.json says.
    classifier = Classifier(model_dir, abstention=False)
    raw_val, vec_val = forward_samples(classifier, splits["validation"])
    _, vec_train = forward_samples(classifier, splits["train"])
    y_val = np.array([names.index(s.label) for s in splits["validation"]])
    y_train = np.array([names.index(s.label) for s in splits["train"]])

    temperature = cal.fit_temperature(raw_val, y_val)
    calibrated = cal.apply_temperature(raw_val, temperature)
    summary: dict[str, Any] = {
        "fitted_on": {"validation": len(y_val), "train": len(y_train)},
        "calibration": cal.calibration_summary(y_val, raw_val, temperature, names),
    }
    operating_point: dict[str, Any] = {}
    if spec.positive_class in names:
        k = names.index(spec.positive_class)
        truth = y_val == k
        threshold = cal.choose_threshold(calibrated[:, k], truth, target_sensitivity)
        called = calibrated[:, k] >= threshold
        counts = m.two_by_two(truth, called)
        operating_point = {
            "class": spec.positive_class,
            "threshold": round(threshold, 6),
            "target_sensitivity": target_sensitivity,
            "validation_sensitivity": round(counts["tp"] / max(1, counts["tp"] + counts["fn"]), 4),
            "validation_specificity": round(counts["tn"] / max(1, counts["tn"] + counts["fp"]), 4),
            "chosen_on": "validation",
        }
        summary["operating_point"] = operating_point

    density = ab.fit_density(vec_train)
    scores_val = density.score(vec_val)
    limit = ab.threshold_at(scores_val, quantile)
    density.save(model_dir / ab.FILE)
    abstention = {
        "file": ab.FILE,
        "threshold": round(limit, 4),
        "quantile": quantile,
        "score": f"cosine distance to the {density.k}th nearest training image, pooled "
        "features (deep nearest neighbours)",
        "validation_abstention_rate": round(float(np.mean(scores_val > limit)), 4),
    }
    summary["abstention"] = abstention
    fitted = replace(
        spec, temperature=temperature, operating_point=operating_point, abstention=abstention
    )
    (model_dir / "model.json").write_text(json.dumps(fitted.to_json(), indent=2) + "\n")
    (model_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
