"""C-FIND matching for the Study Root and Patient Root Query/Retrieve Information Models
(PS3.4 C.6.2 and C.6.1), and what a C-GET or C-MOVE selects.

:func:`find` turns a C-FIND request identifier into one SQL statement over the
``studies``/``series``/``instances`` tables and yields one response identifier per match;
:func:`retrieve` lists the stored instances a retrieve request names.

The node keeps no patient table: a patient is the studies sharing a Patient ID (Issuer of
Patient ID is not considered). Patient Root adds the PATIENT level (one response per Patient
ID, its name, birth date and sex taken from its matching studies, and the patient's study,
series and instance counts) and makes Patient ID a unique key of every level below it; Study
Root has no PATIENT level (such a request is refused) and answers the patient attributes at the
STUDY level.

Matching (PS3.4 C.2.2.2) is done in SQL:

* universal matching: an empty value matches everything;
* single value matching: exact and case-sensitive, except Person Name (PN), which this node
  matches case-insensitively (and ignoring trailing ``^``) because names reach the archive with
  inconsistent capitalisation from different modalities;
* wildcard matching with ``*`` and ``?`` on text and PN attributes (not on UIDs, dates, times,
  numbers), translated to SQL ``LIKE`` with ``%`` and ``_`` escaped. SQLite's ``LIKE`` ignores
  ASCII case, so on SQLite a ``GLOB`` keeps case-sensitive wildcards case-sensitive;
* list of UID matching: backslash-separated UIDs for the UID keys;
* range matching for dates (``a-``, ``-b``, ``a-b``) and times; an empty stored value never
  matches a range, open or closed (a study without a date is neither "since 2020" nor "before
  2022"; Orthanc 1.10 agrees for ``a-`` and ``a-b`` but lets it match ``-b``, where the empty
  text sorts first: tests/test_find_orthanc.py); several values (a backslash) are alternatives
  only for UIDs and ModalitiesInStudy, elsewhere part of the one value (Orthanc 1.10 reads a
  backslash in a person name as a list of names).

The model is treated relationally: at SERIES and IMAGE level, keys of the levels above are matched
too (not only their unique keys). Keys of a level below the query level, and keys this node does not
know, are returned empty and do not constrain the match. Combined date-time matching, sequence
matching and fuzzy semantic matching of person names are not supported.

Counts and ModalitiesInStudy come from grouped subqueries joined once, never one query per result.
Iterate the returned responses while *session* is still open: they are read from the database as
the caller consumes them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import (
    ColumnElement,
    Row,
    Select,
    SQLColumnExpression,
    and_,
    exists,
    func,
    or_,
    select,
)
from sqlalchemy.orm import Session, aliased

from storage.db import chunks
from storage.errors import QueryError
from storage.models import Instance, Series, Study

RESPONSE_CHARSET = "ISO_IR 192"  # the database holds Unicode text
PARTITION_SIZE = 500
_SEPARATOR = "\\"


class Level(enum.IntEnum):
    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


class Model(enum.Enum):
    """The Query/Retrieve Information Model of the request (its presentation context)."""

    STUDY_ROOT = "study"
    PATIENT_ROOT = "patient"


class Match(enum.Enum):
    """How a key's request value is matched against its column."""

    TEXT = "text"  # single value (case-sensitive) and wildcards
    PN = "pn"  # like TEXT, case-insensitive
    UID = "uid"  # single value and list of UIDs
    DATE = "date"  # single value and range
    TIME = "time"  # single value and range
    INT = "int"  # single value
    MODALITIES = "modalities"  # any series of the study has one of the listed modalities
    RETURN_ONLY = "return-only"  # computed values: a request value is ignored


@dataclass(frozen=True)
class Key:
    """A supported attribute: the level that owns it, its SQL value and how it is matched.

    ``per_patient``: a value over all of a patient's studies (the NumberOfPatientRelated*
    counts), answered at the PATIENT level only."""

    level: Level
    value: SQLColumnExpression[Any]
    match: Match
    per_patient: bool = False


_STUDY_SERIES = (
    select(Series.study_pk.label("pk"), func.count(Series.id).label("n"))
    .group_by(Series.study_pk)
    .subquery("study_series_counts")
)
_STUDY_INSTANCES = (
    select(Series.study_pk.label("pk"), func.count(Instance.id).label("n"))
    .join(Instance, Instance.series_pk == Series.id)
    .group_by(Series.study_pk)
    .subquery("study_instance_counts")
)
_SERIES_INSTANCES = (
    select(Instance.series_pk.label("pk"), func.count(Instance.id).label("n"))
    .group_by(Instance.series_pk)
    .subquery("series_instance_counts")
)
_DISTINCT_MODALITIES = (
    select(Series.study_pk.label("pk"), Series.modality.label("modality"))
    .where(Series.modality != "")
    .distinct()
    .subquery("distinct_modalities")
)
_STUDY_MODALITIES = (
    select(
        _DISTINCT_MODALITIES.c.pk,
        func.aggregate_strings(_DISTINCT_MODALITIES.c.modality, _SEPARATOR).label("list"),
    )
    .group_by(_DISTINCT_MODALITIES.c.pk)
    .subquery("study_modalities")
)

# computed keys: the grouped subquery each one needs, joined on the owning row's primary key
_JOINS = {
    "NumberOfStudyRelatedSeries": (_STUDY_SERIES, Study.id),
    "NumberOfStudyRelatedInstances": (_STUDY_INSTANCES, Study.id),
    "NumberOfSeriesRelatedInstances": (_SERIES_INSTANCES, Series.id),
    "ModalitiesInStudy": (_STUDY_MODALITIES, Study.id),
    "NumberOfPatientRelatedSeries": (_STUDY_SERIES, Study.id),
    "NumberOfPatientRelatedInstances": (_STUDY_INSTANCES, Study.id),
}

KEYS: dict[str, Key] = {
    # patient level (kept on the study row; in the Study Root model they are study keys)
    "PatientID": Key(Level.PATIENT, Study.patient_id, Match.TEXT),
    "PatientName": Key(Level.PATIENT, Study.patient_name, Match.PN),
    "PatientBirthDate": Key(Level.PATIENT, Study.patient_birth_date, Match.DATE),
    "PatientSex": Key(Level.PATIENT, Study.patient_sex, Match.TEXT),
    "NumberOfPatientRelatedStudies": Key(
        Level.PATIENT, func.count(Study.id), Match.RETURN_ONLY, per_patient=True
    ),
    "NumberOfPatientRelatedSeries": Key(
        Level.PATIENT, func.coalesce(func.sum(_STUDY_SERIES.c.n), 0), Match.RETURN_ONLY, True
    ),
    "NumberOfPatientRelatedInstances": Key(
        Level.PATIENT, func.coalesce(func.sum(_STUDY_INSTANCES.c.n), 0), Match.RETURN_ONLY, True
    ),
    # study level
    "StudyInstanceUID": Key(Level.STUDY, Study.study_instance_uid, Match.UID),
    "StudyDate": Key(Level.STUDY, Study.study_date, Match.DATE),
    "StudyTime": Key(Level.STUDY, Study.study_time, Match.TIME),
    "AccessionNumber": Key(Level.STUDY, Study.accession_number, Match.TEXT),
    "StudyID": Key(Level.STUDY, Study.study_id, Match.TEXT),
    "StudyDescription": Key(Level.STUDY, Study.study_description, Match.TEXT),
    "ReferringPhysicianName": Key(Level.STUDY, Study.referring_physician_name, Match.PN),
    "ModalitiesInStudy": Key(Level.STUDY, _STUDY_MODALITIES.c.list, Match.MODALITIES),
    "NumberOfStudyRelatedSeries": Key(
        Level.STUDY, func.coalesce(_STUDY_SERIES.c.n, 0), Match.RETURN_ONLY
    ),
    "NumberOfStudyRelatedInstances": Key(
        Level.STUDY, func.coalesce(_STUDY_INSTANCES.c.n, 0), Match.RETURN_ONLY
    ),
    # series level
    "SeriesInstanceUID": Key(Level.SERIES, Series.series_instance_uid, Match.UID),
    "Modality": Key(Level.SERIES, Series.modality, Match.TEXT),
    "SeriesNumber": Key(Level.SERIES, Series.series_number, Match.INT),
    "SeriesDescription": Key(Level.SERIES, Series.series_description, Match.TEXT),
    "BodyPartExamined": Key(Level.SERIES, Series.body_part_examined, Match.TEXT),
    "NumberOfSeriesRelatedInstances": Key(
        Level.SERIES, func.coalesce(_SERIES_INSTANCES.c.n, 0), Match.RETURN_ONLY
    ),
    # image level
    "SOPInstanceUID": Key(Level.IMAGE, Instance.sop_instance_uid, Match.UID),
    "SOPClassUID": Key(Level.IMAGE, Instance.sop_class_uid, Match.UID),
    "InstanceNumber": Key(Level.IMAGE, Instance.instance_number, Match.INT),
    "Rows": Key(Level.IMAGE, Instance.rows, Match.INT),
    "Columns": Key(Level.IMAGE, Instance.columns, Match.INT),
    "ContentDate": Key(Level.IMAGE, Instance.content_date, Match.DATE),
}

UNIQUE_KEYS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: ("StudyInstanceUID",),
    Level.SERIES: ("StudyInstanceUID", "SeriesInstanceUID"),
    Level.IMAGE: ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}


def unique_keys(model: Model, level: Level) -> tuple[str, ...]:
    """The unique keys of *level* and the levels above it, in *model* (PS3.4 C.6.1.1, C.6.2.1)."""
    if model is Model.PATIENT_ROOT:
        return ("PatientID",) + (UNIQUE_KEYS[level] if level is not Level.PATIENT else ())
    return UNIQUE_KEYS[level]


def _answers(key: Key, level: Level) -> bool:
    """Whether *key* is answered (and matched) at *level*."""
    return key.level <= level and (not key.per_patient or level is Level.PATIENT)


_SKIPPED = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet"})


@dataclass(frozen=True)
class Search:
    """A C-FIND request's answer: the matches, read as they are consumed, and the keys it
    gave a matching value that the node cannot match on (unknown to it, or of a level below
    the query's): the matches do not honour those, which PS3.4 C.4.1.1.3.1 says to tell with
    the status 0xFF01 (pending, optional keys not supported) on every response."""

    matches: Iterator[Dataset]
    unsupported: list[str]


def search(session: Session, identifier: Dataset, model: Model = Model.STUDY_ROOT) -> Search:
    """The answer to the C-FIND request *identifier* in the information *model*.

    Raises :class:`QueryError` at once (not on first iteration) for an unsupported
    QueryRetrieveLevel or an unusable matching value.
    """
    level = _level(identifier, model)
    elements = _elements(identifier)
    answered = _answered_keys(elements, level, model)
    is_sqlite = session.get_bind().dialect.name == "sqlite"
    stmt = _statement(level, answered, _conditions(elements, level, is_sqlite))
    rows = session.execute(stmt)
    return Search(
        _responses(rows.partitions(PARTITION_SIZE), elements, level, answered),
        _unsupported(elements, level),
    )


def find(
    session: Session, identifier: Dataset, model: Model = Model.STUDY_ROOT
) -> Iterator[Dataset]:
    """The response identifiers matching the C-FIND request *identifier* (see :func:`search`)."""
    return search(session, identifier, model).matches


def _level(identifier: Dataset, model: Model) -> Level:
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip()
    levels = [lvl.name for lvl in Level if model is Model.PATIENT_ROOT or lvl is not Level.PATIENT]
    if raw not in levels:
        root = "Patient Root" if model is Model.PATIENT_ROOT else "Study Root"
        raise QueryError(
            f"unsupported QueryRetrieveLevel {raw!r} in the {root} model: expected "
            f"{', '.join(levels)}"
        )
    return Level[raw]


def _elements(identifier: Dataset) -> list[DataElement]:
    """The request's elements, decoded; a value pydicom cannot decode is a :class:`QueryError`."""
    elements = []
    tags = list(identifier.keys())  # iterating the Dataset itself would decode every element
    for tag in tags:
        try:
            elements.append(identifier[tag])
        except (ValueError, TypeError) as exc:
            raise QueryError(f"unreadable value for {tag}: {exc}") from exc
    return elements


def _unsupported(elements: Sequence[DataElement], level: Level) -> list[str]:
    out = []
    for elem in elements:
        if elem.keyword in _SKIPPED or not _request_values(elem):
            continue
        key = KEYS.get(elem.keyword)
        if key is None or not _answers(key, level):
            out.append(elem.keyword or str(elem.tag))
    return out


def _answered_keys(elements: Sequence[DataElement], level: Level, model: Model) -> list[str]:
    """The keys filled from the database: requested known keys at or above *level*, unique keys."""
    keys = list(unique_keys(model, level))
    for elem in elements:
        key = KEYS.get(elem.keyword)
        if key is not None and _answers(key, level) and elem.keyword not in keys:
            keys.append(elem.keyword)
    return keys


# --- the SQL statement ---------------------------------------------------------------------------


def _statement(
    level: Level, answered: Sequence[str], conditions: Sequence[ColumnElement[bool]]
) -> Select[tuple[object, ...]]:
    stmt = _base(level)
    for keyword in answered:
        if keyword in _JOINS:
            subquery, owner_pk = _JOINS[keyword]
            stmt = stmt.outerjoin(subquery, subquery.c.pk == owner_pk)
        value = KEYS[keyword].value
        if level is Level.PATIENT and not KEYS[keyword].per_patient and keyword != "PatientID":
            value = func.max(value)  # one patient, many studies: a non-empty value of them
        stmt = stmt.add_columns(value.label(keyword))
    return stmt.where(*conditions)


def _base(level: Level) -> Select[tuple[object, ...]]:
    if level is Level.PATIENT:
        # the matching studies, grouped by patient, in the order their first study arrived
        return select().select_from(Study).group_by(Study.patient_id).order_by(func.min(Study.id))
    if level is Level.STUDY:
        return select().select_from(Study).order_by(Study.id)
    if level is Level.SERIES:
        return (
            select()
            .select_from(Series)
            .join(Study, Series.study_pk == Study.id)
            .order_by(Study.id, Series.id)
        )
    return (
        select()
        .select_from(Instance)
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .order_by(Study.id, Series.id, Instance.id)
    )


# --- matching ------------------------------------------------------------------------------------


def _conditions(
    elements: Sequence[DataElement], level: Level, is_sqlite: bool
) -> list[ColumnElement[bool]]:
    conditions = []
    for elem in elements:
        key = KEYS.get(elem.keyword)
        if key is None or not _answers(key, level):
            continue
        values = _request_values(elem)
        if not values:
            continue  # universal matching
        condition = _match(key, elem.keyword, values, is_sqlite)
        if condition is not None:
            conditions.append(condition)
    return conditions


def _request_values(elem: DataElement) -> list[str]:
    """The non-empty values of a request element, as text."""
    value = elem.value
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    items = value if isinstance(value, MultiValue | list | tuple) else [value]
    texts = (str(item).strip() for item in items if item is not None)
    return [text for text in texts if text]


NO_WILDCARDS = (Match.UID, Match.DATE, Match.TIME, Match.INT)


def _match(
    key: Key, keyword: str, values: list[str], is_sqlite: bool
) -> ColumnElement[bool] | None:
    if key.match is Match.RETURN_ONLY:
        return None
    if key.match in NO_WILDCARDS and any(_has_wildcard(v) for v in values):
        # PS3.4 C.2.2.2.4: wildcards apply to text and person names only; such a request is
        # refused rather than answered with no matches, which would look like "none found"
        raise QueryError(f"{keyword}: wildcards are not allowed in this attribute")
    if key.match is Match.UID:
        return key.value.in_(values)  # list of UID matching; one UID is single value matching
    if key.match is Match.MODALITIES:
        return _modalities_match(values, is_sqlite)
    if len(values) > 1:
        # multiple values are matching values only for UIDs (list of UID matching) and
        # ModalitiesInStudy; elsewhere a backslash is part of the one value (no match
        # unless a stored value holds it), as Orthanc does
        values = ["\\".join(values)]
    return _single(key, keyword, values[0], is_sqlite)


def _single(key: Key, keyword: str, value: str, is_sqlite: bool) -> ColumnElement[bool]:
    column = key.value
    if key.match is Match.DATE:
        return _range(column, value) if "-" in value else column == value
    if key.match is Match.TIME:
        return _time_match(column, value)
    if key.match is Match.INT:
        return column == _integer(keyword, value)
    if key.match is Match.PN:
        return _pn_match(column, value, is_sqlite)
    return _text_match(column, value, is_sqlite)


def _modalities_match(values: list[str], is_sqlite: bool) -> ColumnElement[bool]:
    other = aliased(Series)
    return exists().where(
        other.study_pk == Study.id,
        or_(*(_text_match(other.modality, value, is_sqlite) for value in values)),
    )


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _like_pattern(value: str) -> str:
    """A DICOM wildcard value as a LIKE pattern with escape character ``\\``."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _glob_pattern(value: str) -> str:
    """A DICOM wildcard value as an SQLite GLOB pattern (``*`` and ``?`` mean the same there)."""
    return value.replace("[", "[[]")


def _text_match(
    column: SQLColumnExpression[Any], value: str, is_sqlite: bool
) -> ColumnElement[bool]:
    """Case-sensitive single value or wildcard matching."""
    if not _has_wildcard(value):
        return column == value
    condition: ColumnElement[bool] = column.like(_like_pattern(value), escape="\\")
    if is_sqlite:  # SQLite's LIKE ignores ASCII case; GLOB does not
        condition = and_(condition, column.op("GLOB")(_glob_pattern(value)))
    return condition


def _pn_match(column: SQLColumnExpression[Any], value: str, is_sqlite: bool) -> ColumnElement[bool]:
    """Person Name matching, deliberately case-insensitive (a node choice PS3.4 allows), for
    every alphabet: ``Östlund^Åsa`` matches ``ÖSTLUND^ÅSA``.

    Trailing empty name components (``Doe^John^^``) are ignored on both sides. SQLite's own
    ``lower()`` folds ASCII letters only: there the comparison uses ``unicode_lower``, Python's
    ``str.lower`` registered on every connection (``storage.db``); PostgreSQL's ``lower()``
    folds every letter of a UTF-8 database.
    """
    lower = func.unicode_lower if is_sqlite else func.lower
    stored = lower(func.rtrim(column, "^"))
    wanted = value.rstrip("^").lower()
    if not _has_wildcard(wanted):
        return stored == wanted
    return stored.like(_like_pattern(wanted), escape="\\")


def _range(column: SQLColumnExpression[Any], value: str) -> ColumnElement[bool]:
    """Date range matching on YYYYMMDD text: ``a-``, ``-b``, ``a-b`` (bounds included)."""
    low, high = (part.strip() for part in value.split("-", 1))
    bounds = [column != ""]
    if low:
        bounds.append(column >= low)
    if high:
        bounds.append(column <= high)
    return and_(*bounds)


def _time_match(column: SQLColumnExpression[Any], value: str) -> ColumnElement[bool]:
    """Time single value or range matching, to the second.

    Stored and requested times are compared as HHMMSS: a shorter stored time is padded with zeros,
    fractions are dropped, a shorter upper bound covers its whole hour or minute.
    """
    low, high = value.split("-", 1) if "-" in value else (value, value)
    stored = func.substr(column + "000000", 1, 6)
    bounds = [column != ""]
    if low.strip():
        bounds.append(stored >= _time_bound(low, "0"))
    if high.strip():
        bounds.append(stored <= _time_bound(high, "9"))
    return and_(*bounds)


def _time_bound(value: str, fill: str) -> str:
    return value.strip().replace(":", "").split(".", 1)[0][:6].ljust(6, fill)


def _integer(keyword: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise QueryError(f"{keyword} must be an integer, got {value!r}") from None


# --- responses -----------------------------------------------------------------------------------


def _responses(
    partitions: Iterator[Sequence[Row[Any]]],
    elements: Sequence[DataElement],
    level: Level,
    answered: Sequence[str],
) -> Iterator[Dataset]:
    # requested keys this node does not answer at this level come back empty
    unanswered = [e for e in elements if e.keyword not in _SKIPPED and e.keyword not in answered]
    with_charset = any(e.keyword == "SpecificCharacterSet" for e in elements)
    for partition in partitions:
        for row in partition:
            response = Dataset()
            for elem in unanswered:
                response.add(_empty(elem))
            for keyword in answered:
                setattr(response, keyword, _dicom_value(keyword, row._mapping[keyword]))
            response.QueryRetrieveLevel = level.name
            if with_charset:
                response.SpecificCharacterSet = RESPONSE_CHARSET
            yield response


def _empty(elem: DataElement) -> DataElement:
    return DataElement(elem.tag, elem.VR, [] if elem.VR == "SQ" else None)


def _dicom_value(keyword: str, value: object) -> object:
    if keyword == "ModalitiesInStudy":
        return sorted(set(str(value).split(_SEPARATOR))) if value else None
    if value is None or value == "":
        return None
    return value


# --- retrieve (C-GET, C-MOVE) --------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """One instance a retrieve request selects, and where its file is."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    path: str  # relative to the storage directory


def retrieve(
    session: Session, identifier: Dataset, model: Model = Model.STUDY_ROOT
) -> list[Stored]:
    """The instances a C-GET or C-MOVE *identifier* selects (PS3.4 C.4.2.2.1, C.4.3.2.1).

    The request names what to retrieve by the unique key of its level (a list of UIDs is
    allowed), and may narrow it by the unique keys of the levels above; other keys are not
    matched. A missing unique key is a :class:`QueryError` (0xA900), not "everything".
    """
    level = _level(identifier, model)
    elements = {e.keyword: e for e in _elements(identifier)}
    keys = unique_keys(model, level)
    own = keys[-1]
    if own not in elements or not _request_values(elements[own]):
        raise QueryError(f"a retrieve at the {level.name} level needs a value for {own}")
    conditions = []
    for keyword in keys:
        values = _request_values(elements[keyword]) if keyword in elements else []
        if not values:
            continue
        if any(_has_wildcard(v) for v in values):
            raise QueryError(f"{keyword}: wildcards are not allowed in a retrieve")
        conditions.append(KEYS[keyword].value.in_(values))
    stmt = (
        _base(Level.IMAGE)
        .add_columns(
            Instance.sop_class_uid,
            Instance.sop_instance_uid,
            Instance.transfer_syntax_uid,
            Instance.path,
        )
        .where(*conditions)
    )
    return [Stored(*row) for row in session.execute(stmt)]


@dataclass(frozen=True)
class Subject:
    """Who and what an instance is about, for the audit trail."""

    study_instance_uid: str
    patient_id: str
    patient_name: str
    accession_number: str
    sop_class_uid: str
    sop_instance_uid: str


def subjects(session: Session, sop_instance_uids: Sequence[str]) -> list[Subject]:
    """The study and patient of each of *sop_instance_uids* the node holds (in chunks, so a
    retrieve of a whole archive stays within the database's parameter limits)."""
    found: list[Subject] = []
    uids = list(dict.fromkeys(sop_instance_uids))
    for chunk in chunks(uids):
        rows = session.execute(
            select(
                Study.study_instance_uid,
                Study.patient_id,
                Study.patient_name,
                Study.accession_number,
                Instance.sop_class_uid,
                Instance.sop_instance_uid,
            )
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk)
            .where(Instance.sop_instance_uid.in_(chunk))
        ).all()
        found.extend(Subject(*row) for row in rows)
    return found
