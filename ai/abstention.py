"""How far an image is from the training data, and when the model should not answer.

The score is the deep nearest-neighbour distance (Sun et al., ICML 2022, "Out-of-distribution
detection with deep nearest neighbors"): the image's pooled feature vector (the ``gradcam_layer``
feature map averaged over space, the vector the classifier reads), scaled to unit length, and
its cosine distance to the k-th nearest (k = 5) of the training images' vectors. The threshold is
a high quantile (0.98 by default) of the validation images' scores, so about 2 % of images like
the training data are refused; an image above it gets the result "indeterminate" with the
reason, while the probabilities are still reported.

Measured on the chest X-ray model before choosing it: a class-conditional Mahalanobis distance
in the top 32 principal components told test images from CT slices, figure crops and a leg
radiograph with AUROC 0.81 (it flagged none of the DICOM CT slices); this score with 0.999.

The training vectors (float16, unit length) live in ``abstention.npz`` beside ``model.json``;
the threshold in ``model.json["abstention"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILE = "abstention.npz"
DEFAULT_QUANTILE = 0.98
K = 5


class AbstentionError(ValueError):
    """The abstention statistics are missing or do not fit the model."""


def embed(features: np.ndarray) -> np.ndarray:
    """Pooled feature vectors (N, m) of feature maps (N, h, w, m)."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=(1, 2)) if f.ndim == 4 else f


def _unit(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True)
class FeatureDensity:
    bank: np.ndarray  # (N, m) training feature vectors, unit length
    k: int = K

    def score(self, vectors: np.ndarray) -> np.ndarray:
        """Cosine distance of each vector (N, m) to its k-th nearest training vector."""
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != self.bank.shape[1]:
            raise AbstentionError(
                f"feature vectors of shape {v.shape} do not fit statistics of {self.bank.shape[1]}"
            )
        if not len(v):
            return np.zeros(0)
        bank = np.asarray(self.bank, dtype=np.float32)  # no copy: loaded as float32
        k = min(self.k, len(bank))
        out = np.empty(len(v))
        for i in range(0, len(v), 256):  # bounded memory for a long CT series
            sim = _unit(v[i : i + 256]) @ bank.T
            out[i : i + 256] = 1.0 - np.partition(sim, -k, axis=1)[:, -k]
        return out

    def save(self, path: Path) -> None:
        np.savez_compressed(path, bank=self.bank.astype(np.float16), k=np.array(self.k))

    @classmethod
    def load(cls, path: Path) -> FeatureDensity:
        try:
            with np.load(path) as data:
                return cls(bank=np.asarray(data["bank"], dtype=np.float32), k=int(data["k"]))
        except (OSError, KeyError, ValueError) as exc:
            raise AbstentionError(f"{path}: cannot read abstention statistics ({exc})") from None


def fit_density(vectors: np.ndarray, y: np.ndarray | None = None, k: int = K) -> FeatureDensity:
    """Keep the training feature vectors (N, m) for nearest-neighbour scoring."""
    v = np.asarray(vectors, dtype=np.float32)
    if len(v) < k:
        raise AbstentionError(f"need at least {k} training images to fit abstention")
    return FeatureDensity(bank=_unit(v), k=k)


def threshold_at(scores: np.ndarray, quantile: float = DEFAULT_QUANTILE) -> float:
    """The *quantile* of in-distribution (validation) scores."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        raise AbstentionError("no validation images to fit the abstention threshold on")
    return float(np.quantile(s, quantile))
