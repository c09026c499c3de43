"""Index a stored instance: upsert its study, series and instance rows."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import Instance, Series, Study, utcnow


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
    study: Study
    series: Series
    instance: Instance
    is_new: bool


def record_instance(
    session: Session,
    ds: Dataset,
    *,
    relpath: str,
    size_bytes: int,
    transfer_syntax_uid: str,
    source_ae: str = "",
    generated: bool = False,
) -> Indexed:
    """Insert or update the rows for one instance whose file is already on disk."""
    study_uid = text(ds, "StudyInstanceUID")
    series_uid = text(ds, "SeriesInstanceUID")
    sop_uid = text(ds, "SOPInstanceUID")

    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        study = Study(study_instance_uid=study_uid)
        session.add(study)
    study.patient_id = text(ds, "PatientID") or study.patient_id or ""
    study.patient_name = text(ds, "PatientName", 324) or study.patient_name or ""
    study.patient_birth_date = text(ds, "PatientBirthDate", 8) or study.patient_birth_date or ""
    study.patient_sex = text(ds, "PatientSex", 16) or study.patient_sex or ""
    study.study_date = text(ds, "StudyDate", 8) or study.study_date or ""
    study.study_time = text(ds, "StudyTime", 16) or study.study_time or ""
    study.accession_number = text(ds, "AccessionNumber", 16) or study.accession_number or ""
    study.study_id = text(ds, "StudyID", 16) or study.study_id or ""
    study.study_description = text(ds, "StudyDescription") or study.study_description or ""
    study.referring_physician_name = (
        text(ds, "ReferringPhysicianName", 324) or study.referring_physician_name or ""
    )
    session.flush()

    series = session.scalar(select(Series).where(Series.series_instance_uid == series_uid))
    if series is None:
        series = Series(series_instance_uid=series_uid, study_pk=study.id, generated=generated)
        session.add(series)
    series.modality = text(ds, "Modality", 16).upper() or series.modality or ""
    series.series_number = integer(ds, "SeriesNumber")
    series.series_description = text(ds, "SeriesDescription") or series.series_description or ""
    series.body_part_examined = text(ds, "BodyPartExamined", 16) or series.body_part_examined or ""
    if source_ae:
        series.source_ae = source_ae
    series.last_received_at = utcnow()
    session.flush()

    instance = session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))
    is_new = instance is None
    if instance is None:
        instance = Instance(sop_instance_uid=sop_uid, series_pk=series.id)
        session.add(instance)
    instance.series_pk = series.id
    instance.sop_class_uid = text(ds, "SOPClassUID")
    instance.instance_number = integer(ds, "InstanceNumber")
    instance.transfer_syntax_uid = transfer_syntax_uid
    instance.path = relpath
    instance.size_bytes = size_bytes
    instance.received_at = utcnow()
    session.flush()
    return Indexed(study, series, instance, is_new)
