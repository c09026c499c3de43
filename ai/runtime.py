"""Serving on ONNX Runtime: export a model folder's Keras model to ONNX and run it without TF.

``export_onnx`` writes two files beside ``model.json`` (which it does not change):

* ``model.onnx``: the model with two outputs, ``features`` (the ``gradcam_layer`` feature map,
  NHWC) and ``probabilities`` (softmax), converted Keras -> TF SavedModel -> tf2onnx. Keras's own
  ONNX export is not used (it gets EfficientNet's input normalisation wrong);
* ``gradcam_head.npz``: the kernel and bias of the final Dense layer, so that Grad-CAM needs no
  autodiff and no TensorFlow at serving time.

Grad-CAM in closed form. The head must be ``feature map -> GlobalAveragePooling2D -> (Dropout)
-> Dense(W, b) -> softmax``. With ``A`` the (h, w, m) feature map and ``p`` the probabilities, the
gradient of ``p_c`` (the probability, as :mod:`ai.gradcam` takes it, not the logit) is

    dp_c / dA_ijm = (1 / (h w)) * sum_k g_k W_mk,   g_k = (delta_ck - p_c) * p_k

(``g`` is TF's softmax gradient ``(onehot - p_c) * p``, equal to ``p_c (delta_ck - p_k)``, written
as TF evaluates it so that float32 rounding of a saturated ``p_c`` matches). It does not depend on
(i, j), so the Grad-CAM channel weights are ``alpha_m = (1 / (h w)) sum_k g_k W_mk`` and the map is
``ReLU(sum_m alpha_m A_ijm)`` divided by its maximum per image, as :func:`ai.gradcam.gradcam`
does. ``export_onnx`` refuses other heads with a :class:`~ai.model.ModelError` naming what it
found.

TensorFlow, Keras and tf2onnx are imported only to export; serving needs numpy and onnxruntime.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ai.model import (
    BUILTIN_DIR,
    Classifier,
    ModelError,
    ModelSpec,
    load_classifier,
    load_density,
    model_dir,
    read_spec,
    warm_up,
)

ONNX_FILE = "model.onnx"
HEAD_FILE = "gradcam_head.npz"
INPUT = "image"
FEATURES = "features"
PROBABILITIES = "probabilities"
OPSET = 17
RUNTIMES = ("onnx", "keras")
# export_onnx refuses a conversion whose probabilities differ from Keras's by more than this.
EXPORT_TOLERANCE = 1e-4
SOURCE_KEY = "source_sha256"  # ONNX metadata and npz entry: the model.keras they came from


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class Head:
    """The Grad-CAM feature map and the Dense layer that ends the model."""

    features: Any  # KerasTensor: the gradcam_layer output that feeds the pooling
    dense: Any  # keras.layers.Dense


def find_head(model: Any, layer_name: str) -> Head:
    """Check that *model* ends ``layer_name -> GlobalAveragePooling2D -> (Dropout...) -> Dense``
    with a softmax (the Dense's activation or a following Softmax/Activation layer).

    Raises :class:`ModelError` naming the layers found otherwise.
    """
    import keras

    name = getattr(model, "name", "model")
    try:
        feature_layer = model.get_layer(layer_name)
    except ValueError:
        raise ModelError(
            f"{name}: no layer named {layer_name!r} (model.json gradcam_layer); a layer inside "
            "a nested backbone model is not visible: build the backbone on the model's input"
        ) from None
    if len(getattr(model, "inputs", None) or []) != 1 or len(model.outputs) != 1:
        raise ModelError(f"{name}: ONNX serving needs a model with one input and one output")

    # Walk back from the output along single-input layers until the gradcam layer.
    chain: list[Any] = []
    tensor = model.outputs[0]
    features = None
    for _ in range(8):  # the head is short; anything longer is not the expected shape
        history = tensor._keras_history
        layer = history.operation
        if layer is feature_layer:
            features = tensor
            break
        chain.append(layer)
        inputs = layer._inbound_nodes[history.node_index].input_tensors
        if len(inputs) != 1:
            break
        tensor = inputs[0]
    chain.reverse()

    def softmax_layer(layer: Any) -> bool:
        if isinstance(layer, keras.layers.Softmax):
            return layer.axis in (-1, (-1,), [-1])
        return isinstance(layer, keras.layers.Activation) and _activation(layer) == "softmax"

    dense_at = next(
        (i for i, layer in enumerate(chain) if isinstance(layer, keras.layers.Dense)), None
    )
    ok = features is not None and dense_at is not None and len(chain) >= 2
    if ok:
        assert dense_at is not None
        pool, middle, dense = chain[0], chain[1:dense_at], chain[dense_at]
        after = chain[dense_at + 1 :]
        ok = (
            isinstance(pool, keras.layers.GlobalAveragePooling2D)
            and pool.data_format == "channels_last"
            and not pool.keepdims
            and all(isinstance(layer, keras.layers.Dropout) for layer in middle)
            and (
                (_activation(dense) == "softmax" and not after)
                or (_activation(dense) == "linear" and len(after) == 1 and softmax_layer(after[0]))
            )
        )
    if not ok:
        found = " -> ".join(
            ([f"'{layer_name}'"] if features is not None else ["..."])
            + [f"{type(layer).__name__}({_activation(layer) or layer.name})" for layer in chain]
        )
        raise ModelError(
            f"{name}: ONNX serving computes Grad-CAM in closed form and needs the head "
            f"'{layer_name}' -> GlobalAveragePooling2D -> (Dropout) -> Dense(softmax); "
            f"this model has {found}"
        )
    assert features is not None and dense_at is not None
    if len(features.shape) != 4:
        raise ModelError(
            f"{name}: gradcam_layer {layer_name!r} gives shape {tuple(features.shape)}, "
            "not an (N, h, w, channels) feature map"
        )
    return Head(features=features, dense=chain[dense_at])


def _activation(layer: Any) -> str:
    fn = getattr(layer, "activation", None)
    return str(getattr(fn, "__name__", "")) if fn is not None else ""


def export_onnx(model_dir: Path, out_path: Path | None = None) -> Path:
    """Convert the folder's Keras model to ONNX (``model.onnx`` beside ``model.json`` unless
    *out_path* is given) and write ``gradcam_head.npz`` next to it; return the ONNX path.

    The files are written under temporary names and renamed, so a reader never sees half a file.
    The conversion is checked on a probe batch against Keras before it is kept.
    """
    directory = Path(model_dir)
    spec = read_spec(directory)
    weights = directory / spec.file
    if not weights.is_file():
        raise ModelError(f"{directory}: weights file {spec.file} is missing")
    out = Path(out_path) if out_path is not None else directory / ONNX_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    source = _sha256(weights)

    import keras

    model = keras.saving.load_model(weights, compile=False)
    head = find_head(model, spec.gradcam_layer)
    shape = _input_shape(model, spec)
    both = keras.Model(
        model.inputs, {FEATURES: head.features, PROBABILITIES: model.outputs[0]}, name="serving"
    )
    # (m, classes)
    kernel = np.asarray(keras.ops.convert_to_numpy(head.dense.kernel), dtype=np.float32)
    bias = (
        np.asarray(keras.ops.convert_to_numpy(head.dense.bias), dtype=np.float32)
        if head.dense.use_bias
        else np.zeros(kernel.shape[1], np.float32)
    )
    if kernel.shape != (head.features.shape[-1], len(spec.classes)):
        raise ModelError(
            f"{spec.name}: Dense kernel {kernel.shape} does not join {spec.gradcam_layer} "
            f"({head.features.shape[-1]} channels) to {len(spec.classes)} classes"
        )

    with tempfile.TemporaryDirectory(prefix="onnx-export-") as tmp_name:
        tmp = Path(tmp_name)
        saved = tmp / "saved_model"
        archive = keras.export.ExportArchive()
        archive.track(both)
        # training=False explicitly: model.export() traced this model's random augmentation
        # layers as active (a non-deterministic SavedModel, with ops tf2onnx cannot convert).
        archive.add_endpoint(
            "serve",
            lambda image: both(image, training=False),
            input_signature=[keras.InputSpec(shape=(None, *shape), dtype="float32", name=INPUT)],
        )
        archive.write_out(str(saved), verbose=False)
        proto = _tf2onnx(saved)
    _stamp(proto, source, spec)
    serialized = proto.SerializeToString()
    probe = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    _verify(serialized, probe, both.predict_on_batch(probe), kernel, bias, spec)

    with _staged(out.parent / HEAD_FILE) as head_tmp, head_tmp.open("wb") as fh:
        np.savez(fh, kernel=kernel, bias=bias, **{SOURCE_KEY: np.array(source)})  # type: ignore[arg-type]
    with _staged(out) as onnx_tmp:
        onnx_tmp.write_bytes(serialized)
    return out


def _input_shape(model: Any, spec: ModelSpec) -> tuple[int, int, int]:
    want = (spec.input_size, spec.input_size, spec.channels)
    have = tuple(model.inputs[0].shape[1:])
    if len(have) != 3 or any(h is not None and h != w for h, w in zip(have, want, strict=True)):
        raise ModelError(f"{spec.name}: model input {have} does not match model.json {want}")
    return want


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _tf2onnx(saved: Path) -> Any:
    """SavedModel -> ONNX with tf2onnx, as its command line does (``python -m tf2onnx.convert
    --saved-model ... --signature_def serve``) but in this process, which has TensorFlow loaded
    already: a child process would spend longer importing TensorFlow than converting."""
    try:
        import tf2onnx
        from tf2onnx import tf_loader
    except ImportError:
        raise ModelError("exporting to ONNX needs tf2onnx (pip install tf2onnx)") from None
    import onnx

    errors = _Collect()
    tf2onnx_log, tf_log = logging.getLogger("tf2onnx"), logging.getLogger("tensorflow")
    tf2onnx_log.addHandler(errors)
    tf_level = tf_log.level
    tf_log.setLevel(logging.ERROR)  # tf2onnx's TF1-style freezing warns of deprecations
    try:
        graph_def, inputs, outputs, _, renames = tf_loader.from_saved_model(
            str(saved), None, None, tag="serve", signatures=["serve"],
            return_initialized_tables=True, return_tensors_to_rename=True,
        )  # fmt: skip
        proto, _ = tf2onnx.convert.from_graph_def(
            graph_def, name="serving", input_names=inputs, output_names=outputs, opset=OPSET,
            tensors_to_rename=renames,
        )  # fmt: skip
        onnx.checker.check_model(proto)  # an op tf2onnx could not convert is left unregistered
    except Exception as exc:  # tf2onnx and onnx raise many kinds; all mean "no conversion"
        found = "\n".join(errors.messages[-10:])
        raise ModelError(
            f"tf2onnx could not convert the model: {type(exc).__name__}: {exc}"
            + (f"\n{found}" if found else "")
        ) from exc
    finally:
        tf2onnx_log.removeHandler(errors)
        tf_log.setLevel(tf_level)
    return proto


def _stamp(proto: Any, source: str, spec: ModelSpec) -> None:
    for key, value in (
        (SOURCE_KEY, source),
        ("model_name", spec.name),
        ("model_version", spec.version),
        ("gradcam_layer", spec.gradcam_layer),
    ):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _verify(
    model: bytes,
    probe: np.ndarray,
    expected: dict[str, Any],
    kernel: np.ndarray,
    bias: np.ndarray,
    spec: ModelSpec,
) -> None:
    """The ONNX model must reproduce Keras's probabilities, and the saved head must reproduce the
    ONNX probabilities from its feature map (which is what closed-form Grad-CAM relies on)."""
    session = _session(model, threads=1)
    features, probs = session.run([FEATURES, PROBABILITIES], {INPUT: probe})
    keras_probs = np.asarray(expected[PROBABILITIES])
    diff = float(np.abs(probs - keras_probs).max())
    if not diff < EXPORT_TOLERANCE:
        raise ModelError(
            f"{spec.name}: the ONNX model disagrees with Keras by {diff:.2e} on a probe batch"
        )
    logits = features.astype(np.float64).mean(axis=(1, 2)) @ kernel + bias
    head_diff = float(np.abs(_softmax(logits) - probs).max())
    if not head_diff < EXPORT_TOLERANCE:
        raise ModelError(
            f"{spec.name}: softmax(GAP(features) @ W + b) differs from the model's output by "
            f"{head_diff:.2e}: the head is not the plain GAP -> Dense(softmax) Grad-CAM assumes"
        )


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A temporary path beside *target*, renamed over it when the block succeeds."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes it private; the exports are as readable as the model
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- serving


def default_threads() -> int:
    """Intra-op threads: the cores this process may use but one, at most 4. ONNX Runtime's
    small-batch kernels gain little beyond that, and a node shares its CPU with the DICOM
    services: on two cores a second thread made a chest X-ray job dearer (burst of 60, work
    role 4.8 s of CPU with two threads, 4.1-4.4 s with one) and the burst slower."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores - 1))


def _session(model: Path | bytes, threads: int | None = None) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError("ONNX serving needs onnxruntime (pip install onnxruntime)") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # idle intra-op threads spin by default, burning a core between the node's small batches
    # that the DICOM services and the other roles need (measured: 150 ms of CPU per chest
    # X-ray job with spinning, for a 6 ms forward pass)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        source = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        where = "the converted model" if isinstance(model, bytes) else str(model)
        raise ModelError(f"{where}: ONNX Runtime cannot load it: {exc}") from exc


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def closed_form_gradcam(
    features: np.ndarray,
    probs: np.ndarray,
    kernel: np.ndarray,
    class_index: np.ndarray | None = None,
) -> np.ndarray:
    """Grad-CAM of the class probabilities for a GAP -> Dense(softmax) head, shape (N, h, w),
    each map divided by its maximum (an all-zero map stays zero), as :func:`ai.gradcam.gradcam`.

    *features* (N, h, w, m) and *probs* (N, classes) are the model's outputs, *kernel* (m,
    classes) the Dense kernel; *class_index* gives each image's class (default: predicted).
    """
    n, h, w, _ = features.shape
    if n == 0:
        return np.zeros((0, h, w), np.float32)
    probs32 = np.asarray(probs, dtype=np.float32)
    if class_index is None:
        idx = np.argmax(probs32, axis=-1)
    else:
        idx = np.asarray(class_index, dtype=np.int64).reshape(-1)
        if idx.shape != (n,):
            raise ValueError(f"class_index has {idx.size} entries for {n} images")
        if ((idx < 0) | (idx >= probs32.shape[1])).any():
            raise ValueError(f"class_index out of range for {probs32.shape[1]} classes")
    rows = np.arange(n)
    p_c = probs32[rows, idx]
    onehot = np.zeros_like(probs32)
    onehot[rows, idx] = 1.0
    g = ((onehot - p_c[:, None]) * probs32).astype(np.float64)  # float32 as TF, then exact
    alpha = g @ kernel.astype(np.float64).T / (h * w)  # (N, m)
    cams = np.einsum("nhwm,nm->nhw", features.astype(np.float64), alpha)
    np.maximum(cams, 0.0, out=cams)
    peaks = cams.reshape(n, -1).max(axis=1)
    scale = np.where(peaks > 0, peaks, 1.0)
    return (cams / scale[:, None, None]).astype(np.float32)


class OnnxClassifier:
    """A model served by ONNX Runtime, with the interface of :class:`ai.model.Classifier`."""

    runtime = "onnx"

    def __init__(
        self, directory: Path, *, threads: int | None = None, source: Path | None = None
    ) -> None:
        """*directory* holds the export; *source* (default: the same) the model folder whose
        ``model.json`` and abstention statistics are served."""
        self.directory = Path(directory)
        self.source = Path(source) if source is not None else self.directory
        self.spec = read_spec(self.source)
        self.density = load_density(self.source, self.spec)
        path = self.directory / ONNX_FILE
        head_path = self.directory / HEAD_FILE
        for needed in (path, head_path):
            if not needed.is_file():
                raise ModelError(
                    f"{self.directory}: no {needed.name}; run ai.runtime.export_onnx first"
                )
        self.session = _session(path, threads)
        with np.load(head_path) as head:
            self.kernel = np.asarray(head["kernel"], dtype=np.float32)
            self.bias = np.asarray(head["bias"], dtype=np.float32)
            head_source = str(head[SOURCE_KEY]) if SOURCE_KEY in head else ""
        meta = self.session.get_modelmeta().custom_metadata_map
        if head_source != meta.get(SOURCE_KEY, ""):
            raise ModelError(
                f"{self.directory}: {HEAD_FILE} and {ONNX_FILE} come from different exports; "
                "export again"
            )
        self._check_signature()
        self._lock = threading.Lock()  # as Classifier: one inference at a time per model

    def _check_signature(self) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if inputs != [INPUT] or set(outputs) != {FEATURES, PROBABILITIES}:
            raise ModelError(
                f"{self.directory / ONNX_FILE}: expected input {INPUT!r} and outputs "
                f"{FEATURES!r}, {PROBABILITIES!r}; found {inputs} -> {sorted(outputs)}"
            )
        classes = len(self.spec.classes)
        if outputs[PROBABILITIES][-1] != classes or self.kernel.shape[1] != classes:
            raise ModelError(f"{self.directory}: the ONNX model does not have {classes} classes")
        if len(outputs[FEATURES]) != 4 or outputs[FEATURES][-1] != self.kernel.shape[0]:
            raise ModelError(f"{self.directory}: {HEAD_FILE} does not fit the feature map")
        self._feature_shape = outputs[FEATURES]

    def _input(self, x: np.ndarray) -> np.ndarray:
        arr = np.ascontiguousarray(x, dtype=np.float32)
        want = (self.spec.input_size, self.spec.input_size, self.spec.channels)
        if arr.ndim != 4 or arr.shape[1:] != want:
            raise ModelError(
                f"{self.spec.name}: input batch has shape {arr.shape}, expected (N, *{want})"
            )
        return arr

    def _run(self, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        with self._lock:
            return self.session.run(outputs, {INPUT: x})

    def warm_up(self) -> None:
        """Run one prediction and one heatmap, as :meth:`Classifier.warm_up`."""
        warm_up(self)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (N, classes)."""
        arr = self._input(x)
        if not len(arr):
            return np.zeros((0, len(self.spec.classes)))
        (probs,) = self._run(arr, [PROBABILITIES])
        return np.asarray(probs, dtype=np.float64)

    def heatmaps(self, x: np.ndarray, class_index: np.ndarray | None = None) -> np.ndarray:
        """Grad-CAM maps in [0, 1], shape (N, h, w), for each image's class (default predicted)."""
        return self.predict_and_explain(x, class_index)[1]

    def predict_and_explain(
        self, x: np.ndarray, class_index: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and Grad-CAM maps from one pass through the network."""
        arr = self._input(x)
        if not len(arr):
            h, w = (d if isinstance(d, int) else 0 for d in self._feature_shape[1:3])
            return np.zeros((0, len(self.spec.classes))), np.zeros((0, h, w), np.float32)
        features, probs = self._run(arr, [FEATURES, PROBABILITIES])
        cams = closed_form_gradcam(features, probs, self.kernel, class_index)
        return np.asarray(probs, dtype=np.float64), cams

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw probabilities and feature maps from one pass (:class:`ai.model.Predictor`)."""
        arr = self._input(x)
        if not len(arr):
            shape = tuple(d if isinstance(d, int) else 0 for d in self._feature_shape[1:])
            return np.zeros((0, len(self.spec.classes))), np.zeros((0, *shape), np.float32)
        features, probs = self._run(arr, [FEATURES, PROBABILITIES])
        return np.asarray(probs, dtype=np.float64), np.asarray(features, dtype=np.float32)

    def explain(
        self, features: np.ndarray, probs: np.ndarray, class_index: np.ndarray | None = None
    ) -> np.ndarray:
        return closed_form_gradcam(features, probs, self.kernel, class_index)

    def novelty(self, features: np.ndarray) -> np.ndarray | None:
        from ai.abstention import embed

        return None if self.density is None else self.density.score(embed(features))


def needs_export(directory: Path) -> bool:
    """True when the folder has no ONNX export, or one made from other Keras weights.

    An export older than ``model.keras`` is checked against the SHA-256 of the weights recorded
    at export time rather than trusted or redone on its date alone: copies and package installs
    reset modification times, while weights replaced by an older-dated file are still caught.
    """
    spec = read_spec(directory)
    onnx_path, head_path = directory / ONNX_FILE, directory / HEAD_FILE
    if not onnx_path.is_file() or not head_path.is_file():
        return True
    weights = directory / spec.file
    if not weights.is_file():
        return False  # an ONNX-only folder: nothing to export from, serve what is there
    try:
        with np.load(head_path) as head:
            recorded = str(head[SOURCE_KEY]) if SOURCE_KEY in head else ""
    except (OSError, ValueError):  # unreadable or truncated: export again
        return True
    return recorded != _sha256(weights)


_cache: dict[Path, OnnxClassifier] = {}
_cache_lock = threading.Lock()


def load_runtime_classifier(
    name_or_path: str, runtime: str = "onnx", *, threads: int | None = None
) -> OnnxClassifier | Classifier:
    """A shipped model (by name) or a model folder, served by ONNX Runtime (``"onnx"``; exported
    first when the folder has no export or one from other weights, see :func:`needs_export`) or
    by Keras (``"keras"``). Loaded once per process, as :func:`ai.model.load_classifier`;
    *threads* (ONNX Runtime intra-op threads) applies when the model is first loaded."""
    if runtime not in RUNTIMES:
        raise ModelError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if runtime == "keras":
        return load_classifier(name_or_path)
    directory = model_dir(name_or_path)
    with _cache_lock:
        cached = _cache.get(directory)
        if cached is not None:
            return cached
        serve_from = directory
        if needs_export(directory):
            serve_from = export_folder(directory)
            if needs_export(serve_from):
                try:
                    export_onnx(directory, serve_from / ONNX_FILE)
                except OSError as exc:
                    raise ModelError(
                        f"{directory}: cannot write the ONNX export to {serve_from} ({exc}); "
                        "set PACS_NODE_CACHE to a writable folder"
                    ) from exc
        classifier = OnnxClassifier(serve_from, threads=threads, source=directory)
        _cache[directory] = classifier
        return classifier


_digests: dict[tuple[Path, int, int], str] = {}


def weights_sha256(name_or_path: str) -> str:
    """The SHA-256 of a model's weights (its ``model.keras``, else its ONNX export), as the
    audit trail names them; hashed once per file and modification."""
    directory = model_dir(name_or_path)
    spec = read_spec(directory)
    weights = directory / spec.file
    if not weights.is_file():
        weights = directory / ONNX_FILE
    st = weights.stat()
    key = (weights.resolve(), st.st_mtime_ns, st.st_size)
    with _cache_lock:
        if key not in _digests:
            _digests[key] = _sha256(weights)
        return _digests[key]


def cache_root() -> Path:
    """Where exports of read-only model folders go: ``$PACS_NODE_CACHE``, else
    ``~/.cache/pacs-node``."""
    configured = os.environ.get("PACS_NODE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "pacs-node"


def export_folder(directory: Path) -> Path:
    """The folder an export of *directory* is served from.

    A writable model folder holds its own export. A model shipped in the package, or a
    read-only folder, is exported once into the cache, in a folder named after the weights' SHA-256
    so new weights never meet an old export; ``model.json`` is copied beside it.
    """
    shipped = directory.resolve().is_relative_to(BUILTIN_DIR.resolve())
    if not shipped and os.access(directory, os.W_OK):
        return directory
    spec = read_spec(directory)
    target = cache_root() / "onnx" / f"{spec.name}-{_sha256(directory / spec.file)[:16]}"
    target.mkdir(parents=True, exist_ok=True)
    meta = target / "model.json"
    if not meta.is_file():
        with _staged(meta) as tmp:
            shutil.copyfile(directory / "model.json", tmp)
    return target
