"""Evaluation: metrics against hand-computed examples, and a full report from a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from ai import metrics as m
from ai.evaluate import comparison_table, evaluate, occlude, rebuild_test_split
from ai.train import TrainSettings, train
from tests.orthanc import SHARED_DATA

# ------------------------------------------------------------------- confusion-based


def test_confusion_matrix_and_per_class_by_hand() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2, 2, 2, 0])
    cm = m.confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    stats = m.per_class(cm)
    # class 0: TP 2, FP 1, FN 1, TN 5
    assert stats["precision"][0] == pytest.approx(2 / 3)
    assert stats["recall"][0] == pytest.approx(2 / 3)
    assert stats["specificity"][0] == pytest.approx(5 / 6)
    assert stats["f1"][0] == pytest.approx(2 / 3)
    # class 1: TP 1, FP 1, FN 1, TN 6
    assert stats["precision"][1] == pytest.approx(0.5)
    assert stats["specificity"][1] == pytest.approx(6 / 7)
    # class 2: TP 3, FP 1, FN 1
    assert stats["f1"][2] == pytest.approx(0.75)
    assert stats["support"].tolist() == [3, 2, 4]
    assert m.accuracy(cm) == pytest.approx(6 / 9)
    assert m.macro_f1(cm) == pytest.approx((2 / 3 + 0.5 + 0.75) / 3)


def test_undefined_metrics_are_nan_not_errors() -> None:
    cm = m.confusion_matrix(np.array([0, 0, 1]), np.array([0, 0, 0]), 3)
    stats = m.per_class(cm)
    assert math.isnan(stats["precision"][1])  # class 1 never predicted
    assert stats["f1"][1] == 0.0  # present in truth, never found
    assert math.isnan(stats["f1"][2])  # absent everywhere: skipped by the macro mean
    assert m.macro_f1(cm) == pytest.approx((0.8 + 0.0) / 2)
    assert math.isnan(m.accuracy(np.zeros((2, 2))))


# ---------------------------------------------------------------------------- ranking


def test_auc_perfect_inverted_tied_and_by_hand() -> None:
    pos = np.array([1, 1, 0, 0], dtype=bool)
    assert m.roc_auc(pos, np.array([0.9, 0.8, 0.2, 0.1])) == 1.0
    assert m.roc_auc(pos, np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    assert m.roc_auc(pos, np.full(4, 0.5)) == 0.5  # all tied: chance
    # pairs (pos, neg): (0.8,0.6) win, (0.8,0.4) win, (0.4,0.6) loss, (0.4,0.4) tie -> 2.5/4
    assert m.roc_auc(pos, np.array([0.8, 0.4, 0.6, 0.4])) == pytest.approx(0.625)
    assert math.isnan(m.roc_auc(np.ones(3, bool), np.array([0.1, 0.2, 0.3])))


def test_auc_of_random_scores_is_near_half() -> None:
    rng = np.random.default_rng(1)
    pos = rng.random(4000) < 0.3
    assert m.roc_auc(pos, rng.random(4000)) == pytest.approx(0.5, abs=0.03)


def test_average_ranks_and_roc_curve_area() -> None:
    assert m.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    pos = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
    scores = np.array([0.9, 0.9, 0.7, 0.3, 0.3, 0.1])
    fpr, tpr = m.roc_curve(pos, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(m.roc_auc(pos, scores))


def test_one_vs_rest_and_macro_auc() -> None:
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[y] * 0.7 + 0.1
    assert m.roc_auc_ovr(y, probs).tolist() == [1.0, 1.0, 1.0]
    probs[0] = [0.1, 0.8, 0.1]  # a class-0 image scored as class 1
    aucs = m.roc_auc_ovr(y, probs)
    assert aucs[0] == pytest.approx(0.75)  # pos {0.1, 0.8} vs neg {0.1 x4}: (4 + 4 * 0.5) / 8
    assert m.macro_auc(y, probs) == pytest.approx(float(np.mean(aucs)))


# ------------------------------------------------------------------------ calibration


def test_ece_zero_for_a_perfectly_calibrated_toy_set() -> None:
    # 10 images at confidence 0.8 with 8 right, 10 at 0.6 with 6 right.
    probs = np.array([[0.8, 0.2]] * 10 + [[0.6, 0.4]] * 10)
    y = np.array([0] * 8 + [1] * 2 + [0] * 6 + [1] * 4)
    assert m.expected_calibration_error(y, probs) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_overconfident_predictions() -> None:
    probs = np.array([[1.0, 0.0]] * 4)
    assert m.expected_calibration_error(np.array([1, 1, 1, 1]), probs) == pytest.approx(1.0)
    # half right at confidence 0.9 -> |0.5 - 0.9| = 0.4
    probs = np.array([[0.9, 0.1]] * 4)
    assert m.expected_calibration_error(np.array([0, 0, 1, 1]), probs) == pytest.approx(0.4)


# ------------------------------------------------------------------------ binary view


def test_binary_covid_view_from_three_classes() -> None:
    y = np.array([0, 0, 1, 2, 2])  # 0 = covid
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # TP
            [0.3, 0.6, 0.1],  # FN
            [0.5, 0.4, 0.1],  # FP
            [0.1, 0.1, 0.8],  # TN
            [0.2, 0.1, 0.7],  # TN
        ]
    )
    view = m.binary_view(y, probs, positive=0)
    assert (view["tp"], view["fn"], view["fp"], view["tn"]) == (1, 1, 1, 2)
    assert view["sensitivity"] == pytest.approx(0.5)
    assert view["specificity"] == pytest.approx(2 / 3)
    # P(covid): pos {0.7, 0.3} vs neg {0.5, 0.1, 0.2}: 3 + 2 wins of 6
    assert view["auc"] == pytest.approx(5 / 6)


def test_pair_view_leaves_other_classes_out_and_renormalises() -> None:
    y = np.array([0, 1, 1, 2, 2, 2])  # 0 covid, 1 pneumonia (positive), 2 normal
    probs = np.array(
        [
            [0.1, 0.8, 0.1],  # covid: not part of the pair, whatever it was called
            [0.6, 0.3, 0.1],  # pneumonia called covid overall, but 0.3 > 0.1: TP in the pair
            [0.2, 0.3, 0.5],  # FN
            [0.1, 0.2, 0.7],  # TN
            [0.8, 0.15, 0.05],  # FP: 0.15 / 0.20 = 0.75
            [0.0, 0.0, 0.0],  # both zero: score 0.5, called positive (FP)
        ]
    )
    view = m.pair_view(y, probs, positive=1, negative=2)
    assert (view["tp"], view["fn"], view["fp"], view["tn"]) == (1, 1, 2, 1)
    assert view["accuracy"] == pytest.approx(2 / 5)
    assert view["sensitivity"] == pytest.approx(0.5)
    assert view["specificity"] == pytest.approx(1 / 3)
    # scores: pos {0.75, 0.375} vs neg {2/9, 0.75, 0.5}: 0.75 wins 1 + ties 0.5 + wins 1 = 2.5;
    # 0.375 wins 1 of 3
    assert view["auc"] == pytest.approx(3.5 / 6)


def test_summarize_adds_the_pair_only_when_both_classes_exist() -> None:
    y = np.array([0, 1, 1, 2])
    probs = np.eye(3)[y] * 0.9 + 0.1 / 3
    three = m.summarize(y, probs, ["a", "b", "c", "d"], ["covid", "pneumonia", "normal"])
    pair = three["pair"]
    assert isinstance(pair, dict)
    assert pair["positive_class"] == "pneumonia" and pair["accuracy"]["value"] == 1.0
    ct = m.summarize(y[:2], probs[:2, :2], ["a", "b"], ["covid", "noncovid"])
    assert "pair" not in ct


def test_occlude_hides_the_centre_box_or_everything_else() -> None:
    image = np.arange(2 * 20 * 20 * 3, dtype=np.float32).reshape(2, 20, 20, 3)
    hidden = occlude(image, keep_centre=False)
    shown = occlude(image, keep_centre=True)
    means = image.mean(axis=(1, 2))  # per image and channel
    # 15 % of 20 = 3: the centre box is rows/cols 3..16
    assert np.allclose(hidden[:, 3:17, 3:17, :], means[:, None, None, :])
    assert np.array_equal(hidden[:, :3], image[:, :3]) and np.array_equal(
        hidden[:, :, 17:], image[:, :, 17:]
    )
    assert np.array_equal(shown[:, 3:17, 3:17], image[:, 3:17, 3:17])
    assert np.allclose(shown[:, :3], means[:, None, None, :])
    assert np.allclose(shown[:, :, 17:], means[:, None, None, :])
    assert image[0, 0, 0, 0] == 0  # the input is not modified


# -------------------------------------------------------------------------- bootstrap


def _one_big_patient() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Patient 'big' has 100 images, all right; ten others have one image each, all wrong."""
    y = np.zeros(110, dtype=np.int64)
    probs = np.tile([0.9, 0.1], (110, 1))
    probs[100:] = [0.1, 0.9]
    groups = ["big"] * 100 + [f"p{i}" for i in range(10)]
    return y, probs, groups


def test_resamples_draw_whole_groups() -> None:
    _, _, groups = _one_big_patient()
    for rows in m.resample_groups(groups, n=200, seed=3):
        big = int(np.sum(rows < 100))
        assert big % 100 == 0  # the big patient comes whole, or not at all
        assert big // 100 + int(np.sum(rows >= 100)) == 11  # as many groups as there are


def test_bootstrap_is_patient_level_reproducible_and_covers_the_estimate() -> None:
    y, probs, groups = _one_big_patient()

    def acc(rows: np.ndarray) -> float:
        return float(np.mean(probs[rows].argmax(axis=1) == y[rows]))

    point = acc(np.arange(110))
    ci = m.bootstrap_ci(acc, groups, n=300, seed=11)
    assert ci.low <= point <= ci.high
    assert ci == m.bootstrap_ci(acc, groups, n=300, seed=11)
    first = [r.tolist() for r in m.resample_groups(groups, n=5, seed=11)]
    assert first == [r.tolist() for r in m.resample_groups(groups, n=5, seed=11)]
    assert first != [r.tolist() for r in m.resample_groups(groups, n=5, seed=12)]
    # Image-level resampling would give about 0.91 +- 0.05; whole patients swing far wider.
    assert ci.low == 0.0 and ci.high - ci.low > 0.5


def test_bootstrap_survives_resamples_without_a_class() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    groups = ["a", "b", "c", "d"]
    result = m.bootstrap_many(
        lambda rows: {"auc": m.roc_auc(y[rows] == 1, probs[rows, 1])}, groups, n=200, seed=0
    )
    assert 0 < result["auc"].n_valid < 200  # some resamples hold one class only
    assert result["auc"].low == result["auc"].high == 1.0
    nothing = m.percentile_interval([float("nan")] * 3)
    assert nothing.n_valid == 0 and math.isnan(nothing.low)


def test_summarize_is_json_ready_with_intervals() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    probs = rng.dirichlet(np.ones(3), size=30) * 0.5 + np.eye(3)[y] * 0.5
    groups = [f"g{i // 2}" for i in range(30)]
    summary = m.summarize(y, probs, groups, ["covid", "pneumonia", "normal"], n_bootstrap=50)
    json.dumps(summary, allow_nan=False)
    assert summary["n_images"] == 30 and summary["n_patients"] == 15
    overall = summary["overall"]
    assert isinstance(overall, dict)
    for entry in overall.values():
        assert entry["ci_low"] <= entry["ci_high"] and entry["n_valid"] == 50
    assert overall["accuracy"]["ci_low"] <= overall["accuracy"]["value"]
    assert overall["accuracy"]["value"] <= overall["accuracy"]["ci_high"]
    binary = summary["binary"]
    assert isinstance(binary, dict) and binary["positive_class"] == "covid"
    assert set(binary["sensitivity"]) == {"value", "ci_low", "ci_high", "n_valid"}


def test_comparison_table_renders_one_row_per_model() -> None:
    entry = {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9, "n_valid": 50}
    row = {
        "overall": {"accuracy": entry, "macro_f1": entry, "macro_auc": {"value": 0.91}},
        "binary": {"sensitivity": {"value": 0.75}, "specificity": {"value": None}},
        "backbone": "small-cnn",
        "image_size": 128,
        "epochs": 20,
        "train_time_s": 61.4,
        "params": 123456,
    }
    table = comparison_table([row, {**row, "backbone": "efficientnet"}])
    lines = table.strip().splitlines()
    assert lines[0].startswith("| Backbone | Image size | Epochs | Accuracy (95% CI)")
    assert len(lines) == 4
    assert "| small-cnn | 128×128 | 20 | 0.800 (0.700–0.900) |" in lines[2]
    assert "| 0.750 | n/a | 0.910 | n/a | 61 | 123,456 |" in lines[2]


# ------------------------------------------------------------------------ integration


@pytest.mark.slow
def test_tiny_model_full_evaluation_report(tmp_path: Path) -> None:
    manifest = SHARED_DATA / "manifest.csv"
    settings = TrainSettings(
        task="cxr",
        data_dir=SHARED_DATA,
        manifest=manifest,
        out_dir=tmp_path / "m",
        image_size=48,
        epochs=2,
        limit_per_class=8,
        name="tiny",
        version="0.0.1",
        hold_out_source="figure1",
    )
    trained = train(settings)
    out = tmp_path / "eval"
    result = evaluate(tmp_path / "m", SHARED_DATA, manifest, out, bootstrap=50, gradcam_images=4)

    test = rebuild_test_split(
        json.loads((tmp_path / "m" / "training.json").read_text())["settings"],
        SHARED_DATA,
        manifest,
    )
    assert result["n_images"] == len(test) == trained["split_sizes"]["test"]
    assert result["n_patients"] == trained["split_groups"]["test"]
    assert result["confusion_matrix"] == trained["test_confusion"]
    assert result["overall"]["accuracy"]["value"] == pytest.approx(trained["test_accuracy"])
    assert result["gradcam_images"] == 4

    for name in ("confusion_matrix", "learning_curves", "roc", "gradcam_sheet"):
        image = cv2.imread(str(out / f"{name}.png"))
        assert image is not None and image.shape[0] > 100 and image.shape[1] > 100, name
    report = (out / "report.md").read_text()
    assert "not for diagnostic use" in report
    assert "| Class | Support | Precision | Recall (sensitivity) | Specificity | F1 |" in report
    for meaning in ("COVID-19", "Pneumonia", "Normal"):
        assert f"| {meaning} |" in report
    assert "(gradcam_sheet.png)" in report and "COVID-19 vs not" in report
    assert "## Pneumonia vs normal" in report
    assert "## Occlusion check" in report and "| centre hidden |" in report

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["bootstrap"]["n"] == 50 and saved["bootstrap"]["unit"] == "patient group"
    for key in ("accuracy", "macro_f1", "macro_auc", "ece"):
        assert {"value", "ci_low", "ci_high", "n_valid"} <= set(saved["overall"][key])
    assert "ci_low" in saved["per_class"]["covid"]["recall"]
    assert "ci_high" in saved["binary"]["sensitivity"]
    assert (
        saved["pair"]["tp"] + saved["pair"]["fn"]
        == result["test_split"]["per_class"]["pneumonia"]["images"]
    )
    assert len(saved["predictions"]) == result["n_images"]
    assert set(saved["occlusion"]["conditions"]) == {
        "whole image",
        "centre hidden",
        "only the centre",
    }
    # issue 8: the held-out source, per-source rows, calibration, abstention, sheets per source
    assert "## Per source" in report and "## Held-out source: figure1" in report
    assert "## Calibration (test split)" in report and "## Abstention" in report
    held = [r for r in saved["per_source"] if r["split"] == "held out"]
    assert [r["source"] for r in held] == ["figure1"] and "sensitivity" in held[0]
    assert {r["source"] for r in saved["per_source"] if r["split"] == "test"} >= {"nih", "cohen"}
    assert (
        saved["calibration"]["temperature"]
        == json.loads((tmp_path / "m" / "model.json").read_text())["temperature"]
    )
    rates = saved["abstention"]["rates"]
    assert {"test (in distribution)", "held-out source", "CT slices (DICOM, lung window)"} <= set(
        rates
    )
    assert rates["CT slices (DICOM, lung window)"]["n"] == 35
    for source, sheet in saved["gradcam_per_source"].items():
        assert (out / sheet["file"]).is_file(), source
    assert cv2.imread(str(out / "reliability.png")) is not None
    whole = saved["occlusion"]["conditions"]["whole image"]
    assert whole["accuracy"] == pytest.approx(result["overall"]["accuracy"]["value"], abs=1e-6)
