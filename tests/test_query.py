"""C-FIND matching (storage.query.find) against a real SQLite database.

Every identifier is encoded and decoded as pynetdicom does on the wire, and every response is
encoded again, so the tests also check that what find() takes and yields survives the network.
"""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode
from sqlalchemy import event

from storage.db import Database
from storage.errors import StorageError
from storage.models import Instance, Series, Study
from storage.query import Model, QueryError, _like_pattern, find, search

CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.33"
SC = "1.2.840.10008.5.1.4.1.1.7"


def _study(uid: str, **columns: Any) -> Study:
    return Study(study_instance_uid=uid, **columns)


def _series(study: Study, uid: str, modality: str, number: int | None, **columns: Any) -> Series:
    series = Series(series_instance_uid=uid, modality=modality, series_number=number, **columns)
    series.study = study
    return series


def _instance(series: Series, uid: str, sop_class: str, number: int | None) -> Instance:
    instance = Instance(
        sop_instance_uid=uid, sop_class_uid=sop_class, instance_number=number, path=f"{uid}.dcm"
    )
    instance.series = series
    return instance


@pytest.fixture
def db(tmp_path) -> Iterator[Database]:
    """Two patients, four studies.

    1.2.3.1  PID001 Doe^John  2020-01-15 08:30  CR (2 images), SR and SC results (1 each)
    1.2.3.2  PID001 Doe^John  2020-12-31 14:15  CT (3 images)
    1.2.3.3  pid002 DOE^JANE  2021-06-01        CR (1 image), a series without modality or images
    1.2.3.4  (no patient, no date)              no series at all
    """
    database = Database(f"sqlite:///{tmp_path / 'q.sqlite3'}")
    john = {
        "patient_id": "PID001",
        "patient_name": "Doe^John",
        "patient_birth_date": "19700101",
        "patient_sex": "M",
    }
    s1 = _study(
        "1.2.3.1",
        **john,
        study_date="20200115",
        study_time="083000",
        accession_number="ACC001",
        study_id="1",
        study_description="Chest PA",
        referring_physician_name="Smith^Anna",
    )
    s2 = _study(
        "1.2.3.2",
        **john,
        study_date="20201231",
        study_time="141500.123",
        accession_number="ACC_02",
        study_id="2",
        study_description="CT Thorax",
        referring_physician_name="O_Brien^Pat",
    )
    s3 = _study(
        "1.2.3.3",
        patient_id="pid002",
        patient_name="DOE^JANE^^",
        patient_birth_date="19851231",
        patient_sex="F",
        study_date="20210601",
        accession_number="ACC%03",
        study_id="3",
        study_description="chest pa",
        referring_physician_name="OXBrien^Pat",
    )
    s4 = _study("1.2.3.4")
    cr1 = _series(s1, "1.2.3.1.1", "CR", 1, series_description="PA")
    sr1 = _series(s1, "1.2.3.1.2", "SR", 900, series_description="AI result", generated=True)
    sc1 = _series(s1, "1.2.3.1.3", "SC", 901, series_description="AI heatmap", generated=True)
    ct2 = _series(s2, "1.2.3.2.1", "CT", 2, series_description="Thorax 1mm")
    cr3 = _series(s3, "1.2.3.3.1", "CR", 1, series_description="pa")
    bare3 = _series(s3, "1.2.3.3.2", "", None)
    instances = [
        _instance(cr1, "1.2.3.1.1.1", CR, 1),
        _instance(cr1, "1.2.3.1.1.2", CR, 2),
        _instance(sr1, "1.2.3.1.2.1", SR, 1),
        _instance(sc1, "1.2.3.1.3.1", SC, 1),
        _instance(ct2, "1.2.3.2.1.1", CT, 1),
        _instance(ct2, "1.2.3.2.1.2", CT, 2),
        _instance(ct2, "1.2.3.2.1.3", CT, None),
        _instance(cr3, "1.2.3.3.1.1", CR, 1),
    ]
    with database.session() as session:
        session.add_all([s1, s2, s3, s4, bare3, *instances])
    yield database
    database.dispose()


def _wire(ds: Dataset) -> Dataset:
    """*ds* after a trip over the network (implicit VR little endian)."""
    encoded = encode(ds, True, True)
    assert encoded is not None, f"cannot encode {ds}"
    return decode(BytesIO(encoded), True, True)


def query(db: Database, level: str, model: Model = Model.STUDY_ROOT, **keys: Any) -> list[Dataset]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    with db.session() as session:
        responses = list(find(session, _wire(identifier), model))
    for response in responses:
        _wire(response)  # every response must be encodable
    return responses


def uids(responses: list[Dataset], keyword: str = "StudyInstanceUID") -> list[str]:
    return sorted(str(r.get(keyword)) for r in responses)


def studies(db: Database, **keys: Any) -> list[str]:
    return uids(query(db, "STUDY", **keys))


ALL_STUDIES = ["1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4"]

# wildcards and deliberately odd values in requests make pydicom warn about the VR's format
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
    pytest.mark.filterwarnings("ignore:Value .* is not valid:UserWarning"),
]


# --- levels and returned keys --------------------------------------------------------------------


@pytest.mark.parametrize("level", ["PATIENT", "FRAME", "", "study"])
def test_unsupported_level_raises_at_call(db: Database, level: str) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    with db.session() as session, pytest.raises(QueryError, match="QueryRetrieveLevel"):
        find(session, identifier)  # raised before iteration; PATIENT is not in Study Root
    if level != "PATIENT":
        with db.session() as session, pytest.raises(QueryError, match="Patient Root"):
            find(session, identifier, Model.PATIENT_ROOT)


# --- Patient Root --------------------------------------------------------------------------------


def test_patient_level_one_response_per_patient_with_counts(db: Database) -> None:
    responses = query(
        db,
        "PATIENT",
        Model.PATIENT_ROOT,
        PatientID="",
        PatientName="",
        PatientSex="",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedSeries="",
        NumberOfPatientRelatedInstances="",
    )
    by_id = {str(r.PatientID or ""): r for r in responses}
    assert sorted(by_id) == ["", "PID001", "pid002"]  # 1.2.3.4 has no Patient ID
    john = by_id["PID001"]
    assert str(john.PatientName) == "Doe^John" and john.PatientSex == "M"
    assert john.NumberOfPatientRelatedStudies == 2
    assert john.NumberOfPatientRelatedSeries == 4  # CR, SR, SC and CT
    assert john.NumberOfPatientRelatedInstances == 7
    jane = by_id["pid002"]
    assert (jane.NumberOfPatientRelatedStudies, jane.NumberOfPatientRelatedSeries) == (1, 2)
    assert jane.NumberOfPatientRelatedInstances == 1
    assert by_id[""].NumberOfPatientRelatedSeries == 0  # a study with no series
    assert all(r.QueryRetrieveLevel == "PATIENT" and "StudyInstanceUID" not in r for r in responses)


def test_patient_level_matching(db: Database) -> None:
    def patients(**keys: Any) -> list[str]:
        return uids(query(db, "PATIENT", Model.PATIENT_ROOT, **keys), "PatientID")

    assert patients(PatientName="doe*") == ["PID001", "pid002"]
    assert patients(PatientName="DOE^JOHN") == ["PID001"]
    assert patients(PatientBirthDate="-19801231") == ["PID001"]
    assert patients(PatientID="pid002") == ["pid002"]
    assert patients(PatientSex="F", PatientID="PID001") == []


def test_patient_root_study_level_returns_the_patient_id(db: Database) -> None:
    responses = query(db, "STUDY", Model.PATIENT_ROOT, PatientID="PID001", StudyDate="")
    assert uids(responses) == ["1.2.3.1", "1.2.3.2"]
    assert all(r.PatientID == "PID001" for r in responses)
    # a unique key of the level above comes back even when not asked for
    image = query(db, "IMAGE", Model.PATIENT_ROOT, StudyInstanceUID="1.2.3.3")
    assert [(r.PatientID, r.SOPInstanceUID) for r in image] == [("pid002", "1.2.3.3.1.1")]


def test_patient_counts_are_patient_level_only(db: Database) -> None:
    # at the STUDY level a patient count is not answered (empty) and does not constrain
    responses = query(db, "STUDY", Model.PATIENT_ROOT, NumberOfPatientRelatedStudies="")
    assert len(responses) == 4 and all(r.NumberOfPatientRelatedStudies is None for r in responses)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "PATIENT"
    identifier.StudyDate = "20200115"  # a study key at the PATIENT level: cannot be matched
    with db.session() as session:
        answer = search(session, _wire(identifier), Model.PATIENT_ROOT)
        assert answer.unsupported == ["StudyDate"]
        assert len(list(answer.matches)) == 3


def test_missing_level_raises(db: Database) -> None:
    identifier = Dataset()
    identifier.PatientID = ""
    with db.session() as session, pytest.raises(QueryError):
        find(session, identifier)
    assert issubclass(QueryError, StorageError)


def test_study_response_has_exactly_requested_and_unique_keys(db: Database) -> None:
    responses = query(
        db,
        "STUDY",
        SpecificCharacterSet="ISO_IR 100",
        PatientID="PID001",
        PatientName="",
        StudyDate="",
        InstitutionName="",  # not known to the node
        Modality="",  # a series key: not answered at STUDY level
        ReferencedStudySequence=[],
    )
    assert uids(responses) == ["1.2.3.1", "1.2.3.2"]
    first = next(r for r in responses if r.StudyInstanceUID == "1.2.3.1")
    assert {e.keyword for e in first} == {
        "SpecificCharacterSet",
        "QueryRetrieveLevel",
        "StudyInstanceUID",
        "PatientID",
        "PatientName",
        "StudyDate",
        "InstitutionName",
        "Modality",
        "ReferencedStudySequence",
    }
    assert first.SpecificCharacterSet == "ISO_IR 192"
    assert first.QueryRetrieveLevel == "STUDY"
    assert first.PatientID == "PID001"
    assert first.PatientName == "Doe^John"
    assert first.StudyDate == "20200115"
    assert first["InstitutionName"].is_empty
    assert first["Modality"].is_empty
    assert len(first.ReferencedStudySequence) == 0


def test_no_specific_character_set_unless_requested(db: Database) -> None:
    (response,) = query(db, "STUDY", StudyInstanceUID="1.2.3.1", PatientName="")
    assert {e.keyword for e in response} == {
        "QueryRetrieveLevel",
        "StudyInstanceUID",
        "PatientName",
    }


def test_series_without_instances_counts_zero(db: Database) -> None:
    (response,) = query(
        db, "SERIES", SeriesInstanceUID="1.2.3.3.2", Modality="", NumberOfSeriesRelatedInstances=""
    )
    assert response["Modality"].is_empty
    assert response.NumberOfSeriesRelatedInstances == 0


def test_unicode_values_with_utf8_charset(db: Database) -> None:
    with db.session() as session:
        session.add(_study("1.2.3.5", patient_id="PID005", patient_name="Müller^Zoë"))
    (response,) = query(
        db, "STUDY", SpecificCharacterSet="ISO_IR 192", PatientID="PID005", PatientName=""
    )
    assert response.SpecificCharacterSet == "ISO_IR 192"
    assert _wire(response).PatientName == "Müller^Zoë"
    assert studies(db, PatientName="müller*") == ["1.2.3.5"]


def test_a_backslash_in_a_person_name_is_not_a_list(db: Database) -> None:
    """Issue 10: ``Doe^John\\Roe^Jane`` matched both patients; Orthanc matches neither."""
    with db.session() as session:
        session.add(_study("1.2.3.8", patient_id="PID008", patient_name="ROE^RICHARD"))
    assert studies(db, PatientName="doe^jane") == ["1.2.3.3"]
    assert studies(db, PatientName="roe^richard") == ["1.2.3.8"]
    assert studies(db, PatientName="doe^jane\\roe^richard") == []


def test_person_names_match_without_case_in_every_alphabet(db: Database) -> None:
    """Issue 10: upper-case non-ASCII letters never matched (SQLite lower-cases ASCII only)."""
    with db.session() as session:
        session.add(_study("1.2.3.6", patient_id="PID006", patient_name="Östlund^Åsa"))
        session.add(_study("1.2.3.7", patient_id="PID007", patient_name="ÜNAL^Ömer"))
    assert studies(db, PatientName="ÖSTLUND^ÅSA") == ["1.2.3.6"]
    assert studies(db, PatientName="östlund^åsa") == ["1.2.3.6"]
    assert studies(db, PatientName="Ünal*") == ["1.2.3.7"]
    assert studies(db, PatientName="ünal^ömer") == ["1.2.3.7"]


def test_study_values_missing_in_db_are_empty(db: Database) -> None:
    (response,) = query(db, "STUDY", StudyInstanceUID="1.2.3.4", PatientName="", StudyDate="")
    assert response["PatientName"].is_empty
    assert response["StudyDate"].is_empty


def test_study_computed_keys(db: Database) -> None:
    responses = query(
        db,
        "STUDY",
        ModalitiesInStudy="",
        NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="",
    )
    by_uid = {r.StudyInstanceUID: r for r in responses}
    assert sorted(by_uid) == ALL_STUDIES
    s1 = by_uid["1.2.3.1"]
    assert list(s1.ModalitiesInStudy) == ["CR", "SC", "SR"]  # generated results count too
    assert s1.NumberOfStudyRelatedSeries == 3
    assert s1.NumberOfStudyRelatedInstances == 4
    s2 = by_uid["1.2.3.2"]
    assert s2.ModalitiesInStudy == "CT"
    assert (s2.NumberOfStudyRelatedSeries, s2.NumberOfStudyRelatedInstances) == (1, 3)
    s3 = by_uid["1.2.3.3"]
    assert s3.ModalitiesInStudy == "CR"  # the series without a modality adds nothing
    assert (s3.NumberOfStudyRelatedSeries, s3.NumberOfStudyRelatedInstances) == (2, 1)
    s4 = by_uid["1.2.3.4"]
    assert s4["ModalitiesInStudy"].is_empty
    assert (s4.NumberOfStudyRelatedSeries, s4.NumberOfStudyRelatedInstances) == (0, 0)


def test_study_counts_ignore_request_values(db: Database) -> None:
    (response,) = query(db, "STUDY", StudyInstanceUID="1.2.3.2", NumberOfStudyRelatedSeries="7")
    assert response.NumberOfStudyRelatedSeries == 1


# --- single value, wildcard and universal matching -----------------------------------------------


def test_universal_matching(db: Database) -> None:
    assert studies(db) == ALL_STUDIES
    assert studies(db, PatientID="", StudyDate="", PatientName="") == ALL_STUDIES
    assert studies(db, PatientID="*") == ALL_STUDIES


def test_single_value_text_is_case_sensitive(db: Database) -> None:
    assert studies(db, PatientID="PID001") == ["1.2.3.1", "1.2.3.2"]
    assert studies(db, PatientID="pid001") == []
    assert studies(db, PatientID="PID00") == []  # no prefix matching without a wildcard
    assert studies(db, StudyDescription="Chest PA") == ["1.2.3.1"]
    assert studies(db, StudyDescription="chest pa") == ["1.2.3.3"]
    assert studies(db, AccessionNumber="ACC_02") == ["1.2.3.2"]
    assert studies(db, StudyID="3") == ["1.2.3.3"]
    assert studies(db, PatientSex="F") == ["1.2.3.3"]


def test_wildcards_are_case_sensitive_for_text(db: Database) -> None:
    assert studies(db, PatientID="PID*") == ["1.2.3.1", "1.2.3.2"]
    assert studies(db, PatientID="?ID00?") == ["1.2.3.1", "1.2.3.2"]
    assert studies(db, PatientID="?id00?") == ["1.2.3.3"]
    assert studies(db, StudyDescription="Chest*") == ["1.2.3.1"]
    assert studies(db, StudyDescription="*pa") == ["1.2.3.3"]
    assert studies(db, StudyDescription="*T*") == ["1.2.3.2"]
    assert studies(db, StudyDescription="C?est*") == ["1.2.3.1"]
    assert studies(db, PatientID="PID00?1") == []  # ? is exactly one character


def test_like_metacharacters_are_literal(db: Database) -> None:
    assert _like_pattern("a_b%c*d?") == "a\\_b\\%c%d_"
    assert studies(db, AccessionNumber="ACC_0*") == ["1.2.3.2"]
    assert studies(db, AccessionNumber="ACC%*") == ["1.2.3.3"]
    assert studies(db, AccessionNumber="ACC%03") == ["1.2.3.3"]
    # PN matching uses LIKE alone (no GLOB), so this checks the escaping by itself
    assert studies(db, ReferringPhysicianName="o_brien*") == ["1.2.3.2"]
    assert studies(db, ReferringPhysicianName="o?brien*") == ["1.2.3.2", "1.2.3.3"]


def test_person_name_matching_is_case_insensitive(db: Database) -> None:
    assert studies(db, PatientName="doe^john") == ["1.2.3.1", "1.2.3.2"]
    assert studies(db, PatientName="DOE^JOHN") == ["1.2.3.1", "1.2.3.2"]
    assert studies(db, PatientName="Doe^Jane") == ["1.2.3.3"]  # stored as DOE^JANE^^
    assert studies(db, PatientName="doe*") == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    assert studies(db, PatientName="doe^j?hn") == ["1.2.3.1", "1.2.3.2"]
    assert studies(db, PatientName="Doe") == []  # single value matching is not prefix matching
    assert studies(db, ReferringPhysicianName="SMITH^ANNA") == ["1.2.3.1"]


def test_several_keys_must_all_match(db: Database) -> None:
    assert studies(db, PatientID="PID001", StudyDescription="CT*") == ["1.2.3.2"]
    assert studies(db, PatientID="PID001", StudyDescription="chest*") == []


# --- UIDs ----------------------------------------------------------------------------------------


def test_uid_single_and_list_matching(db: Database) -> None:
    assert studies(db, StudyInstanceUID="1.2.3.2") == ["1.2.3.2"]
    assert studies(db, StudyInstanceUID="1.2.3.1\\1.2.3.3") == ["1.2.3.1", "1.2.3.3"]
    assert studies(db, StudyInstanceUID="1.2.3.1\\9.9.9") == ["1.2.3.1"]
    assert studies(db, StudyInstanceUID="9.9.9") == []


def test_wildcards_on_uids_dates_and_numbers_are_refused(db: Database) -> None:
    """PS3.4 C.2.2.2.4: wildcards apply to text and names; elsewhere the request is refused
    (it was answered with no matches, which reads as "none found")."""
    for keys in (
        {"StudyInstanceUID": "1.2.3.*"},
        {"StudyInstanceUID": "1.2.3.?"},
        {"StudyDate": "2020*"},
        {"StudyTime": "12*"},
    ):
        with pytest.raises(QueryError, match="wildcards are not allowed"):
            studies(db, **keys)


# --- dates and times -----------------------------------------------------------------------------


def test_study_date_single_and_ranges(db: Database) -> None:
    assert studies(db, StudyDate="20200115") == ["1.2.3.1"]
    assert studies(db, StudyDate="20200116") == []
    assert studies(db, StudyDate="20200101-") == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    assert studies(db, StudyDate="20200116-") == ["1.2.3.2", "1.2.3.3"]
    assert studies(db, StudyDate="-20201231") == ["1.2.3.1", "1.2.3.2"]  # bounds included
    assert studies(db, StudyDate="-20201230") == ["1.2.3.1"]
    assert studies(db, StudyDate="20200201-20201231") == ["1.2.3.2"]
    assert studies(db, StudyDate="20200115-20200115") == ["1.2.3.1"]
    assert studies(db, StudyDate="20220101-20230101") == []


def test_birth_date_range(db: Database) -> None:
    assert studies(db, PatientBirthDate="-19801231") == ["1.2.3.1", "1.2.3.2"]
    assert studies(db, PatientBirthDate="19851231") == ["1.2.3.3"]


def test_study_time(db: Database) -> None:
    assert studies(db, StudyTime="083000") == ["1.2.3.1"]
    assert studies(db, StudyTime="141500") == ["1.2.3.2"]  # stored with a fraction
    assert studies(db, StudyTime="0800-1200") == ["1.2.3.1"]
    assert studies(db, StudyTime="14-") == ["1.2.3.2"]
    assert studies(db, StudyTime="-0830") == ["1.2.3.1"]
    assert studies(db, StudyTime="090000") == []


# --- ModalitiesInStudy ---------------------------------------------------------------------------


def test_modalities_in_study_matching(db: Database) -> None:
    assert studies(db, ModalitiesInStudy="CT") == ["1.2.3.2"]
    assert studies(db, ModalitiesInStudy="CR") == ["1.2.3.1", "1.2.3.3"]
    assert studies(db, ModalitiesInStudy="CT\\SR") == ["1.2.3.1", "1.2.3.2"]
    assert studies(db, ModalitiesInStudy="MR") == []
    assert studies(db, ModalitiesInStudy="ct") == []
    assert studies(db, PatientID="PID001", ModalitiesInStudy="CR") == ["1.2.3.1"]


def test_matched_study_lists_all_its_modalities(db: Database) -> None:
    (response,) = query(db, "STUDY", ModalitiesInStudy="SR")
    assert response.StudyInstanceUID == "1.2.3.1"
    assert list(response.ModalitiesInStudy) == ["CR", "SC", "SR"]


# --- SERIES level --------------------------------------------------------------------------------


def series(db: Database, **keys: Any) -> list[str]:
    return uids(query(db, "SERIES", **keys), "SeriesInstanceUID")


def test_series_response_keys_and_values(db: Database) -> None:
    responses = query(
        db,
        "SERIES",
        StudyInstanceUID="1.2.3.1",
        Modality="",
        SeriesNumber="",
        SeriesDescription="",
        NumberOfSeriesRelatedInstances="",
        SOPInstanceUID="",  # an image key: not answered at SERIES level
    )
    by_uid = {r.SeriesInstanceUID: r for r in responses}
    assert sorted(by_uid) == ["1.2.3.1.1", "1.2.3.1.2", "1.2.3.1.3"]
    cr = by_uid["1.2.3.1.1"]
    assert {e.keyword for e in cr} == {
        "QueryRetrieveLevel",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "NumberOfSeriesRelatedInstances",
        "SOPInstanceUID",
    }
    assert cr.QueryRetrieveLevel == "SERIES"
    assert (cr.Modality, cr.SeriesNumber, cr.SeriesDescription) == ("CR", 1, "PA")
    assert cr.NumberOfSeriesRelatedInstances == 2
    assert cr["SOPInstanceUID"].is_empty
    assert by_uid["1.2.3.1.2"].Modality == "SR"
    assert by_uid["1.2.3.1.2"].NumberOfSeriesRelatedInstances == 1


def test_series_unique_keys_always_returned(db: Database) -> None:
    (response,) = query(db, "SERIES", Modality="CT")
    assert {e.keyword for e in response} == {
        "QueryRetrieveLevel",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
    }
    assert (response.StudyInstanceUID, response.SeriesInstanceUID) == ("1.2.3.2", "1.2.3.2.1")


def test_series_matching(db: Database) -> None:
    assert series(db) == [
        "1.2.3.1.1",
        "1.2.3.1.2",
        "1.2.3.1.3",
        "1.2.3.2.1",
        "1.2.3.3.1",
        "1.2.3.3.2",
    ]
    assert series(db, Modality="SR") == ["1.2.3.1.2"]
    assert series(db, Modality="C?") == ["1.2.3.1.1", "1.2.3.2.1", "1.2.3.3.1"]
    assert series(db, Modality="c*") == []
    # Modality has VM 1: a backslash is part of the value, not a list (only UIDs and
    # ModalitiesInStudy take several values)
    assert series(db, Modality="SR\\SC") == []
    assert series(db, SeriesNumber="900") == ["1.2.3.1.2"]
    assert series(db, SeriesNumber="1") == ["1.2.3.1.1", "1.2.3.3.1"]
    assert series(db, SeriesDescription="AI*") == ["1.2.3.1.2", "1.2.3.1.3"]
    assert series(db, SeriesDescription="pa") == ["1.2.3.3.1"]
    assert series(db, SeriesInstanceUID="1.2.3.1.3\\1.2.3.2.1") == ["1.2.3.1.3", "1.2.3.2.1"]
    assert series(db, StudyInstanceUID="1.2.3.1", Modality="CR") == ["1.2.3.1.1"]


def test_series_matches_study_keys_too(db: Database) -> None:
    assert series(db, PatientID="pid002") == ["1.2.3.3.1", "1.2.3.3.2"]
    assert series(db, StudyDate="20200101-20200131", Modality="S*") == ["1.2.3.1.2", "1.2.3.1.3"]


def test_lower_level_key_does_not_constrain(db: Database) -> None:
    assert series(db, StudyInstanceUID="1.2.3.2", SOPInstanceUID="9.9.9") == ["1.2.3.2.1"]
    assert studies(db, StudyInstanceUID="1.2.3.2", Modality="MR") == ["1.2.3.2"]


@pytest.mark.parametrize("raw", [b"x ", b"1.5 "])
def test_bad_integer_raises(db: Database, raw: bytes) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.SeriesNumber = "1"
    encoded = encode(identifier, True, True)
    assert encoded is not None
    element = b"\x20\x00\x11\x00\x02\x00\x00\x001 "  # (0020,0011) IS "1 ", implicit VR
    assert element in encoded
    patched = encoded.replace(element, element[:4] + len(raw).to_bytes(4, "little") + raw)
    with db.session() as session, pytest.raises(QueryError):
        find(session, decode(BytesIO(patched), True, True))


# --- IMAGE level ---------------------------------------------------------------------------------


def images(db: Database, **keys: Any) -> list[str]:
    return uids(query(db, "IMAGE", **keys), "SOPInstanceUID")


def test_image_response_keys_and_values(db: Database) -> None:
    responses = query(db, "IMAGE", SeriesInstanceUID="1.2.3.2.1", SOPClassUID="", InstanceNumber="")
    by_uid = {r.SOPInstanceUID: r for r in responses}
    assert sorted(by_uid) == ["1.2.3.2.1.1", "1.2.3.2.1.2", "1.2.3.2.1.3"]
    first = by_uid["1.2.3.2.1.1"]
    assert {e.keyword for e in first} == {
        "QueryRetrieveLevel",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
    }
    assert first.QueryRetrieveLevel == "IMAGE"
    assert (first.StudyInstanceUID, first.SeriesInstanceUID) == ("1.2.3.2", "1.2.3.2.1")
    assert (first.SOPClassUID, first.InstanceNumber) == (CT, 1)
    assert by_uid["1.2.3.2.1.3"]["InstanceNumber"].is_empty


def test_image_matching(db: Database) -> None:
    assert len(images(db)) == 8
    assert images(db, SeriesInstanceUID="1.2.3.1.1") == ["1.2.3.1.1.1", "1.2.3.1.1.2"]
    assert images(db, SOPClassUID=SR) == ["1.2.3.1.2.1"]  # generated results are found
    assert images(db, SOPClassUID=f"{SR}\\{SC}") == ["1.2.3.1.2.1", "1.2.3.1.3.1"]
    assert images(db, SOPInstanceUID="1.2.3.3.1.1\\1.2.3.2.1.2") == ["1.2.3.2.1.2", "1.2.3.3.1.1"]
    assert images(db, SeriesInstanceUID="1.2.3.2.1", InstanceNumber="2") == ["1.2.3.2.1.2"]
    assert images(db, StudyInstanceUID="1.2.3.1", Modality="SC") == ["1.2.3.1.3.1"]
    assert images(db, PatientName="doe^jane", SOPClassUID=CR) == ["1.2.3.3.1.1"]
    with pytest.raises(QueryError, match="SOPClassUID: wildcards are not allowed"):
        images(db, SOPClassUID="1.2.840.10008.5.1.4.1.1.*")


# --- scale ---------------------------------------------------------------------------------------


def test_one_statement_per_find(db: Database) -> None:
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        responses = query(
            db,
            "STUDY",
            ModalitiesInStudy="",
            NumberOfStudyRelatedSeries="",
            NumberOfStudyRelatedInstances="",
            NumberOfSeriesRelatedInstances="",
        )
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    assert len(responses) == 4
    assert len(statements) == 1


def test_many_studies(db: Database) -> None:
    count = 1200  # more than one partition of results
    with db.session() as session:
        for n in range(count):
            study = _study(f"2.25.{n}", patient_id=f"BULK{n:05d}", study_date="20190101")
            session.add(_instance(_series(study, f"2.25.{n}.1", "CT", 1), f"2.25.{n}.1.1", CT, 1))
    responses = query(
        db, "STUDY", PatientID="BULK*", NumberOfStudyRelatedInstances="", ModalitiesInStudy=""
    )
    assert len(responses) == count
    assert {(r.NumberOfStudyRelatedInstances, r.ModalitiesInStudy) for r in responses} == {
        (1, "CT")
    }
    assert len(studies(db, StudyDate="-20191231")) == count
