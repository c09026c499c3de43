"""Evaluate a trained model on the test patients of its own training split, and report it.

The test split is recomputed from ``training.json["settings"]`` (task, seed, fractions,
per-class limit) with the same functions as training, so the evaluation sees exactly the
patients the model never saw. Images go through the training preprocessing
(``read_image_file`` + ``to_model_input`` with the model's ``preprocessing`` options). Metrics
come from :mod:`ai.metrics` with patient-level bootstrap intervals.

Written into the output folder: ``report.md``, ``metrics.json``, ``confusion_matrix.png``,
``learning_curves.png``, ``roc.png`` and ``gradcam_sheet.png``. These are research numbers,
not for diagnostic use.

Command line: ``python -m ai.evaluate MODEL_DIR --data DATA_DIR --out OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ai import DISCLAIMER
from ai import metrics as m
from ai.calibration import apply_temperature
from ai.dataset import Sample, data_dirs_of, make_splits
from ai.model import Classifier, ModelSpec
from ai.outputs import render_overlay
from ai.preprocess import heatmap_in_image_frame, read_image_file, read_inputs
from ai.serving import forward_images, forward_samples

BATCH_SIZE = 32
SHEET_COLUMNS = 4  # image/overlay pairs per row of the Grad-CAM sheet
SHEET_TILE = 256  # pixels, long side of each displayed image
SOURCE_SHEET_IMAGES = 4  # Grad-CAM images per source sheet
FIGURES = {
    "confusion_matrix": "confusion_matrix.png",
    "learning_curves": "learning_curves.png",
    "roc": "roc.png",
    "gradcam_sheet": "gradcam_sheet.png",
}
RESEARCH_NOTE = (
    "These are research numbers on a small, patient-disjoint test split: the intervals are "
    "wide, the model is not clinically validated, and it is not for diagnostic use."
)


# ------------------------------------------------------------------------------ the split


def rebuild_test_split(
    settings: Mapping[str, Any], data_dir: Path | Sequence[Path], manifest: Path | None = None
) -> list[Sample]:
    """The test samples of the training run whose *settings* are given."""
    return rebuild_splits(settings, data_dir, manifest)["test"]


def rebuild_splits(
    settings: Mapping[str, Any],
    data_dirs: Path | Sequence[Path] | None,
    manifest: Path | None = None,
    labels: Sequence[str] | None = None,
) -> dict[str, list[Sample]]:
    """Every split of the training run (ai.dataset.make_splits), from *data_dirs* (default: the
    recorded folders)."""
    from ai.train import CLASSES

    dirs = [data_dirs] if isinstance(data_dirs, Path | str) else list(data_dirs or [])
    names = list(labels or [c.name for c in CLASSES[str(settings["task"])]])
    return make_splits(settings, names, data_dirs=[Path(d) for d in dirs], manifest=manifest)


def read_training(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "training.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no training.json (needed to rebuild the split)")
    data: dict[str, Any] = json.loads(path.read_text())
    if "settings" not in data:
        raise ValueError(f"{path}: no 'settings'")
    return data


# ---------------------------------------------------------------------------- prediction


def _model_input(paths: Sequence[Path], spec: ModelSpec) -> np.ndarray:
    return read_inputs(paths, spec.input_size, spec.channels, spec.preprocessing)


def predict(classifier: Classifier, paths: Sequence[Path]) -> np.ndarray:
    """Class probabilities of the image files, shape (N, classes), in batches."""
    parts = [
        classifier.predict(_model_input(paths[i : i + BATCH_SIZE], classifier.spec))
        for i in range(0, len(paths), BATCH_SIZE)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, len(classifier.spec.classes)))


def heatmaps(classifier: Classifier, paths: Sequence[Path], targets: np.ndarray) -> np.ndarray:
    """Grad-CAM maps of the image files for the *targets* classes, in batches."""
    parts = [
        classifier.heatmaps(
            _model_input(paths[i : i + BATCH_SIZE], classifier.spec), targets[i : i + BATCH_SIZE]
        )
        for i in range(0, len(paths), BATCH_SIZE)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 1, 1), np.float32)


OCCLUSION_BOX = 0.15  # the centre box spans 15 %-85 % of each side of the model input


def occlude(inputs: np.ndarray, keep_centre: bool) -> np.ndarray:
    """Copies of model inputs (N, H, W, C) with the centre box (where the lungs of a PA chest
    film or the body of a CT slice lie) or everything but it set to each image's mean."""
    out = np.asarray(inputs, dtype=np.float32)
    _, h, w, _ = out.shape
    top, left = round(h * OCCLUSION_BOX), round(w * OCCLUSION_BOX)
    centre = np.zeros((h, w), dtype=bool)
    centre[top : h - top, left : w - left] = True
    hide = ~centre if keep_centre else centre
    means = out.mean(axis=(1, 2), keepdims=True)
    return np.where(hide[np.newaxis, :, :, np.newaxis], means, out).astype(np.float32)


def occlusion_check(
    classifier: Classifier, paths: Sequence[Path], y: np.ndarray, full: np.ndarray
) -> dict[str, Any]:
    """How much of the score survives when the centre of each test image is hidden, and when
    only the centre is shown (point values, no intervals).

    A model that reads disease in the lungs should fall towards chance with the centre hidden;
    one that still separates the classes is reading something else: age, body shape, text,
    borders. (Hiding is itself an unusual input, so a fall alone proves less than a score that
    holds up.)
    """
    spec = classifier.spec
    names = [c.name for c in spec.classes]
    pos = names.index(spec.positive_class) if spec.positive_class in names else None
    hidden, centre = [], []
    for i in range(0, len(paths), BATCH_SIZE):
        x = _model_input(paths[i : i + BATCH_SIZE], spec)  # read and prepared once for both
        hidden.append(classifier.predict(occlude(x, keep_centre=False)))
        centre.append(classifier.predict(occlude(x, keep_centre=True)))
    conditions = {
        "whole image": full,
        "centre hidden": np.concatenate(hidden),
        "only the centre": np.concatenate(centre),
    }
    rows = {}
    for label, probs in conditions.items():
        point = m.point_metrics(y, probs, names, pos)
        rows[label] = {
            key: None if value is None or not math.isfinite(value) else round(value, 6)
            for key, value in (
                ("accuracy", point["accuracy"]),
                ("macro_f1", point["macro_f1"]),
                ("positive_auc", point.get("binary/auc")),
                ("positive_sensitivity", point.get("binary/sensitivity")),
            )
        }
    return {"box": [OCCLUSION_BOX, 1 - OCCLUSION_BOX], "conditions": rows}


def _count_params(classifier: Classifier) -> int | None:
    try:
        return int(classifier.model.count_params())
    except Exception:  # a model object without Keras' API
        return None


# ------------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Any:
    """A matplotlib figure drawn by the Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, format="png", bbox_inches="tight")


def plot_confusion(cm: np.ndarray, labels: Sequence[str], path: Path) -> None:
    k = len(labels)
    fig = _figure(1.6 * k + 2.5, 1.4 * k + 2)
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, int(cm.max())))
    threshold = cm.max() / 2.0
    for (i, j), count in np.ndenumerate(cm):
        colour = "white" if count > threshold else "black"
        ax.text(j, i, str(int(count)), ha="center", va="center", color=colour, fontsize=13)
    ax.set_xticks(range(k), labels, rotation=30, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title("Confusion matrix (test images)")
    _save(fig, path)


def plot_learning_curves(history: Mapping[str, Sequence[float]], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11, 4)
    for i, (key, title) in enumerate((("loss", "Loss"), ("accuracy", "Accuracy"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, label, style in ((key, "train", "-o"), (f"val_{key}", "validation", "-s")):
            values = history.get(name) or []
            if values:
                ax.plot(range(1, len(values) + 1), values, style, label=label, markersize=3)
        if not (history.get(key) or history.get(f"val_{key}")):
            ax.text(0.5, 0.5, "no history", ha="center", va="center", transform=ax.transAxes)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("Epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    _save(fig, path)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str], path: Path) -> None:
    fig = _figure(6, 6)
    ax = fig.add_subplot()
    for k, label in enumerate(labels):
        positive = y_true == k
        auc = m.roc_auc(positive, probs[:, k])
        if math.isnan(auc):
            continue
        fpr, tpr = m.roc_curve(positive, probs[:, k])
        ax.plot(fpr, tpr, label=f"{label} vs rest (AUC {auc:.2f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title("ROC, one vs rest (test images)")
    ax.legend(loc="lower right")
    _save(fig, path)


def pick_for_gradcam(y_true: np.ndarray, count: int) -> list[int]:
    """Up to *count* indices, taking the true classes in turn (first images of each)."""
    queues = [list(np.flatnonzero(y_true == k)) for k in sorted(set(y_true.tolist()))]
    picked: list[int] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(int(queue.pop(0)))
    return picked


def _display(image: np.ndarray) -> np.ndarray:
    h, w = image.shape
    scale = SHEET_TILE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return np.clip(cv2.resize(image, size, interpolation=interp), 0.0, 1.0)


def plot_gradcam_sheet(
    classifier: Classifier,
    paths: Sequence[Path],
    y_true: np.ndarray,
    probs: np.ndarray,
    count: int,
    path: Path,
    title: str = "test images",
) -> int:
    """A grid of test images beside their Grad-CAM overlays; returns how many are shown."""
    picked = pick_for_gradcam(y_true, count)
    labels = [c.meaning for c in classifier.spec.classes]
    rows = max(1, math.ceil(len(picked) / SHEET_COLUMNS))
    cols = 2 * min(SHEET_COLUMNS, max(1, len(picked)))
    fig = _figure(2.4 * cols, 2.8 * rows + 0.6)
    fig.suptitle(f"Grad-CAM of the predicted class, {title} - {DISCLAIMER}", fontsize=11)
    predicted = probs[picked].argmax(axis=1)
    maps = heatmaps(classifier, [paths[i] for i in picked], predicted)
    for n, i in enumerate(picked):
        original = read_image_file(paths[i])
        heat = heatmap_in_image_frame(
            maps[n], original.shape, classifier.spec.preprocessing, original
        )
        image = _display(original)
        overlay = render_overlay(image, heat, [])
        pred = int(predicted[n])
        ax = fig.add_subplot(rows, cols, 2 * n + 1)
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"true: {labels[int(y_true[i])]}", fontsize=9)
        ax.axis("off")
        ax = fig.add_subplot(rows, cols, 2 * n + 2)
        ax.imshow(overlay)
        colour = "darkgreen" if pred == int(y_true[i]) else "firebrick"
        ax.set_title(f"pred: {labels[pred]} ({probs[i, pred]:.2f})", fontsize=9, color=colour)
        ax.axis("off")
    if not picked:
        fig.text(0.5, 0.5, "no test images", ha="center", va="center")
    _save(fig, path)
    return len(picked)


# -------------------------------------------------------------------------------- report


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def fmt_ci(entry: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``0.850 (0.700-0.950)``, or ``n/a`` parts where undefined."""
    if not entry or entry.get("value") is None:
        return "n/a"
    text = _num(entry.get("value"), digits)
    if "ci_low" in entry:
        text += f" ({_num(entry['ci_low'], digits)}–{_num(entry['ci_high'], digits)})"
    return text


def _split_table(result: Mapping[str, Any]) -> list[str]:
    lines = ["| Split | Images | Patients |", "|---|---:|---:|"]
    training = result["training"]
    sizes, groups = training.get("split_sizes", {}), training.get("split_groups", {})
    for split in ("train", "validation"):
        if split in sizes:
            lines.append(f"| {split} | {sizes[split]} | {groups.get(split, 'n/a')} |")
    lines.append(f"| test (this evaluation) | {result['n_images']} | {result['n_patients']} |")
    return lines


def _test_classes_table(result: Mapping[str, Any]) -> list[str]:
    lines = ["| Class | Test images | Test patients |", "|---|---:|---:|"]
    meanings = dict(zip(result["classes"], result["class_meanings"], strict=True))
    for name, row in result["test_split"]["per_class"].items():
        lines.append(f"| {meanings[name]} | {row['images']} | {row['patients']} |")
    return lines


def _per_class_table(result: Mapping[str, Any]) -> list[str]:
    header = "| Class | Support | Precision | Recall (sensitivity) | Specificity | F1 | AUC (OvR) |"
    lines = [header, "|---|---:|---|---|---|---|---|"]
    meanings = dict(zip(result["classes"], result["class_meanings"], strict=True))
    for name, row in result["per_class"].items():
        cells = [fmt_ci(row[k]) for k in ("precision", "recall", "specificity", "f1", "auc")]
        lines.append(f"| {meanings[name]} | {row['support']} | " + " | ".join(cells) + " |")
    return lines


def _overall_table(result: Mapping[str, Any]) -> list[str]:
    names = {
        "accuracy": "Accuracy",
        "macro_f1": "Macro-F1",
        "macro_auc": "Macro AUC (one vs rest)",
        "ece": f"ECE ({m.ECE_BINS} bins, top-class probability)",
    }
    lines = ["| Metric | Value (95% CI) |", "|---|---|"]
    lines += [f"| {label} | {fmt_ci(result['overall'][k])} |" for k, label in names.items()]
    return lines


def _binary_section(result: Mapping[str, Any]) -> list[str]:
    b = result.get("binary")
    if not b:
        return ["No 'covid' class in this model: no binary view."]
    lines = [
        f"Positive: **{b['positive_class']}**; {b['rule']}; AUC ranks by P({b['positive_class']}).",
        "",
        "| Metric | Value (95% CI) |",
        "|---|---|",
    ]
    for key, label in (
        ("sensitivity", "Sensitivity"),
        ("specificity", "Specificity"),
        ("ppv", "PPV"),
        ("npv", "NPV"),
        ("auc", "AUC"),
    ):
        lines.append(f"| {label} | {fmt_ci(b[key])} |")
    lines += ["", f"TP {b['tp']}, FP {b['fp']}, TN {b['tn']}, FN {b['fn']}."]
    return lines


def _pair_section(result: Mapping[str, Any]) -> list[str | list[str]]:
    pair = result.get("pair")
    if not pair:
        return []
    pos, neg = pair["positive_class"], pair["negative_class"]
    table = ["| Metric | Value (95% CI) |", "|---|---|"] + [
        f"| {label} | {fmt_ci(pair[key])} |"
        for key, label in (
            ("accuracy", "Accuracy"),
            ("sensitivity", f"Sensitivity ({pos})"),
            ("specificity", f"Specificity ({neg})"),
            ("auc", "AUC"),
        )
    ]
    return [
        f"## {pos.capitalize()} vs {neg}",
        f"The research's separate binary task, read from the same output: {pair['rule']}. "
        f"In `shared/data` both classes come from the same sources (the Kermany children and "
        "NIH adults, plus Cohen's adult pneumonias), so this pair is less confounded by "
        "source and age than COVID-19 vs not.",
        table,
        f"TP {pair['tp']}, FP {pair['fp']}, TN {pair['tn']}, FN {pair['fn']}.",
    ]


def _occlusion_section(result: Mapping[str, Any]) -> list[str | list[str]]:
    check = result.get("occlusion")
    if not check:
        return []
    low, high = check["box"]
    positive = (result.get("binary") or {}).get("positive_class", "positive")
    return [
        "## Occlusion check (is it looking at the lungs?)",
        f"The same test images with the centre box ({low:.0%}–{high:.0%} of each side of the "
        "model input, where the lungs of a PA chest film or the body of a CT slice lie) set to "
        "the image mean, and with "
        "only that box shown. A model that reads disease in the lungs should fall towards "
        "chance with the centre hidden; one that still separates the classes reads something "
        "else (age, body shape, text, borders). Point values, no intervals.",
        [
            f"| Input | Accuracy | Macro-F1 | {positive} AUC | {positive} sensitivity |",
            "|---|---:|---:|---:|---:|",
        ]
        + [
            f"| {label} | {_num(row['accuracy'])} | {_num(row['macro_f1'])} | "
            f"{_num(row['positive_auc'])} | {_num(row['positive_sensitivity'])} |"
            for label, row in check["conditions"].items()
        ],
    ]


def fmt_rate(entry: Mapping[str, Any] | None) -> str:
    """``0.85 (0.70–0.95)`` for a rate with its interval, ``–`` when undefined."""
    if not entry or entry.get("value") is None:
        return "–"
    text = f"{entry['value']:.2f}"
    if entry.get("ci_low") is not None:
        text += f" ({entry['ci_low']:.2f}–{entry['ci_high']:.2f})"
    return text


def _robustness_sections(result: Mapping[str, Any]) -> list[str | list[str]]:
    parts: list[str | list[str]] = []
    point = result.get("operating_point", {})
    fitted = point.get("fitted") or {}
    if point.get("test"):
        t = point["test"]
        rule = (
            f"COVID-19 when its calibrated probability is at least {fitted['threshold']:.3f} "
            f"(chosen on validation for sensitivity >= {fitted.get('target_sensitivity')}: "
            f"validation sensitivity {fitted.get('validation_sensitivity')}, specificity "
            f"{fitted.get('validation_specificity')})"
            if fitted
            else "arg-max (no operating point fitted)"
        )
        parts += [
            "## Operating point (test split)",
            [
                f"- Rule: {rule}; otherwise the most probable other class.",
                f"- Sensitivity {fmt_rate(t['sensitivity'])}, specificity "
                f"{fmt_rate(t['specificity'])} (tp {t['tp']}, fn {t['fn']}, tn {t['tn']}, "
                f"fp {t['fp']}); macro-F1 with this rule {_num(t['macro_f1'])}.",
            ],
        ]
    rows = result.get("per_source") or []
    if rows:
        lines = [
            "| Split | Source | Images | Patients | Labels | COVID-19 sensitivity | "
            "Specificity | Accuracy (all classes) |",
            "|---|---|---:|---:|---|---|---|---|",
        ]
        for r in rows:
            labels = ", ".join(f"{k} {v}" for k, v in r["labels"].items())
            lines.append(
                f"| {r['split']} | {r['source']} | {r['images']} | {r['patients']} | {labels} | "
                f"{fmt_rate(r.get('sensitivity'))} | {fmt_rate(r.get('specificity'))} | "
                f"{fmt_rate(r.get('accuracy'))} |"
            )
        parts += [
            "## Per source (operating point; 95% patient-level bootstrap intervals)",
            "Sensitivity on the COVID-19 images of a source, specificity (not called COVID-19) "
            "on its other images. A held-out source was not seen in training or validation.",
            lines,
        ]
    held = result.get("held_out")
    if held:
        parts += [
            f"## Held-out source: {', '.join(held['sources'])} (arg-max, calibrated)",
            [
                f"- {held['n_images']} images, {held['n_patients']} patients; accuracy "
                f"{fmt_ci(held['overall']['accuracy'])}, macro-F1 "
                f"{fmt_ci(held['overall']['macro_f1'])}, "
                f"ECE {_num(held['overall']['ece']['value'])}",
            ],
        ]
    cal = result.get("calibration")
    if cal:
        parts += [
            "## Calibration (test split)",
            [
                f"- Temperature {cal['temperature']} fitted on validation (NLL). ECE "
                f"({m.ECE_BINS} bins, top class): before {_num(cal['ece_before'])}, after "
                f"{_num(cal['ece_after'])}; NLL before {_num(cal['nll_before'])}, after "
                f"{_num(cal['nll_after'])}.",
                "- ![reliability diagram](reliability.png)",
            ],
        ]
    ab = result.get("abstention")
    if ab:
        lines = ["| Images | n | Abstained | Rate | Median distance |", "|---|---:|---:|---:|---:|"]
        for name, r in ab["rates"].items():
            lines.append(
                f"| {name} | {r['n']} | {r['abstained']} | {_num(r['rate'], 2)} | "
                f"{_num(r['median_distance'], 3)} |"
            )
        parts += [
            "## Abstention (indeterminate: unlike the training data)",
            f"Score: {ab['fitted'].get('score', 'feature distance')}; threshold "
            f"{ab['threshold']:.2f} = the {ab['fitted'].get('quantile')} quantile of the "
            "validation images' distances.",
            lines,
        ]
    sheets = result.get("gradcam_per_source") or {}
    if sheets:
        parts += [
            "## Grad-CAM per source",
            [f"- {src}: ![{src}]({v['file']})" for src, v in sheets.items()],
        ]
    return parts


def render_report(result: Mapping[str, Any]) -> str:
    model, boot, settings = result["model"], result["bootstrap"], result["training"]["settings"]
    split_keys = ("task", "seed", "validation_fraction", "test_fraction", "limit_per_class")
    split_text = ", ".join(f"{k}={settings.get(k)}" for k in split_keys)
    figures = [f"![{name.replace('_', ' ')}]({file})" for name, file in FIGURES.items()]
    parts: list[str | list[str]] = [
        f"# Evaluation: {model['name']} {model['version']}",
        f"> **Research use only — {DISCLAIMER}.** {RESEARCH_NOTE}",
        "## Model",
        [
            f"- Name / version: `{model['name']}` {model['version']} (task `{model['task']}`)",
            f"- Folder: `{model['directory']}`",
            f"- Input: {model['input_size']}×{model['input_size']}×{model['channels']}; "
            f"parameters: {'n/a' if model['params'] is None else format(model['params'], ',')}",
            f"- Classes: {', '.join(result['class_meanings'])}",
        ],
        "## Data and split",
        [
            f"- Manifest: `{result['data']['manifest']}`; images: `{result['data']['data_dir']}`",
            f"- Split rebuilt from training.json: {split_text}. Whole patient groups go to one "
            "split only, so no test patient was seen in training or validation.",
        ],
        _split_table(result),
        _test_classes_table(result),
        "## Overall",
        _overall_table(result),
        "## Per class",
        _per_class_table(result),
        "## COVID-19 vs not",
        _binary_section(result),
        *_pair_section(result),
        *_occlusion_section(result),
        *_robustness_sections(result),
        "## Method",
        [
            f"- 95% intervals: percentile bootstrap over **patient groups** (clusters), "
            f"{boot['n']} resamples, seed {boot['seed']}; images of a patient are resampled "
            "together. Resamples where a metric is undefined (e.g. a class absent) are "
            "skipped for that metric.",
            "- Per-class precision/recall/specificity/F1 are one vs rest on the arg-max label.",
            f"- ECE: {m.ECE_BINS} equal-width bins on the top-class probability.",
        ],
        "## Figures",
        figures,
        "## Limitations",
        [
            f"- {RESEARCH_NOTE}",
            "- Public images from several sources: source and label can be confounded, so "
            "these numbers may overstate performance on real studies.",
        ],
    ]
    blocks = ["\n".join(p) if isinstance(p, list) else p for p in parts]
    return "\n\n".join(blocks) + "\n"


def _cell(row: Mapping[str, Any], *path: str) -> Any:
    value: Any = row
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def _comparison_row(row: Mapping[str, Any]) -> list[str]:
    size = row.get("image_size", _cell(row, "model", "input_size"))
    epochs = row.get("epochs", _cell(row, "training", "epochs_run"))
    params = row.get("params", _cell(row, "model", "params"))
    seconds = row.get("train_time_s")
    backbone = row.get("backbone") or _cell(row, "model", "name") or "?"
    return [
        str(backbone),
        "–" if size is None else f"{size}×{size}",
        "–" if epochs is None else str(epochs),
        fmt_ci(_cell(row, "overall", "accuracy")),
        fmt_ci(_cell(row, "overall", "macro_f1")),
        _num(_cell(row, "binary", "sensitivity", "value")),
        _num(_cell(row, "binary", "specificity", "value")),
        _num(_cell(row, "overall", "macro_auc", "value")),
        _num(_cell(row, "pair", "accuracy", "value")),
        "–" if seconds is None else f"{float(seconds):.0f}",
        "–" if params is None else f"{int(params):,}",
    ]


COMPARISON_COLUMNS = (
    "Backbone",
    "Image size",
    "Epochs",
    "Accuracy (95% CI)",
    "Macro-F1 (95% CI)",
    "COVID sensitivity",
    "COVID specificity",
    "Macro AUC",
    "Pneumonia vs normal accuracy",
    "Train time (s)",
    "Params",
)


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table comparing evaluated models (dicts from :func:`evaluate` plus
    ``backbone``, ``image_size``, ``epochs``, ``train_time_s`` and ``params``)."""
    lines = [
        "| " + " | ".join(COMPARISON_COLUMNS) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(COMPARISON_COLUMNS) - 3)) + "|",
    ]
    lines += ["| " + " | ".join(_comparison_row(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ evaluate


def _split_counts(samples: Sequence[Sample], names: Sequence[str]) -> dict[str, Any]:
    return {
        "per_class": {
            name: {
                "images": sum(s.label == name for s in samples),
                "patients": len({s.group for s in samples if s.label == name}),
            }
            for name in names
        }
    }


def _shown(path: Path) -> str:
    """*path* relative to the working directory when it lies below it (reports get committed)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _model_info(classifier: Classifier, model_dir: Path) -> dict[str, Any]:
    spec = classifier.spec
    return {
        "name": spec.name,
        "version": spec.version,
        "task": spec.task,
        "directory": _shown(model_dir),
        "input_size": spec.input_size,
        "channels": spec.channels,
        "params": _count_params(classifier),
    }


def _training_info(training: Mapping[str, Any]) -> dict[str, Any]:
    recorded = training.get("metrics", {})
    history = recorded.get("history", {})
    return {
        "settings": training["settings"],
        "split_sizes": recorded.get("split_sizes", {}),
        "split_groups": recorded.get("split_groups", {}),
        "epochs_run": len(history.get("loss", [])) or None,
    }


def _shown_dirs(data_dir: Path | Sequence[Path] | None) -> list[str]:
    if data_dir is None:
        return []
    dirs = [data_dir] if isinstance(data_dir, Path | str) else list(data_dir)
    return [str(d) for d in dirs]


def _relative(path: Path) -> str:
    """*path* from its data folder on (``cxr_adult/covid/x.jpg``), so reports do not depend on
    where the data lies."""
    parts = Path(path).parts
    return str(Path(*parts[-3:])) if len(parts) >= 3 else str(path)


def _predictions(
    samples: Sequence[Sample], y: np.ndarray, probs: np.ndarray
) -> list[dict[str, Any]]:
    return [
        {
            "file": _relative(s.path),
            "patient_group": s.group,
            "source": s.source,
            "true": int(y[i]),
            "predicted": int(probs[i].argmax()),
            "probabilities": [round(float(v), 6) for v in probs[i]],
        }
        for i, s in enumerate(samples)
    ]


def _probe_vectors(classifier: Classifier, paths: Sequence[Path]) -> np.ndarray:
    """Pooled features of probe files (DICOM through the serving decode, or image files)."""
    import pydicom

    from ai.errors import UnusableInputError
    from ai.preprocess import dicom_to_image

    spec = classifier.spec
    images = []
    for path in paths:
        try:
            if path.suffix.lower() == ".dcm":
                images.append(dicom_to_image(pydicom.dcmread(path), window=spec.window))
            else:
                images.append(read_image_file(path))
        except (UnusableInputError, OSError, ValueError):
            continue  # a probe the decoder refuses never reaches the model
    return forward_images(classifier, images)[1]


def plot_reliability(calibration: Mapping[str, Any], path: Path) -> None:
    """Reliability diagram: accuracy against confidence per bin, before and after scaling."""
    fig = _figure(5.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for key, label, marker in (
        ("reliability_before", f"before (ECE {calibration['ece_before']:.3f})", "o"),
        (
            "reliability_after",
            f"after T={calibration['temperature']:.2f} (ECE {calibration['ece_after']:.3f})",
            "s",
        ),
    ):
        data = calibration[key]
        pts = [
            (c, a)
            for c, a in zip(data["confidence"], data["accuracy"], strict=True)
            if c is not None and a is not None
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=label)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"Reliability, test images ({calibration['n']}) - {DISCLAIMER}", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def _robustness(
    classifier: Classifier,
    splits: Mapping[str, Sequence[Sample]],
    test: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    out_dir: Path,
    bootstrap: int,
    seed: int,
    data_dir: Path | Sequence[Path] | None,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Held-out source, per-source table, operating point, calibration, abstention and
    per-source Grad-CAM sheets (ai.robustness)."""
    from ai import robustness as rb
    from ai.calibration import calibration_summary
    from ai.train import CLASSES

    spec = classifier.spec
    names = [c.name for c in spec.classes]
    y, raw, probs, vectors = test
    held = list(splits.get("held_out", []))
    out: dict[str, Any] = {}
    y_h = np.array([names.index(s.label) for s in held], dtype=np.int64)
    raw_h, vec_h = forward_samples(classifier, held) if held else (np.zeros((0, len(names))), None)
    probs_h = apply_temperature(raw_h, spec.temperature)
    if held:
        out["held_out"] = {
            "sources": sorted({s.source for s in held}),
            **m.summarize(
                y_h,
                probs_h,
                [s.group for s in held],
                names,
                spec.positive_class,
                n_bootstrap=bootstrap,
                seed=seed,
            ),
        }
    both = list(splits["test"]) + held
    split_of = ["test"] * len(splits["test"]) + ["held out"] * len(held)
    out["per_source"] = rb.per_source(
        both,
        split_of,
        np.concatenate([y, y_h]),
        np.concatenate([probs, probs_h]),
        names,
        spec.positive_class,
        spec.threshold,
        n_bootstrap=bootstrap,
        seed=seed,
    )
    out["operating_point"] = {
        "test": rb.operating_point(
            y,
            probs,
            [s.group for s in splits["test"]],
            names,
            spec.positive_class,
            spec.threshold,
            n_bootstrap=bootstrap,
            seed=seed,
        ),
        "fitted": dict(spec.operating_point),
    }
    out["calibration"] = calibration_summary(y, raw, spec.temperature, names)
    plot_reliability(out["calibration"], out_dir / "reliability.png")
    density = classifier.density
    if density is not None:
        limit = float(spec.abstention["threshold"])
        scores = {"test (in distribution)": density.score(vectors)}
        if held and vec_h is not None:
            scores["held-out source"] = density.score(vec_h)
        dirs = [data_dir] if isinstance(data_dir, Path | str) else list(data_dir or [])
        dirs = dirs or data_dirs_of(settings)
        labels_of = {t: [c.name for c in CLASSES[t]] for t in CLASSES}
        for name, files in rb.probe_sets(spec.task, [Path(d) for d in dirs], labels_of).items():
            vec = _probe_vectors(classifier, files)
            if len(vec):
                scores[name] = density.score(vec)
        out["abstention"] = {
            "threshold": limit,
            "fitted": dict(spec.abstention),
            "rates": rb.abstention_rates(scores, limit),
        }
    sheets = {}
    for source in sorted({s.source for s in both}):
        idx = [i for i, s in enumerate(both) if s.source == source]
        file = f"gradcam_{source}.png"
        shown = plot_gradcam_sheet(
            classifier,
            [both[i].path for i in idx],
            np.concatenate([y, y_h])[idx],
            np.concatenate([probs, probs_h])[idx],
            SOURCE_SHEET_IMAGES,
            out_dir / file,
            title=f"source {source} ({split_of[idx[0]]})",
        )
        sheets[source] = {"file": file, "images": shown}
    out["gradcam_per_source"] = sheets
    return out


def evaluate(
    model_dir: Path,
    data_dir: Path | Sequence[Path] | None,
    manifest: Path | None,
    out_dir: Path,
    *,
    bootstrap: int = 1000,
    gradcam_images: int = 12,
) -> dict[str, Any]:
    """Evaluate the model in *model_dir* on its test patients; write the report into *out_dir*."""
    started = time.monotonic()
    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    classifier = Classifier(model_dir)
    spec = classifier.spec
    training = read_training(model_dir)
    if str(training["settings"].get("task", spec.task)) != spec.task:
        raise ValueError(f"{model_dir}: training.json task differs from model.json's")
    names = [c.name for c in spec.classes]
    splits = rebuild_splits(training["settings"], data_dir, manifest, names)
    samples = splits["test"]
    if not samples:
        raise ValueError(f"{model_dir}: the rebuilt test split is empty")
    paths = [s.path for s in samples]
    y = np.array([names.index(s.label) for s in samples], dtype=np.int64)
    raw, vectors = forward_samples(classifier, samples)
    probs = apply_temperature(raw, spec.temperature)
    seed = int(training["settings"].get("seed", 0))
    result: dict[str, Any] = {
        "model": _model_info(classifier, model_dir),
        "data": {"data_dir": _shown_dirs(data_dir), "manifest": str(manifest or "")},
        "training": _training_info(training),
        "test_split": _split_counts(samples, names),
        **m.summarize(
            y,
            probs,
            [s.group for s in samples],
            names,
            spec.positive_class,
            n_bootstrap=bootstrap,
            seed=seed,
        ),
        "class_meanings": [c.meaning for c in spec.classes],
        "disclaimer": f"Research use only. {DISCLAIMER}.",
        "figures": dict(FIGURES),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = result["class_meanings"]
    plot_confusion(
        np.array(result["confusion_matrix"]), labels, out_dir / FIGURES["confusion_matrix"]
    )
    plot_learning_curves(
        training.get("metrics", {}).get("history", {}), out_dir / FIGURES["learning_curves"]
    )
    plot_roc(y, probs, labels, out_dir / FIGURES["roc"])
    result["gradcam_images"] = plot_gradcam_sheet(
        classifier, paths, y, probs, gradcam_images, out_dir / FIGURES["gradcam_sheet"]
    )
    result["occlusion"] = occlusion_check(classifier, paths, y, probs)
    result["predictions"] = _predictions(samples, y, probs)
    result.update(
        _robustness(
            classifier,
            splits,
            (y, raw, probs, vectors),
            out_dir,
            bootstrap,
            seed,
            data_dir,
            training["settings"],
        )
    )
    result["evaluation_time_s"] = round(time.monotonic() - started, 2)
    (out_dir / "report.md").write_text(render_report(result))
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument(
        "--data", type=Path, action="append", help="data folder (repeatable; default: recorded)"
    )
    parser.add_argument("--manifest", type=Path, help="default: the first DATA/manifest.csv")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--gradcam-images", type=int, default=12)
    args = parser.parse_args(argv)
    result = evaluate(
        args.model_dir,
        args.data,
        args.manifest,
        args.out,
        bootstrap=args.bootstrap,
        gradcam_images=args.gradcam_images,
    )
    print(f"{args.out / 'report.md'}: accuracy {fmt_ci(result['overall']['accuracy'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
