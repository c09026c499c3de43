"""Tests of ai.outputs: the TID 1500 SR, the overlay and the secondary capture."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage, generate_uid

import ai.outputs
from ai.outputs import (
    DISCLAIMER,
    ClassCode,
    Prediction,
    build_pm,
    build_sc,
    build_sr,
    overlay_lines,
    render_overlay,
)
from ai.templates import encoded

DATA = Path(os.environ.get("PACS_NODE_TEST_DICOM", "/work/shared/data/dicom"))
CR = DATA / "cxr/dwv__gdcm-CR-MONO1-10-chest.dcm"
DX = DATA / "cxr/nhsx_nccid__1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"
CR_J2K = DATA / "cxr/pydicom_data__RG1_J2KI.dcm"
CT_SERIES = DATA / "ct_series/lung_pet_ct_dx_A0002_B40f"
CT_SLICE = DATA / "ct_covid_slices/covid19_ny_sbu__19001229-053.dcm"
DCIODVFY = "/usr/bin/dciodvfy"
DSRDUMP = "/usr/bin/dsrdump"

# Class codes (SNOMED CT). "noncovid" is SCT 260385009 "Negative" (qualifier value): the
# CT model answers "is this COVID-19?", and "Negative" is the standard coded answer for a
# negative finding/test result; "Normal" would claim more than the model knows (a
# non-COVID CT can still be abnormal).
COVID = ClassCode("covid", "SCT", "840539006", "COVID-19")
PNEUMONIA = ClassCode("pneumonia", "SCT", "233604007", "Pneumonia")
NORMAL = ClassCode("normal", "SCT", "17621005", "Normal")
NONCOVID = ClassCode("noncovid", "SCT", "260385009", "Negative")

CXR_PRED = Prediction(
    "cxr-baseline", "0.1.0", "cxr", (COVID, PNEUMONIA, NORMAL), (0.93, 0.05, 0.02)
)
CT_PRED = Prediction("ct-baseline", "0.2.1", "ct", (COVID, NONCOVID), (0.27, 0.73))


@pytest.fixture(autouse=True)
def raise_on_invalid_values():
    old = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    try:
        yield
    finally:
        pydicom.config.settings.writing_validation_mode = old


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"test data not available: {path}")
    return path


def _headers(paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(_need(p), stop_before_pixels=True) for p in paths]


def _ct_paths() -> list[Path]:
    paths = sorted(_need(CT_SERIES).glob("*.dcm"))
    assert len(paths) == 30
    return paths


# name -> (source paths, prediction)
CASES = {
    "cr": (lambda: [CR], CXR_PRED),
    "dx": (lambda: [DX], CXR_PRED),
    "cr_j2k": (lambda: [CR_J2K], CXR_PRED),
    "ct_series": (_ct_paths, CT_PRED),
    "ct_slice": (lambda: [CT_SLICE], CT_PRED),
}


@pytest.fixture(params=sorted(CASES))
def case(request) -> tuple[str, list[Dataset], Prediction]:
    paths, prediction = CASES[request.param]
    return request.param, _headers(paths()), prediction


def _sr(sources: list[Dataset], prediction: Prediction, regions: tuple = ()) -> Dataset:
    return build_sr(
        sources,
        prediction,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        software_version="0.1.0",
        regions=regions,
    )


def _overlay_for(source: Dataset, prediction: Prediction) -> np.ndarray:
    rows, cols = int(source.Rows), int(source.Columns)
    yy, xx = np.mgrid[0:rows, 0:cols]
    image = (xx + yy) / float(rows + cols)
    heat = np.zeros((7, 7))
    heat[2:5, 3:6] = 1.0
    return render_overlay(image, heat, overlay_lines(prediction, "Grad-CAM"))


def _sc(source: Dataset, prediction: Prediction) -> tuple[Dataset, np.ndarray]:
    overlay = _overlay_for(source, prediction)
    sc = build_sc(
        source,
        overlay,
        prediction,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        software_version="0.1.0",
    )
    return sc, overlay


def _roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _items(seq) -> Iterator[Dataset]:
    for item in seq:
        yield item
        if "ContentSequence" in item:
            yield from _items(item.ContentSequence)


def _concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return code.CodingSchemeDesignator, code.CodeValue


def _dciodvfy(ds: Dataset, tmp_path: Path, name: str) -> str:
    if not os.path.exists(DCIODVFY):
        pytest.skip(f"{DCIODVFY} is not installed")
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


def _opt(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword) or "")


# ---------------------------------------------------------------------- Prediction


def test_prediction_label_and_probability():
    assert CXR_PRED.label == COVID
    assert CXR_PRED.probability == pytest.approx(0.93)
    assert CT_PRED.label == NONCOVID
    assert CT_PRED.probability == pytest.approx(0.73)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probabilities": (0.5, 0.5)}, "probabilities"),
        ({"probabilities": (0.5, 0.4, 0.3)}, "sum to 1"),
        ({"probabilities": (1.2, -0.1, -0.1)}, "probabilities"),
        ({"probabilities": (float("nan"), 0.5, 0.5)}, "probabilities"),
        ({"classes": (), "probabilities": ()}, "classes"),
        ({"classes": (COVID, COVID, NORMAL)}, "classes"),
        ({"task": "mri"}, "task"),
        ({"model_name": ""}, "model_name"),
    ],
)
def test_prediction_validation(kwargs, message):
    args = {
        "model_name": "m",
        "model_version": "1",
        "task": "cxr",
        "classes": (COVID, PNEUMONIA, NORMAL),
        "probabilities": (0.2, 0.3, 0.5),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Prediction(**args)


# ------------------------------------------------------------------------- overlay


def test_overlay_lines():
    lines = overlay_lines(CXR_PRED, "extra text")
    text = "\n".join(lines)
    for needle in ("COVID-19", "0.93", "cxr-baseline", "0.1.0", DISCLAIMER, "extra text"):
        assert needle in text
    assert DISCLAIMER in lines
    assert "" not in overlay_lines(CXR_PRED)


def test_render_overlay_shape_dtype_and_size():
    small = render_overlay(np.full((100, 80), 0.5), np.zeros((10, 10)), ["x"])
    assert small.dtype == np.uint8 and small.ndim == 3 and small.shape[2] == 3
    assert max(small.shape[:2]) == 512  # upscaled for readable text
    assert small.shape[0] / small.shape[1] == pytest.approx(100 / 80, rel=0.01)

    big = render_overlay(np.full((3000, 2000), 0.5), np.zeros((7, 7)), ["x"])
    assert max(big.shape[:2]) == 1024  # capped
    assert big.shape[0] / big.shape[1] == pytest.approx(3000 / 2000, rel=0.01)

    mid = render_overlay(np.full((700, 600), 0.5), np.zeros((7, 7)), [])
    assert mid.shape == (700, 600, 3)


def test_render_overlay_heatmap_changes_pixels():
    image = np.full((600, 600), 0.5)
    cold = render_overlay(image, np.zeros((12, 12)), [])
    hot_map = np.zeros((12, 12))
    hot_map[6:10, 6:10] = 1.0
    hot = render_overlay(image, hot_map, [])
    # Without heat the image stays gray (R == G == B), and the gray level is kept.
    assert np.array_equal(cold[..., 0], cold[..., 1]) and np.array_equal(cold[..., 1], cold[..., 2])
    assert abs(int(cold[300, 300, 0]) - 128) <= 1
    changed = np.any(hot != cold, axis=2)
    assert changed[350:450, 350:450].all()  # the hot region is colored
    assert not changed[:200, :200].any()  # cold regions are untouched
    # JET at 1.0 is red; blended at ~0.4 over mid gray it is reddish.
    r, g, b = (int(v) for v in hot[400, 400])
    assert r > g and r > b


def test_render_overlay_burns_text_on_dark_band():
    image = np.full((512, 512), 0.9)
    plain = render_overlay(image, np.zeros((4, 4)), [])
    texted = render_overlay(image, np.zeros((4, 4)), overlay_lines(CXR_PRED))
    band = texted[:20]
    assert band.mean() < plain[:20].mean()  # dark band
    assert (texted[:80] == 255).all(axis=2).any()  # white text
    assert np.array_equal(texted[-100:], plain[-100:])  # rest of image unchanged


def test_render_overlay_rejects_bad_input():
    with pytest.raises(ValueError, match="image"):
        render_overlay(np.zeros((5, 5, 3)), np.zeros((5, 5)), [])
    with pytest.raises(ValueError, match="heatmap"):
        render_overlay(np.zeros((5, 5)), np.zeros(5), [])
    with pytest.raises(ValueError, match="lines"):
        render_overlay(np.zeros((5, 5)), np.zeros((5, 5)), "text")


# ------------------------------------------------------------------------------ SR


def test_sr_content(case):
    name, sources, prediction = case
    sr = _roundtrip(_sr(sources, prediction))
    src = sources[0]

    assert sr.SOPClassUID == ComprehensiveSRStorage
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert _opt(sr, "PatientID") == _opt(src, "PatientID")
    assert _opt(sr, "PatientName") == _opt(src, "PatientName")
    assert sr.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
    assert sr.SeriesNumber == 9901
    assert sr.Manufacturer == "pacs-node"
    assert DISCLAIMER in sr.SeriesDescription
    assert len(sr.SeriesDescription) <= 64
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    equipment = [
        e
        for e in sr.ContributingEquipmentSequence
        if e.get("ManufacturerModelName") == prediction.model_name
    ]
    assert len(equipment) == 1
    assert prediction.model_version in list(np.atleast_1d(equipment[0].SoftwareVersions))

    items = list(_items(sr.ContentSequence))
    findings = [i for i in items if i.ValueType == "CODE" and _concept(i) == ("DCM", "121071")]
    assert len(findings) == 1
    value = findings[0].ConceptCodeSequence[0]
    assert (value.CodingSchemeDesignator, value.CodeValue, value.CodeMeaning) == (
        prediction.label.scheme,
        prediction.label.value,
        prediction.label.meaning,
    )

    library = [i for i in items if i.ValueType == "CONTAINER" and _concept(i) == ("DCM", "111028")]
    assert len(library) == 1  # the Image Library, which OHIF reads
    entries = list(_items(library[0].ContentSequence))
    listed = {str(e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
              for e in entries if e.ValueType == "IMAGE"}  # fmt: skip
    assert listed == {str(s.SOPInstanceUID) for s in sources}
    classes = {(c.scheme, c.value) for c in prediction.classes}
    nums = {_concept(i): i for i in items if i.ValueType == "NUM" and _concept(i) in classes}
    assert len(nums) == len(prediction.classes)
    for cls, prob in zip(prediction.classes, prediction.probabilities, strict=True):
        num = nums[(cls.scheme, cls.value)]
        measured = num.MeasuredValueSequence[0]
        assert float(measured.NumericValue) == pytest.approx(prob, abs=1e-6)
        assert measured.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"

    procedures = [i for i in items if i.ValueType == "CODE" and _concept(i) == ("DCM", "121058")]
    expected_procedure = "399208008" if prediction.task == "cxr" else "169069000"
    assert procedures[0].ConceptCodeSequence[0].CodeValue == expected_procedure

    observer = [i for i in items if i.ValueType == "TEXT" and _concept(i) == ("DCM", "121013")]
    assert observer[0].TextValue == prediction.model_name
    algorithm = {
        i.TextValue
        for i in items
        if i.ValueType == "TEXT" and _concept(i) in {("DCM", "111001"), ("DCM", "111003")}
    }
    assert algorithm == {prediction.model_name, prediction.model_version}

    assert any(i.ValueType == "TEXT" and i.TextValue == DISCLAIMER for i in items)

    source_uids = {str(s.SOPInstanceUID) for s in sources}
    referenced = {
        str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for i in items
        if i.ValueType == "IMAGE"
    }
    assert referenced == source_uids
    evidence = {
        str(inst.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }
    assert evidence == source_uids
    assert "PertinentOtherEvidenceSequence" not in sr


def test_sr_passes_dciodvfy(case, tmp_path):
    from ai.outputs import Region

    name, sources, prediction = case
    out = _dciodvfy(_sr(sources, prediction), tmp_path, f"{name}_sr")
    errors = [line for line in out.splitlines() if "Error" in line]
    assert not errors, out
    with_region = _sr(sources, prediction, (Region(sources[-1], (10.0, 12.0, 50.0, 64.0)),))
    out = _dciodvfy(with_region, tmp_path, f"{name}_sr_region")
    assert not [line for line in out.splitlines() if "Error" in line], out


def test_a_malformed_sequence_of_the_source_is_not_copied(tmp_path):
    """Issue 11: a CT whose ReferencedStudySequence lacks ReferencedSOPClassUID got results that
    failed dciodvfy, because the node copied the sequence; now only what validates is copied."""
    from ai.outputs import Region, build_pm

    src = _headers([CT_SLICE])[0]
    item = Dataset()
    item.ReferencedSOPInstanceUID = generate_uid()  # no ReferencedSOPClassUID: malformed
    src.ReferencedStudySequence = [item]
    heat = np.zeros((int(src.Rows), int(src.Columns)), np.float32)
    heat[10:20, 10:20] = 1.0
    kwargs = dict(series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(),
                  software_version="0.1.0")  # fmt: skip
    outputs = {
        "sr": build_sr([src], CT_PRED, regions=(Region(src, (10, 10, 20, 20)),), **kwargs),
        "sc": _sc(src, CT_PRED)[0],
        "pm": build_pm(src, heat, CT_PRED, **kwargs),
    }
    for name, ds in outputs.items():
        assert "ReferencedStudySequence" not in ds, name
        out = _dciodvfy(ds, tmp_path, f"malformed_{name}")
        assert not [line for line in out.splitlines() if "Error" in line], (name, out)


def test_the_grad_cam_hot_spot_is_a_region_over_its_image(case):
    """Issue 11: what OHIF v3 shows over the image: a planar ROI group (TID 1410) whose SCOORD
    is a closed polyline on the source image, with the finding and the probabilities."""
    from ai.outputs import Region, hot_spot

    name, sources, prediction = case
    heat = np.zeros((int(sources[0].Rows), int(sources[0].Columns)), np.float32)
    heat[20:30, 40:61] = 0.9
    heat[25, 50] = 1.0
    heat[2:4, 2:4] = 0.8  # a second, separate warm spot: not part of the box
    box = hot_spot(heat)
    assert box == (40.0, 20.0, 61.0, 30.0)
    assert hot_spot(np.zeros((4, 4))) is None
    sr = _roundtrip(_sr(sources, prediction, (Region(sources[0], box),)))
    items = list(_items(sr.ContentSequence))
    rois = [i for i in items if i.ValueType == "CONTAINER" and _concept(i) == ("DCM", "125007")]
    assert len(rois) == 1  # the region's group holds the result (OHIF needs every group placed)
    region = rois[0]
    inner = list(_items(region.ContentSequence))
    [scoord] = [i for i in inner if i.ValueType == "SCOORD"]
    assert scoord.GraphicType == "POLYLINE"
    assert [float(v) for v in scoord.GraphicData] == [40, 20, 61, 20, 61, 30, 40, 30, 40, 20]
    [image] = [i for i in _items(scoord.ContentSequence) if i.ValueType == "IMAGE"]
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    classes = {(c.scheme, c.value) for c in prediction.classes}
    assert {_concept(i) for i in inner if i.ValueType == "NUM"} == classes
    finding = [i for i in inner if i.ValueType == "CODE" and _concept(i) == ("DCM", "121071")]
    assert finding[0].ConceptCodeSequence[0].CodeValue == prediction.label.value
    texts = [str(i.TextValue) for i in inner if "TextValue" in i]
    assert f"AI finding: {prediction.label.meaning}" in texts  # what OHIF labels it with
    assert DISCLAIMER in texts


def test_sr_renders_with_dsrdump(case, tmp_path):
    if not os.path.exists(DSRDUMP):
        pytest.skip(f"{DSRDUMP} is not installed")
    name, sources, prediction = case
    path = tmp_path / f"{name}_sr.dcm"
    _sr(sources, prediction).save_as(path, enforce_file_format=True)
    proc = subprocess.run([DSRDUMP, "+Pl", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f'"{DISCLAIMER}"' in proc.stdout  # the TEXT content item, in full
    assert f'"Finding")=({prediction.label.value},SCT,"{prediction.label.meaning}")' in proc.stdout
    # Also without +Pl (long values shortened) the disclaimer shows, in the Series line.
    short = subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, timeout=60)
    assert short.returncode == 0 and DISCLAIMER in short.stdout


def test_sr_ct_series_is_fast():
    sources = _headers(_ct_paths())
    _sr(sources, CT_PRED)  # first use loads highdicom's tables of the standard
    start = time.perf_counter()
    _sr(sources, CT_PRED)
    assert time.perf_counter() - start < 1.0


def test_sr_and_sc_do_not_modify_or_decode_sources():
    full = pydicom.dcmread(_need(CR_J2K))  # JPEG 2000: decoding would need a plugin
    before = copy.deepcopy(full)
    _sr([full], CXR_PRED)
    _sc(full, CXR_PRED)
    assert full == before
    assert "_pixel_array" not in full.__dict__ or full.__dict__["_pixel_array"] is None


def test_sr_handles_missing_type2_attributes():
    src = _headers([CR])[0]
    for kw in ("PatientName", "PatientID", "StudyID", "AccessionNumber", "StudyDate"):
        if kw in src:
            delattr(src, kw)
    sr = _roundtrip(_sr([src], CXR_PRED))
    for kw in ("PatientName", "PatientID", "StudyID", "AccessionNumber", "StudyDate"):
        assert kw in sr and not sr[kw].value


def test_sr_argument_validation():
    cr = _headers([CR])[0]
    ct = _headers(_ct_paths()[:2])
    kwargs = {
        "series_instance_uid": generate_uid(),
        "sop_instance_uid": generate_uid(),
        "software_version": "0.1.0",
    }
    with pytest.raises(ValueError, match="sources"):
        build_sr([], CXR_PRED, **kwargs)
    with pytest.raises(ValueError, match="sources"):
        build_sr(cr, CXR_PRED, **kwargs)
    with pytest.raises(ValueError, match="one study"):
        build_sr([cr, *ct], CXR_PRED, **kwargs)
    missing = copy.deepcopy(cr)
    del missing.SOPInstanceUID
    with pytest.raises(ValueError, match=r"sources\[0\]"):
        build_sr([missing], CXR_PRED, **kwargs)
    with pytest.raises(ValueError, match="series_instance_uid"):
        build_sr([cr], CXR_PRED, **{**kwargs, "series_instance_uid": cr.SeriesInstanceUID})
    with pytest.raises(ValueError, match="sop_instance_uid"):
        build_sr([cr], CXR_PRED, **{**kwargs, "sop_instance_uid": "not a uid"})
    with pytest.raises(ValueError, match="prediction"):
        build_sr([cr], "covid", **kwargs)
    with pytest.raises(ValueError, match="series_number"):
        build_sr([cr], CXR_PRED, series_number=0, **kwargs)


def test_sr_ignores_duplicate_sources():
    ct = _headers(_ct_paths()[:3])
    sr = _sr([*ct, ct[0]], CT_PRED)
    referenced = [
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for i in _items(sr.ContentSequence)
        if i.ValueType == "IMAGE"
    ]
    # once in the Image Library and once as a source of the measurement group, never thrice
    assert sorted(referenced) == sorted(2 * [s.SOPInstanceUID for s in ct])


# ------------------------------------------------------------------------------ SC


def test_sc_content(case):
    name, sources, prediction = case
    src = sources[0]
    built, overlay = _sc(src, prediction)
    sc = _roundtrip(built)

    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == src.StudyInstanceUID
    assert _opt(sc, "PatientID") == _opt(src, "PatientID")
    assert _opt(sc, "PatientName") == _opt(src, "PatientName")
    assert sc.SeriesInstanceUID != src.SeriesInstanceUID
    assert sc.SeriesNumber == 9902
    assert sc.Manufacturer == "pacs-node"
    assert sc.BurnedInAnnotation == "YES"
    assert DISCLAIMER in sc.SeriesDescription and len(sc.SeriesDescription) <= 64
    assert DISCLAIMER in sc.ImageComments
    assert sc.PhotometricInterpretation == "RGB"
    assert (sc.SamplesPerPixel, sc.BitsAllocated, sc.BitsStored) == (3, 8, 8)
    assert (sc.Rows, sc.Columns) == overlay.shape[:2]
    assert np.array_equal(sc.pixel_array, overlay)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert any(
        e.get("ManufacturerModelName") == prediction.model_name
        for e in sc.ContributingEquipmentSequence
    )


def test_sc_passes_dciodvfy(case, tmp_path):
    name, sources, prediction = case
    sc, _ = _sc(sources[0], prediction)
    out = _dciodvfy(sc, tmp_path, f"{name}_sc")
    errors = [line for line in out.splitlines() if "Error" in line]
    assert not errors, out


def test_the_heatmap_as_a_parametric_map(case, tmp_path):
    """Issue 11: the Grad-CAM map as data, on the source's pixel grid, that viewers overlay and
    toggle; valid for a CT slice (its own frame of reference) and for radiographs (which have
    none: the map gets one of its own)."""
    from pydicom.uid import ParametricMapStorage

    from ai.outputs import PM_SCALE, build_pm

    name, sources, prediction = case
    src = sources[0]
    rows, cols = int(src.Rows), int(src.Columns)
    heat = np.linspace(0.0, 1.0, rows * cols, dtype=np.float32).reshape(rows, cols)
    pm = build_pm(src, heat, prediction, series_instance_uid=generate_uid(),
                  sop_instance_uid=generate_uid(), software_version="0.1.0")  # fmt: skip
    out = _dciodvfy(pm, tmp_path, f"{name}_pm")
    assert not [line for line in out.splitlines() if "Error" in line], out
    back = _roundtrip(pm)
    assert back.SOPClassUID == ParametricMapStorage
    assert back.StudyInstanceUID == src.StudyInstanceUID
    assert DISCLAIMER in back.SeriesDescription
    mapping = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    stored = back.pixel_array.astype(np.float64)
    relevance = stored * float(mapping.RealWorldValueSlope) + float(mapping.RealWorldValueIntercept)
    np.testing.assert_allclose(relevance, heat, atol=0.6 / PM_SCALE)
    derivation = back.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    if "FrameOfReferenceUID" in src:
        assert back.FrameOfReferenceUID == src.FrameOfReferenceUID
    else:
        assert back.FrameOfReferenceUID  # its own
    with pytest.raises(ValueError, match="shape"):
        build_pm(src, heat[:-1], prediction, series_instance_uid=generate_uid(),
                 sop_instance_uid=generate_uid(), software_version="0.1.0")  # fmt: skip


def test_sc_patient_orientation():
    ct = _headers(_ct_paths()[:1])[0]
    sc, _ = _sc(ct, CT_PRED)
    assert list(sc.PatientOrientation) == ["L", "P"]  # axial slice, identity orientation
    j2k = _headers([CR_J2K])[0]
    sc, _ = _sc(j2k, CXR_PRED)
    assert list(sc.PatientOrientation) == list(j2k.PatientOrientation)
    sc, _ = _sc(_headers([DX])[0], CXR_PRED)
    assert not sc.PatientOrientation  # unknown: empty (Type 2C)


def test_sc_argument_validation():
    cr = _headers([CR])[0]
    kwargs = {
        "series_instance_uid": generate_uid(),
        "sop_instance_uid": generate_uid(),
        "software_version": "0.1.0",
    }
    good = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="overlay_rgb"):
        build_sc(cr, good.astype(np.float32), CXR_PRED, **kwargs)
    with pytest.raises(ValueError, match="overlay_rgb"):
        build_sc(cr, good[..., 0], CXR_PRED, **kwargs)
    with pytest.raises(ValueError, match="source"):
        build_sc([cr], good, CXR_PRED, **kwargs)
    with pytest.raises(ValueError, match="sop_instance_uid"):
        build_sc(cr, good, CXR_PRED, **{**kwargs, "sop_instance_uid": cr.SOPInstanceUID})


def _as_another_study(sources: list[Dataset], name: str) -> list[Dataset]:
    """The same images as a new study of another patient (same header shape)."""
    study, series = generate_uid(), generate_uid()
    out = []
    for ds in sources:
        ds = copy.deepcopy(ds)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        if "PatientName" in ds and ds.PatientName:
            ds.PatientName = name
        if "PatientID" in ds and ds.PatientID:
            ds.PatientID = f"ID-{name[:8]}"
        if "AccessionNumber" in ds and ds.AccessionNumber:
            ds.AccessionNumber = "ACC9"
        out.append(ds)
    return out


@pytest.mark.parametrize("with_region", [False, True], ids=["", "region"])
@pytest.mark.parametrize("indeterminate", ["", "every image is unlike the model's training data"])
def test_an_sr_filled_from_a_template_is_the_sr_highdicom_builds(case, indeterminate, with_region):
    """The fast path (an earlier SR of the same shape, filled in) gives byte for byte the SR
    that highdicom builds for the new input, except its creation times; with a Grad-CAM
    region, its box is filled in too."""
    from ai.outputs import SR_TEMPLATES, Region, _header, _library_values, _sr_shape

    name, sources, prediction = case
    first = Prediction(**{**prediction.__dict__, "indeterminate": indeterminate})
    second_probs = tuple(reversed(prediction.probabilities))
    second = Prediction(
        **{**prediction.__dict__, "probabilities": second_probs, "indeterminate": indeterminate}
    )
    if second.label != first.label:  # a different label is a different shape: keep the label
        second = first
    # the first input of a shape is built and kept; the second is built too and checked
    # against the kept one (ai.templates.Templates); from the third on, the template fills
    _sr(sources, first, (Region(sources[0], (1, 2, 30, 40)),) if with_region else ())
    second_input = _as_another_study(sources, "Second^Patient")
    _sr(second_input, first, (Region(second_input[0], (3, 4, 31, 41)),) if with_region else ())
    others = _as_another_study(sources, "Other^Patient")
    header, names = _header(others[0])
    library = _library_values([others[0]] if with_region else others)
    settings = (9901, 1, "pacs-node", "0.1.0", (0,) if with_region else (), library)
    assert SR_TEMPLATES.get(_sr_shape(others, header, names, second, settings))
    series_uid, sop_uid = generate_uid(), generate_uid()
    kwargs = dict(
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        software_version="0.1.0",
        regions=(Region(others[0], (5.0, 6.0, 70.5, 80.0)),) if with_region else (),
    )
    fast = build_sr(others, second, **kwargs)
    slow = build_sr(others, second, use_template=False, **kwargs)
    assert fast.SOPInstanceUID == sop_uid and fast.file_meta.MediaStorageSOPInstanceUID == sop_uid
    assert fast.StudyInstanceUID == others[0].StudyInstanceUID
    assert encoded(fast) == _aligned(slow, fast), name  # the bytes the worker writes


def _aligned(slow: Dataset, fast: Dataset) -> bytes:
    """*slow* encoded with *fast*'s times (the one thing a template's fill may change)."""
    for kw in ai.outputs._NOW_KEYWORDS:
        if kw in fast:
            setattr(slow, kw, fast[kw].value)
    for theirs, mine in zip(
        slow.get("ContributingEquipmentSequence", []),
        fast.get("ContributingEquipmentSequence", []),
        strict=True,
    ):
        if "ContributionDateTime" in mine:
            theirs.ContributionDateTime = mine.ContributionDateTime
    return encoded(slow)


@pytest.mark.parametrize("name", ["cr", "dx", "cr_j2k", "ct_slice"])
def test_images_filled_from_a_template_are_the_bytes_highdicom_builds(name):
    """The secondary capture and the Parametric Map of a third input of one shape are filled
    from the first one's bytes (the second checked them, ai.templates.Templates): the file the
    worker writes is, byte for byte, what highdicom and pydicom make for the third input,
    except the times. A CT slice's map (its own geometry) is always built in full."""
    from ai.outputs import IMAGE_TEMPLATES

    path = CT_SLICE if name == "ct_slice" else CASES[name][0]()[0]
    source = _headers([path])[0]
    prediction = CT_PRED if name == "ct_slice" else CXR_PRED
    rows, cols = int(source.Rows), int(source.Columns)
    rng = np.random.default_rng(7)
    IMAGE_TEMPLATES.clear()
    for n, src in enumerate(
        [source, *(_as_another_study([source], f"Patient{n}^Test")[0] for n in range(2))]
    ):
        heat = rng.random((rows, cols)).astype(np.float32)
        overlay = rng.integers(0, 255, (rows, cols, 3), dtype=np.uint8)
        kwargs = dict(series_instance_uid=generate_uid(), software_version="0.1.0")
        sc_uid, pm_uid = generate_uid(), generate_uid()
        sc = build_sc(src, overlay, prediction, sop_instance_uid=sc_uid, **kwargs)
        pm = build_pm(src, heat, prediction, sop_instance_uid=pm_uid, **kwargs)
        filled = "_pacs_node_encoded" in sc.__dict__, "_pacs_node_encoded" in pm.__dict__
        if n < 2:
            assert filled == (False, False)  # the first kept, the second built and checked
            continue
        assert filled == (True, name != "ct_slice")
        slow_sc = build_sc(
            src, overlay, prediction, sop_instance_uid=sc_uid, use_template=False, **kwargs
        )
        slow_pm = build_pm(
            src, heat, prediction, sop_instance_uid=pm_uid, use_template=False, **kwargs
        )
        assert encoded(sc) == _aligned(slow_sc, sc)
        assert encoded(pm) == _aligned(slow_pm, pm)
        assert sc.PatientName == src.PatientName and sc.StudyInstanceUID == src.StudyInstanceUID
        assert np.array_equal(pm.pixel_array, np.round(heat * 1000).astype(np.uint16))


@pytest.mark.parametrize("p", [0.0, 1.0, 0.93, 0.123456789, 1e-7, 0.5000004])
def test_a_probability_item_is_what_highdicom_writes(p):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from ai.outputs import PROBABILITY_UNIT, _probability_ds

    theirs = hd.sr.NumContentItem(
        name=codes.DCM.Finding, value=round(p, 6), unit=PROBABILITY_UNIT
    ).MeasuredValueSequence[0]
    assert _probability_ds(p) == theirs
    assert str(_probability_ds(p).NumericValue) == str(theirs.NumericValue)


def test_what_a_template_cannot_fill_in_keeps_it_from_another_image():
    """The Image Library states each image's size: a third radiograph of another size is not
    filled from the first two's template (its SR is built, and says its own size); the
    library lists no dates (a template is for any study date; the Study's dates are filled in
    from the source as Patient and Study attributes)."""
    from ai.outputs import SR_TEMPLATES, Region

    source = _headers([CR])[0]
    SR_TEMPLATES.clear()
    first, second = _as_another_study([source], "A^A")[0], _as_another_study([source], "B^B")[0]
    for ds in (first, second):
        _sr([ds], CXR_PRED, (Region(ds, (1, 2, 30, 40)),))
    other = _as_another_study([source], "C^C")[0]
    other.Rows, other.Columns = 600, 500
    sr = _sr([other], CXR_PRED, (Region(other, (1, 2, 30, 40)),))
    assert "_pacs_node_encoded" not in sr.__dict__  # built in full
    library = next(
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"
    )

    def items(ds):
        for item in ds.get("ContentSequence", []):
            yield item
            yield from items(item)

    found = {
        i.ConceptNameCodeSequence[0].CodeMeaning: i
        for i in items(library)
        if "ConceptNameCodeSequence" in i
    }
    assert float(found["Pixel Data Rows"].MeasuredValueSequence[0].NumericValue) == 600
    assert float(found["Pixel Data Columns"].MeasuredValueSequence[0].NumericValue) == 500
    assert not [i for i in items(library) if i.ValueType in ("DATE", "TIME", "DATETIME")]
    # the same size again is filled in, from the first template
    again = _as_another_study([source], "D^D")[0]
    assert "_pacs_node_encoded" in _sr([again], CXR_PRED, (Region(again, (1, 2, 30, 40)),)).__dict__


def test_a_template_is_not_filled_for_a_source_whose_kept_value_differs():
    from ai.outputs import _Kept

    kept = _Kept(frozenset(), ((0x00180015, "CHEST"),))
    header = Dataset()
    header.BodyPartExamined = "CHEST"
    assert kept.fits(header)
    header.BodyPartExamined = "ABDOMEN"
    assert not kept.fits(header)
    del header.BodyPartExamined
    assert not kept.fits(header)


def _image_files() -> list[Path]:
    found = []
    for path in sorted(DATA.glob("**/*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if "Rows" in ds and int(ds.get("NumberOfFrames", 1) or 1) == 1:
            found.append(path)
    return found


def _three(src, overlay, heat, prediction, uids, kwargs, *, use_template):  # type: ignore[no-untyped-def]
    """The SR (with a region), SC and Parametric Map of one source."""
    from ai.outputs import Region

    regions = (Region(src, (1, 2, 30, 40)),)
    return [
        build_sr([src], prediction, sop_instance_uid=uids[0], regions=regions,
                 use_template=use_template, **kwargs),
        build_sc(src, overlay, prediction, sop_instance_uid=uids[1], use_template=use_template,
                 **kwargs),
        build_pm(src, heat, prediction, sop_instance_uid=uids[2], use_template=use_template,
                 **kwargs),
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("path", _image_files() if DATA.is_dir() else [], ids=lambda p: p.name[:40])
def test_every_shared_image_gets_from_templates_the_bytes_highdicom_builds(path):
    """Each single-frame image of the shared data as the source of three studies of other
    patients and dates (UTF-8 names for the radiographs): the third study's SR, secondary
    capture and Parametric Map, filled in or built, are what highdicom and pydicom make."""
    from ai.outputs import IMAGE_TEMPLATES, SR_TEMPLATES

    base = _headers([path])[0]
    radiograph = str(base.get("Modality", "")) in ("CR", "DX")
    if radiograph:
        base.SpecificCharacterSet = "ISO_IR 192"
    prediction = CT_PRED if str(base.get("Modality", "")) == "CT" else CXR_PRED
    rows, cols = int(base.Rows), int(base.Columns)
    rng = np.random.default_rng(3)
    SR_TEMPLATES.clear()
    IMAGE_TEMPLATES.clear()
    for n in range(3):
        src = _as_another_study([base], ("Müller^Jürgen" if radiograph else "Doe^John") + str(n))[0]
        src.StudyDate, src.StudyTime = f"2025010{n + 1}", f"10{n}000"
        heat = rng.random((rows, cols)).astype(np.float32)
        overlay = rng.integers(0, 255, (min(rows, 600), min(cols, 600), 3), dtype=np.uint8)
        kwargs = dict(series_instance_uid=generate_uid(), software_version="0.1.0")
        uids = [generate_uid() for _ in range(3)]

        args = (src, overlay, heat, prediction, uids, kwargs)
        made = _three(*args, use_template=True)
        if n == 2:
            for mine, theirs in zip(made, _three(*args, use_template=False), strict=True):
                assert encoded(mine) == _aligned(theirs, mine), mine.Modality
            assert "_pacs_node_encoded" in made[0].__dict__  # the SR, at least, was filled in
