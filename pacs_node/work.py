"""The work role: claim a job (radiographs: a batch), run the model through ``ai``, store the
results, owe them.

``pacs-node work`` runs :func:`run` (any number of them, on any machine that sees the database
and the storage folder); a job row is the only thing that moves work between the roles. Each
attempt runs under its deadline and renews its lease (:class:`pacs_node.process.Watchdog`);
results are recorded only while the lease is still this process's, together with the job's
``done`` state, so a job taken back from a hung or dead worker is never recorded twice.
:meth:`Worker.run_pending` runs everything due at once in this thread ("burst" mode, for tests
and :class:`pacs_node.node.Node`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ai.errors import ModelError, UnusableInputError
from ai.outputs import SrReference, add_predecessor
from ai.results import build_not_analysed, build_results
from ai.runtime import load_runtime_classifier, weights_sha256
from ai.selection import Candidate, RuleSkip, choose_series, not_chosen_reason, select_images
from ai.templates import encoded
from pacs_node import __version__, audit, wake
from pacs_node.assembly import SINGLE_IMAGE_MODALITIES
from pacs_node.audit import AuditTrail
from pacs_node.completeness import judge
from pacs_node.config import Config, ModelBinding
from pacs_node.logs import log_failure
from pacs_node.process import Stop, Watchdog, file_store, owner_id, run_loop
from storage import queue, tasks
from storage.db import Database
from storage.files import FileStore, instance_relpath
from storage.ingest import Made, record_made
from storage.models import Instance, Job, Result, Series, Study, TaskState, utcnow
from storage.queue import Schedule

if TYPE_CHECKING:
    from ai.analysis import Analysis

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesWork:
    job_id: int
    model_name: str  # "": no model serves the series' modality (it is reported, not analysed)
    series_uid: str
    source_ae: str
    priority: int
    paths: list[Path]
    modality: str = ""
    study_uid: str = ""
    last_received_at: datetime | None = None  # of the series' newest instance
    # the SR of the series' current result, which this job's SR replaces (PS3.3 C.17.2.3)
    predecessor: SrReference | None = None
    warning: str = ""  # analysed although its sender holds more of the series
    # for the audit trail: the study's patient, and the series' instances (SOP class, UID)
    subject: audit.StudyRecord | None = None
    study_pk: int = 0


@dataclass(eq=False)  # one job's: compared by identity
class Outcome:
    """A job's results, built (the SR first), to be written and then recorded together with
    the job's new state by *transition*; *after* runs once they are recorded."""

    work: SeriesWork
    outputs: list[Dataset]
    result: dict[str, object]
    transition: Callable[[Session, Job], object]
    destinations: list[str]
    after: Callable[[], None] = lambda: None
    replaces: SrReference | None = None  # the SR of the result this one replaces
    written: list[tuple[Dataset, Path, int]] = field(default_factory=list)


def _write_bytes(data: bytes, fh: BinaryIO) -> None:
    fh.write(data)


class LeaseLost(Exception):
    """The job was taken back (its lease ran out) while this process worked on it."""


class Worker:
    """Runs jobs: what it needs is passed in, nothing reaches back for it."""

    def __init__(
        self,
        config: Config,
        db: Database,
        files: FileStore,
        *,
        owner: str | None = None,
        watchdog: Watchdog | None = None,
        trail: AuditTrail | None = None,
        owed: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.files = files
        self.owner = owner or owner_id()
        self.watchdog = watchdog
        self.trail = trail or AuditTrail(config, "work")
        self.owed = owed  # called when results are owed to a peer (the send role is nudged)
        self._writes: ThreadPoolExecutor | None = None  # a batch's result files, in order

    # -- jobs ------------------------------------------------------------------------------

    def run_next(self) -> int:
        """Claim and run the next due job, or a batch; returns how many were claimed (0: none
        was due).

        A first attempt at a single-image series (CR, DX) is claimed with up to
        ``worker.batch_size - 1`` more of them for the same model: each is analysed in turn,
        and their results are indexed, owed and recorded in one transaction (the forward
        pass is not batched: on this CPU 16 images at once cost what 16 passes do). A retry
        always runs alone, so an input that kills the process costs the jobs claimed with it
        one attempt each, and the next claim isolates it; jobs with a single attempt are not
        batched."""
        settings = self.config.worker
        now = utcnow()
        with self.db.session() as session:
            claimed = tasks.claim(session, Job, owner=self.owner, lease_s=settings.lease_s, now=now)
            if not claimed:
                return 0
            first = claimed[0]
            works = [self._series_work(session, first)]
            if (
                settings.batch_size > 1
                and first.model_name
                and first.attempts == 1
                and first.max_attempts > 1
                and works[0].modality in SINGLE_IMAGE_MODALITIES
            ):
                single_image = select(Series.id).where(
                    Series.modality.in_(sorted(SINGLE_IMAGE_MODALITIES))
                )
                more = tasks.claim(
                    session,
                    Job,
                    owner=self.owner,
                    lease_s=settings.lease_s,
                    now=now,
                    limit=settings.batch_size - 1,
                    where=[
                        Job.model_name == first.model_name,
                        Job.attempts == 0,
                        Job.max_attempts > 1,  # a crash costs each an attempt: one to spare
                        Job.series_pk.in_(single_image),
                    ],
                )
                works += [self._series_work(session, job) for job in more]
                claimed += more
            deadline_s = max(job.deadline_s for job in claimed)
        if works[0].modality not in SINGLE_IMAGE_MODALITIES:
            warning = self._complete_or_defer(works[0])
            if warning is None:
                return 1
            if warning:
                works = [replace(works[0], warning=warning)]
        try:
            self._run(works, deadline_s)
        finally:
            if self.watchdog is not None:
                self.watchdog.release()
        return len(works)

    def _series_work(self, session: Session, job: Job) -> SeriesWork:
        series = session.get(Series, job.series_pk)
        assert series is not None
        rows = session.execute(
            select(
                Instance.path,
                Instance.received_at,
                Instance.sop_class_uid,
                Instance.sop_instance_uid,
            )
            .where(Instance.series_pk == series.id)
            .order_by(Instance.instance_number, Instance.id)
        ).all()
        study = series.study
        subject = audit.StudyRecord(
            study.study_instance_uid,
            patient_id=study.patient_id,
            patient_name=study.patient_name,
            accession=study.accession_number,
        )
        for row in rows:
            subject.add(row[2], row[3])
        return SeriesWork(
            job.id,
            job.model_name,
            series.series_instance_uid,
            series.source_ae,
            job.priority,
            [self.files.abspath(row[0]) for row in rows],
            series.modality,
            study_uid=study.study_instance_uid,
            last_received_at=max((row[1] for row in rows), default=None),
            predecessor=self._current_sr(session, series.id, study.study_instance_uid),
            subject=subject,
            study_pk=study.id,
        )

    def _current_sr(self, session: Session, series_pk: int, study_uid: str) -> SrReference | None:
        """The SR of the series' result that has not been replaced, if any."""
        row = session.execute(
            select(Result.sr_sop_instance_uid, Instance.sop_class_uid, Series.series_instance_uid)
            .join(Instance, Instance.sop_instance_uid == Result.sr_sop_instance_uid)
            .join(Series, Series.id == Instance.series_pk)
            .where(Result.series_pk == series_pk, Result.superseded_by == "")
            .order_by(Result.id.desc())
            .limit(1)
        ).first()
        if row is None:
            return None
        return SrReference(study_uid, row[2], row[1], row[0])

    def _complete_or_defer(self, work: SeriesWork) -> str | None:
        """Whether the series is all here (:mod:`pacs_node.completeness`): "" to analyse it,
        a warning to analyse it although the sender holds more, None when the job was put
        back to wait (or dropped for a newer job of the same series)."""
        now = utcnow()
        verdict = judge(
            self.config,
            self.config.peer(work.source_ae) if work.source_ae else None,
            held=len(work.paths),
            study_uid=work.study_uid,
            series_uid=work.series_uid,
            last_received_at=work.last_received_at or now,
            now=now,
        )
        if verdict.ready:
            log.debug("job %d (series %s): %s", work.job_id, work.series_uid, verdict.note)
            return verdict.warning
        try:
            with self.db.session() as session:
                job = self._held_job(session, work)
                # instances that came while this job was claimed queued a job of their own
                # (the receive role cannot move a claimed job's start): the same request, so
                # it is folded into this one, which waits for the later of the two starts
                newer = session.scalars(
                    select(Job)
                    .where(
                        Job.series_pk == job.series_pk,
                        Job.id > job.id,
                        Job.state == TaskState.QUEUED,
                    )
                    .order_by(Job.id)
                ).all()
                start = now + timedelta(seconds=verdict.wait_s)
                for duplicate in newer:
                    start = max(start, duplicate.not_before)
                    job.model_name = duplicate.model_name  # as the receive role queued it last
                    session.delete(duplicate)
                tasks.defer(job, start, now)
        except LeaseLost:
            log.warning("job %d: lease lost while working; outcome dropped", work.job_id)
            return None
        log.info(
            "job %d (series %s) waits %.1f s: %s",
            work.job_id,
            work.series_uid,
            verdict.wait_s,
            verdict.note,
        )
        return None

    def _run(self, works: list[SeriesWork], deadline_s: float) -> None:
        """Analyse each job and build its results; then record them all together. A thread
        writes (and fsyncs) each job's files, while the next job of a batch is analysed.
        Each job's analysis gets the whole *deadline_s* (the watchdog's clock restarts; it
        holds every job of the batch, whose leases it renews until they are recorded)."""
        held = [work.job_id for work in works]
        ready: list[tuple[Outcome, Future[list[tuple[Dataset, Path, int]]]]] = []
        for work in works:
            if self.watchdog is not None:
                self.watchdog.hold(held, deadline_s)
            try:
                outcome = self._results_of(work)
            except Exception:  # recording its skip or failure failed (the database): its
                # lease runs out (a failed attempt) and the rest of the batch goes on
                log_failure(log, "job %d: its outcome could not be recorded", work.job_id)
                continue
            if outcome is not None:
                ready.append((outcome, self._writer().submit(self._write_outputs, outcome)))
        for outcome, writing in ready:
            try:
                outcome.written = writing.result()
            except Exception:  # written again by _record, which reports what fails there
                log_failure(log, "job %d: writing its results failed", outcome.work.job_id)
        if ready:
            self._record([outcome for outcome, _ in ready])

    def _writer(self) -> ThreadPoolExecutor:
        if self._writes is None:
            self._writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-results")
        return self._writes

    def close(self) -> None:
        """Stop the writer thread (after the writes it holds)."""
        if self._writes is not None:
            self._writes.shutdown(wait=True)
            self._writes = None

    def _results_of(self, work: SeriesWork) -> Outcome | None:
        """The job's results, or None when it ended otherwise (skipped or failed: recorded)."""
        if not work.model_name:
            modality = work.modality or "(none)"
            self._skip(work, f"no model for modality {modality}: stored, not analysed")
            return None
        try:
            analysis = self._analyse(work)
        except RuleSkip as exc:  # the configured rules: recorded, no "not analysed" report
            self._skip(work, f"not for {work.model_name} by the selection rules: {exc}", False)
            return None
        except UnusableInputError as exc:
            self._skip(work, str(exc))
            return None
        except ModelError as exc:
            self._fail(work, f"model unavailable: {exc}", permanent=True)
            return None
        except Exception as exc:
            log_failure(log, "job %d (series %s) failed", work.job_id, work.series_uid)
            self._fail(work, f"{type(exc).__name__}: {exc}")
            return None
        try:
            return self._results(work, analysis)
        except Exception as exc:
            log_failure(
                log, "job %d (series %s): building results failed", work.job_id, work.series_uid
            )
            self._fail(work, f"building results failed: {type(exc).__name__}: {exc}")
            return None

    def _record(self, outcomes: list[Outcome]) -> None:
        """Write the outcomes' files, then record them in one transaction; when that fails
        for a batch, each is tried alone, so that one cannot sink the others."""
        try:
            for outcome in outcomes:
                if not outcome.written:
                    outcome.written = self._write_outputs(outcome)
            kept = self._commit(outcomes)
        except Exception as exc:
            if len(outcomes) > 1:
                log_failure(log, "%d jobs: recording their results failed", len(outcomes))
                for outcome in outcomes:
                    self._record([outcome])
                return
            work = outcomes[0].work
            log_failure(
                log, "job %d (series %s): storing results failed", work.job_id, work.series_uid
            )
            self._fail(work, f"storing results failed: {type(exc).__name__}: {exc}")
            return
        for outcome in outcomes:
            work = outcome.work
            if outcome not in kept:
                log.warning(
                    "job %d (series %s): lease lost while working; outcome dropped",
                    work.job_id,
                    work.series_uid,
                )
                continue
            if outcome.replaces is not None:
                log.info(
                    "job %d (series %s): its SR supersedes %s",
                    work.job_id,
                    work.series_uid,
                    outcome.replaces.sop_instance_uid,
                )
            outcome.after()

    def _held_job(self, session: Session, work: SeriesWork) -> Job:
        """The job, read afresh in *session*; :class:`LeaseLost` when it is no longer ours."""
        job = session.get(Job, work.job_id, populate_existing=True)
        if job is None or not tasks.holds(job, self.owner):
            raise LeaseLost(work.job_id)
        return job

    def _finish(
        self, work: SeriesWork, transition: Callable[[Session, Job], object]
    ) -> TaskState | None:
        """Apply *transition* to the job while it is still ours; its new state, or None when
        the lease was lost (the outcome is dropped)."""
        try:
            with self.db.session() as session:
                job = self._held_job(session, work)
                transition(session, job)
                return job.state
        except LeaseLost:
            log.warning("job %d: lease lost while working; outcome dropped", work.job_id)
            return None

    def _audit(
        self,
        work: SeriesWork,
        outcome: str,
        description: str = "",
        outputs: list[Dataset] | None = None,
        version: str = "",
    ) -> None:
        """AI Analysis in the audit trail: the model, what it read and made, the outcome."""
        if not self.trail.enabled or work.subject is None or not work.model_name:
            return
        made: dict[str, list[str]] = {}
        for ds in outputs or []:
            made.setdefault(str(ds.SOPClassUID), []).append(str(ds.SOPInstanceUID))
        binding = self.config.model_named(work.model_name)
        try:
            digest = weights_sha256(binding.path or binding.name) if binding else ""
        except Exception:  # a model that cannot be found has no weights to hash
            digest = ""
        self.trail.analysed(
            work.subject,
            made,
            model_name=work.model_name,
            model_version=version,
            weights_sha256=digest or "unknown",
            outcome=outcome,
            description=description,
        )

    def _fail(self, work: SeriesWork, error: str, permanent: bool = False) -> None:
        state = self._finish(
            work, lambda s, j: tasks.fail(s, j, error, now=utcnow(), permanent=permanent)
        )
        if state is not None:
            self._audit(work, audit.SERIOUS_FAILURE, f"{state}: {error}")
        # the full reason (which may quote data) is on the job row, for pacs-node status
        log.warning(
            "job %d (series %s) %s: %s",
            work.job_id,
            work.series_uid,
            state or "dropped",
            error.split(":", 1)[0],
        )

    def _analyse(self, work: SeriesWork) -> Analysis:
        from ai.analysis import analyse_datasets, read_dicom

        binding = self.config.model_named(work.model_name)
        if binding is None:
            raise ModelError(f"model {work.model_name!r} is no longer configured")
        datasets: list[Dataset] = []
        unreadable: list[str] = []
        for path in work.paths:
            try:
                datasets.append(read_dicom(path))
            except Exception as exc:
                unreadable.append(f"{path.name}: {type(exc).__name__}")
        if not datasets:
            raise UnusableInputError("no readable instance: " + ", ".join(unreadable)[:400])
        kept, by_rule = select_images(datasets, binding.rules)
        if binding.one_series_per_study:
            self._check_chosen(work, binding, kept)
        classifier = load_runtime_classifier(binding.path or binding.name, binding.runtime)
        analysis = analyse_datasets(kept, classifier)
        analysis.excluded[:0] = by_rule
        for reason in unreadable:
            analysis.excluded.append(("?", f"unreadable file {reason}"))
        return analysis

    def _check_chosen(self, work: SeriesWork, binding: ModelBinding, kept: list[Dataset]) -> None:
        """:class:`RuleSkip` when the model reads one series per study and the prefer rules
        choose another series of this study that the node holds."""
        from ai.analysis import read_dicom

        candidates = [Candidate(work.series_uid, kept[0], len(kept))]
        with self.db.session() as session:
            others = session.execute(
                select(Series.id, Series.series_instance_uid)
                .join(Study, Series.study_pk == Study.id)
                .where(
                    Study.study_instance_uid == work.study_uid,
                    Series.series_instance_uid != work.series_uid,
                    Series.modality.in_(binding.modalities),
                    Series.generated.is_(False),
                )
            ).all()
            firsts = []
            for series_pk, series_uid in others:
                paths = session.scalars(
                    select(Instance.path)
                    .where(Instance.series_pk == series_pk)
                    .order_by(Instance.instance_number, Instance.id)
                ).all()
                if paths:
                    firsts.append((series_uid, paths[0], len(paths)))
        for series_uid, path, count in firsts:
            try:
                header = read_dicom(self.files.abspath(path))
            except Exception:
                continue  # an unreadable series is no candidate
            candidates.append(Candidate(series_uid, header, count))
        chosen = choose_series(candidates, binding.rules)
        if chosen is not None and chosen.series_uid != work.series_uid:
            raise RuleSkip(not_chosen_reason(chosen, binding.rules))

    def _skip(self, work: SeriesWork, reason: str, report_it: bool = True) -> None:
        """Skip the job with *reason*; with ``worker.report_not_analysed`` (and *report_it*) an
        SR that says so goes back too (recorded with the skip, while the lease is still ours)."""
        report = self._not_analysed_report(work, reason) if report_it else None

        def skipped() -> None:
            made = [report] if report else None
            self._audit(work, audit.MINOR_FAILURE, f"skipped: {reason}", made)
            log.info("job %d (series %s) skipped: %s", work.job_id, work.series_uid, reason)

        def skip(session: Session, job: Job) -> None:
            tasks.skip(session, job, reason, utcnow())

        if report is None:
            self._finish(work, skip)
            skipped()
            return
        result = dict(
            model_name=work.model_name or "none",
            model_version="",
            label="not_analysed",
            probability=0.0,
            probabilities={},
            sr_sop_instance_uid=str(report.SOPInstanceUID),
            sc_sop_instance_uids=[],
        )
        destinations = self.destinations(work.source_ae)
        self._record([self._outcome(work, [report], result, skip, skipped, destinations)])

    def _not_analysed_report(self, work: SeriesWork, reason: str) -> Dataset | None:
        if not self.config.worker.report_not_analysed:
            return None
        from ai.analysis import read_dicom  # headers; Pixel Data stays on disk

        headers = []
        for path in work.paths:
            try:
                headers.append(read_dicom(path))
            except Exception as exc:
                log.info("job %d: %s unreadable for the report: %s", work.job_id, path.name, exc)
        if not headers:
            log.warning("job %d: no readable header, no not-analysed report", work.job_id)
            return None
        try:
            return build_not_analysed(
                headers, reason, model_name=work.model_name, software_version=__version__
            )
        except Exception:
            log_failure(log, "job %d: the not-analysed report could not be made", work.job_id)
            return None

    def _outcome(
        self,
        work: SeriesWork,
        outputs: list[Dataset],
        result: dict[str, object],
        transition: Callable[[Session, Job], object],
        after: Callable[[], None],
        destinations: list[str],
    ) -> Outcome:
        """An :class:`Outcome`; the SR says which result it replaces, if any, in its
        Predecessor Documents Sequence (PS3.3 C.17.2.3)."""
        sr = outputs[0]
        replaces = work.predecessor
        if replaces is not None and replaces.sop_instance_uid != sr.SOPInstanceUID:
            add_predecessor(sr, replaces)
        else:
            replaces = None
        return Outcome(work, outputs, result, transition, destinations, after, replaces)

    def _commit(self, outcomes: list[Outcome]) -> list[Outcome]:
        """In one transaction, for the outcomes whose job is still this process's: index their
        written results, owe them to the destinations, record each Result (the one it replaces
        marked so) and apply each transition. Returns those recorded (the others' leases were
        lost: their outcome is dropped)."""
        with self.db.session() as session:
            ids = [outcome.work.job_id for outcome in outcomes]
            jobs = {
                job.id: job
                for job in session.scalars(
                    select(Job).where(Job.id.in_(ids)).execution_options(populate_existing=True)
                )
            }
            kept = [
                o
                for o in outcomes
                if (job := jobs.get(o.work.job_id)) is not None and tasks.holds(job, self.owner)
            ]
            made = [
                Made(ds, relpath.as_posix(), size, o.work.study_pk)
                for o in kept
                for ds, relpath, size in o.written
            ]
            keys = iter(record_made(session, made))
            owed: dict[tuple[tuple[str, ...], int], list[int]] = {}
            for outcome in kept:
                job = jobs[outcome.work.job_id]
                pks = [next(keys) for _ in outcome.written]
                owing = (tuple(outcome.destinations), outcome.work.priority)
                owed.setdefault(owing, []).extend(pks)
                if outcome.replaces is not None:
                    session.execute(
                        update(Result)
                        .where(Result.series_pk == job.series_pk, Result.superseded_by == "")
                        .values(superseded_by=str(outcome.outputs[0].SOPInstanceUID))
                        .execution_options(synchronize_session=False)
                    )
                session.add(Result(job_pk=job.id, series_pk=job.series_pk, **outcome.result))
                outcome.transition(session, job)
            for (destinations, priority), pks in owed.items():
                queue.owe(session, pks, destinations, self.delivery_schedule(priority))
        if any(o.destinations for o in kept) and self.owed is not None:
            self.owed()
        return kept

    def _write_outputs(self, outcome: Outcome) -> list[tuple[Dataset, Path, int]]:
        written = []
        for ds in outcome.outputs:
            relpath = instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            size = self.files.write_atomic(relpath, partial(_write_bytes, encoded(ds)))
            written.append((ds, relpath, size))
        return written

    def _results(self, work: SeriesWork, analysis: Analysis) -> Outcome:
        """The SR, SC (and Parametric Map) of *analysis*, with the job's ``done``."""
        prediction = analysis.prediction
        outputs = build_results(
            analysis,
            software_version=__version__,
            parametric_maps=self.config.worker.parametric_map,
        )
        sr = outputs[0]
        result = dict(
            model_name=prediction.model_name,
            model_version=prediction.model_version,
            label=prediction.label.name,
            probability=prediction.probability,
            probabilities={
                c.name: p for c, p in zip(prediction.classes, prediction.probabilities, strict=True)
            },
            sr_sop_instance_uid=str(sr.SOPInstanceUID),
            sc_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in outputs[1:]],
            inference_s=analysis.inference_s,
        )

        if work.warning:
            analysis.warnings.append(work.warning)

        def done(session: Session, job: Job) -> None:
            job.warnings = "\n".join(analysis.warnings)
            tasks.succeed(session, job, utcnow())

        destinations = self.destinations(work.source_ae)

        def recorded() -> None:  # refers to no Outcome: a cycle would hold its arrays until gc
            self._audit(
                work,
                audit.SUCCESS,
                f"{prediction.label.name} {prediction.probability:.3f}",
                outputs,
                prediction.model_version,
            )
            for warning in analysis.warnings:
                log.warning("job %d (series %s): %s", work.job_id, work.series_uid, warning)
            log.info(
                "job %d (series %s): %s %.3f by %s %s; %d images used, %d excluded; "
                "results owed to %s",
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

        return self._outcome(work, outputs, result, done, recorded, destinations)

    def destinations(self, source_ae: str) -> list[str]:
        """The peers owed a series' results: its sender if so configured, and the extra ones."""
        titles = []
        peer = self.config.peer(source_ae) if source_ae else None
        if peer is not None and peer.send_results:
            titles.append(peer.ae_title)
        titles.extend(t for t in self.config.delivery.also_send_to if t not in titles)
        return titles

    def delivery_schedule(self, priority: int) -> Schedule:
        settings = self.config.delivery
        return Schedule(
            max_attempts=settings.max_attempts,
            backoff_initial_s=settings.backoff_initial_s,
            backoff_max_s=settings.backoff_max_s,
            deadline_s=self.config.node.dimse_timeout_s,
            priority=priority,
        )

    # -- loops -----------------------------------------------------------------------------

    def sweep(self) -> int:
        """Take back jobs whose lease ran out (their worker died or hung)."""
        with self.db.session() as session:
            taken = tasks.expire(session, Job, now=utcnow())
        for job in taken:
            log.warning("job %d taken back (%s): %s", job.id, job.state, job.last_error)
        return len(taken)

    def run_pending(self, max_jobs: int = 10_000) -> int:
        """Run every job due now, synchronously; returns how many ran."""
        ran = 0
        while ran < max_jobs:  # bounded: each pass claims at least one job or stops
            claimed = self.run_next()
            if not claimed:
                break
            ran += claimed
        return ran


def preload_models(config: Config) -> None:
    """Load every configured model now, so a broken model stops start-up, not a job."""
    for binding in config.models:
        if binding.enabled:
            classifier = load_runtime_classifier(binding.path or binding.name, binding.runtime)
            classifier.warm_up()
            _warm_results(classifier, binding.modalities[0] if binding.modalities else "OT")
            log.info(
                "model %s %s (%s) serves %s",
                classifier.spec.name,
                classifier.spec.version,
                binding.runtime,
                "/".join(binding.modalities),
            )


def _warm_results(classifier: object, modality: str) -> None:
    """Build the results of one synthetic image, so that the first study after a start does
    not pay for highdicom's first use (its standard's tables: ~0.5 s)."""
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from ai.analysis import analyse_datasets

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (generate_uid() for _ in "123")
    ds.Modality, ds.BodyPartExamined, ds.PatientID, ds.PatientName = modality, "CHEST", "WARM", "Up"
    ds.Rows = ds.Columns = 512
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    rng = np.random.default_rng(0)
    ds.PixelData = rng.integers(0, 4096, (512, 512), dtype=np.uint16).tobytes()
    try:
        build_results(analyse_datasets([ds], classifier), software_version=__version__)  # type: ignore[arg-type]
    except Exception as exc:  # best effort: the first job pays instead
        log.debug("results warm-up skipped: %s", exc)


def run(config: Config, stop: Stop) -> None:
    """``pacs-node work``: load the models, then claim and run jobs until stopped."""
    db = Database(config.node.resolved_database_url)
    files = file_store(config)
    owner = owner_id()
    preload_models(config)

    def on_deadline(ids: list[int], elapsed_s: float) -> None:
        with db.session() as session:
            for job in session.scalars(select(Job).where(Job.id.in_(ids))).all():
                if tasks.holds(job, owner):
                    state = tasks.fail(
                        session,
                        job,
                        f"deadline exceeded: stopped after {elapsed_s:.0f} s "
                        f"(deadline {job.deadline_s:.0f} s)",
                        now=utcnow(),
                    )
                    log.error("job %d stopped at its deadline: %s", job.id, state)

    watchdog = Watchdog(
        db, Job, owner=owner, lease_s=config.worker.lease_s, on_deadline=on_deadline
    ).start()
    senders = wake.Nudger(files.root, wake.SEND)
    worker = Worker(config, db, files, owner=owner, watchdog=watchdog, owed=senders.nudge)
    nudged = threading.Event()
    listener = wake.listen(files.root, wake.WORK, nudged)
    log.info("work role %s ready", owner)
    try:
        with worker.trail.running():
            try:
                run_loop(
                    worker.run_next,
                    config.worker.poll_interval_s,
                    stop,
                    sweep=worker.sweep,
                    sweep_every_s=max(1.0, config.worker.lease_s / 4),
                    wake=nudged,
                )
            finally:
                watchdog.stop()
                worker.close()
    finally:
        if listener is not None:
            listener.close()
        senders.close()
        db.dispose()
