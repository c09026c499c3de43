"""``/metrics``: the node's state in Prometheus text format, read from the database at scrape.

Every role writes its work to the one database, and the web role runs in a process of its own,
so the figures are counted there (a prometheus-client collector), not in per-process counters
that a restart would reset: what the database holds, the exporter reports.

- ``pacs_node_instances_received_total{modality}``: instances stored (not the node's own);
- ``pacs_node_jobs_total{outcome}`` and ``pacs_node_deliveries_total{outcome}``: by state
  (done, failed, skipped; queued and running are the queue below);
- ``pacs_node_queue_depth{queue,state}`` and ``pacs_node_queue_oldest_age_seconds{queue}``;
- ``pacs_node_stage_seconds{modality,stage}``: a histogram of each stage's latency for the
  analysed series (``complete``: first to last instance received; ``queued``: last instance to
  the job's start; ``analysed``: the job's run, the models' inference with it; ``delivered``:
  analysed to the last of the result's own outputs delivered; ``confirmed``: delivered to
  confirmed; ``storage.latency``, which the dashboard shows too), and
  ``pacs_node_receive_to_delivered_seconds{modality}`` for the whole of it;
- ``pacs_node_refused_total{what,reason}``: associations and instances refused, by reason
  (``storage.refusals`` counts them, since what is refused is not stored);
- ``pacs_node_inference_seconds{model}``: a histogram of the model's own time per job (forward
  passes and Grad-CAM), apart from decoding and building the results.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select

from storage import refusals
from storage.db import Database
from storage.latency import stage_times
from storage.models import Delivery, Instance, Job, Result, Series, TaskState, utcnow

BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FINISHED = (TaskState.DONE, TaskState.FAILED, TaskState.SKIPPED)
WAITING = (TaskState.QUEUED, TaskState.RUNNING)


class NodeCollector:
    def __init__(self, db: Database) -> None:
        self.db = db

    def describe(self) -> list[Any]:
        return []  # collected at scrape only (the registry must not query at registration)

    def collect(self) -> Iterator[Any]:
        with self.db.read() as session:
            received = CounterMetricFamily(
                "pacs_node_instances_received", "Instances stored", labels=["modality"]
            )
            rows = session.execute(
                select(Series.modality, func.count(Instance.id))
                .join(Instance, Instance.series_pk == Series.id)
                .where(Series.generated.is_(False))
                .group_by(Series.modality)
            ).all()
            for modality, n in rows:
                received.add_metric([modality or ""], n)
            yield received
            depth = GaugeMetricFamily(
                "pacs_node_queue_depth", "Tasks waiting or running", labels=["queue", "state"]
            )
            oldest = GaugeMetricFamily(
                "pacs_node_queue_oldest_age_seconds",
                "Age of the oldest queued task",
                labels=["queue"],
            )
            now = utcnow()
            for name, model in (("jobs", Job), ("deliveries", Delivery)):
                outcomes = CounterMetricFamily(
                    f"pacs_node_{name}", f"{name.title()} by outcome", labels=["outcome"]
                )
                counts = dict(
                    session.execute(select(model.state, func.count()).group_by(model.state)).all()  # type: ignore[attr-defined]
                )
                for state in FINISHED:
                    outcomes.add_metric([str(state)], counts.get(state, 0))
                yield outcomes
                for state in WAITING:
                    depth.add_metric([name, str(state)], counts.get(state, 0))
                first = session.scalar(
                    select(func.min(model.created_at)).where(model.state == TaskState.QUEUED)  # type: ignore[attr-defined]
                )
                oldest.add_metric([name], (now - first).total_seconds() if first else 0.0)
            yield depth
            yield oldest
            refused = CounterMetricFamily(
                "pacs_node_refused", "Associations and instances refused", labels=["what", "reason"]
            )
            for what, reason, n in refusals.counts(session):
                refused.add_metric([what, reason], n)
            yield refused
            inference = HistogramMetricFamily(
                "pacs_node_inference_seconds",
                "The model's forward passes and Grad-CAM, per job",
                labels=["model"],
            )
            by_model: dict[str, list[float]] = defaultdict(list)
            for name, seconds in session.execute(
                select(Result.model_name, Result.inference_s).where(Result.inference_s.is_not(None))
            ).all():
                by_model[name].append(float(seconds or 0.0))
            for name, values in sorted(by_model.items()):
                inference.add_metric([name], *_histogram(values, INFERENCE_BUCKETS))
            yield inference
            yield from self._latencies(session)

    def _latencies(self, session: Any) -> Iterator[Any]:
        """Each stage's seconds, per modality, for the analysed series (storage.latency)."""
        stages: dict[tuple[str, str], list[float]] = defaultdict(list)
        whole: dict[str, list[float]] = defaultdict(list)
        for times in stage_times(session, analysed_only=True):
            for stage, seconds in times.seconds().items():
                stages[(times.modality, stage)].append(seconds)
            if times.receive_to_delivered_s is not None:
                whole[times.modality].append(times.receive_to_delivered_s)
        stage_metric = HistogramMetricFamily(
            "pacs_node_stage_seconds", "Latency of each stage", labels=["modality", "stage"]
        )
        for (modality, stage), values in sorted(stages.items()):
            stage_metric.add_metric([modality, stage], *_histogram(values))
        yield stage_metric
        total = HistogramMetricFamily(
            "pacs_node_receive_to_delivered_seconds",
            "First instance received to the last result delivered",
            labels=["modality"],
        )
        for modality, values in sorted(whole.items()):
            total.add_metric([modality], *_histogram(values))
        yield total


def _histogram(
    values: list[float], edges: tuple[float, ...] = BUCKETS
) -> tuple[list[tuple[str, float]], float]:
    buckets = [(floatToGoString(edge), float(sum(v <= edge for v in values))) for edge in edges]
    buckets.append(("+Inf", float(len(values))))
    return buckets, sum(values)


def registry(db: Database) -> CollectorRegistry:
    out = CollectorRegistry(auto_describe=False)
    out.register(NodeCollector(db))  # type: ignore[arg-type]
    return out
