"""The worker: claim a job, run the model through ``ai``, store the results, owe them to peers.

Each step goes through ``storage.queue``; a job row is the only thing that moves work between
the network side and the models. :meth:`Worker.run_pending` runs everything that is due, at
once and in this thread ("burst" mode, for tests and ``pacs-node run-pending``); the scheduler
calls :meth:`Worker.tick` in production.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pydicom.dataset import Dataset
from sqlalchemy import select

from ai.model import ModelError
from ai.results import build_results
from ai.runtime import load_runtime_classifier
from pacs_node import __version__, sender
from pacs_node.errors import UnusableInputError
from pacs_node.logs import log_failure
from storage import queue
from storage.files import instance_relpath
from storage.ingest import record_instance
from storage.models import Delivery, DeliveryState, Instance, Job, Result, Series

if TYPE_CHECKING:
    from ai.analysis import Analysis
    from pacs_node.node import Node

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesWork:
    job_id: int
    model_name: str
    series_uid: str
    source_ae: str
    paths: list[Path]


def _write_bytes(data: bytes, fh: BinaryIO) -> None:
    fh.write(data)


class Worker:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = node.config

    # -- jobs ------------------------------------------------------------------------------

    def run_one(self) -> bool:
        """Claim and run one due job; False when none is due."""
        with self.node.db.session() as session:
            job = queue.claim(session, self.config.worker.lease_s)
            if job is None:
                return False
            series = session.get(Series, job.series_pk)
            assert series is not None
            paths = session.scalars(
                select(Instance.path)
                .where(Instance.series_pk == series.id)
                .order_by(Instance.instance_number, Instance.id)
            ).all()
            work = SeriesWork(
                job.id,
                job.model_name,
                series.series_instance_uid,
                series.source_ae,
                [self.node.files.abspath(p) for p in paths],
            )
        self._run(work)
        return True

    def _run(self, work: SeriesWork) -> None:
        try:
            analysis = self._analyse(work)
        except UnusableInputError as exc:
            with self.node.db.session() as session:
                job = session.get(Job, work.job_id)
                assert job is not None
                queue.skip_running(session, job, str(exc))
            log.info("job %d (series %s) skipped: %s", work.job_id, work.series_uid, exc)
            return
        except ModelError as exc:
            self._fail(work, f"model unavailable: {exc}", final=True)
            return
        except Exception as exc:
            log_failure(log, "job %d (series %s) failed", work.job_id, work.series_uid)
            self._fail(work, f"{type(exc).__name__}: {exc}")
            return
        try:
            self._store_results(work, analysis)
        except Exception as exc:
            log_failure(
                log, "job %d (series %s): storing results failed", work.job_id, work.series_uid
            )
            self._fail(work, f"storing results failed: {type(exc).__name__}: {exc}")

    def _fail(self, work: SeriesWork, error: str, final: bool = False) -> None:
        with self.node.db.session() as session:
            job = session.get(Job, work.job_id)
            assert job is not None
            if final:
                job.attempts = job.max_attempts
            state = queue.fail(session, job, error, self.config.worker.retry_backoff_s)
        # the full reason (which may quote data) is on the job row, for pacs-node status
        log.warning(
            "job %d (series %s) %s: %s", work.job_id, work.series_uid, state, error.split(":", 1)[0]
        )

    def _analyse(self, work: SeriesWork) -> Analysis:
        from ai.analysis import analyse_datasets, read_dicom

        binding = next((m for m in self.config.models if m.name == work.model_name), None)
        if binding is None:
            raise ModelError(f"model {work.model_name!r} is no longer configured")
        classifier = load_runtime_classifier(binding.path or binding.name, binding.runtime)
        datasets: list[Dataset] = []
        unreadable: list[str] = []
        for path in work.paths:
            try:
                datasets.append(read_dicom(path))
            except Exception as exc:
                unreadable.append(f"{path.name}: {type(exc).__name__}")
        if not datasets:
            raise UnusableInputError("no readable instance: " + ", ".join(unreadable)[:400])
        analysis = analyse_datasets(datasets, classifier)
        for reason in unreadable:
            analysis.excluded.append(("?", f"unreadable file {reason}"))
        return analysis

    def _store_results(self, work: SeriesWork, analysis: Analysis) -> None:
        prediction = analysis.prediction
        outputs = build_results(analysis, software_version=__version__)
        sr = outputs[0]
        written = []
        for ds in outputs:
            relpath = instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            size = self.node.files.write_atomic(relpath, partial(_write_bytes, buffer.getvalue()))
            written.append((ds, relpath, size))
        destinations = self.destinations(work.source_ae)
        with self.node.db.session() as session:
            job = session.get(Job, work.job_id)
            assert job is not None
            pks = []
            for ds, relpath, size in written:
                indexed = record_instance(
                    session,
                    ds,
                    relpath=relpath.as_posix(),
                    size_bytes=size,
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    generated=True,
                )
                pks.append(indexed.instance.id)
                for ae_title in destinations:
                    queue.add_delivery(session, indexed.instance.id, ae_title)
            session.add(
                Result(
                    job_pk=job.id,
                    series_pk=job.series_pk,
                    model_name=prediction.model_name,
                    model_version=prediction.model_version,
                    label=prediction.label.name,
                    probability=prediction.probability,
                    probabilities={
                        c.name: p
                        for c, p in zip(prediction.classes, prediction.probabilities, strict=True)
                    },
                    sr_sop_instance_uid=str(sr.SOPInstanceUID),
                    sc_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in outputs[1:]],
                )
            )
            queue.complete(session, job)
        log.info(
            "job %d (series %s): %s %.3f by %s %s; %d images used, %d excluded; results owed to %s",
            work.job_id,
            work.series_uid,
            prediction.label.name,
            prediction.probability,
            prediction.model_name,
            prediction.model_version,
            len(analysis.used),
            len(analysis.excluded),
            ", ".join(destinations) or "nobody",
        )

    def destinations(self, source_ae: str) -> list[str]:
        """The peers owed a series' results: its sender if so configured, and the extra ones."""
        titles = []
        peer = self.config.peer(source_ae) if source_ae else None
        if peer is not None and peer.send_results:
            titles.append(peer.ae_title)
        titles.extend(t for t in self.config.delivery.also_send_to if t not in titles)
        return titles

    # -- deliveries ------------------------------------------------------------------------

    def deliver_due(self) -> int:
        """Send every due delivery, one association per peer; returns how many were tried."""
        settings = self.config.delivery
        with self.node.db.session() as session:
            claimed = queue.claim_deliveries(session, self.config.worker.lease_s)
            batches: dict[str, list[tuple[int, Path]]] = defaultdict(list)
            for delivery in claimed:
                batches[delivery.destination_ae].append(
                    (delivery.id, self.node.files.abspath(delivery.instance.path))
                )
        for ae_title, items in batches.items():
            peer = self.config.peer(ae_title)
            if peer is None:
                outcomes = [
                    sender.Outcome(k, None, f"{ae_title} is not a configured peer", permanent=True)
                    for k, _ in items
                ]
            else:
                outcomes = sender.send(self.config, peer, items)
            with self.node.db.session() as session:
                for outcome in outcomes:
                    if outcome.ok:
                        queue.delivered(session, outcome.key, outcome.status or 0)
                    else:
                        state = queue.delivery_failed(
                            session,
                            outcome.key,
                            outcome.error,
                            status=outcome.status,
                            max_attempts=settings.max_attempts,
                            backoff_initial_s=settings.backoff_initial_s,
                            backoff_max_s=settings.backoff_max_s,
                            permanent=outcome.permanent,
                        )
                        log.warning(
                            "delivery %d to %s: %s (%s)",
                            outcome.key,
                            ae_title,
                            outcome.error,
                            state,
                        )
            sent = sum(o.ok for o in outcomes)
            log.info("sent %d of %d results to %s", sent, len(outcomes), ae_title)
        return sum(len(v) for v in batches.values())

    # -- loops -----------------------------------------------------------------------------

    def sweep(self) -> int:
        with self.node.db.session() as session:
            return queue.requeue_expired(session)

    def tick(self) -> None:
        """One scheduler round: expired leases back, due jobs run, due results sent."""
        self.sweep()
        while self.run_one():
            pass
        self.deliver_due()

    def run_pending(self, max_rounds: int = 1000) -> int:
        """Run every job and delivery due now, synchronously; returns jobs run."""
        ran = 0
        for _ in range(max_rounds):
            progressed = False
            while self.run_one():
                ran += 1
                progressed = True
            if self.deliver_due():
                progressed = True
            if not progressed:
                break
        return ran


def pending_deliveries(node: Node) -> int:
    with node.db.read() as session:
        return len(
            session.scalars(
                select(Delivery.id).where(
                    Delivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING])
                )
            ).all()
        )
