"""The leave-one-source-out table (issue 8) from the evaluation reports of the LOSO runs.

Each ``RUNS/loso-<source>/eval/metrics.json`` is one model trained without that source (and
without the teaching set); its held-out rows give the sensitivity (COVID-19 sources) or
specificity (others) at the model's own operating point, chosen on its validation split.

    python scripts/loso_table.py build/adult/cxr-all build/adult/loso-*
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ai.evaluate import fmt_rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", type=Path, nargs="+", help="run folders with eval/metrics.json, or report folders"
    )
    args = parser.parse_args()
    print(
        "| Held-out source | Images (patients) | Labels | COVID-19 sensitivity | Specificity | "
        "Abstained | In-distribution test macro-F1 | Threshold |"
    )
    print("|---|---:|---|---|---|---:|---:|---:|")
    for run in args.runs:
        report = run / "metrics.json" if (run / "metrics.json").is_file() else run / "eval"
        r = json.loads((report / "metrics.json" if report.is_dir() else report).read_text())
        rows = [x for x in r.get("per_source", []) if x["split"] == "held out"]
        rates = (r.get("abstention") or {}).get("rates", {}).get("held-out source", {})
        threshold = (r.get("operating_point", {}).get("fitted") or {}).get("threshold")
        for row in rows:
            labels = ", ".join(f"{k} {v}" for k, v in row["labels"].items())
            abstained = f"{rates['rate']:.2f}" if rates else "–"
            print(
                f"| {row['source']} | {row['images']} ({row['patients']}) | {labels} | "
                f"{fmt_rate(row.get('sensitivity'))} | {fmt_rate(row.get('specificity'))} | "
                f"{abstained} | {r['overall']['macro_f1']['value']:.2f} | "
                f"{threshold if threshold is None else f'{threshold:.3f}'} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
