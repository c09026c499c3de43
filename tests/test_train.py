"""Training: patient-disjoint splits, backbones, two phases, shortcut-removing preprocessing that
serving repeats, reproducibility and DCGAN balancing; tiny models trained in seconds."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from ai.analysis import analyse_images
from ai.calibration import apply_temperature
from ai.dcgan import GAN_SIZE, balance_with_dcgan, train_dcgan
from ai.gradcam import build_grad_model, gradcam
from ai.model import Classifier, ModelError, ModelSpec
from ai.preprocess import (
    batch,
    check_options,
    heatmap_in_image_frame,
    parse_options,
    prepare,
    read_image_file,
    to_model_input,
)
from ai.train import (
    BACKBONES,
    TrainSettings,
    build_model,
    read_manifest,
    split_by_group,
    train,
)
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow

MANIFEST = SHARED_DATA / "manifest.csv"
SHORTCUT_OPTIONS = {"crop": 0.8, "mask_border": 0.06, "clahe": 2.0}


def settings(tmp_path: Path, **kw: object) -> TrainSettings:
    base: dict[str, object] = {
        "task": "cxr",
        "data_dir": SHARED_DATA,
        "manifest": MANIFEST,
        "out_dir": tmp_path / "model",
        "image_size": 32,
        "epochs": 1,
        "limit_per_class": 4,
        "run_eagerly": True,  # no tf.function tracing: seconds instead of a minute per test
    }
    base.update(kw)
    return TrainSettings(**base)  # type: ignore[arg-type]


def chest_image() -> np.ndarray:
    return read_image_file(next((SHARED_DATA / "cxr" / "normal").glob("*.jpg")))


# ----------------------------------------------------------------------------- the split


@pytest.mark.parametrize("task", ["cxr", "ct"])
def test_split_is_patient_disjoint_stratified_and_reproducible(task):
    samples = read_manifest(MANIFEST, task, SHARED_DATA)
    assert len(samples) > 300
    splits = split_by_group(samples, seed=7, validation_fraction=0.15, test_fraction=0.15)
    groups = {k: {s.group for s in v} for k, v in splits.items()}
    assert not groups["train"] & groups["test"]
    assert not groups["train"] & groups["validation"]
    assert not groups["validation"] & groups["test"]
    assert sum(len(v) for v in splits.values()) == len(samples)
    for split in splits.values():
        assert {s.label for s in split} == {s.label for s in samples}
    again = split_by_group(samples, seed=7, validation_fraction=0.15, test_fraction=0.15)
    assert again == splits
    other = split_by_group(samples, seed=8, validation_fraction=0.15, test_fraction=0.15)
    assert other != splits


def test_cross_validation_folds_keep_the_test_split_and_partition_the_rest():
    samples = read_manifest(MANIFEST, "ct", SHARED_DATA)
    plain = split_by_group(samples, seed=0, validation_fraction=0.15, test_fraction=0.15)
    rest = {s.group for k in ("train", "validation") for s in plain[k]}
    seen: set[str] = set()
    for fold in range(5):
        splits = split_by_group(samples, 0, 0.15, 0.15, cv_fold=(fold, 5))
        assert splits["test"] == plain["test"]  # the test patients never move
        val = {s.group for s in splits["validation"]}
        assert not val & {s.group for s in splits["train"]} and not val & seen
        assert {s.label for s in splits["validation"]} == {"covid", "noncovid"}
        assert 0.15 < len(val) / len(rest) < 0.25
        seen |= val
    assert seen == rest  # every non-test group validates exactly once
    with pytest.raises(ValueError, match="cv_fold"):
        settings(Path("/tmp/x"), cv_fold=(5, 5))


# ------------------------------------------------------------------------- preprocessing


def test_no_options_leave_the_old_preprocessing_unchanged():
    image = chest_image()
    assert prepare(image, None) is image and prepare(image, {}) is image
    old = to_model_input(image, 64, 3)
    assert np.array_equal(to_model_input(image, 64, 3, {}), old)
    assert np.array_equal(batch([image], 64, 3, None)[0], old)


def test_crop_keeps_the_centre():
    image = np.zeros((100, 200), np.float32)
    image[50, 100] = 1.0  # the centre survives the crop
    image[2, 2] = 1.0  # a corner mark does not
    out = prepare(image, {"crop": 0.8})
    assert out.shape == (80, 160)
    assert out.sum() == 1.0 and out[40, 80] == 1.0


def test_square_cuts_the_central_square_before_the_crop():
    wide = np.zeros((100, 160), np.float32)
    wide[:, 30:130] = 0.5  # the central 100 x 100
    wide[50, 80] = 1.0
    out = prepare(wide, {"square": True})
    assert out.shape == (100, 100) and np.all(out[out != 1.0] == 0.5) and out[50, 50] == 1.0
    tall = prepare(np.ones((90, 60), np.float32), {"square": True, "crop": 0.5})
    assert tall.shape == (30, 30)
    # a square image is left as it was; both orientations give the same model input shape
    assert prepare(np.ones((64, 64), np.float32), {"square": True}).shape == (64, 64)
    heat = heatmap_in_image_frame(np.ones((4, 4), np.float32), (100, 160), {"square": True})
    assert heat[50, 80] == 1.0 and heat[50, 29] == 0.0 and heat[50, 130] == 0.0
    assert heat[50, 30] == 1.0 and heat[50, 129] == 1.0


def test_mask_border_blanks_corner_text_with_the_inner_mean():
    image = np.full((100, 100), 0.3, np.float32)
    image[1:6, 1:30] = 1.0  # burned-in text in a corner
    out = prepare(image, {"mask_border": 0.1})
    assert out.shape == image.shape
    assert np.allclose(out[:10, :], 0.3) and np.allclose(out[:, :10], 0.3)
    assert np.allclose(out[10:90, 10:90], image[10:90, 10:90])


@pytest.mark.parametrize("option", [{"clahe": 2.0}, {"equalize": True}])
def test_contrast_normalisation_spreads_a_narrow_histogram(option):
    rng = np.random.default_rng(0)
    image = (0.45 + 0.1 * rng.random((128, 128))).astype(np.float32)  # low contrast
    out = prepare(image, option)
    assert out.shape == image.shape and out.min() >= 0.0 and out.max() <= 1.0
    assert np.std(out) > 2 * np.std(image)


def test_options_parse_validate_and_serving_maps_heatmaps_back():
    assert parse_options("crop=0.8,mask_border=0.06,clahe") == SHORTCUT_OPTIONS
    assert parse_options("equalize") == {"equalize": True}
    assert parse_options("square,crop=0.9") == {"square": True, "crop": 0.9}
    assert parse_options("square=false") == {}
    assert parse_options("none") == {}
    bad_options = ({"crop": 0.0}, {"mask_border": 0.5}, {"sharpen": 1}, {"square": 0.5})
    for bad in (*bad_options, {"clahe": 2, "equalize": True}):
        with pytest.raises(ValueError):
            check_options(bad)
    spec = {"name": "m", "version": "1", "task": "cxr", "input_size": 8, "gradcam_layer": "x"}
    spec["classes"] = [{"name": n, "scheme": "S", "value": n, "meaning": n} for n in "ab"]
    with pytest.raises(ModelError):  # a model needing an unknown option is refused, not run
        ModelSpec.from_json({**spec, "preprocessing": {"sharpen": 1}})
    assert ModelSpec.from_json(spec).preprocessing == {}
    heat = heatmap_in_image_frame(np.ones((4, 4), np.float32), (100, 200), {"crop": 0.5})
    assert heat.shape == (100, 200)
    assert heat[50, 100] == 1.0 and heat[0, 0] == 0.0 and heat[50, 10] == 0.0


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_builds_predicts_and_gives_a_gradcam_map(tmp_path, backbone):
    info = BACKBONES[backbone]
    s = settings(tmp_path, backbone=backbone, image_size=max(info.min_size, 64))
    model, _, layer = build_model(s, 3)
    x = to_model_input(chest_image(), s.image_size, info.channels)[np.newaxis]
    probs = np.asarray(model(x, training=False))
    assert probs.shape == (1, 3) and abs(float(probs.sum()) - 1.0) < 1e-4
    heat = gradcam(build_grad_model(model, layer), x)
    assert heat.ndim == 3 and heat.shape[0] == 1 and min(heat.shape[1:]) >= 1
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0


def test_tiny_model_trains_and_serves(tmp_path):
    s = settings(tmp_path, image_size=48, epochs=2, limit_per_class=8, name="tiny")
    s.version = "0.0.1"
    metrics = train(s)
    assert metrics["split_sizes"]["train"] == 24
    assert len(metrics["history"]["loss"]) == 2 and metrics["phase_epochs"] == [2, 0]
    classifier = Classifier(tmp_path / "model")
    assert classifier.spec.name == "tiny" and classifier.spec.input_size == 48
    assert classifier.spec.channels == 1 and classifier.spec.preprocessing == {}
    image = chest_image()
    analysis = analyse_images(["x"], [image], classifier)
    assert abs(sum(analysis.prediction.probabilities) - 1) < 1e-6
    heatmap = analysis.explained[0].heatmap  # the 6 x 6 map over the whole image, its shape
    assert heatmap.shape == image.shape and heatmap.min() >= 0 and heatmap.max() <= 1


def test_pretrained_lite0_two_phases_with_shortcut_preprocessing_serves_the_same(tmp_path):
    s = settings(
        tmp_path,
        backbone="efficientnet_lite0",
        pretrained=True,
        image_size=64,
        phase1_epochs=1,
        phase2_epochs=1,
        fine_tune_layers=30,
        limit_per_class=8,
        preprocessing=dict(SHORTCUT_OPTIONS),
        lr_schedule="cosine",
    )
    metrics = train(s)
    assert metrics["phase_epochs"] == [1, 1] and len(metrics["history"]["val_loss"]) == 2
    assert metrics["gradcam_layer"] == "top_activation"

    recorded = json.loads((tmp_path / "model" / "training.json").read_text())["settings"]
    assert TrainSettings(**recorded).record() == s.record()  # every setting round-trips
    assert recorded["backbone"] == "efficientnet_lite0" and recorded["pretrained"] is True
    for key in ("task", "seed", "validation_fraction", "test_fraction", "limit_per_class"):
        assert key in recorded  # what ai.evaluate rebuilds the test split from

    classifier = Classifier(tmp_path / "model")
    spec = classifier.spec
    assert spec.preprocessing == SHORTCUT_OPTIONS and spec.channels == 3
    assert "EfficientNet-Lite0" in spec.description
    model_json = json.loads((tmp_path / "model" / "model.json").read_text())
    assert model_json["preprocessing"] == SHORTCUT_OPTIONS
    assert classifier.model.get_layer("top_activation") is not None  # flat graph

    image = chest_image()
    analysis = analyse_images(["x"], [image], classifier)
    with_options = classifier.predict(batch([image], 64, 3, SHORTCUT_OPTIONS))[0]
    without = batch([image], 64, 3)
    calibrated = apply_temperature(with_options[None], spec.temperature)[0]
    assert spec.temperature != 1.0  # fitted on validation at the end of training
    assert np.allclose(analysis.prediction.probabilities, calibrated, atol=1e-6)
    assert not np.allclose(without, batch([image], 64, 3, SHORTCUT_OPTIONS))
    maps = classifier.heatmaps(batch([image], 64, 3, SHORTCUT_OPTIONS))
    assert maps.shape == (1, 2, 2) and maps.min() >= 0.0 and maps.max() <= 1.0
    # the overlay's map is placed over the uncropped image
    assert analysis.explained[0].heatmap.shape == image.shape


def test_random_init_keras_application_builds_and_trains_one_step(tmp_path):
    s = settings(tmp_path, backbone="mobilenet_v2", epochs=1, limit_per_class=4)
    metrics = train(s)
    assert metrics["split_sizes"]["train"] == 12 and len(metrics["history"]["loss"]) == 1
    spec = json.loads((tmp_path / "model" / "model.json").read_text())
    assert spec["channels"] == 3 and spec["gradcam_layer"] == "out_relu"
    assert "randomly initialised" in spec["description"]
    model, base_layers, layer = build_model(s, 3)  # flat: Grad-CAM works before saving too
    assert layer == "out_relu" and model.get_layer("out_relu") in base_layers
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    assert gradcam(build_grad_model(model, layer), x).shape == (2, 1, 1)


def test_only_lite_can_be_pretrained_and_sizes_are_checked(tmp_path):
    with pytest.raises(ValueError, match="only the efficientnet_lite backbones"):
        settings(tmp_path, backbone="resnet50", pretrained=True)
    with pytest.raises(ValueError, match="at least 75"):
        settings(tmp_path, backbone="inception_v3", image_size=64)
    with pytest.raises(ValueError, match="unknown backbone"):
        settings(tmp_path, backbone="alexnet")
    assert {"efficientnet_lite0", "efficientnet_b0", "inception_resnet_v2"} <= set(BACKBONES)
    from pacs_node.cli import BACKBONE_NAMES  # the parser's copy, kept free of TensorFlow

    assert list(BACKBONES) == BACKBONE_NAMES


def test_same_seed_same_split_and_same_first_epoch_loss(tmp_path):
    first = train(settings(tmp_path, out_dir=tmp_path / "a"))
    second = train(settings(tmp_path, out_dir=tmp_path / "b"))
    assert first["split_sizes"] == second["split_sizes"]
    assert first["history"]["loss"][0] == pytest.approx(second["history"]["loss"][0], rel=1e-4)
    assert first["test_confusion"] == second["test_confusion"]


def test_dcgan_adds_samples_to_minority_classes_only():
    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 2 + [2] * 39)
    x = rng.random((len(y), 32, 32, 3)).astype(np.float32)
    gan = partial(train_dcgan, eager=True)  # the real DCGAN, one step, without tracing
    x2, y2, info = balance_with_dcgan(x, y, 3, steps=1, seed=0, train_fn=gan)
    assert np.bincount(y2).tolist() == [40, 40, 39]  # one short of 40 is not worth a GAN
    assert info["synthetic"] == {1: 38} and info["skipped"] == {2: 1}
    assert np.array_equal(x2[: len(x)], x) and np.array_equal(y2[: len(y)], y)
    fake = x2[len(x) :]
    assert fake.shape == (38, 32, 32, 3) and fake.min() >= 0.0 and fake.max() <= 1.0
    assert np.array_equal(fake[..., 0], fake[..., 2])  # grey, replicated like real input
    assert GAN_SIZE == 64


def test_dcgan_flag_balances_the_training_split_only(tmp_path):
    calls = []

    class Generator:  # what ai.dcgan.sample needs: generator(z) -> (n, 64, 64, 1) in [-1, 1]
        def __call__(self, z, training=False):
            return np.zeros((len(z), GAN_SIZE, GAN_SIZE, 1), np.float32)

    def cheap_gan(images, *, steps, seed):
        calls.append(len(images))
        return Generator(), []

    s = settings(tmp_path, limit_per_class=6, dcgan=True, train_class_limit={"covid": 2})
    metrics = train(s, dcgan_fn=cheap_gan)
    assert calls == [2]  # one GAN, on the two real training COVID-19 images
    assert metrics["dcgan"]["synthetic"] == {"covid": 4}
    assert metrics["train_images_per_class"] == {"covid": 6, "pneumonia": 6, "normal": 6}
    assert metrics["split_sizes"]["train"] == 14  # real images; validation/test untouched
    assert metrics["split_sizes"]["validation"] == 18
    assert (tmp_path / "model" / "dcgan_samples.png").is_file()  # real row above synthetic row


def test_cli_train_passes_every_setting(monkeypatch, tmp_path):
    import ai.train
    from pacs_node.cli import main

    seen = {}
    monkeypatch.setattr(ai.train, "train", lambda s: seen.setdefault("s", s) and {"ok": 1})
    argv = ["train", "--task", "ct", "--data", str(SHARED_DATA), "--out", str(tmp_path)]
    argv += ["--backbone", "efficientnet_lite0", "--pretrained", "--phase1-epochs", "2"]
    argv += ["--phase2-epochs", "3", "--phase2-learning-rate", "3e-5", "--lr-schedule", "cosine"]
    argv += ["--preprocess", "crop=0.8,clahe", "--preprocess", "mask_border=0.05", "--dcgan"]
    argv += ["--train-class-limit", "covid=20", "--no-class-weights", "--horizontal-flip"]
    assert main(argv) == 0
    s = seen["s"]
    assert (s.backbone, s.pretrained, s.phase1_epochs, s.phase2_epochs) == (
        "efficientnet_lite0",
        True,
        2,
        3,
    )
    assert s.phase2_learning_rate == 3e-5 and s.lr_schedule == "cosine"
    assert s.preprocessing == {"crop": 0.8, "clahe": 2.0, "mask_border": 0.05}
    assert s.dcgan and s.train_class_limit == {"covid": 20}
    assert not s.class_weights and s.horizontal_flip
    assert main(argv[:7] + ["--backbone", "vgg16", "--pretrained"]) == 2  # a clear error
