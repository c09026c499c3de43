"""How far an image is from the training data, and when the model should not answer.

The score is a class-conditional Mahalanobis distance in the network's own feature space (Lee et
al., 2018): the pooled feature map (the ``gradcam_layer`` output averaged over space, the vector
the classifier reads) is projected on the leading principal components of the training images'
features, whitened, and compared with each class's mean; the distance to the nearest class mean
is the score. The threshold is a high quantile (0.98 by default) of the scores of the
validation images, so about 2 % of images like the training data are refused; an image above it
gets the result "indeterminate" with the reason, while the probabilities are still reported.

Fitted statistics live in ``abstention.npz`` beside ``model.json``; the threshold in
``model.json["abstention"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILE = "abstention.npz"
DEFAULT_QUANTILE = 0.98
COMPONENTS = 32


class AbstentionError(ValueError):
    """The abstention statistics are missing or do not fit the model."""


def embed(features: np.ndarray) -> np.ndarray:
    """Pooled feature vectors (N, m) of feature maps (N, h, w, m)."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=(1, 2)) if f.ndim == 4 else f


@dataclass(frozen=True)
class FeatureDensity:
    mean: np.ndarray  # (m,) training feature mean
    components: np.ndarray  # (m, k) principal directions
    scale: np.ndarray  # (k,) standard deviation along each
    class_means: np.ndarray  # (classes, k) in whitened coordinates

    def score(self, vectors: np.ndarray) -> np.ndarray:
        """Distance of each vector (N, m) to the nearest class mean, in whitened units."""
        v = np.asarray(vectors, dtype=np.float64)
        if v.ndim != 2 or v.shape[1] != self.mean.shape[0]:
            raise AbstentionError(
                f"feature vectors of shape {v.shape} do not fit statistics of {self.mean.shape[0]}"
            )
        z = (v - self.mean) @ self.components / self.scale
        d = np.linalg.norm(z[:, None, :] - self.class_means[None, :, :], axis=-1)
        return d.min(axis=1)

    def save(self, path: Path) -> None:
        np.savez(
            path,
            mean=self.mean,
            components=self.components,
            scale=self.scale,
            class_means=self.class_means,
        )

    @classmethod
    def load(cls, path: Path) -> FeatureDensity:
        try:
            with np.load(path) as data:
                return cls(
                    mean=np.asarray(data["mean"]),
                    components=np.asarray(data["components"]),
                    scale=np.asarray(data["scale"]),
                    class_means=np.asarray(data["class_means"]),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise AbstentionError(f"{path}: cannot read abstention statistics ({exc})") from None


def fit_density(
    vectors: np.ndarray, y: np.ndarray, n_classes: int, components: int = COMPONENTS
) -> FeatureDensity:
    """Fit the whitened PCA space and class means on training feature vectors (N, m)."""
    v = np.asarray(vectors, dtype=np.float64)
    if len(v) < 3:
        raise AbstentionError("need at least three training images to fit abstention")
    mean = v.mean(axis=0)
    centred = v - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = int(min(components, vt.shape[0], max(1, len(v) - 1)))
    basis = vt[:k].T
    scale = s[:k] / np.sqrt(max(1, len(v) - 1))
    scale = np.where(scale > 1e-8 * max(1.0, float(scale.max())), scale, 1.0)
    z = centred @ basis / scale
    yy = np.asarray(y, dtype=np.int64)
    class_means = np.stack(
        [z[yy == c].mean(axis=0) if np.any(yy == c) else np.zeros(k) for c in range(n_classes)]
    )
    return FeatureDensity(mean=mean, components=basis, scale=scale, class_means=class_means)


def threshold_at(scores: np.ndarray, quantile: float = DEFAULT_QUANTILE) -> float:
    """The *quantile* of in-distribution (validation) scores."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        raise AbstentionError("no validation images to fit the abstention threshold on")
    return float(np.quantile(s, quantile))
