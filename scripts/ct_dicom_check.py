"""How CT models do on real DICOM CT, which none of them was trained on (issue 8).

The only real DICOM CT in the shared data (dicom/manifest_dicom.csv):

* ``ct_series/lung_pet_ct_dx_A0002_B40f``: one 30-slice chest CT of a lung-cancer patient
  (TCIA Lung-PET-CT-Dx), **not COVID-19**;
* ``ct_covid_slices``: one axial chest slice from each of five COVID-19 patients
  (TCIA COVID-19-NY-SBU).

Each model reads them through the node's own path (``ai.analysis.analyse_datasets``: eligibility,
lung window, the model's preprocessing, calibration, the series rule). Reported: slice-level
COVID-19 AUC (5 positive slices against 30 negative ones, patient-level bootstrap interval) and
series-level (six "series": the 30-slice scan and five one-slice series), plus the decision at
the model's operating point. Six patients cannot establish anything; the interval says so.

    python scripts/ct_dicom_check.py --data ../shared/data MODEL_DIR...
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pydicom

from ai import metrics as m
from ai.analysis import analyse_datasets
from ai.model import Classifier, model_dir


def load_cases(data: Path) -> list[tuple[str, bool, list[pydicom.Dataset]]]:
    """(series name, is COVID-19, datasets) for the real DICOM CT."""
    listing = data / "dicom" / "manifest_dicom.csv"
    with listing.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    cases = []
    series = sorted(r["file"] for r in rows if r["category"].startswith("ct_series/"))
    cases.append(
        ("lung_pet_ct_dx_A0002", False, [pydicom.dcmread(data / "dicom" / f) for f in series])
    )
    for r in rows:
        if r["category"] == "ct_covid_slices":
            cases.append(
                (Path(r["file"]).stem, True, [pydicom.dcmread(data / "dicom" / r["file"])])
            )
    return cases


def check(directory: Path, cases: list, n_bootstrap: int = 2000) -> dict:
    classifier = Classifier(directory)
    spec = classifier.spec
    pos = [c.name for c in spec.classes].index(spec.positive_class)
    slice_scores, slice_truth, slice_groups, series_rows = [], [], [], []
    for name, covid, datasets in cases:
        analysis = analyse_datasets(datasets, classifier)
        for _, probs in analysis.per_image:
            slice_scores.append(probs[pos])
            slice_truth.append(covid)
            slice_groups.append(name)
        p = analysis.prediction
        series_rows.append(
            {
                "series": name,
                "covid": covid,
                "slices": len(datasets),
                "p_covid": round(p.probabilities[pos], 4),
                "label": p.decided.name,  # the decision rule's class, even when indeterminate
                "indeterminate": p.indeterminate,
            }
        )
    s, t = np.array(slice_scores), np.array(slice_truth)
    slice_auc = m.roc_auc(t, s)
    ci = m.bootstrap_ci(lambda rows: m.roc_auc(t[rows], s[rows]), slice_groups, n=n_bootstrap)
    ss = np.array([r["p_covid"] for r in series_rows])
    st = np.array([r["covid"] for r in series_rows])
    return {
        "model": f"{spec.name} {spec.version}",
        "directory": str(directory),
        "preprocessing": spec.preprocessing,
        "slice_auc": round(float(slice_auc), 3),
        "slice_auc_ci": [round(ci.low, 3), round(ci.high, 3)],
        "series_auc": round(float(m.roc_auc(st, ss)), 3),
        "negative_slices_p_covid": [round(float(v), 3) for v in s[~t]],
        "positive_slices_p_covid": [round(float(v), 3) for v in s[t]],
        "series": series_rows,
        "called_covid": {
            "covid_series": int(sum(r["label"] == "covid" for r in series_rows if r["covid"])),
            "noncovid_series": int(
                sum(r["label"] == "covid" for r in series_rows if not r["covid"])
            ),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    cases = load_cases(args.data)
    results = [check(model_dir(d), cases) for d in args.models]
    print("| Model | Preprocessing | Slice AUC (95% CI) | Series AUC (6) | COVID series called | "
          "Non-COVID scan called COVID | p(COVID) of the non-COVID scan |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in results:
        scan = next(x for x in r["series"] if not x["covid"])
        print(
            f"| {r['model']} | {','.join(r['preprocessing']) or 'none'} | {r['slice_auc']:.2f} "
            f"({r['slice_auc_ci'][0]:.2f}–{r['slice_auc_ci'][1]:.2f}) | {r['series_auc']:.2f} | "
            f"{r['called_covid']['covid_series']}/5 | "
            f"{'yes' if r['called_covid']['noncovid_series'] else 'no'} | {scan['p_covid']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
