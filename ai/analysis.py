"""From the images of one series (or image files) to one prediction and the heatmaps behind it.

No network, no database: datasets or pixel arrays in, an :class:`Analysis` out.

Series rule: a chest X-ray series' probabilities are the mean over its eligible images. A CT
series' are the mean over its top-k slices ranked by the positive class (k = 10 % of the usable
slices, at least 1): a focal finding on a few slices should not be averaged away, which suits
triage, at the price of more false positives than a plain mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from ai.eligibility import reason_not_eligible
from ai.model import Predictor
from ai.outputs import Prediction
from ai.preprocess import batch, dicom_to_image, heatmap_in_image_frame
from pacs_node.errors import UnusableInputError

BATCH_SIZE = 16
MAX_EXPLAINED = 3


@dataclass
class Explained:
    """One image that drove the decision, with its Grad-CAM map."""

    name: str
    image: np.ndarray  # 2-D, [0, 1]
    heatmap: np.ndarray  # 2-D, [0, 1]
    probability: float  # of the series' label on this image
    dataset: Dataset | None = None


@dataclass
class Analysis:
    prediction: Prediction
    used: list[Dataset] = field(default_factory=list)  # datasets that went into the decision
    explained: list[Explained] = field(default_factory=list)
    per_image: list[tuple[str, tuple[float, ...]]] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)


def analyse_datasets(datasets: Sequence[Dataset], classifier: Predictor) -> Analysis:
    """Classify the eligible images among *datasets* (one series)."""
    spec = classifier.spec
    images: list[np.ndarray] = []
    used: list[Dataset] = []
    excluded: list[tuple[str, str]] = []
    for ds in datasets:
        name = str(ds.get("SOPInstanceUID", "?"))
        reason = reason_not_eligible(ds, spec.task)
        if reason is None:
            try:
                images.append(dicom_to_image(ds, window=spec.window))
                used.append(ds)
                continue
            except UnusableInputError as exc:
                reason = str(exc)
        excluded.append((name, reason))
    if not images:
        reasons = sorted({r for _, r in excluded})
        raise UnusableInputError("no usable image in the series: " + "; ".join(reasons)[:500])
    names = [str(ds.SOPInstanceUID) for ds in used]
    analysis = analyse_images(names, images, classifier, datasets=used)
    analysis.excluded = excluded
    return analysis


def analyse_images(
    names: Sequence[str],
    images: Sequence[np.ndarray],
    classifier: Predictor,
    *,
    datasets: Sequence[Dataset] | None = None,
) -> Analysis:
    """Classify 2-D [0, 1] images as one series; explain the few that drove the result."""
    spec = classifier.spec
    if not images:
        raise UnusableInputError("no image to classify")
    probs = np.concatenate(
        [
            classifier.predict(
                batch(
                    images[i : i + BATCH_SIZE], spec.input_size, spec.channels, spec.preprocessing
                )
            )
            for i in range(0, len(images), BATCH_SIZE)
        ]
    )
    if spec.task == "ct":
        positive = spec.class_index(spec.positive_class)
        k = max(1, math.ceil(0.1 * len(images)))
        top = np.argsort(-probs[:, positive], kind="stable")[:k]
        series_probs = probs[top].mean(axis=0)
    else:
        series_probs = probs.mean(axis=0)
    series_probs = series_probs / series_probs.sum()
    prediction = Prediction(
        model_name=spec.name,
        model_version=spec.version,
        task=spec.task,
        classes=spec.classes,
        probabilities=tuple(float(p) for p in series_probs),
    )
    label = int(np.argmax(series_probs))
    order = np.argsort(-probs[:, label], kind="stable")[:MAX_EXPLAINED]
    x = batch([images[i] for i in order], spec.input_size, spec.channels, spec.preprocessing)
    maps = classifier.heatmaps(x, np.full(len(order), label))
    explained = [
        Explained(
            name=names[i],
            image=images[i],
            heatmap=heatmap_in_image_frame(maps[j], images[i].shape, spec.preprocessing),
            probability=float(probs[i, label]),
            dataset=datasets[i] if datasets is not None else None,
        )
        for j, i in enumerate(order)
    ]
    return Analysis(
        prediction=prediction,
        used=list(datasets or []),
        explained=explained,
        per_image=[(n, tuple(float(v) for v in p)) for n, p in zip(names, probs, strict=True)],
    )
