"""Hypothesis-generated datasets against the DICOM-to-tensor path and the SR/SC builders.

Whatever the header says and whatever the pixel bytes are, the answer is an image in [0, 1] or
an :class:`UnusableInputError` with a reason, and the builders give a dataset or a ValueError
naming the argument: never another exception, which would fail a job instead of skipping it.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from ai.analysis import analyse_datasets
from ai.errors import UnusableInputError
from ai.model import load_classifier
from ai.outputs import build_sc, build_sr, overlay_lines, render_overlay
from ai.preprocess import dicom_to_image
from tests.conftest import CR_CHEST, CT_SERIES

# the fuzzed headers are invalid on purpose: pydicom's warnings about them are expected
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BASE_CR = pydicom.dcmread(CR_CHEST)
BASE_CT = pydicom.dcmread(CT_SERIES[0])

header = st.fixed_dictionaries(
    {},
    optional={
        "Rows": st.integers(0, 70000),
        "Columns": st.integers(0, 70000),
        "BitsAllocated": st.sampled_from([1, 8, 12, 16, 32, 64, 0]),
        "BitsStored": st.integers(0, 40),
        "HighBit": st.integers(0, 40),
        "PixelRepresentation": st.integers(0, 1),
        "SamplesPerPixel": st.sampled_from([1, 3, 4, 0]),
        "PhotometricInterpretation": st.sampled_from(
            ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "PALETTE COLOR", "", "XYZ"]
        ),
        "NumberOfFrames": st.integers(0, 5),
        "RescaleSlope": st.sampled_from(["0", "1", "-1", "1e30", "0.5"]),
        "RescaleIntercept": st.sampled_from(["-1024", "0", "1e30", "-1e30"]),
        "WindowCenter": st.sampled_from(["40", "-600", "0", "1e30"]),
        "WindowWidth": st.sampled_from(["400", "1500", "0", "-5", "1"]),
        "BodyPartExamined": st.sampled_from(["CHEST", "LEG", "", "THORAX"]),
        "ViewPosition": st.sampled_from(["PA", "AP", "LL", "", "XX"]),
    },
)


def _mutated(
    base: pydicom.Dataset, changes: dict, pixel_bytes: bytes | None, rle: bool
) -> pydicom.Dataset:
    ds = copy.deepcopy(base)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    if pixel_bytes is not None:
        ds.PixelData = pixel_bytes
    if rle:  # claim a compressed syntax for bytes that are not
        ds.file_meta.TransferSyntaxUID = RLELossless
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


fuzz_settings = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@fuzz_settings
@given(
    changes=header,
    pixels=st.one_of(st.none(), st.binary(max_size=4096)),
    rle=st.booleans(),
    ct=st.booleans(),
)
def test_dicom_to_image_answers_or_says_why(changes, pixels, rle, ct):
    ds = _mutated(BASE_CT if ct else BASE_CR, changes, pixels, rle)
    try:
        image = dicom_to_image(ds, window=(-600.0, 1500.0) if ct else None)
    except UnusableInputError as exc:
        assert str(exc)
        return
    assert image.ndim == 2 and image.dtype == np.float32
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0


@pytest.fixture(scope="module")
def cxr_model():
    return load_classifier("cxr")


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(changes=header, pixels=st.one_of(st.none(), st.binary(max_size=2048)), rle=st.booleans())
def test_series_analysis_never_crashes(cxr_model, changes, pixels, rle):
    ds = _mutated(BASE_CR, changes, pixels, rle)
    try:
        analysis = analyse_datasets([ds], cxr_model)
    except UnusableInputError:
        return
    assert abs(sum(analysis.prediction.probabilities) - 1) < 1e-6


text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    name=text,
    patient_id=text,
    study_date=text,
    accession=text,
    description=text,
    drop=st.sets(
        st.sampled_from(
            [
                "PatientName",
                "PatientID",
                "StudyDate",
                "StudyTime",
                "AccessionNumber",
                "StudyID",
                "ReferringPhysicianName",
                "PatientBirthDate",
                "PatientSex",
            ]
        )
    ),
    probs=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
)
def test_sr_and_sc_builders_build_or_name_the_bad_argument(
    cxr_model, name, patient_id, study_date, accession, description, drop, probs
):
    from ai.outputs import Prediction

    ds = copy.deepcopy(BASE_CR)
    ds.PatientName, ds.PatientID, ds.StudyDate = name, patient_id, study_date
    ds.AccessionNumber, ds.StudyDescription = accession, description
    for keyword in drop:
        if keyword in ds:
            delattr(ds, keyword)
    total = sum(probs)
    spec = cxr_model.spec
    try:
        prediction = Prediction(
            model_name=spec.name,
            model_version=spec.version,
            task=spec.task,
            classes=spec.classes,
            probabilities=tuple(p / total for p in probs) if total > 0 else tuple(probs),
        )
    except ValueError:
        return  # e.g. all-zero probabilities: refused with a message, before any DICOM
    try:
        sr = build_sr(
            [ds],
            prediction,
            series_instance_uid="2.25.1",
            sop_instance_uid="2.25.2",
            software_version="0",
        )
        image = np.zeros((64, 64), np.float32)
        overlay = render_overlay(image, image, overlay_lines(prediction))
        sc = build_sc(
            ds,
            overlay,
            prediction,
            series_instance_uid="2.25.3",
            sop_instance_uid="2.25.4",
            software_version="0",
        )
    except ValueError as exc:
        assert str(exc)
        return
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == ds.StudyInstanceUID
    for obj in (sr, sc):  # and they are written as the worker writes them
        buffer = io.BytesIO()
        obj.save_as(buffer, enforce_file_format=True)
        assert pydicom.dcmread(io.BytesIO(buffer.getvalue())).SOPInstanceUID == obj.SOPInstanceUID
