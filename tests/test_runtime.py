"""ONNX Runtime serving: the shipped models exported to ONNX agree with Keras on real images, in
probabilities and in Grad-CAM (closed form against TensorFlow's autodiff), and models whose head
the closed form does not cover are refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
import pytest

from ai.model import BUILTIN_DIR, Classifier, ModelError
from ai.preprocess import batch, dicom_to_image, read_image_file
from ai.runtime import (
    HEAD_FILE,
    ONNX_FILE,
    OnnxClassifier,
    export_onnx,
    find_head,
    load_runtime_classifier,
    needs_export,
)
from tests.orthanc import SHARED_DATA

pytestmark = pytest.mark.slow  # two tf2onnx conversions, ~10 s each

CT_SERIES = SHARED_DATA / "dicom" / "ct_series" / "lung_pet_ct_dx_A0002_B40f"
PROB_TOL = 1e-4
# Both sides compute in float32 with different summation orders; measured max |diff| ~3e-6.
CAM_TOL = 1e-3
CAM_CORR = 0.999


def _jpegs(task: str, per_class: int) -> list[np.ndarray]:
    images = []
    for folder in sorted((SHARED_DATA / task).iterdir()):
        files = sorted(folder.glob("*.jpg"))
        step = max(1, len(files) // per_class)
        images += [read_image_file(f) for f in files[::step][:per_class]]
    return images


class Served(NamedTuple):
    keras: Classifier
    onnx: OnnxClassifier
    x: np.ndarray
    model_json: bytes  # as before the export


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Served]:
    """Per task: the Keras classifier, the ONNX one exported into a copy of the model folder,
    and a batch of real preprocessed images (JPEGs of every class; for CT also DICOM slices)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for task in ("cxr", "ct"):
        directory = root / task
        shutil.copytree(
            BUILTIN_DIR / task,
            directory,
            ignore=shutil.ignore_patterns("*.onnx", "gradcam_head.npz"),
        )
        model_json = (directory / "model.json").read_bytes()
        if task == "cxr":
            assert export_onnx(directory) == directory / ONNX_FILE
            onnx_model = OnnxClassifier(directory)
        else:  # the serving path: exported on first load
            assert needs_export(directory)
            onnx_model = load_runtime_classifier(str(directory), runtime="onnx")
            assert isinstance(onnx_model, OnnxClassifier)
        keras_model = Classifier(directory)
        spec = keras_model.spec
        images = _jpegs(task, per_class=4)
        if task == "ct":
            slices = sorted(CT_SERIES.glob("*.dcm"))[::3]
            images += [dicom_to_image(pydicom.dcmread(p), window=spec.window) for p in slices]
        x = batch(images, spec.input_size, spec.channels)
        out[task] = Served(keras_model, onnx_model, x, model_json)
    return out


@pytest.mark.parametrize("task", ["cxr", "ct"])
def test_export_writes_onnx_and_head_beside_unchanged_model_json(models, task):
    keras_model, onnx_model, _, model_json = models[task]
    directory = onnx_model.directory
    assert (directory / ONNX_FILE).is_file() and (directory / HEAD_FILE).is_file()
    assert (directory / "model.json").read_bytes() == model_json
    assert onnx_model.spec == keras_model.spec
    assert [o.name for o in onnx_model.session.get_outputs()] == ["features", "probabilities"]
    assert not needs_export(directory)


@pytest.mark.parametrize("task", ["cxr", "ct"])
def test_probabilities_agree_with_keras_on_real_images(models, task):
    keras_model, onnx_model, x, _ = models[task]
    assert len(x) >= 8
    expected = np.asarray(keras_model.model.predict_on_batch(x), dtype=np.float64)
    got = onnx_model.predict(x)
    assert got.shape == expected.shape == (len(x), len(keras_model.spec.classes))
    assert np.abs(got - expected).max() < PROB_TOL
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    one = onnx_model.predict(x[:1])  # batch of one, as for a single X-ray
    assert np.abs(one - expected[:1]).max() < PROB_TOL


def _assert_cams_agree(expected: np.ndarray, got: np.ndarray) -> None:
    assert got.shape == expected.shape and got.dtype == np.float32
    assert got.min() >= 0.0 and got.max() <= 1.0
    assert np.abs(got - expected).max() < CAM_TOL
    for e, g in zip(expected, got, strict=True):
        if e.std() == 0 or g.std() == 0:  # an all-zero map (no positive evidence) on both sides
            assert np.abs(e - g).max() < CAM_TOL
        else:
            assert np.corrcoef(e.ravel(), g.ravel())[0, 1] > CAM_CORR


@pytest.mark.parametrize("task", ["cxr", "ct"])
def test_heatmaps_agree_with_tensorflow_gradcam(models, task):
    keras_model, onnx_model, x, _ = models[task]
    _assert_cams_agree(keras_model.heatmaps(x), onnx_model.heatmaps(x))
    for c in range(len(keras_model.spec.classes)):  # every class, not only the predicted one
        target = np.full(len(x), c)
        _assert_cams_agree(keras_model.heatmaps(x, target), onnx_model.heatmaps(x, target))
    probs, cams = onnx_model.predict_and_explain(x)
    assert np.array_equal(probs, onnx_model.predict(x))
    assert np.array_equal(cams, onnx_model.heatmaps(x))


def test_interface_matches_classifier(models):
    onnx_model, x = models["cxr"].onnx, models["cxr"].x
    onnx_model.warm_up()
    assert onnx_model.predict(x[:0]).shape == (0, 3)
    grid = onnx_model.heatmaps(x[:1]).shape[1:]  # the model's feature-map size
    assert len(grid) == 2 and onnx_model.heatmaps(x[:0]).shape == (0, *grid)
    with pytest.raises(ModelError, match="expected"):
        onnx_model.predict(x[:, :64, :64])
    with pytest.raises(ValueError, match="class_index"):
        onnx_model.heatmaps(x[:2], np.array([0, 7]))


def test_load_runtime_classifier(models):
    onnx_model = models["ct"].onnx
    directory = onnx_model.directory
    exported = (directory / ONNX_FILE).stat().st_mtime_ns
    assert load_runtime_classifier(str(directory)) is onnx_model  # loaded once per process
    assert (directory / ONNX_FILE).stat().st_mtime_ns == exported  # not exported again
    assert isinstance(load_runtime_classifier(str(directory), runtime="keras"), Classifier)
    with pytest.raises(ModelError, match="unknown runtime 'torch'"):
        load_runtime_classifier(str(directory), runtime="torch")
    weights = directory / "model.keras"
    later = exported + 10**9
    os.utime(weights, ns=(later, later))  # newer date, same weights: the export still holds
    assert not needs_export(directory)
    with weights.open("ab") as fh:  # other weights: the export is stale
        fh.write(b"\0")
    assert needs_export(directory)


def test_head_from_another_export_is_refused(models, tmp_path):
    onnx_model = models["cxr"].onnx
    copy = tmp_path / "cxr"
    shutil.copytree(onnx_model.directory, copy)
    with np.load(copy / HEAD_FILE) as head:
        arrays = dict(head)
    arrays["source_sha256"] = np.array("0" * 64)
    with (copy / HEAD_FILE).open("wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(ModelError, match="different exports"):
        OnnxClassifier(copy)


def _model_folder(tmp_path: Path, head: str) -> Path:
    import keras
    from keras import layers

    inputs = keras.Input((32, 32, 1), name="image")
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="last_conv")(inputs)
    if head == "flatten":
        x = layers.Flatten()(x)
    else:  # GAP then a hidden Dense before the classifier
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dense(16, activation="relu")(x)
    outputs = layers.Dense(2, activation="softmax", name="probabilities")(x)
    directory = tmp_path / head
    directory.mkdir()
    keras.Model(inputs, outputs).save(directory / "model.keras")
    meta = json.loads((BUILTIN_DIR / "ct" / "model.json").read_text())
    meta.update(input_size=32, name=f"bad-{head}")
    (directory / "model.json").write_text(json.dumps(meta))
    return directory


@pytest.mark.parametrize("head", ["flatten", "hidden_dense"])
def test_model_without_gap_dense_head_is_refused(tmp_path, head):
    directory = _model_folder(tmp_path, head)
    with pytest.raises(ModelError, match="GlobalAveragePooling2D -> \\(Dropout\\) -> Dense") as exc:
        export_onnx(directory)
    assert "this model has" in str(exc.value)
    assert not (directory / ONNX_FILE).exists() and not (directory / HEAD_FILE).exists()


def test_head_accepts_dense_then_softmax_layer_and_names_missing_layer():
    import keras
    from keras import layers

    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, name="features_out")(inputs)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    dense = layers.Dense(3, name="logits")
    outputs = layers.Softmax()(dense(x))
    model = keras.Model(inputs, outputs)
    assert find_head(model, "features_out").dense is dense
    with pytest.raises(ModelError, match="no layer named 'top_conv'"):
        find_head(model, "top_conv")


def test_shipped_models_without_an_export_are_exported_into_the_cache(tmp_path, monkeypatch):
    from ai import model as model_module
    from ai import runtime

    shipped = tmp_path / "shipped"
    shutil.copytree(
        BUILTIN_DIR / "ct",
        shipped / "ct",
        ignore=shutil.ignore_patterns("*.onnx", "gradcam_head.npz"),
    )
    monkeypatch.setattr(model_module, "BUILTIN_DIR", shipped)
    monkeypatch.setattr(runtime, "BUILTIN_DIR", shipped)
    monkeypatch.setenv("PACS_NODE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "_cache", {})
    classifier = runtime.load_runtime_classifier("ct", "onnx")
    assert classifier.directory.is_relative_to(tmp_path / "cache" / "onnx")
    assert not list((shipped / "ct").glob("*.onnx")), "the package folder must stay untouched"
    x = np.full(
        (1, classifier.spec.input_size, classifier.spec.input_size, classifier.spec.channels),
        0.5,
        np.float32,
    )
    assert classifier.predict(x).shape == (1, len(classifier.spec.classes))
