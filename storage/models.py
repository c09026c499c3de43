"""Tables: studies, series, instances (received and generated), jobs, results, deliveries.

Jobs (a series to analyse) and deliveries (a generated instance owed to a peer) are both
*tasks*: the same columns and the same state machine (``storage.tasks``). Schema changes go
through the Alembic migrations in ``storage/migrations``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class TaskState(enum.StrEnum):
    """``queued -> running -> done | failed | skipped``; a failed attempt with attempts left
    goes back to ``queued`` after its backoff."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


FINISHED_STATES = (TaskState.DONE, TaskState.FAILED, TaskState.SKIPPED)


class TaskColumns:
    """What every task row carries: its state, its attempts and their schedule, its lease."""

    state: Mapped[TaskState] = mapped_column(
        Enum(TaskState, native_enum=False, length=16), default=TaskState.QUEUED, index=True
    )
    priority: Mapped[int] = mapped_column(Integer, default=0)  # higher runs first
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    backoff_initial_s: Mapped[float] = mapped_column(Float, default=10.0)  # doubles per attempt
    backoff_max_s: Mapped[float] = mapped_column(Float, default=600.0)
    deadline_s: Mapped[float] = mapped_column(Float, default=600.0)  # one attempt, at most
    not_before: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    claimed_by: Mapped[str] = mapped_column(String(64), default="")  # "host:pid" of the holder
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_id: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    source_ae: Mapped[str] = mapped_column(String(16), default="")  # calling AE that sent it
    generated: Mapped[bool] = mapped_column(Boolean, default=False)  # made by this node
    last_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
    path: Mapped[str] = mapped_column(Text)  # relative to the storage directory
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)  # IMAGE-level C-FIND keys
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    content_date: Mapped[str] = mapped_column(String(8), default="")

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(TaskColumns, Base):
    """One unit of analysis: a series to classify."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_due", "state", "priority", "not_before"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64), default="")
    # what the analysis worked around without failing (an unknown character set...): shown
    # to operators beside the outcome, one warning a line
    warnings: Mapped[str] = mapped_column(Text, default="", server_default="")

    series: Mapped[Series] = relationship()


class Result(Base):
    """What a model found for a job, and the DICOM objects made from it."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    # the heatmap objects: the secondary captures and parametric maps (the name predates PMs)
    sc_sop_instance_uids: Mapped[list[str]] = mapped_column(JSON)
    # the SR SOP Instance UID of the result that replaced this one (a new analysis of the
    # series after more of its instances arrived); "" while this is the series' current result
    superseded_by: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # seconds the model's forward passes and Grad-CAM took for this job (None before 0.4)
    inference_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Delivery(TaskColumns, Base):
    """One generated instance owed to one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("instance_pk", "destination_ae"),
        Index("ix_deliveries_due", "state", "priority", "not_before"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    destination_ae: Mapped[str] = mapped_column(String(16))
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)  # DIMSE status
    # after Success: "committed (storage commitment)" or "confirmed by C-FIND" once the
    # destination took responsibility for / was seen to hold the instance, "commitment
    # failed: ..." from its N-EVENT-REPORT, "unconfirmed: <why>" when it could not be asked;
    # "" not checked (or not yet sent)
    confirmation: Mapped[str] = mapped_column(Text, default="", server_default="")
    confirmed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # the Storage Commitment request (N-ACTION) that covers it; its N-EVENT-REPORT names it
    transaction_uid: Mapped[str] = mapped_column(
        String(64), default="", server_default="", index=True
    )

    instance: Mapped[Instance] = relationship()


class Refusal(Base):
    """How often something was refused, by what and why (``/metrics`` reports them): what a
    node refuses is not stored, so it is counted here. *what*: ``association`` or
    ``instance``; *reason*: a short fixed name (``unknown_calling_ae``, ``truncated``, ...)."""

    __tablename__ = "refusals"
    __table_args__ = (UniqueConstraint("what", "reason", name="uq_refusals_what_reason"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    what: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(64))
    count: Mapped[int] = mapped_column(Integer, default=0)
    last_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
