"""The dashboard at ``/``: what the node received, found and failed at, for the people who run it.

Server-rendered HTML with one small script (no CDN, no framework): the queue by state; recent
studies with their result, probability, model and heatmap thumbnail (WADO-RS rendered) and the
time each stage took; failed and skipped work with the reason, and a Retry button for what
failed; the models with their cards; the peers with their last contact. Retry is a ``POST`` to
``/dashboard/retry`` that must carry ``X-Requested-By: pacs-node`` (which the page's script
sets): a form on another web site cannot set that header without a CORS preflight, which this
server never grants, so it cannot retry work in the operator's name.
"""

from __future__ import annotations

import html
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from ai import DISCLAIMER
from pacs_node.config import Config
from storage import queue
from storage.db import Database
from storage.latency import STAGES, stage_times
from storage.models import Delivery, Instance, Job, Result, Series, Study, TaskState

MODELS_DIR = Path(__file__).resolve().parents[2] / "ai" / "models"
CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0} h2{font-size:1.1em;margin-top:1.6em}
.warn{background:#fff3cd;border:1px solid #e0c36a;padding:.4em .8em;display:inline-block}
table{border-collapse:collapse;font-size:.9em} td,th{border-bottom:1px solid #ddd;
padding:.3em .6em;text-align:left;vertical-align:top} th{background:#f3f3f3}
img.thumb{width:96px;height:96px;object-fit:contain;background:#000}
.failed{color:#a00} .skipped{color:#777} code{font-size:.85em}
"""
SCRIPT = """
async function retry(kind, id, button) {
  button.disabled = true;
  const r = await fetch('dashboard/retry', {method: 'POST',
    headers: {'X-Requested-By': 'pacs-node', 'Content-Type': 'application/json'},
    body: JSON.stringify({kind: kind, id: id})});
  const text = await r.text();
  button.parentElement.querySelector('.outcome').textContent = text;
}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _seconds(a: datetime | None, b: datetime | None) -> str:
    if a is None or b is None:
        return "-"
    return f"{max(0.0, (b - a).total_seconds()):.2f} s"


def render(config: Config, db: Database, limit: int = 25) -> str:
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>pacs-node {_e(config.node.ae_title)}</title><style>{CSS}</style>",
        f"<script>{SCRIPT}</script></head><body>",
        f"<h1>pacs-node {_e(config.node.ae_title)}</h1>",
        f"<p class='warn'><strong>{_e(DISCLAIMER)}.</strong> Triage and second reading only.</p>",
    ]
    with db.read() as session:
        out += _queue(session)
        out += _studies(session, limit)
        out += _problems(session, limit)
        out += _peers(config, session)
    out += _models(config)
    out.append(
        "<p>DICOMweb: <code>/dicomweb</code> (QIDO-RS, WADO-RS, STOW-RS); metrics: "
        "<code>/metrics</code></p></body></html>"
    )
    return "\n".join(out)


def _queue(session: Any) -> list[str]:
    rows = ["<h2>Queue</h2><table><tr><th></th>"]
    rows.append("".join(f"<th>{s.value}</th>" for s in TaskState) + "</tr>")
    for name, model in (("jobs", Job), ("deliveries", Delivery)):
        counts = dict(
            session.execute(select(model.state, func.count()).group_by(model.state)).all()
        )
        cells = "".join(f"<td>{counts.get(s, 0)}</td>" for s in TaskState)
        rows.append(f"<tr><th>{name}</th>{cells}</tr>")
    rows.append("</table>")
    return rows


def _studies(session: Any, limit: int) -> list[str]:
    results = session.execute(
        select(Result, Series, Study)
        .join(Series, Series.id == Result.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .order_by(Result.id.desc())
        .limit(limit)
    ).all()
    rows = [
        "<h2>Recent results (AI-generated, not for diagnostic use)</h2>",
        "<table id='results'><tr><th>heatmap</th><th>study</th><th>series</th><th>result</th>"
        "<th>model</th>" + "".join(f"<th>{s}</th>" for s in STAGES[1:]) + "</tr>",
    ]
    stages = {t.result_pk: t.times for t in stage_times(session, [r.id for r, _, _ in results])}
    for result, series, study in results:
        times = stages.get(result.id, (None,) * len(STAGES))
        thumb = _thumbnail(session, result, study)
        cells = "".join(
            f"<td>{_seconds(a, b)}</td>" for a, b in zip(times, times[1:], strict=False)
        )
        replaced = " (superseded)" if result.superseded_by else ""
        rows.append(
            f"<tr><td>{thumb}</td><td><code>{_e(study.study_instance_uid)}</code><br>"
            f"{_e(study.patient_id)}</td><td>{_e(series.modality)}</td>"
            f"<td><strong>{_e(result.label)}</strong> {result.probability:.3f}{replaced}</td>"
            f"<td>{_e(result.model_name)} {_e(result.model_version)}</td>{cells}</tr>"
        )
    if not results:
        rows.append("<tr><td colspan='10'>no results yet</td></tr>")
    rows.append("</table><p>Stage times: from the previous stage (received = first instance).</p>")
    return rows


def _thumbnail(session: Any, result: Result, study: Study) -> str:
    if not result.sc_sop_instance_uids:
        return ""
    row = session.execute(
        select(Instance.sop_instance_uid, Series.series_instance_uid)
        .join(Series, Series.id == Instance.series_pk)
        .where(Instance.sop_instance_uid == result.sc_sop_instance_uids[0])
    ).first()
    if row is None:
        return ""
    url = (
        f"dicomweb/studies/{study.study_instance_uid}/series/{row[1]}/instances/{row[0]}/thumbnail"
    )
    return f"<img class='thumb' alt='heatmap' src='{_e(url)}'>"


def _problems(session: Any, limit: int) -> list[str]:
    rows = ["<h2>Failed and skipped work</h2><table id='problems'><tr><th>what</th>"
            "<th>state</th><th>attempts</th><th>reason</th><th></th></tr>"]  # fmt: skip
    jobs = session.execute(
        select(Job, Series.series_instance_uid, Series.modality)
        .join(Series, Series.id == Job.series_pk)
        .where(Job.state.in_([TaskState.FAILED, TaskState.SKIPPED]))
        .order_by(Job.id.desc())
        .limit(limit)
    ).all()
    for job, series_uid, modality in jobs:
        rows.append(_problem_row("job", job, f"{modality} series <code>{_e(series_uid)}</code>"))
    deliveries = queue.failed_deliveries(session, limit)
    for delivery, sop_uid in deliveries:
        what = f"delivery to {_e(delivery.destination_ae)} of <code>{_e(sop_uid)}</code>"
        rows.append(_problem_row("delivery", delivery, what))
    if not jobs and not deliveries:
        rows.append("<tr><td colspan='5'>nothing failed or skipped</td></tr>")
    rows.append("</table>")
    return rows


def _problem_row(kind: str, task: Any, what: str) -> str:
    button = ""
    if task.state == TaskState.FAILED:
        button = (
            f"<button data-retry='{kind}-{task.id}' onclick=\"retry('{kind}', {task.id}, this)\">"
            "Retry</button> <span class='outcome'></span>"
        )
    state = task.state.value
    return (
        f"<tr class='{state}'><td>{kind} {task.id}: {what}</td><td>{state}</td>"
        f"<td>{task.attempts}</td><td>{_e(task.last_error)}</td><td>{button}</td></tr>"
    )


def _peers(config: Config, session: Any) -> list[str]:
    rows = ["<h2>Peers</h2><table><tr><th>AE title</th><th>address</th><th>last received</th>"
            "<th>last delivered</th></tr>"]  # fmt: skip
    for peer in config.peers:
        received = session.scalar(
            select(func.max(Series.last_received_at)).where(Series.source_ae == peer.ae_title)
        )
        delivered = session.scalar(
            select(func.max(Delivery.finished_at)).where(
                Delivery.destination_ae == peer.ae_title, Delivery.state == TaskState.DONE
            )
        )
        rows.append(
            f"<tr><td>{_e(peer.ae_title)}</td><td>{_e(peer.host)}:{peer.port}</td>"
            f"<td>{_e(received or '-')}</td><td>{_e(delivered or '-')}</td></tr>"
        )
    if not config.peers:
        rows.append("<tr><td colspan='4'>none configured (any calling AE accepted)</td></tr>")
    rows.append("</table>")
    return rows


def _models(config: Config) -> list[str]:
    rows = ["<h2>Models</h2><table><tr><th>name</th><th>modalities</th><th>card</th></tr>"]
    for model in config.models:
        folder = Path(model.path) if model.path else MODELS_DIR / model.name
        card = folder / "MODEL_CARD.md"
        text = card.read_text(encoding="utf-8") if card.is_file() else "(no model card)"
        state = "" if model.enabled else " (disabled)"
        rows.append(
            f"<tr><td>{_e(model.name)}{state}</td><td>{_e(', '.join(model.modalities))}</td>"
            f"<td><details><summary>model card</summary><pre>{_e(text)}</pre></details></td></tr>"
        )
    rows.append("</table>")
    return rows


def retry(db: Database, kind: str, task_id: int) -> tuple[int, str]:
    """(HTTP status, message) of a Retry button press."""
    is_id = isinstance(task_id, int) and not isinstance(task_id, bool)  # JSON true is no id
    if kind not in ("job", "delivery") or not is_id or task_id < 1:
        return 400, "expected {kind: job|delivery, id: N}"
    with db.session() as session:
        ids = {"delivery_ids": [task_id] if kind == "delivery" else [],
               "job_ids": [task_id] if kind == "job" else []}  # fmt: skip
        deliveries, jobs = queue.retry_failed(session, **ids)
    if deliveries + jobs == 0:
        return 409, f"{kind} {task_id} is not failed (or does not exist): nothing requeued"
    return 200, f"{kind} {task_id} requeued"
