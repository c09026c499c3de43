"""EfficientNet-Lite0/1/2: the shipped ImageNet weights reproduce the original PyTorch models.

The reference outputs in ai/weights/efficientnet_liteN_port_check.json were computed with
PyTorch by scripts/port_efficientnet_lite.py; torch is not needed here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ai import backbones
from ai.preprocess import read_image_file, to_model_input

SHIPPED = [name for name, v in backbones.VARIANTS.items() if v.weights.is_file()]
CHECK = json.loads(backbones.VARIANTS["lite0"].port_check.read_text())


def _images(shared_data: Path, check: dict[str, Any] = CHECK) -> np.ndarray:
    return np.stack(
        [
            to_model_input(read_image_file(shared_data / ref["file"]), check["input_size"], 3)
            for ref in check["images"]
        ]
    )


@pytest.fixture(scope="module")
def imagenet_model() -> Any:
    """Pooled features and logits of the ImageNet model, as loaded from the package data."""
    import keras

    model = backbones.efficientnet_lite0(weights="imagenet", include_top=True)
    return keras.Model(model.input, [model.get_layer("avg_pool").output, model.output])


def test_every_shipped_variant_has_its_port_check() -> None:
    assert "lite0" in SHIPPED
    for name in SHIPPED:
        v = backbones.VARIANTS[name]
        assert v.top_weights.is_file() and v.port_check.is_file(), name
        assert json.loads(v.port_check.read_text())["input_size"] == v.input_size


@pytest.mark.parametrize("name", SHIPPED)
def test_imagenet_weights_match_pytorch_on_real_images(name: str, shared_data: Path) -> None:
    import keras

    v = backbones.VARIANTS[name]
    check = json.loads(v.port_check.read_text())
    size = check["input_size"]
    model = backbones.efficientnet_lite(name, (size, size, 3), include_top=True, weights="imagenet")
    probe = keras.Model(model.input, [model.get_layer("avg_pool").output, model.output])
    assert len(check["images"]) == 3
    features, logits = (np.asarray(t) for t in probe(_images(shared_data, check)))
    assert features.shape == (3, backbones.HEAD_FILTERS)
    assert logits.shape == (3, backbones.NUM_CLASSES)
    for i, ref in enumerate(check["images"]):
        np.testing.assert_allclose(features[i, :16], ref["features_first16"], atol=1e-3, rtol=1e-3)
        assert features[i].mean() == pytest.approx(ref["features_mean"], rel=1e-3, abs=1e-4)
        assert np.linalg.norm(features[i]) == pytest.approx(ref["features_l2"], rel=1e-3)
        top5 = [int(c) for c in np.argsort(-logits[i])[:5]]
        assert top5 == ref["top5"], ref["file"]
        # The classifier ships as float16: logits move by ~1e-3, far below the top-5 gaps.
        np.testing.assert_allclose(logits[i, top5], ref["top5_logits"], atol=5e-3)


def test_feature_extractor_without_top(imagenet_model: Any, shared_data: Path) -> None:
    model = backbones.efficientnet_lite0(weights="imagenet", include_top=False, pooling="avg")
    assert model.output.shape == (None, backbones.HEAD_FILTERS)
    assert model.get_layer("top_activation").output.shape == (None, 7, 7, backbones.HEAD_FILTERS)
    assert "predictions" not in [layer.name for layer in model.layers]
    image = _images(shared_data)[:1]
    np.testing.assert_allclose(
        np.asarray(model(image)), np.asarray(imagenet_model(image)[0]), atol=1e-5
    )


def test_untrained_variants_build() -> None:
    fmap = backbones.efficientnet_lite0(input_shape=(96, 96, 3))
    assert fmap.output.shape == (None, 3, 3, backbones.HEAD_FILTERS)
    assert fmap.get_layer(backbones.FEATURE_LAYER) is fmap.layers[-1]
    # The official Lite scaling: first and last stage keep their repeats, stem and head widths
    # stay 32 and 1280 (Lite2's 352-wide last stage is the width multiplier at work).
    assert [len(backbones.block_specs(n)) for n in ("lite0", "lite1", "lite2")] == [16, 21, 21]
    assert [backbones.block_specs(n)[-1].filters_out for n in ("lite1", "lite2")] == [320, 352]
    assert backbones.block_specs("lite2")[0].filters_in == backbones.STEM_FILTERS
    assert backbones.round_filters(112, 1.1) == 120 and backbones.round_filters(40, 1.1) == 48
    lite2 = backbones.efficientnet_lite("lite2", (64, 64, 3), pooling="avg")
    assert lite2.output.shape == (None, backbones.HEAD_FILTERS)
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        backbones.efficientnet_lite("lite4")


def test_bad_weights_are_refused_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        backbones.efficientnet_lite0(weights=tmp_path / "nope.weights.h5")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        backbones.efficientnet_lite0(weights="imagenet21k")
    not_hdf5 = tmp_path / "junk.weights.h5"
    not_hdf5.write_text("not weights")
    with pytest.raises(ValueError, match="not an HDF5 weights file"):
        backbones.efficientnet_lite0(weights=not_hdf5)
    monkeypatch.setattr(backbones, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="port_efficientnet_lite.py --variant lite0"):
        backbones.efficientnet_lite0(weights="imagenet")
    with pytest.raises(ValueError, match="pooling"):
        backbones.efficientnet_lite0(pooling="mean")
    with pytest.raises(ValueError, match="RGB"):
        backbones.efficientnet_lite0(input_shape=(224, 224, 1))


def test_shipped_weights_stay_small() -> None:
    for name in SHIPPED:
        v = backbones.VARIANTS[name]
        assert v.weights.stat().st_size + v.top_weights.stat().st_size < 25e6, name


def test_shipped_models_fit_in_40_mb_with_their_cards() -> None:
    models = Path(backbones.__file__).parent / "models"
    shipped = sorted(p for p in models.iterdir() if p.is_dir())
    assert [p.name for p in shipped] == ["ct", "cxr"]
    for folder in shipped:
        card = (folder / "MODEL_CARD.md").read_text()
        assert "not for diagnostic use" in card.lower() and "research use only" in card.lower()
        assert (folder / "model.json").is_file() and (folder / "training.json").is_file()
    total = sum(f.stat().st_size for p in shipped for f in p.rglob("*") if f.is_file())
    assert total <= 40e6
