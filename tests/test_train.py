"""Training: patient-disjoint splits, and a tiny model trained in seconds that the node loads."""

from __future__ import annotations

import pytest

from ai.analysis import analyse_images
from ai.model import Classifier
from ai.preprocess import read_image_file
from ai.train import TrainSettings, read_manifest, split_by_group, train
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("task", ["cxr", "ct"])
def test_split_is_patient_disjoint_stratified_and_reproducible(task):
    samples = read_manifest(SHARED_DATA / "manifest.csv", task, SHARED_DATA)
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


def test_tiny_model_trains_and_serves(tmp_path):
    settings = TrainSettings(
        task="cxr",
        data_dir=SHARED_DATA,
        manifest=SHARED_DATA / "manifest.csv",
        out_dir=tmp_path / "model",
        image_size=48,
        epochs=2,
        limit_per_class=8,
        name="tiny",
        version="0.0.1",
    )
    metrics = train(settings)
    assert metrics["split_sizes"]["train"] == 24
    assert len(metrics["history"]["loss"]) == 2
    classifier = Classifier(tmp_path / "model")
    assert classifier.spec.name == "tiny" and classifier.spec.input_size == 48
    image = read_image_file(next((SHARED_DATA / "cxr" / "normal").glob("*.jpg")))
    analysis = analyse_images(["x"], [image], classifier)
    assert abs(sum(analysis.prediction.probabilities) - 1) < 1e-6
    heatmap = analysis.explained[0].heatmap
    assert heatmap.shape == (6, 6) and heatmap.min() >= 0 and heatmap.max() <= 1
