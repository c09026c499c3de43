"""Index a stored instance: upsert its study, series and instance rows.

This runs on the association thread for every C-STORE, inside the transaction whose commit is
the Success the sender waits for, so it is written for speed: SQLAlchemy Core statements, and
an :class:`IndexCache` per process that remembers the primary keys and the attributes last
written for recent studies and series, so that the 2nd to 300th slice of a CT series costs one
lookup and one insert instead of three reads and three updates. Study and series rows are never
deleted, so a cached key stays valid; a cached attribute set is only a shortcut (a mismatch
reads the row again). :func:`record_made` indexes the results a work role made, a batch of
them in four statements.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from storage.models import Instance, Series, Study, utcnow
from storage.prepared import Prepared, prepare

STUDY_FIELDS: tuple[tuple[str, str, int], ...] = (
    # (column, DICOM keyword, maximum length)
    ("patient_id", "PatientID", 64),
    ("patient_name", "PatientName", 324),
    ("patient_birth_date", "PatientBirthDate", 8),
    ("patient_sex", "PatientSex", 16),
    ("study_date", "StudyDate", 8),
    ("study_time", "StudyTime", 16),
    ("accession_number", "AccessionNumber", 16),
    ("study_id", "StudyID", 16),
    ("study_description", "StudyDescription", 64),
    ("referring_physician_name", "ReferringPhysicianName", 324),
)
# with the character set, which says how their bytes decode
STUDY_TAGS: tuple[int, ...] = (
    *(int(tag_for_keyword(keyword) or 0) for _, keyword, _ in STUDY_FIELDS),
    0x00080005,
)
LAST_RECEIVED_STEP_S = 1.0  # series.last_received_at is refreshed at most this often


def text(ds: Dataset, keyword: str, max_len: int = 64) -> str:
    """An attribute as plain text ('' when absent or unreadable), cut to *max_len*."""
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element must not stop indexing
        return ""
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:max_len]


def integer(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Indexed:
    """What indexing one instance found and made."""

    study_pk: int
    series_pk: int
    instance_pk: int
    is_new: bool  # the instance was not in the database before
    modality: str
    source_ae: str
    generated: bool  # the series was made by this node


@dataclass
class _SeriesEntry:
    pk: int
    study_pk: int
    attrs: tuple[Any, ...]
    generated: bool
    source_ae: str
    last_received: float


class IndexCache:
    """Primary keys and last-written attributes of recent studies and series (one per
    process; thread-safe)."""

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self._lock = threading.Lock()
        # uid -> (primary key, attributes as written, the raw values they were read from)
        self._studies: OrderedDict[str, tuple[int, tuple[str, ...], tuple[Any, ...]]] = (
            OrderedDict()
        )
        self._series: OrderedDict[str, _SeriesEntry] = OrderedDict()
        self.queued_jobs: OrderedDict[int, int] = OrderedDict()  # series pk -> queued job id

    def study(self, uid: str) -> tuple[int, tuple[str, ...], tuple[Any, ...]] | None:
        with self._lock:
            return self._studies.get(uid)

    def series(self, uid: str) -> _SeriesEntry | None:
        with self._lock:
            return self._series.get(uid)

    def put_study(
        self, uid: str, pk: int, attrs: tuple[str, ...], raw: tuple[Any, ...] = ()
    ) -> None:
        with self._lock:
            self._studies[uid] = (pk, attrs, raw)
            self._studies.move_to_end(uid)
            while len(self._studies) > self.size:
                self._studies.popitem(last=False)

    def put_series(self, uid: str, entry: _SeriesEntry) -> None:
        with self._lock:
            self._series[uid] = entry
            self._series.move_to_end(uid)
            while len(self._series) > self.size:
                self._series.popitem(last=False)

    def forget(self) -> None:
        """Drop everything (after a rolled-back transaction the cache may be ahead of it)."""
        with self._lock:
            self._studies.clear()
            self._series.clear()
            self.queued_jobs.clear()

    def queued_job(self, series_pk: int) -> int | None:
        with self._lock:
            return self.queued_jobs.get(series_pk)

    def put_queued_job(self, series_pk: int, job_id: int | None) -> None:
        with self._lock:
            if job_id is None:
                self.queued_jobs.pop(series_pk, None)
                return
            self.queued_jobs[series_pk] = job_id
            self.queued_jobs.move_to_end(series_pk)
            while len(self.queued_jobs) > self.size:
                self.queued_jobs.popitem(last=False)


def _merged(new: tuple[Any, ...], old: tuple[Any, ...]) -> tuple[Any, ...]:
    """A new non-empty value replaces the stored one; an empty one keeps it."""
    return tuple(n if n not in ("", None) else o for n, o in zip(new, old, strict=True))


def record_instance(
    session: Session,
    ds: Dataset,
    *,
    relpath: str,
    size_bytes: int,
    transfer_syntax_uid: str,
    source_ae: str = "",
    generated: bool = False,
    cache: IndexCache | None = None,
) -> Indexed:
    """Insert or update the rows for one instance whose file is already on disk."""
    cache = cache if cache is not None else IndexCache(0)
    conn = session.connection()  # Core statements on the session's connection: no ORM cost
    now = utcnow()
    study_uid = text(ds, "StudyInstanceUID")
    series_uid = text(ds, "SeriesInstanceUID")
    sop_uid = text(ds, "SOPInstanceUID")

    study_pk = _study(conn, cache, study_uid, ds, now)
    series = _series(conn, cache, series_uid, study_pk, ds, source_ae, generated, now)

    instance_values = {
        "series_pk": series.pk,
        "sop_class_uid": text(ds, "SOPClassUID"),
        "instance_number": integer(ds, "InstanceNumber"),
        "transfer_syntax_uid": transfer_syntax_uid,
        "path": relpath,
        "size_bytes": size_bytes,
        "received_at": now,
        "rows": integer(ds, "Rows"),
        "columns": integer(ds, "Columns"),
        "content_date": text(ds, "ContentDate", 8),
    }
    # one statement for a new instance: insert unless the UID is there already
    instance_pk = (
        _insert_new_instance(conn.dialect)
        .run(
            conn,
            {f"v_{k}": v for k, v in instance_values.items()} | {"v_sop_instance_uid": sop_uid},
        )
        .scalar()
    )
    is_new = instance_pk is not None
    if instance_pk is None:  # the same instance again: it replaces the stored one
        instance_pk = conn.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_uid))
        conn.execute(update(Instance).where(Instance.id == instance_pk).values(instance_values))
    assert instance_pk is not None
    return Indexed(
        study_pk=study_pk,
        series_pk=series.pk,
        instance_pk=int(instance_pk),
        is_new=is_new,
        modality=series.attrs[0],
        source_ae=series.source_ae,
        generated=series.generated,
    )


INSTANCE_COLUMNS = (
    "sop_instance_uid", "series_pk", "sop_class_uid", "instance_number", "transfer_syntax_uid",
    "path", "size_bytes", "received_at", "rows", "columns", "content_date",
)  # fmt: skip


def dialect_insert(dialect: Dialect) -> Any:
    """The dialect's ``insert`` (with ``on_conflict_do_nothing`` / ``_do_update``)."""
    if dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert
    if dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    raise NotImplementedError(f"no upsert for database dialect {dialect.name!r}")


@functools.cache
def _insert_new_instance(dialect: Dialect) -> Prepared:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING id`` in the dialect's words, compiled once
    (parameters ``v_<column>``; run by the driver: the hot statement of every C-STORE)."""
    statement = (
        dialect_insert(dialect)(Instance)
        .values({name: bindparam(f"v_{name}") for name in INSTANCE_COLUMNS})
        .on_conflict_do_nothing(index_elements=[Instance.sop_instance_uid])
        .returning(Instance.id)
    )
    return prepare(statement, dialect)


def raw_key(ds: Dataset, tags: tuple[int, ...]) -> tuple[Any, ...]:
    """The values of *tags* as they are held (the bytes read, while pydicom has not decoded
    them): equal keys mean equal attributes, found without decoding names and dates."""
    out: list[Any] = []
    for tag in tags:
        try:
            elem = ds.get_item(tag)
        except Exception:  # a malformed element: no shortcut
            return ()
        out.append(None if elem is None else elem.value)
    return tuple(out)


def _study(conn: Connection, cache: IndexCache, uid: str, ds: Dataset, now: Any) -> int:
    raw = raw_key(ds, STUDY_TAGS)
    cached = cache.study(uid)
    if cached is not None and raw and cached[2] == raw:
        return cached[0]  # the same values as the last instance of the study: nothing to write
    new = tuple(text(ds, keyword, length) for _, keyword, length in STUDY_FIELDS)
    if cached is not None and _merged(new, cached[1]) == cached[1]:
        cache.put_study(uid, cached[0], cached[1], raw)
        return cached[0]
    columns = [getattr(Study, name) for name, _, _ in STUDY_FIELDS]
    row = conn.execute(select(Study.id, *columns).where(Study.study_instance_uid == uid)).first()
    if row is None:
        pk = conn.scalar(
            insert(Study)
            .values(
                study_instance_uid=uid,
                created_at=now,
                updated_at=now,
                **{name: value for (name, _, _), value in zip(STUDY_FIELDS, new, strict=True)},
            )
            .returning(Study.id)
        )
        attrs = new
    else:
        pk, old = row[0], tuple(row[1:])
        attrs = _merged(new, old)
        if attrs != old:
            conn.execute(
                update(Study)
                .where(Study.id == pk)
                .values(
                    updated_at=now,
                    **{name: v for (name, _, _), v in zip(STUDY_FIELDS, attrs, strict=True)},
                )
            )
    assert pk is not None
    cache.put_study(uid, int(pk), attrs, raw)
    return int(pk)


def _series(
    conn: Connection,
    cache: IndexCache,
    uid: str,
    study_pk: int,
    ds: Dataset,
    source_ae: str,
    generated: bool,
    now: Any,
) -> _SeriesEntry:
    new = (
        text(ds, "Modality", 16).upper(),
        integer(ds, "SeriesNumber"),
        text(ds, "SeriesDescription"),
        text(ds, "BodyPartExamined", 16),
    )
    clock = time.monotonic()
    cached = cache.series(uid)
    if (
        cached is not None
        and cached.study_pk == study_pk
        and _merged(new, cached.attrs) == cached.attrs
        and (not source_ae or source_ae == cached.source_ae)
        and clock - cached.last_received < LAST_RECEIVED_STEP_S
    ):
        return cached
    names = ("modality", "series_number", "series_description", "body_part_examined")
    row = conn.execute(
        select(
            Series.id,
            Series.study_pk,
            Series.generated,
            Series.source_ae,
            *(getattr(Series, n) for n in names),
        ).where(Series.series_instance_uid == uid)
    ).first()
    if row is None:
        attrs = new
        pk = conn.scalar(
            insert(Series)
            .values(
                series_instance_uid=uid,
                study_pk=study_pk,
                generated=generated,
                source_ae=source_ae,
                last_received_at=now,
                **dict(zip(names, attrs, strict=True)),
            )
            .returning(Series.id)
        )
        entry = _SeriesEntry(int(pk), study_pk, attrs, generated, source_ae, clock)  # type: ignore[arg-type]
    else:
        pk, was_generated, old_source = row[0], bool(row[2]), row[3]
        old = tuple(row[4:])
        attrs = _merged(new, old)
        attrs = (attrs[0], new[1], attrs[2], attrs[3])  # SeriesNumber: as last received
        source = source_ae or old_source
        conn.execute(
            update(Series)
            .where(Series.id == pk)
            .values(
                study_pk=study_pk,
                source_ae=source,
                last_received_at=now,
                **dict(zip(names, attrs, strict=True)),
            )
        )
        entry = _SeriesEntry(int(pk), study_pk, attrs, was_generated, source, clock)
    cache.put_series(uid, entry)
    return entry


@dataclass(frozen=True)
class Made:
    """An instance this node made (a result), its file written: what indexing it needs."""

    ds: Dataset
    relpath: str
    size_bytes: int
    study_pk: int  # the study of the analysed series, which the result joins


def record_made(session: Session, made: Sequence[Made]) -> list[int]:
    """Index instances this node made, each in a series of its own making, in a study the node
    holds: four statements for any number of them (a work role's batch of jobs), where
    :func:`record_instance` runs three or four per instance. A series or instance already
    indexed (a retried job makes the same UIDs) is updated. Returns the instances' keys, in
    the order of *made*."""
    if not made:
        return []
    conn = session.connection()
    now = utcnow()
    series: dict[str, dict[str, Any]] = {}
    for item in made:
        uid = text(item.ds, "SeriesInstanceUID")
        series.setdefault(
            uid,
            {
                "series_instance_uid": uid,
                "study_pk": item.study_pk,
                "modality": text(item.ds, "Modality", 16).upper(),
                "series_number": integer(item.ds, "SeriesNumber"),
                "series_description": text(item.ds, "SeriesDescription"),
                "body_part_examined": text(item.ds, "BodyPartExamined", 16),
                "source_ae": "",
                "generated": True,
                "last_received_at": now,
            },
        )
    insert_ = dialect_insert(conn.dialect)
    statement = insert_(Series)
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=[Series.series_instance_uid],
            set_={"last_received_at": statement.excluded.last_received_at},
        ),
        list(series.values()),
    )
    series_pks = dict(
        conn.execute(
            select(Series.series_instance_uid, Series.id).where(
                Series.series_instance_uid.in_(list(series))
            )
        ).all()
    )
    rows: list[dict[str, Any]] = [
        {
            "sop_instance_uid": text(item.ds, "SOPInstanceUID"),
            "series_pk": series_pks[text(item.ds, "SeriesInstanceUID")],
            "sop_class_uid": text(item.ds, "SOPClassUID"),
            "instance_number": integer(item.ds, "InstanceNumber"),
            "transfer_syntax_uid": str(item.ds.file_meta.TransferSyntaxUID),
            "path": item.relpath,
            "size_bytes": item.size_bytes,
            "received_at": now,
            "rows": integer(item.ds, "Rows"),
            "columns": integer(item.ds, "Columns"),
            "content_date": text(item.ds, "ContentDate", 8),
        }
        for item in made
    ]
    statement = insert_(Instance)
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=[Instance.sop_instance_uid],
            set_={
                name: getattr(statement.excluded, name)
                for name in INSTANCE_COLUMNS
                if name != "sop_instance_uid"
            },
        ),
        rows,
    )
    uids = [str(row["sop_instance_uid"]) for row in rows]
    pks = dict(
        conn.execute(
            select(Instance.sop_instance_uid, Instance.id).where(
                Instance.sop_instance_uid.in_(uids)
            )
        ).all()
    )
    return [int(pks[uid]) for uid in uids]
