"""From the images of one series (or image files) to one prediction and the heatmaps behind it.

No network, no database: datasets or pixel arrays in, an :class:`Analysis` out. The node's worker
and ``pacs-node classify`` both come through here, so they give the same result for the same
input.

One pass through the network per image gives the probabilities, the feature maps for Grad-CAM
and the feature vector for abstention. Then, in order:

1. **calibration**: the model's temperature (``model.json``, fitted on validation);
2. **abstention** (:mod:`ai.abstention`): an image further from the training data than the
   model's threshold is left out of the decision with that reason; a series with no image left
   is *indeterminate* (its probabilities are still those of all its images);
3. **series rule** (the task's :class:`TaskProfile`): a chest X-ray series' probabilities are the
   mean over its images; a CT series' the mean over its top-k slices ranked by the positive class
   (k = 10 % of the usable slices, at least 1), since a focal finding on a few slices should not
   be averaged away; that suits triage, at the price of more false positives than a plain mean;
4. **operating point**: the positive class when its probability reaches the model's threshold.

A model whose ``model.json`` sets ``indeterminate_reason`` (one not shown to work on the images
the node receives) reports every result as indeterminate with that reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from ai.calibration import apply_temperature
from ai.eligibility import charset_warning, ct_reason, cxr_reason
from ai.errors import UnusableInputError
from ai.model import Predictor
from ai.outputs import Prediction
from ai.preprocess import Crop, batch, dicom_to_image, heatmap_in_image_frame, plan_crop

BATCH_SIZE = 16
MAX_EXPLAINED = 3
# read DICOM with values over this deferred: the header rules run before any pixel byte is
# read, and only eligible images' Pixel Data is read (and decoded)
DEFER_SIZE = "64 KB"


def read_dicom(path: str | Path) -> Dataset:
    """A DICOM file with its large values (Pixel Data) left on disk until used."""
    return pydicom.dcmread(path, defer_size=DEFER_SIZE)


def _mean(probs: np.ndarray, positive: int) -> np.ndarray:
    return np.asarray(probs.mean(axis=0))


def _top_k_mean(probs: np.ndarray, positive: int) -> np.ndarray:
    k = max(1, math.ceil(0.1 * len(probs)))
    top = np.argsort(-probs[:, positive], kind="stable")[:k]
    return np.asarray(probs[top].mean(axis=0))


def _no_caption(item: Explained) -> str:
    return ""


def _slice_caption(item: Explained) -> str:
    number = item.dataset.get("InstanceNumber", "?") if item.dataset is not None else "?"
    return f"slice {number}: p={item.probability:.2f}"


@dataclass(frozen=True)
class TaskProfile:
    """What differs between tasks, in one place: which images a model of the task may read, how
    a series' images become one result, and what the heatmap caption says of each image."""

    task: str
    eligibility: Callable[[Dataset], str | None]
    aggregate: Callable[[np.ndarray, int], np.ndarray]  # per-image probs, positive -> series
    caption: Callable[[Explained], str]
    series_rule: str


PROFILES = {
    "cxr": TaskProfile("cxr", cxr_reason, _mean, _no_caption, "mean over the series' images"),
    "ct": TaskProfile(
        "ct", ct_reason, _top_k_mean, _slice_caption, "mean of the top 10 % of slices"
    ),
}


def profile(task: str) -> TaskProfile:
    if task not in PROFILES:
        raise UnusableInputError(f"no profile for task {task!r}")
    return PROFILES[task]


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
    novelty: list[float] = field(default_factory=list)  # per image, when the model has it
    warnings: list[str] = field(default_factory=list)  # worked around, not failed (charset)
    inference_s: float = 0.0  # the model's forward passes and Grad-CAM, wall clock

    def caption(self, item: Explained) -> str:
        return profile(self.prediction.task).caption(item)


def analyse_datasets(datasets: Sequence[Dataset], classifier: Predictor) -> Analysis:
    """Classify the eligible images among *datasets* (one series)."""
    spec = classifier.spec
    rules = profile(spec.task)
    images: list[np.ndarray] = []
    used: list[Dataset] = []
    excluded: list[tuple[str, str]] = []
    for ds in datasets:
        name = str(ds.get("SOPInstanceUID", "?"))
        reason = rules.eligibility(ds)
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
    analysis.excluded = excluded + analysis.excluded
    found = (charset_warning(ds) for ds in datasets)
    analysis.warnings = list(dict.fromkeys(w for w in found if w))
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
    rules = profile(spec.task)
    if not images:
        raise UnusableInputError("no image to classify")
    raw_parts, feature_parts = [], []
    inference_s = 0.0
    # the lungs (or the body) are looked for once per image, for the input and for the map;
    # the body masks only live while their batch is made (the maps need the boxes only)
    crops: list[Crop] = []
    for i in range(0, len(images), BATCH_SIZE):
        part = images[i : i + BATCH_SIZE]
        found = [plan_crop(image, spec.preprocessing) for image in part]
        x = batch(part, spec.input_size, spec.channels, spec.preprocessing, found)
        crops += [(box, None) for box, _ in found]
        started = time.perf_counter()
        p, f = classifier.forward(x)
        inference_s += time.perf_counter() - started
        raw_parts.append(p)
        feature_parts.append(f)
    raw = np.concatenate(raw_parts)
    features = np.concatenate(feature_parts)
    probs = apply_temperature(raw, spec.temperature)
    names_list = [c.name for c in spec.classes]
    positive = names_list.index(spec.positive_class) if spec.positive_class in names_list else 0

    distances = classifier.novelty(features)
    limit = float(spec.abstention.get("threshold", 0)) if spec.abstention else None
    excluded: list[tuple[str, str]] = []
    keep = np.ones(len(images), dtype=bool)
    if distances is not None and limit:
        keep = distances <= limit
        excluded = [
            (
                names[int(i)],
                f"unlike the model's training data (distance {distances[i]:.2f} > {limit:.2f})",
            )
            for i in np.flatnonzero(~keep)
        ]
    indeterminate = ""
    if not keep.any():
        assert distances is not None and limit is not None
        indeterminate = (
            f"{'the image is' if len(images) == 1 else 'every image is'} unlike the model's "
            f"training data (distance {float(np.min(distances)):.2f}, abstention threshold "
            f"{limit:.2f}, fitted on validation)"
        )
        keep = np.ones(len(images), dtype=bool)  # still report what the images say
    if spec.indeterminate_reason:
        indeterminate = spec.indeterminate_reason
    series_probs = rules.aggregate(probs[keep], positive)
    series_probs = series_probs / series_probs.sum()
    point = spec.operating_point
    note = ""
    if point:
        note = (
            f"Chosen on validation for sensitivity >= {point.get('target_sensitivity', 0.95)}"
            f" (validation sensitivity {point.get('validation_sensitivity', '?')}, specificity "
            f"{point.get('validation_specificity', '?')})."
        )
    prediction = Prediction(
        model_name=spec.name,
        model_version=spec.version,
        task=spec.task,
        classes=spec.classes,
        probabilities=tuple(float(p) for p in series_probs),
        positive_class=spec.positive_class if point else "",
        threshold=spec.threshold,
        operating_point_note=note,
        indeterminate=indeterminate,
    )
    label = names_list.index(prediction.decided.name)
    candidates = np.flatnonzero(keep)
    order = candidates[np.argsort(-probs[candidates, label], kind="stable")[:MAX_EXPLAINED]]
    started = time.perf_counter()
    maps = classifier.explain(features[order], raw[order], np.full(len(order), label))
    inference_s += time.perf_counter() - started
    explained = [
        Explained(
            name=names[i],
            image=images[i],
            heatmap=heatmap_in_image_frame(
                maps[j], images[i].shape, spec.preprocessing, images[i], crops[i]
            ),
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
        excluded=excluded,
        novelty=[] if distances is None else [float(d) for d in distances],
        inference_s=inference_s,
    )
