"""Print the comparison tables of docs/model_comparison.md from evaluated runs.

Usage: ``python scripts/comparison_table.py RUNS_DIR [RUN ...]``: every ``RUNS_DIR/RUN`` holding
``training.json`` and ``eval/metrics.json`` (written by ``scripts/model_comparison.sh``) gives
one row of :func:`ai.evaluate.comparison_table`, then a second table with what that one leaves
out: the initialisation, preprocessing, validation scores (used to choose), COVID-19 AUC with its
interval and the training images per class.

``python scripts/comparison_table.py --cv CV_DIR``: the cross-validation table (``cv_table``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ai.evaluate import comparison_table, fmt_ci


def load_run(run: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((run / "eval" / "metrics.json").read_text())
    training = json.loads((run / "training.json").read_text())
    s, metrics = training["settings"], training["metrics"]
    label = f"{run.name} ({'ImageNet' if s.get('pretrained') else 'random init'})"
    phases = metrics.get("phase_epochs") or [len(metrics["history"]["loss"])]
    result.update(
        backbone=label,
        run=run.name,
        image_size=s["image_size"],
        epochs="+".join(str(p) for p in phases),
        train_time_s=metrics.get("train_time_s"),
        params=metrics.get("params"),
        settings=s,
        train_metrics=metrics,
    )
    return result


def _hidden_auc(row: dict[str, Any]) -> str:
    """COVID-19 AUC of the occlusion check with the image centre hidden ("–": not measured)."""
    hidden = ((row.get("occlusion") or {}).get("conditions") or {}).get("centre hidden") or {}
    auc = hidden.get("positive_auc")
    return "–" if auc is None else f"{auc:.3f}"


def details_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| Run | Init | Preprocessing | DCGAN | Train images (per class) | "
        "Val macro-F1 | Val COVID AUC | Test COVID AUC (95% CI) | Centre hidden: COVID AUC |",
        "|---|---|---|---|---|---:|---:|---|---:|",
    ]
    for row in rows:
        s, tm = row["settings"], row["train_metrics"]
        prep = ",".join(f"{k}={v}" for k, v in s.get("preprocessing", {}).items()) or "none"
        dcgan = "no"
        if s.get("dcgan"):
            dcgan = "+" + ", ".join(f"{n} {k}" for k, n in tm["dcgan"]["synthetic"].items())
        per_class = ", ".join(f"{k} {n}" for k, n in tm.get("train_images_per_class", {}).items())
        val = tm.get("validation", {})
        cells = [
            row["run"],
            "ImageNet" if s.get("pretrained") else "random",
            prep,
            dcgan,
            per_class,
            f"{val.get('macro_f1', float('nan')):.3f}",
            f"{val.get('covid_auc') or float('nan'):.3f}",
            fmt_ci((row.get("binary") or {}).get("auc")),
            _hidden_auc(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_sd(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return "n/a"
    sd = f"{finite.std(ddof=1):.3f}" if finite.size > 1 else "–"
    return f"{finite.mean():.3f} ± {sd}"


def cv_table(cv_dir: Path) -> str:
    """Mean, spread and per-fold validation scores of every ``NAME-foldI`` run in *cv_dir*."""
    folds: dict[str, list[dict[str, Any]]] = {}
    for run in sorted(cv_dir.glob("*-fold*/training.json")):
        name, _, index = run.parent.name.rpartition("-fold")
        training = json.loads(run.read_text())
        folds.setdefault(name, []).append({"fold": int(index), **training})
    lines = [
        "| Settings | Folds | Val macro-F1, mean ± SD | Val COVID AUC, mean ± SD | "
        "COVID AUC per fold | Train time per fold (s) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, runs in folds.items():
        runs.sort(key=lambda r: r["fold"])
        val = [r["metrics"].get("validation", {}) for r in runs]
        f1 = np.array([v.get("macro_f1", np.nan) for v in val], dtype=float)
        auc = np.array([v.get("covid_auc") or np.nan for v in val], dtype=float)
        seconds = np.mean([r["metrics"].get("train_time_s", np.nan) for r in runs])
        k = runs[0]["settings"]["cv_fold"][1]
        lines.append(
            f"| {name} | {len(runs)} of {k} | {_mean_sd(f1)} | {_mean_sd(auc)} | "
            + ", ".join(f"{a:.3f}" for a in auc)
            + f" | {seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--cv":
        print(cv_table(Path(argv[1])))
        return 0
    runs_dir = Path(argv[0])
    names = argv[1:] or sorted(p.name for p in runs_dir.iterdir() if (p / "eval").is_dir())
    rows = [load_run(runs_dir / name) for name in names]
    print(comparison_table(rows))
    print(details_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
