"""Models: their metadata (``model.json``), loading them once, predicting and explaining.

A model is a folder holding ``model.json`` and the weights file it names. The models shipped
with the package live in ``ai/models/<name>/``; a config may point at any other folder.
TensorFlow is imported only when a model is loaded, so the command line stays quick.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ai.errors import ModelError
from ai.outputs import ClassCode
from ai.preprocess import check_options

BUILTIN_DIR = Path(__file__).resolve().parent / "models"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    task: str  # "cxr" or "ct"
    classes: tuple[ClassCode, ...]
    input_size: int
    channels: int
    gradcam_layer: str
    file: str = "model.keras"
    positive_class: str = "covid"
    window: tuple[float, float] | None = None  # CT display window applied to DICOM slices
    description: str = ""
    # shortcut-removing options (ai.preprocess.prepare) the model was trained with; {} = none
    preprocessing: dict[str, Any] = field(default_factory=dict)
    # fitted on validation by ai.serving.fit_serving (defaults: uncalibrated, arg-max, no
    # abstention): softmax(log p / temperature); {"class", "threshold", "target_sensitivity",
    # ...}; {"file", "threshold", "quantile", ...}
    temperature: float = 1.0
    operating_point: dict[str, Any] = field(default_factory=dict)
    abstention: dict[str, Any] = field(default_factory=dict)
    # when set, every result is "indeterminate" with this reason (probabilities still given):
    # for a model not shown to work on the images the node receives (see its model card)
    indeterminate_reason: str = ""

    def class_index(self, name: str) -> int:
        return [c.name for c in self.classes].index(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "classes": [c.__dict__ for c in self.classes],
            "input_size": self.input_size,
            "channels": self.channels,
            "gradcam_layer": self.gradcam_layer,
            "file": self.file,
            "positive_class": self.positive_class,
            "window": list(self.window) if self.window else None,
            "description": self.description,
            "preprocessing": dict(self.preprocessing),
            "temperature": self.temperature,
            "operating_point": dict(self.operating_point),
            "abstention": dict(self.abstention),
            "indeterminate_reason": self.indeterminate_reason,
        }

    @property
    def threshold(self) -> float | None:
        """The decision threshold on the positive class's calibrated probability, if any."""
        value = self.operating_point.get("threshold")
        return None if value is None else float(value)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "model.json") -> ModelSpec:
        try:
            window = data.get("window")
            spec = cls(
                name=str(data["name"]),
                version=str(data["version"]),
                task=str(data["task"]),
                classes=tuple(ClassCode(**c) for c in data["classes"]),
                input_size=int(data["input_size"]),
                channels=int(data.get("channels", 1)),
                gradcam_layer=str(data["gradcam_layer"]),
                file=str(data.get("file", "model.keras")),
                positive_class=str(data.get("positive_class", "covid")),
                window=(float(window[0]), float(window[1])) if window else None,
                description=str(data.get("description", "")),
                preprocessing=check_options(data.get("preprocessing") or {}),
                temperature=float(data.get("temperature") or 1.0),
                operating_point=dict(data.get("operating_point") or {}),
                abstention=dict(data.get("abstention") or {}),
                indeterminate_reason=str(data.get("indeterminate_reason") or ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: invalid model metadata: {exc!r}") from None
        if spec.task not in ("cxr", "ct"):
            raise ModelError(f"{where}: task must be 'cxr' or 'ct', got {spec.task!r}")
        if len(spec.classes) < 2:
            raise ModelError(f"{where}: a classifier needs at least two classes")
        if not (0.01 <= spec.temperature <= 100.0):
            raise ModelError(f"{where}: temperature {spec.temperature} is out of range")
        point = spec.operating_point
        if point and (
            point.get("class") not in [c.name for c in spec.classes]
            or not 0.0 <= float(point.get("threshold", -1)) <= 1.0
        ):
            raise ModelError(f"{where}: operating_point needs a class and a threshold in [0, 1]")
        if spec.abstention and not (
            spec.abstention.get("file") and float(spec.abstention.get("threshold", -1)) > 0
        ):
            raise ModelError(f"{where}: abstention needs a file and a positive threshold")
        return spec


def model_dir(name_or_path: str) -> Path:
    """The folder of a shipped model (by name) or of a model given as a path."""
    path = Path(name_or_path)
    if path.is_absolute() or len(path.parts) > 1:
        if path.is_dir():
            return path.resolve()
        raise ModelError(f"no model folder at {path}")
    builtin = BUILTIN_DIR / name_or_path
    if builtin.is_dir():
        return builtin
    shipped = ", ".join(sorted(p.name for p in BUILTIN_DIR.iterdir() if p.is_dir()))
    raise ModelError(f"no model folder {name_or_path!r} (shipped models: {shipped or 'none'})")


def read_spec(directory: Path) -> ModelSpec:
    meta = directory / "model.json"
    if not meta.is_file():
        raise ModelError(f"{directory}: no model.json")
    try:
        data = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{meta}: invalid model metadata: {exc}") from None
    return ModelSpec.from_json(data, where=str(meta))


class Predictor(Protocol):
    """What serving needs of a model, whatever runtime runs it (Keras or ONNX Runtime)."""

    spec: ModelSpec

    def predict(self, x: np.ndarray) -> np.ndarray: ...

    def heatmaps(self, x: np.ndarray, class_index: np.ndarray | None = None) -> np.ndarray: ...

    def warm_up(self) -> None: ...

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(raw probabilities (N, classes), feature maps (N, h, w, m)) in one pass."""
        ...

    def explain(
        self, features: np.ndarray, probs: np.ndarray, class_index: np.ndarray | None = None
    ) -> np.ndarray:
        """Grad-CAM maps (N, h, w) in [0, 1] from the outputs of :meth:`forward`."""
        ...

    def novelty(self, features: np.ndarray) -> np.ndarray | None:
        """Distance of each image from the training data (ai.abstention), or None."""
        ...


def warm_up(predictor: Predictor) -> None:
    """One prediction and one heatmap on a blank image: loads, traces and allocates up front."""
    spec = predictor.spec
    blank = np.full((1, spec.input_size, spec.input_size, spec.channels), 0.5, dtype=np.float32)
    predictor.predict(blank)
    predictor.heatmaps(blank)


def load_density(directory: Path, spec: ModelSpec) -> Any:
    """The abstention statistics (:class:`ai.abstention.FeatureDensity`) named by *spec*, or
    None when the model has none."""
    from ai.abstention import AbstentionError, FeatureDensity

    if not spec.abstention:
        return None
    path = directory / str(spec.abstention["file"])
    if not path.is_file():
        raise ModelError(f"{directory}: abstention file {path.name} is missing")
    try:
        return FeatureDensity.load(path)
    except AbstentionError as exc:
        raise ModelError(str(exc)) from None


class Classifier:
    """A loaded model: predicts class probabilities and Grad-CAM heatmaps for batches."""

    def __init__(self, directory: Path, *, abstention: bool = True) -> None:
        """*abstention* False skips the abstention statistics (to fit them anew)."""
        import keras

        self.directory = directory
        self.spec = read_spec(directory)
        weights = directory / self.spec.file
        if not weights.is_file():
            raise ModelError(f"{directory}: weights file {self.spec.file} is missing")
        self.model = keras.saving.load_model(weights, compile=False)
        self._grad_model: Any = None
        self._kernel: np.ndarray | None = None
        self.density = load_density(directory, self.spec) if abstention else None
        self._lock = threading.Lock()  # one inference at a time per model

    def warm_up(self) -> None:
        """Run one prediction and one heatmap, so the first real job does not pay for tracing."""
        warm_up(self)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (N, classes)."""
        with self._lock:
            probs = np.asarray(self.model.predict_on_batch(x), dtype=np.float64)
        if probs.shape != (len(x), len(self.spec.classes)):
            raise ModelError(f"{self.spec.name}: output shape {probs.shape} does not match classes")
        return probs

    def heatmaps(self, x: np.ndarray, class_index: np.ndarray | None = None) -> np.ndarray:
        """Grad-CAM maps in [0, 1], shape (N, h, w), for each image's class (default predicted)."""
        from ai.gradcam import build_grad_model, gradcam

        with self._lock:
            if self._grad_model is None:
                self._grad_model = build_grad_model(self.model, self.spec.gradcam_layer)
            return gradcam(self._grad_model, x, class_index)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw probabilities and the ``gradcam_layer`` feature maps, from one pass."""
        from ai.gradcam import build_grad_model

        with self._lock:
            if self._grad_model is None:
                self._grad_model = build_grad_model(self.model, self.spec.gradcam_layer)
            if not len(x):
                shape = tuple(int(d or 0) for d in self._grad_model.outputs[0].shape[1:])
                return np.zeros((0, len(self.spec.classes))), np.zeros((0, *shape), np.float32)
            features, probs = self._grad_model(np.asarray(x, dtype=np.float32), training=False)
        return np.asarray(probs, dtype=np.float64), np.asarray(features, dtype=np.float32)

    def explain(
        self, features: np.ndarray, probs: np.ndarray, class_index: np.ndarray | None = None
    ) -> np.ndarray:
        """Grad-CAM in closed form from :meth:`forward`'s outputs (ai.runtime explains why it
        equals the autodiff one for this head)."""
        from ai.runtime import closed_form_gradcam, find_head

        if self._kernel is None:
            dense = find_head(self.model, self.spec.gradcam_layer).dense
            self._kernel = np.asarray(dense.kernel.numpy(), dtype=np.float32)
        return closed_form_gradcam(features, probs, self._kernel, class_index)

    def novelty(self, features: np.ndarray) -> np.ndarray | None:
        from ai.abstention import embed

        return None if self.density is None else self.density.score(embed(features))


_cache: dict[Path, Classifier] = {}
_cache_lock = threading.Lock()


def load_classifier(name_or_path: str) -> Classifier:
    """Load a model once per process and reuse it."""
    directory = model_dir(name_or_path)
    with _cache_lock:
        if directory not in _cache:
            _cache[directory] = Classifier(directory)
        return _cache[directory]
