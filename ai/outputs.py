"""DICOM outputs of an AI classification: a TID 1500 SR and a Grad-CAM secondary capture.

Every object built here is AI-generated and not for diagnostic use; the disclaimer is put
into the SR content, the SR/SC Series Description, the SC Image Comments and burned into
the SC pixels.

The builders are pure: they read only the header attributes of the source datasets (never
Pixel Data), do no I/O and never modify their arguments.
"""

from __future__ import annotations

import copy
import datetime
import functools
import logging
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import highdicom as hd
import numpy as np
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import RE_VALID_UID, ExplicitVRLittleEndian
from pydicom.valuerep import DS, validate_value

from ai import DISCLAIMER
from ai.eligibility import charset_terms
from ai.templates import Templates, Value, forget_encoding
from ai.templates import read as read_template

log = logging.getLogger(__name__)

__all__ = [
    "CT_CHEST_PROCEDURE",
    "CXR_PROCEDURE",
    "DISCLAIMER",
    "INDETERMINATE",
    "NOT_ANALYSED",
    "PROBABILITY_UNIT",
    "SC_SERIES_DESCRIPTION",
    "Region",
    "SR_SERIES_DESCRIPTION",
    "ClassCode",
    "Prediction",
    "build_not_analysed_sr",
    "build_sc",
    "build_sr",
    "hot_spot",
    "overlay_lines",
    "render_overlay",
]


@dataclass(frozen=True)
class ClassCode:
    """A model output class and the standard code that represents it."""

    name: str  # model's own class name, e.g. "covid"
    scheme: str  # coding scheme designator, e.g. "SCT"
    value: str  # code value, e.g. "840539006"
    meaning: str  # code meaning, e.g. "COVID-19"

    def __post_init__(self) -> None:
        for field in ("name", "scheme", "value", "meaning"):
            v = getattr(self, field)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"ClassCode.{field} must be a non-empty string, got {v!r}")
        if len(self.meaning) > 64:
            raise ValueError(f"ClassCode.meaning must be at most 64 characters: {self.meaning!r}")
        if len(self.value) > 64 or len(self.scheme) > 16:
            raise ValueError("ClassCode.value must be <= 64 and ClassCode.scheme <= 16 characters")

    def coded_concept(self) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(
            value=self.value, scheme_designator=self.scheme, meaning=self.meaning
        )


_TASKS = ("cxr", "ct")

# The finding when the model abstains (SNOMED CT qualifier value "Undetermined").
INDETERMINATE = ClassCode("indeterminate", "SCT", "373068000", "Undetermined")
# The finding when the node did not analyse a series at all (SNOMED CT qualifier value
# "Not performed"): no model for it, not a chest, too small, undecodable.
NOT_ANALYSED = ClassCode("not_analysed", "SCT", "262008008", "Not performed")


@dataclass(frozen=True)
class Prediction:
    """The output of one model on one study: a probability per class, the decision rule that
    turned them into a label, and, when the model abstained, why.

    With an operating point (*positive_class* and *threshold*) the label is the positive class
    when its probability reaches the threshold, else the most probable other class; without
    one, the most probable class. When *indeterminate* gives a reason, the label is
    :data:`INDETERMINATE` (the probabilities are still reported).
    """

    model_name: str
    model_version: str
    task: str  # "cxr" or "ct"
    classes: tuple[ClassCode, ...]
    probabilities: tuple[float, ...]  # same order as classes, sums to 1 (calibrated)
    positive_class: str = ""
    threshold: float | None = None
    operating_point_note: str = ""  # how the threshold was chosen, for the SR
    indeterminate: str = ""  # reason the model abstained; "" when it did not

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise ValueError("model_name must be a non-empty string")
        if not isinstance(self.model_version, str) or not self.model_version.strip():
            raise ValueError("model_version must be a non-empty string")
        if len(self.model_name) > 64 or len(self.model_version) > 64:
            raise ValueError("model_name and model_version must be at most 64 characters")
        if self.task not in _TASKS:
            raise ValueError(f"task must be one of {_TASKS}, got {self.task!r}")
        classes = tuple(self.classes)
        probabilities = tuple(float(p) for p in self.probabilities)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "probabilities", probabilities)
        if len(classes) == 0:
            raise ValueError("classes must not be empty")
        if not all(isinstance(c, ClassCode) for c in classes):
            raise ValueError("classes must contain only ClassCode items")
        if len(probabilities) != len(classes):
            raise ValueError(
                f"probabilities has {len(probabilities)} values but classes has "
                f"{len(classes)}: lengths must match"
            )
        if len({c.name for c in classes}) != len(classes):
            raise ValueError("classes must have unique names")
        if len({(c.scheme, c.value) for c in classes}) != len(classes):
            raise ValueError("classes must have unique (scheme, value) codes")
        for p in probabilities:
            if not math.isfinite(p) or p < 0.0 or p > 1.0:
                raise ValueError(f"probabilities must be finite values in [0, 1], got {p!r}")
        total = math.fsum(probabilities)
        if abs(total - 1.0) > 1e-3:
            raise ValueError(f"probabilities must sum to 1 (got {total:.6f})")

        if self.threshold is not None:
            if self.positive_class not in [c.name for c in classes]:
                raise ValueError("a threshold needs positive_class to name one of the classes")
            if not 0.0 <= float(self.threshold) <= 1.0:
                raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")

    @property
    def _decided(self) -> int:
        p = self.probabilities
        if self.threshold is not None:
            k = [c.name for c in self.classes].index(self.positive_class)
            if p[k] >= self.threshold:
                return k
            others = [i for i in range(len(p)) if i != k]
            return max(others, key=p.__getitem__)
        return max(range(len(p)), key=p.__getitem__)

    @property
    def decided(self) -> ClassCode:
        """The class the decision rule picks, whether or not the model abstained."""
        return self.classes[self._decided]

    @property
    def label(self) -> ClassCode:
        """The finding: the decided class, or :data:`INDETERMINATE` when the model abstained."""
        return INDETERMINATE if self.indeterminate else self.decided

    @property
    def probability(self) -> float:
        """The probability of the decided class."""
        return self.probabilities[self._decided]

    def rule_text(self) -> str:
        """The operating point in words, for the SR and the command line."""
        if self.threshold is None:
            return "Label: the most probable class (no operating point set)."
        meaning = next(c.meaning for c in self.classes if c.name == self.positive_class)
        text = (
            f"Operating point: {meaning} is called when its probability is at least "
            f"{self.threshold:.3f}; otherwise the most probable other class."
        )
        return f"{text} {self.operating_point_note}".strip()


# --------------------------------------------------------------------------- codes

# Procedure reported (TID 1500 row 5). SNOMED CT procedure concepts, preferred terms.
CXR_PROCEDURE = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
CT_CHEST_PROCEDURE = hd.sr.CodedConcept("169069000", "SCT", "CT of chest")
_PROCEDURES = {"cxr": CXR_PROCEDURE, "ct": CT_CHEST_PROCEDURE}

# Unit of the per-class probabilities. A probability is dimensionless; UCUM expresses
# that as unity ("1") optionally carrying a curly-brace annotation, which is ignored for
# unit arithmetic but says what the number is. "{probability}" is therefore a valid UCUM
# unit that is equal to "1" and tells a reader the value is a probability in [0, 1].
PROBABILITY_UNIT = hd.sr.CodedConcept("{probability}", "UCUM", "probability")

# Concept name of the TEXT item that carries the disclaimer inside the measurement group
# (TID 1501 allows TEXT qualitative evaluations; DCM 121106 "Comment" is the generic
# concept for free text remarks).
_COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")

# The exact disclaimer in Series Description: it is what PACS series lists and SR viewers
# (e.g. dsrdump's header) show first.
SR_SERIES_DESCRIPTION = f"AI RESULT - {DISCLAIMER}"
SC_SERIES_DESCRIPTION = f"AI HEATMAP - {DISCLAIMER}"  # both well within LO's 64 characters

# Namespace for the name-based (UUID v5) UIDs below; under the 2.25 arc (ISO/IEC 9834-8),
# so no organisational UID root is needed, and the same inputs always give the same UID.
_UID_NAMESPACE = uuid.UUID("6f1c7a52-3d4b-5e8f-9a0b-1c2d3e4f5a6b")


def _name_uid(*parts: str) -> str:
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(0).join(parts)).int}"


# --------------------------------------------------------------------- source headers

# Attributes that the SR and SC copy as "Type 2" (present, possibly empty) from the source;
# some real inputs lack them altogether, which highdicom does not cope with.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
# Patient/Study/Equipment attributes live in these groups; Pixel Data, overlays, curves and
# private data never go into a header copy.
_HEADER_GROUPS = frozenset({0x0008, 0x0010, 0x0012, 0x0018, 0x0020, 0x0032, 0x0038})
_PERSON_NAMES = ("PatientName", "ReferringPhysicianName")
# VRs whose values pydicom can check; binary and sequence VRs are copied as they are.
_TEXT_VRS = frozenset(
    {
        "AE",
        "AS",
        "CS",
        "DA",
        "DS",
        "DT",
        "IS",
        "LO",
        "LT",
        "PN",
        "SH",
        "ST",
        "TM",
        "UC",
        "UI",
        "UR",
        "UT",
    }
)


def _check_source(ds: object, argname: str) -> Dataset:
    if not isinstance(ds, Dataset):
        raise ValueError(f"{argname} must be a pydicom Dataset, got {type(ds).__name__}")
    for kw in _REQUIRED_UIDS:
        if not ds.get(kw):
            raise ValueError(f"{argname} has no {kw}")
    return ds


# sequences of SOP Instance References (PS3.3 Table 10-11): both UIDs are Type 1 in each item
_SOP_REFERENCE_SEQUENCES = frozenset(
    {
        "ReferencedStudySequence",
        "ReferencedPatientSequence",
        "ReferencedVisitSequence",
        "ReferencedPerformedProcedureStepSequence",
        "ReferencedImageSequence",
    }
)


def _value_is_valid(elem: DataElement) -> bool:
    """Whether an element's value(s) are valid for its VR; a sequence when every item's
    elements are, and, for a sequence of SOP Instance References, each item has both UIDs
    (a source's malformed sequence is not copied into the results)."""
    if elem.VR == "SQ":
        for item in elem.value or []:
            if elem.keyword in _SOP_REFERENCE_SEQUENCES and not (
                item.get("ReferencedSOPClassUID") and item.get("ReferencedSOPInstanceUID")
            ):
                return False
            for tag in list(item.keys()):
                try:
                    inner = item[tag]
                except (ValueError, TypeError):
                    return False
                if not _value_is_valid(inner):
                    return False
        return True
    if elem.VR not in _TEXT_VRS or elem.value is None:
        return True
    values = elem.value if isinstance(elem.value, MultiValue | list | tuple) else [elem.value]
    try:
        for v in values:
            validate_value(elem.VR, v, config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def source_header(ds: Dataset) -> tuple[Dataset, list[DataElement]]:
    """What the builders copy from a source (``prepared=`` of :func:`build_sr`,
    :func:`build_sc` and :func:`build_pm`): made once when one source gets several results."""
    return _header(ds)


def _header(ds: Dataset) -> tuple[Dataset, list[DataElement]]:
    """A deep copy of the source's public header attributes, never touching Pixel Data.

    Returns the copy and the person-name elements held back from it (see below).

    - Missing Type 2 Patient/Study attributes are added empty (some real inputs lack
      them, which highdicom does not cope with).
    - Values invalid for their VR (e.g. Patient's Age "81") are emptied when Type 2 and
      dropped otherwise, so the outputs do not inherit the source's errors.
    - Person names are held back (returned separately, to be added to the output after
      highdicom has built it): highdicom warns on every single-component name such as
      "Anonymized", which real archives are full of, and the name must be copied as is.
    The source itself is left unchanged.
    """
    out = Dataset()
    for tag in list(ds.keys()):
        if tag.group not in _HEADER_GROUPS or tag.is_private:
            continue
        elem = ds[tag]
        if elem.keyword in _REQUIRED_UIDS or _value_is_valid(elem):
            out.add(copy.deepcopy(elem))
        elif elem.keyword in _TYPE2_PATIENT_STUDY:
            setattr(out, elem.keyword, None)
    for kw in _TYPE2_PATIENT_STUDY:
        if kw not in out:
            setattr(out, kw, None)
    if out.PatientSex not in ("M", "F", "O", "", None):
        out.PatientSex = None
    charset = charset_terms(out)
    if charset is not None:
        terms, unknown = charset
        if not any(terms):
            del out.SpecificCharacterSet  # empty means the default repertoire: say nothing
        elif unknown:
            # pydicom decoded the text with the default repertoire (and warned); the copy is
            # written in UTF-8, which holds whatever was decoded, instead of failing the job
            log.warning(
                "unknown character set %s in %s: its text is copied as UTF-8",
                "\\".join(unknown),
                ds.get("SOPInstanceUID", "?"),
            )
            out.SpecificCharacterSet = "ISO_IR 192"
    held_back = []
    for kw in _PERSON_NAMES:
        held_back.append(out[kw])
        del out[kw]
        setattr(out, kw, None)
    return out, held_back


def _as_list(value: object) -> list[object]:
    if value is None:
        return []
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


_LIBRARY_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "Rows", "Columns", "ImageLaterality", "PixelSpacing", "ImagerPixelSpacing",
    "ImageOrientationPatient", "ImagePositionPatient", "FrameOfReferenceUID", "PatientOrientation",
    "SliceThickness", "ViewPosition", "StudyDate", "StudyTime", "ContentDate", "ContentTime",
)  # fmt: skip


# highdicom adds TID 1603/1604 descriptors by Modality and needs all of their attributes
_PROJECTION = (
    {"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"},
    ("PatientOrientation", "ImagerPixelSpacing"),
)
_CROSS_SECTIONAL = ({"CT", "MR", "PT"},
                    ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",
                     "SliceThickness"))  # fmt: skip


def _library_entry(ds: Dataset) -> Dataset:
    """What the Image Library entry of *ds* is made from: its valid descriptive attributes.

    The modality-specific descriptors (orientation, pixel spacing, position) are given only
    when the image has all of them; otherwise the entry names the image without them (many
    real radiographs have no Patient Orientation or Imager Pixel Spacing)."""
    out = Dataset()
    for kw in _LIBRARY_KEYWORDS:
        if kw in ds and not ds[kw].is_empty and (kw.endswith("UID") or _value_is_valid(ds[kw])):
            out.add(copy.deepcopy(ds[kw]))
    if "PatientOrientation" in out and len(_as_list(out.PatientOrientation)) != 2:
        del out.PatientOrientation
    for modalities, needed in (_PROJECTION, _CROSS_SECTIONAL):
        if out.get("Modality") in modalities and not all(kw in out for kw in needed):
            # highdicom picks the descriptors by this attribute (the library's modality code
            # comes from the SOP class): a neutral value leaves them out
            out.Modality = "OT"
    out.setdefault("Modality", "OT")
    return out


def _uid_header(ds: Dataset) -> Dataset:
    out = Dataset()
    for kw in _REQUIRED_UIDS:
        setattr(out, kw, ds[kw].value)
    return out


def _check_sources(sources: Sequence[Dataset]) -> list[Dataset]:
    if isinstance(sources, Dataset) or not isinstance(sources, Sequence):
        raise ValueError("sources must be a sequence of pydicom Datasets (not a single Dataset)")
    if len(sources) == 0:
        raise ValueError("sources must not be empty")
    checked = [_check_source(ds, f"sources[{i}]") for i, ds in enumerate(sources)]
    studies = {str(ds.StudyInstanceUID) for ds in checked}
    if len(studies) != 1:
        raise ValueError(
            f"sources must all belong to one study; got StudyInstanceUIDs {sorted(studies)}"
        )
    patients = {str(ds.get("PatientID") or "") for ds in checked}
    if len(patients - {""}) > 1:
        raise ValueError(f"sources must all belong to one patient; got PatientIDs {patients}")
    # Drop repeated instances (a re-sent image), keeping the first; order is preserved.
    seen: set[str] = set()
    unique = []
    for ds in checked:
        if str(ds.SOPInstanceUID) not in seen:
            seen.add(str(ds.SOPInstanceUID))
            unique.append(ds)
    return unique


def _check_new_uids(
    sources: Sequence[Dataset], series_instance_uid: str, sop_instance_uid: str
) -> None:
    """The output must go into a new series, as a new instance."""
    for ds in sources:
        if str(ds.SeriesInstanceUID) == series_instance_uid:
            raise ValueError("series_instance_uid must be new, not a source's SeriesInstanceUID")
        if str(ds.SOPInstanceUID) == sop_instance_uid:
            raise ValueError("sop_instance_uid must be new, not a source's SOPInstanceUID")


def _check_common(
    prediction: Prediction,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    manufacturer: str,
    software_version: str,
) -> None:
    if not isinstance(prediction, Prediction):
        raise ValueError(f"prediction must be a Prediction, got {type(prediction).__name__}")
    for name, value in (
        ("series_instance_uid", series_instance_uid),
        ("sop_instance_uid", sop_instance_uid),
    ):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty UID string")
        if len(value) > 64 or not re.fullmatch(RE_VALID_UID, value):
            raise ValueError(f"{name} is not a valid DICOM UID: {value!r}")
    for name, num in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= 2**31 - 1:
            raise ValueError(f"{name} must be a positive integer, got {num!r}")
    for name, text in (("manufacturer", manufacturer), ("software_version", software_version)):
        if not isinstance(text, str) or not text.strip() or len(text) > 64:
            raise ValueError(f"{name} must be a non-empty string of at most 64 characters")


def _ai_equipment(prediction: Prediction, manufacturer: str) -> hd.ContributingEquipment:
    """IHE AI Results-style Contributing Equipment item describing the AI model."""
    return hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=prediction.model_name,
        software_versions=prediction.model_version,
        contribution_description=(
            f"AI inference ({prediction.task}) by {prediction.model_name} "
            f"{prediction.model_version}. {DISCLAIMER}"
        ),
    )


# ------------------------------------------------------------------------------- SR


HOT_SPOT_LEVEL = 0.5  # a Grad-CAM hot spot: where the map reaches this share of its maximum
# The tracking identifier viewers built on cornerstone3D (OHIF v3) read a closed 5-point
# polyline under as a rectangle: with it OHIF loads the region as a measurement it can show
# (labelled by the group's Finding) instead of leaving the SR blank.
OHIF_RECTANGLE = "Cornerstone3DTools@^0.1.0:RectangleROI"


@dataclass(frozen=True)
class Region:
    """Where an explained image's Grad-CAM map is hottest: a box in that image's pixel
    coordinates (column, row of the top-left and bottom-right corners, PS3.3 C.18.6.1.1),
    shown as a closed polyline (SCOORD) over the image by viewers that read TID 1500 regions."""

    source: Dataset  # the image (its header is enough)
    box: tuple[float, float, float, float]  # x0, y0, x1, y1

    def graphic_data(self) -> np.ndarray:
        x0, y0, x1, y1 = self.box
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def hot_spot(
    heatmap: np.ndarray, level: float = HOT_SPOT_LEVEL
) -> tuple[float, float, float, float] | None:
    """The box around the connected part of *heatmap* (image frame, [0, 1]) at or above
    *level* times its maximum that holds the maximum; None for an empty map."""
    heat = np.asarray(heatmap, dtype=np.float32)
    peak = float(heat.max()) if heat.size else 0.0
    if not np.isfinite(peak) or peak <= 0.0:
        return None
    mask = (heat >= level * peak).astype(np.uint8)
    _, labels = cv2.connectedComponents(mask, connectivity=8)
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    rows, cols = np.nonzero(labels == labels[row, col])
    # pixel (c, r) covers [c, c + 1) x [r, r + 1) in SCOORD's frame
    return float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)


@dataclass(frozen=True)
class SrReference:
    """An SR the node made earlier, as the Hierarchical SOP Instance Reference Macro names it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str


def add_predecessor(sr: Dataset, earlier: SrReference) -> None:
    """Record in *sr* that it replaces *earlier* (a report of the same series made before all
    of it had arrived): the Predecessor Documents Sequence of the SR Document General module
    (PS3.3 C.17.2), which viewers and PACS follow to the version it supersedes."""
    sop = Dataset()
    sop.ReferencedSOPClassUID = earlier.sop_class_uid
    sop.ReferencedSOPInstanceUID = earlier.sop_instance_uid
    series = Dataset()
    series.SeriesInstanceUID = earlier.series_instance_uid
    series.ReferencedSOPSequence = [sop]
    item = Dataset()
    item.StudyInstanceUID = earlier.study_instance_uid
    item.ReferencedSeriesSequence = [series]
    forget_encoding(sr)
    sr.PredecessorDocumentsSequence = [item]


def build_sr(
    sources: Sequence[Dataset],
    prediction: Prediction,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9901,
    instance_number: int = 1,
    manufacturer: str = "pacs-node",
    software_version: str,
    regions: Sequence[Region] = (),
    use_template: bool = True,
    prepared: tuple[Dataset, list[DataElement]] | None = None,
) -> Dataset:
    """Build a Comprehensive SR (TID 1500 Measurement Report) holding ``prediction``.

    Comprehensive, not Comprehensive 3D: every coordinate is a 2-D SCOORD on an image, and
    OHIF v3 hands Comprehensive 3D SRs to its microscopy extension, which shows nothing for
    a radiograph or CT.

    ``sources`` are the (header-only is enough) datasets of every image the model saw, all
    from one study; the SR joins that study in a new series and references every image. Without
    ``regions`` one measurement group (TID 1501) holds the finding and the probabilities for all
    of them, and the Image Library lists them all. Each of ``regions`` (the Grad-CAM hot spot of
    an explained image) instead gives a planar ROI group (TID 1410): the box as a SCOORD on that
    image, with the finding and the probabilities, which OHIF and other viewers draw over the
    image; the Image Library then lists those images.

    Parameters
    ----------
    use_template:
        Fill in the SR highdicom built for an earlier input of the same shape (see
        :mod:`ai.templates`): the same bytes, a millisecond instead of ~25.
    prepared:
        ``_header(sources[0])``, when the caller has it already.

    Returns
    -------
    pydicom.dataset.Dataset
        The SR, with file meta, ready to be written.
    """
    srcs = _check_sources(sources)
    _check_common(
        prediction,
        series_instance_uid,
        sop_instance_uid,
        series_number,
        instance_number,
        manufacturer,
        software_version,
    )
    _check_new_uids(srcs, series_instance_uid, sop_instance_uid)
    header, person_names = prepared or _header(srcs[0])
    regions = list(regions)
    uids = [str(ds.SOPInstanceUID) for ds in srcs]
    for region in regions:
        if str(region.source.SOPInstanceUID) not in uids:
            raise ValueError("a region must be on one of the sources")
    placed = tuple(uids.index(str(r.source.SOPInstanceUID)) for r in regions)
    library = [r.source for r in regions] if regions else srcs  # the Image Library's images
    key = _sr_shape(
        srcs, header, person_names, prediction,
        (series_number, instance_number, manufacturer, software_version, placed,
         _library_values(library)),
    )  # fmt: skip
    own = _sr_own_uids(series_instance_uid, sop_instance_uid, len(regions))

    def values(copied: frozenset[int]) -> dict[Any, Value]:
        return _sr_values(srcs, header, person_names, prediction, regions, own, copied)

    if use_template:
        template = SR_TEMPLATES.get(key)
        if template is not None and template.info.fits(header):
            return read_template(template.fill(values(template.info.copied)))
    sr = _build_sr(
        srcs,
        header,
        person_names,
        prediction,
        regions,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        instance_number=instance_number,
        manufacturer=manufacturer,
        software_version=software_version,
    )
    if use_template and SR_TEMPLATES.undecided(key):
        kept = _Kept.of(sr, header, person_names, str(srcs[0].SOPClassUID))
        if kept is not None:
            SR_TEMPLATES.offer(
                key,
                sr,
                _sr_rule(_uid_roles(srcs, own), kept.copied),
                lambda: values(kept.copied),
                kept,
            )
    return sr


# what highdicom's Image Library entry may say of an image besides its UIDs (substituted) and
# dates (which it does not list; a test checks): a template is for images that share them
_LIBRARY_SHAPE = tuple(
    kw
    for kw in _LIBRARY_KEYWORDS
    if kw not in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    and kw not in ("StudyDate", "StudyTime", "ContentDate", "ContentTime")
)


def _library_values(library: Sequence[Dataset]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(str(ds.get(kw, "")) for kw in _LIBRARY_SHAPE) for ds in library)


@dataclass(frozen=True)
class _Kept:
    """What a template keeps besides its bytes: the root attributes filled in from the source
    (*copied*), and those it holds with the value the source had that are not filled in
    (*frozen*: a fill is only for a source with the same values)."""

    copied: frozenset[int]
    frozen: tuple[tuple[int, str], ...]

    @classmethod
    def of(
        cls, built: Dataset, header: Dataset, person_names: Sequence[DataElement], sop_class: str
    ) -> _Kept | None:
        """None when *built* holds a Patient or Study attribute it did not copy as it was (a
        template could give another patient's value): such results are always built."""
        copied = _copied_tags(built, header, person_names, sop_class)
        for kw in _patient_study_keywords(sop_class):
            if kw in built and int(built[kw].tag) not in copied:
                return None
        frozen = []
        for elem in built:
            tag = int(elem.tag)
            if tag in copied or elem.VR in ("SQ", "UI") or tag not in header:
                continue
            if header[tag].value == elem.value:
                frozen.append((tag, str(elem.value)))
        return cls(copied, tuple(frozen))

    def fits(self, header: Dataset) -> bool:
        for tag, value in self.frozen:
            elem = header.get(tag)
            if elem is None or str(elem.value) != value:
                return False
        return True


# Procedure reported when nothing was analysed: SNOMED CT "Imaging (procedure)".
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging")
NOT_ANALYSED_ALGORITHM = "pacs-node"  # the node decided, not a model


def build_not_analysed_sr(
    sources: Sequence[Dataset],
    reason: str,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9901,
    manufacturer: str = "pacs-node",
    software_version: str,
) -> Dataset:
    """A TID 1500 SR saying the node did **not** analyse these images, and why.

    So that a radiologist can tell "not analysed" from "not yet": the finding is
    :data:`NOT_ANALYSED` ("Not performed"), the reason and the disclaimer are comments, the
    images are referenced; no probabilities. Header-only *sources* are enough.
    """
    srcs = _check_sources(sources)
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("reason must be a non-empty string")
    _check_new_uids(srcs, series_instance_uid, sop_instance_uid)
    header, person_names = _header(srcs[0])
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_name_uid("tracking", sop_instance_uid), identifier="AI analysis not performed"
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=NOT_ANALYSED_ALGORITHM, version=software_version[:64]
        ),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=NOT_ANALYSED.coded_concept())
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
            )
            for ds in srcs
        ],
    )
    _add_comments(group, (DISCLAIMER, f"Not analysed: {reason}"[:1024]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=_device_context(
                NOT_ANALYSED_ALGORITHM, software_version, manufacturer
            )
        ),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=[group],
    )
    return _sr_document(
        srcs,
        header,
        person_names,
        report,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        instance_number=1,
        manufacturer=manufacturer,
        equipment=hd.ContributingEquipment(
            manufacturer=manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=NOT_ANALYSED_ALGORITHM,
            software_versions=software_version,
            contribution_description=f"AI analysis not performed: {reason[:900]}. {DISCLAIMER}",
        ),
        series_description=f"AI NOT ANALYSED - {DISCLAIMER}"[:64],
        model_name=NOT_ANALYSED_ALGORITHM,
        software_version=software_version,
    )


def _build_sr(
    srcs: list[Dataset],
    header: Dataset,
    person_names: list[DataElement],
    prediction: Prediction,
    regions: Sequence[Region],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    manufacturer: str,
    software_version: str,
) -> Dataset:
    """The SR as highdicom builds it (checked arguments)."""
    observation_context = hd.sr.ObservationContext(
        observer_device_context=_device_context(
            prediction.model_name, prediction.model_version, manufacturer
        )
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=prediction.model_name, version=prediction.model_version
    )

    def measurements() -> list[Any]:
        # One NUM item per class. The concept name is the class's own code: the value is the
        # model's probability that this code applies to the study, and the unit
        # "{probability}" (UCUM unity, see PROBABILITY_UNIT) says so. DICOM has no generic
        # "probability of <X>" concept, and post-coordinating the class as a finding site or
        # modifier would misuse those rows, so naming the number by the class is the most
        # direct defensible encoding (and matches the Finding value for the winning class).
        return [
            hd.sr.Measurement(name=cls.coded_concept(), value=round(prob, 6), unit=PROBABILITY_UNIT)
            for cls, prob in zip(prediction.classes, prediction.probabilities, strict=True)
        ]

    def finding() -> Any:
        return hd.sr.QualitativeEvaluation(
            name=codes.DCM.Finding, value=prediction.label.coded_concept()
        )

    # The disclaimer as content: TEXT items (DCM 121106 "Comment") in each measurement group,
    # next to the CODE qualitative evaluation (TID 1501 has TEXT as well as CODE qualitative
    # evaluations; dciodvfy and highdicom's reader accept it).
    notes = [f"AI finding: {prediction.label.meaning}", DISCLAIMER, prediction.rule_text()[:1024]]
    if prediction.indeterminate:
        notes.append(f"Not determined: {prediction.indeterminate}"[:1024])

    # With regions, the finding, probabilities and notes are given in each region's group and
    # there is no group without a region: OHIF v3 (3.13) fails on an SR that mixes the two
    # (it takes every group to have coordinates) and shows a group's comments as its labels.
    groups: list[Any] = []
    if not regions:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=_name_uid("tracking", sop_instance_uid),
                    identifier=f"{prediction.model_name} {prediction.task} classification"[:64],
                ),
                algorithm_id=algorithm,
                measurements=measurements(),
                qualitative_evaluations=[finding()],
                source_images=[
                    hd.sr.SourceImageForMeasurementGroup(
                        referenced_sop_class_uid=ds.SOPClassUID,
                        referenced_sop_instance_uid=ds.SOPInstanceUID,
                    )
                    for ds in srcs
                ],
            )
        )
    for number, region in enumerate(regions, start=1):
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=_name_uid("tracking", sop_instance_uid, str(number)),
                    identifier=OHIF_RECTANGLE,
                ),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=region.graphic_data(),
                    source_image=hd.sr.SourceImageForRegion(
                        referenced_sop_class_uid=region.source.SOPClassUID,
                        referenced_sop_instance_uid=region.source.SOPInstanceUID,
                    ),
                ),
                finding_type=prediction.label.coded_concept(),
                algorithm_id=algorithm,
                measurements=measurements(),
                qualitative_evaluations=[finding()],
            )
        )
    for group in groups:
        _add_comments(group, notes)
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=_PROCEDURES[prediction.task],
        imaging_measurements=groups,
        # the Image Library lists the images the groups reference: the regions' images, or
        # every image when the one group references them all (a CT's 300 slices need not be
        # described when three carry the result; every image is in the evidence either way)
        referenced_images=[
            _library_entry(ds) for ds in ([r.source for r in regions] if regions else srcs)
        ],
    )
    return _sr_document(
        srcs,
        header,
        person_names,
        report,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        instance_number=instance_number,
        manufacturer=manufacturer,
        equipment=_ai_equipment(prediction, manufacturer),
        series_description=SR_SERIES_DESCRIPTION,
        model_name=prediction.model_name,
        software_version=software_version,
    )


def _device_context(name: str, version: str, manufacturer: str) -> Any:
    """The observer of an SR: the device (a model, or the node) that made it."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_name_uid("device", name, version),
            name=name,
            manufacturer_name=manufacturer,
            model_name=f"{name} {version}"[:64],
        ),
    )


def _add_comments(group: Any, notes: Sequence[str]) -> None:
    """Each note as a TEXT "Comment" item at the end of a measurement group."""
    for note in notes:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=_COMMENT, value=note, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )


def _sr_document(
    srcs: Sequence[Dataset],
    header: Dataset,
    person_names: Sequence[DataElement],
    report: Any,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    manufacturer: str,
    equipment: hd.ContributingEquipment,
    series_description: str,
    model_name: str,
    software_version: str,
) -> Dataset:
    """The Comprehensive SR around *report*, in the study of *srcs*: PRELIMINARY (nobody has
    verified an AI result), UNVERIFIED, the source's person names added back."""
    sr = hd.sr.ComprehensiveSR(
        evidence=[header] + [_uid_header(ds) for ds in srcs[1:]],
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[equipment],
        series_description=series_description,
        manufacturer_model_name=model_name,
        software_versions=software_version,
    )
    for elem in person_names:
        sr.add(elem)
    return sr


def _sr_shape(
    srcs: Sequence[Dataset],
    header: Dataset,
    person_names: Sequence[DataElement],
    prediction: Prediction,
    settings: tuple[Any, ...],
) -> tuple[Any, ...]:
    """What decides an SR's structure and constant text (see :mod:`ai.templates`): the model
    and its classes, the label and whether it is indeterminate, the stated rule, the number of
    source images with their SOP classes and how they fall into series, and which header
    attributes the first source has (and which are empty). The rest is filled in: the UIDs
    (the SR's, its tracking identifiers, the sources'), the probabilities, the regions' boxes,
    the reason an input is indeterminate, the Patient and Study attributes and the times."""
    series = [str(ds.SeriesInstanceUID) for ds in srcs]
    return (
        "SR",
        prediction.model_name,
        prediction.model_version,
        prediction.task,
        tuple(c.name for c in prediction.classes),
        prediction.label.name,
        bool(prediction.indeterminate),
        prediction.rule_text(),
        tuple(str(ds.SOPClassUID) for ds in srcs),
        tuple(series.index(s) for s in series),
        _header_shape(header, person_names),
        settings,
    )


def _header_shape(header: Dataset, person_names: Sequence[DataElement]) -> tuple[Any, ...]:
    return (
        tuple((int(e.tag), e.VR, e.is_empty) for e in header),
        str(header.get("SpecificCharacterSet", "")),
        tuple((int(e.tag), e.is_empty) for e in person_names),
    )


# by the attribute a UID sits in: a study and a series may share a UID (seen in real files),
# and each must still become its own new one
_UID_KIND = {
    "StudyInstanceUID": "study",
    "SeriesInstanceUID": "series",
    "SOPInstanceUID": "instance",
    "ReferencedSOPInstanceUID": "instance",
    "MediaStorageSOPInstanceUID": "instance",
}
# set to the time of building
_NOW_KEYWORDS = frozenset(
    {
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ContentDate",
        "ContentTime",
        "DateOfSecondaryCapture",
        "TimeOfSecondaryCapture",
    }
)
_NOW_VR = {"DA": "%Y%m%d", "TM": "%H%M%S.%f", "DT": "%Y%m%d%H%M%S.%f"}


def _uid_roles(
    srcs: Sequence[Dataset], own: Mapping[str, str]
) -> dict[tuple[str, str], tuple[Any, ...]]:
    """(kind, UID) -> role: the sources' study, series and instance UIDs, and *own* (role ->
    UID of the kind ""; "series" and "sop" are the result's own series and instance)."""
    roles: dict[tuple[str, str], tuple[Any, ...]] = {}
    for i, ds in enumerate(srcs):
        for kind, uid in zip(("study", "series", "instance"), _uids_of(ds), strict=True):
            roles.setdefault((kind, uid), ("src", i, kind))
    for role, uid in own.items():
        kind = {"series": "series", "sop": "instance"}.get(role, "")
        roles[(kind, uid)] = ("own", role)
    return roles


def _uid_values(srcs: Sequence[Dataset], own: Mapping[str, str]) -> dict[Any, str]:
    values: dict[Any, str] = {}
    for i, ds in enumerate(srcs):
        for kind, uid in zip(("study", "series", "instance"), _uids_of(ds), strict=True):
            values[("uid", ("src", i, kind))] = uid
    for role, uid in own.items():
        values[("uid", ("own", role))] = uid
    return values


def _common_rule(
    roles: Mapping[tuple[str, str], tuple[Any, ...]], copied: frozenset[int]
) -> Callable[[DataElement, tuple[Dataset, ...]], Any]:
    """The slots every result has: UIDs by role, the root attributes copied from the source
    (*copied* tags) and the times of building."""

    def rule(elem: DataElement, parents: tuple[Dataset, ...]) -> Any:
        if elem.VR == "UI" and isinstance(elem.value, str):
            role = roles.get((_UID_KIND.get(elem.keyword, ""), elem.value))
            return None if role is None else ("uid", role)
        if not parents:
            if int(elem.tag) in copied:
                return ("top", int(elem.tag))
            if elem.keyword in _NOW_KEYWORDS:
                return ("now", elem.VR)
        elif elem.keyword == "ContributionDateTime":
            return ("now", "DT")
        return None

    return rule


def _common_values(
    header: Dataset, person_names: Sequence[DataElement], copied: frozenset[int]
) -> dict[Any, Value]:
    now = datetime.datetime.now()
    values: dict[Any, Value] = {("now", vr): now.strftime(fmt) for vr, fmt in _NOW_VR.items()}
    for elem in person_names:
        values[("top", int(elem.tag))] = elem
    for tag in copied:
        if ("top", tag) not in values:
            values[("top", tag)] = header[tag]
    return values


def _copied_tags(
    built: Dataset, header: Dataset, person_names: Sequence[DataElement], sop_class_uid: str
) -> frozenset[int]:
    """The root attributes *built* took from the source: its person names, and the Patient
    and Study attributes of the source's IOD that it holds with the header's value."""
    tags = {int(e.tag) for e in person_names}
    for kw in _patient_study_keywords(sop_class_uid):
        if kw in built and kw in header and built[kw].value == header[kw].value:
            tags.add(int(header[kw].tag))
    return frozenset(tags)


def _sr_rule(
    roles: Mapping[tuple[str, str], tuple[Any, ...]], copied: frozenset[int]
) -> Callable[[], Callable[[DataElement, tuple[Dataset, ...]], Any]]:
    """The SR's slots: the common ones, each measurement group's probabilities, each region's
    box and the indeterminate reason; an Image Library entry keeps its numbers (they
    describe the image)."""

    def make() -> Callable[[DataElement, tuple[Dataset, ...]], Any]:
        common = _common_rule(roles, copied)
        counts = {"prob": 0, "graphic": 0}

        def rule(elem: DataElement, parents: tuple[Dataset, ...]) -> Any:
            name = common(elem, parents)
            if name is not None or any(_is_image_library(p) for p in parents):
                return name
            kind = {"MeasuredValueSequence": "prob", "GraphicData": "graphic"}.get(elem.keyword)
            if kind is not None:
                counts[kind] += 1
                return (kind, counts[kind] - 1)
            if elem.keyword == "TextValue" and str(elem.value).startswith("Not determined: "):
                return ("reason",)
            return None

        return rule

    return make


def _sr_values(
    srcs: Sequence[Dataset],
    header: Dataset,
    person_names: Sequence[DataElement],
    prediction: Prediction,
    regions: Sequence[Region],
    own: Mapping[str, str],
    copied: frozenset[int],
) -> dict[Any, Value]:
    values = _common_values(header, person_names, copied)
    values.update(_uid_values(srcs, own))
    probabilities = [_probability_ds(p) for p in prediction.probabilities]
    # every measurement group holds the probabilities: each region's, or the one group's
    for n in range(len(probabilities) * max(1, len(regions))):
        values[("prob", n)] = DataElement(0x0040A300, "SQ", [probabilities[n % len(probabilities)]])
    for n, region in enumerate(regions):
        values[("graphic", n)] = DataElement(
            0x00700022, "FL", [float(v) for v in region.graphic_data().ravel()]
        )
    values[("reason",)] = f"Not determined: {prediction.indeterminate}"[:1024]
    return values


def _sr_own_uids(series_instance_uid: str, sop_instance_uid: str, n_regions: int) -> dict[str, str]:
    own = {
        "series": series_instance_uid,
        "sop": sop_instance_uid,
        "tracking": _name_uid("tracking", sop_instance_uid),
    }
    for number in range(1, n_regions + 1):
        own[f"tracking{number}"] = _name_uid("tracking", sop_instance_uid, str(number))
    return own


SR_TEMPLATES = Templates()
IMAGE_TEMPLATES = Templates(size=16)  # secondary captures and maps: up to ~1 MB each


def _uids_of(ds: Dataset) -> tuple[str, str, str]:
    return (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


def _probability_ds(probability: float) -> Dataset:
    """A probability's measured value item, as highdicom's NumContentItem writes it (a test
    compares the two)."""
    value = round(float(probability), 6)
    item = Dataset()
    item.NumericValue = DS(value, auto_format=True)
    item.FloatingPointValue = value
    item.MeasurementUnitsCodeSequence = [PROBABILITY_UNIT]
    return item


def _is_image_library(item: Dataset) -> bool:
    names = item.get("ConceptNameCodeSequence")
    return bool(names) and (names[0].get("CodingSchemeDesignator"), names[0].get("CodeValue")) == (
        "DCM",
        "111028",
    )


@functools.cache
def _patient_study_keywords(sop_class_uid: str) -> tuple[str, ...]:
    """The root attributes of the Patient and Study modules of the source's IOD: what
    highdicom copies from the first source into the SR."""
    from highdicom._standard_utils import (
        get_iod_module_map,
        get_module_attribute_map,
        get_sop_class_iod_map,
    )

    iod = get_sop_class_iod_map().get(sop_class_uid)
    if iod is None:
        return ()
    keywords = []
    for module in get_iod_module_map()[iod]:
        if module["ie"] in ("Patient", "Study"):
            keywords += [
                str(item["keyword"])
                for item in get_module_attribute_map()[module["key"]]
                if len(item["path"]) == 0
            ]
    return tuple(dict.fromkeys(keywords))


# -------------------------------------------------------------------------- overlay

_MIN_LONG_SIDE = 512
_MAX_LONG_SIDE = 1024
_ALPHA = 0.4
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def overlay_lines(prediction: Prediction, extra: str = "") -> list[str]:
    """The text burned into the secondary capture."""
    label = prediction.label
    head = (
        f"{label.meaning} ({prediction.decided.meaning} {prediction.probability:.2f})"
        if prediction.indeterminate
        else f"{label.meaning} {prediction.probability:.2f}"
    )
    lines = [f"{head} ({prediction.model_name} {prediction.model_version})", DISCLAIMER]
    if prediction.indeterminate:
        reason = f"Not determined: {prediction.indeterminate}"
        lines.append(reason if len(reason) <= 64 else reason[:61].rstrip() + "...")
    if extra:
        lines.append(extra)
    return lines


def _as_unit_2d(arr: np.ndarray, argname: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{argname} must be a non-empty 2-D array, got shape {a.shape}")
    if not (
        np.issubdtype(a.dtype, np.floating)
        or np.issubdtype(a.dtype, np.integer)
        or a.dtype == np.bool_
    ):
        raise ValueError(f"{argname} must be numeric, got dtype {a.dtype}")
    a = np.array(a, dtype=np.float32)  # a copy: clipped in place
    if not np.isfinite(a).all():
        a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(a, 0.0, 1.0, out=a)


def render_overlay(image: np.ndarray, heatmap: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Gray image + JET heatmap (alpha up to 0.4 where the heatmap is high) + text band.

    ``image`` is a 2-D display image in [0, 1] (already windowed; MONOCHROME1 already
    inverted), ``heatmap`` a 2-D map in [0, 1] of any size. The result is uint8 RGB,
    rescaled (aspect kept) so that its long side is between 512 and 1024 pixels.
    """
    img = _as_unit_2d(image, "image")
    heat = _as_unit_2d(heatmap, "heatmap")
    if isinstance(lines, str):
        raise ValueError("lines must be a sequence of strings, not a single string")
    text = [str(s).encode("ascii", "replace").decode("ascii") for s in lines if str(s).strip()]

    h, w = img.shape
    long_side = max(h, w)
    target = min(max(long_side, _MIN_LONG_SIDE), _MAX_LONG_SIDE)
    if target != long_side:
        scale = target / long_side
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        img = cv2.resize(img, size, interpolation=interp)
        np.clip(img, 0.0, 1.0, out=img)
        h, w = img.shape
    heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    np.clip(heat, 0.0, 1.0, out=heat)

    # x 255 rounded to 8 bits by OpenCV (in [0, 1] already, so its absolute value is moot)
    gray = cv2.cvtColor(cv2.convertScaleAbs(img, alpha=255.0), cv2.COLOR_GRAY2RGB)
    jet = cv2.applyColorMap(cv2.convertScaleAbs(heat, alpha=255.0), cv2.COLORMAP_JET)
    jet = cv2.cvtColor(jet, cv2.COLOR_BGR2RGB)
    alpha = cv2.multiply(heat, _ALPHA)
    # gray * (1 - alpha) + jet * alpha, rounded: OpenCV's 2 ms against numpy's 13 for 512x512
    out = cv2.blendLinear(gray, jet, 1.0 - alpha, alpha)

    if text:
        _burn_text(out, text)
    return np.ascontiguousarray(out)


def _burn_text(out: np.ndarray, lines: list[str]) -> None:
    h, w = out.shape[:2]
    margin = max(4, w // 100)
    scale = max(0.4, min(h, w) / 900.0)
    thickness = max(1, round(scale * 1.6))
    # Shrink the font until the widest line fits across the image.
    while scale > 0.3:
        widest = max(cv2.getTextSize(s, _FONT, scale, thickness)[0][0] for s in lines)
        if widest <= w - 2 * margin:
            break
        scale *= 0.9
        thickness = max(1, round(scale * 1.6))
    (_, text_h), baseline = cv2.getTextSize("Ag", _FONT, scale, thickness)
    line_h = text_h + baseline + margin // 2
    band_h = min(h, margin + line_h * len(lines))
    # Dark, mostly opaque band so the white text is readable over any image.
    band = out[:band_h].astype(np.float32) * 0.2
    out[:band_h] = band.astype(np.uint8)
    y = margin + text_h
    for s in lines:
        if y > h:
            break
        cv2.putText(out, s, (margin, y), _FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
        y += line_h


# ------------------------------------------------------------------------------- SC

_ORIENTATION_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


def _patient_orientation(ds: Dataset) -> list[str] | None:
    """Patient Orientation of the source: its own, or derived from Image Orientation."""
    po = ds.get("PatientOrientation")
    if po is not None and not isinstance(po, str) and len(po) == 2:
        values = [str(v) for v in po]
        if all(v and set(v) <= set("APRLHF") for v in values):
            return values
    iop = ds.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        try:
            vec = [float(v) for v in iop]
        except (TypeError, ValueError):
            return None
        result = []
        for direction in (vec[:3], vec[3:]):
            axis = max(range(3), key=lambda i: abs(direction[i]))
            if abs(direction[axis]) < 1e-3:
                return None
            pos, neg = _ORIENTATION_LETTERS[axis]
            result.append(pos if direction[axis] > 0 else neg)
        return result
    return None


def build_sc(
    source: Dataset,
    overlay_rgb: np.ndarray,
    prediction: Prediction,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9902,
    instance_number: int = 1,
    manufacturer: str = "pacs-node",
    software_version: str,
    use_template: bool = True,
    prepared: tuple[Dataset, list[DataElement]] | None = None,
) -> Dataset:
    """Build an RGB Secondary Capture of ``overlay_rgb`` in the study of ``source``.

    ``overlay_rgb`` (uint8 HxWx3, from :func:`render_overlay`) must be a rescaled, not
    rotated/flipped, rendering of ``source``: the source's patient orientation is reused.
    """
    src = _check_source(source, "source")
    _check_common(
        prediction,
        series_instance_uid,
        sop_instance_uid,
        series_number,
        instance_number,
        manufacturer,
        software_version,
    )
    _check_new_uids([src], series_instance_uid, sop_instance_uid)
    pixels = np.asarray(overlay_rgb)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"overlay_rgb must have shape (rows, columns, 3), got {pixels.shape}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"overlay_rgb must have dtype uint8, got {pixels.dtype}")
    if max(pixels.shape[:2]) > 65535:
        raise ValueError("overlay_rgb is too large for a DICOM image")

    header, person_names = prepared or _header(src)
    orientation = _patient_orientation(src)
    comments = f"{DISCLAIMER}. {overlay_lines(prediction)[0]}. Grad-CAM heatmap overlay."
    key = (
        "SC",
        *_image_shape(src, header, person_names, prediction),
        tuple(orientation or ()),
        pixels.shape,
        (series_number, instance_number, manufacturer, software_version),
    )
    own = {"series": series_instance_uid, "sop": sop_instance_uid}

    def values(copied: frozenset[int]) -> dict[Any, Value]:
        return _image_values(src, header, person_names, own, copied, pixels, comments)

    template = IMAGE_TEMPLATES.get(key) if use_template else None
    if template is not None and template.info.fits(header):
        return read_template(template.fill(values(template.info.copied)))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=np.ascontiguousarray(pixels),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        # A secondary capture of a patient image: PATIENT (SLIDE is for microscopy). The
        # PATIENT coordinate system needs Patient Orientation; a placeholder is passed and
        # replaced below by the source's orientation, or left empty (Type 2C) when unknown.
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=("L", "F"),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[_ai_equipment(prediction, manufacturer)],
        series_description=SC_SERIES_DESCRIPTION,
        manufacturer_model_name=prediction.model_name,
        software_versions=software_version,
    )
    sc.PatientOrientation = orientation or []  # empty (Type 2C) when unknown
    # All Patient and Study module attributes, as the SR does, so both join the same study.
    sc.copy_patient_and_study_information(header)
    for elem in person_names:
        sc.add(elem)
    # Both tasks are chest models (the SR reports a chest procedure), so the body part is
    # the source's, or CHEST when the source does not say. Chest is unpaired, so General
    # Series Laterality (Type 2C) is only copied when the source gives one.
    sc.BodyPartExamined = header.get("BodyPartExamined") or "CHEST"
    if src.get("Laterality") in ("R", "L"):
        sc.Laterality = src.Laterality

    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = comments
    sc.DerivationDescription = (
        f"Grad-CAM heatmap of {prediction.model_name} {prediction.model_version} "
        f"blended over the source image, with burned-in text. {DISCLAIMER}"
    )
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    ref.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")
    ]
    sc.SourceImageSequence = [ref]
    # A derivative of a lossy-compressed image is itself lossy (PS3.3 C.7.6.1.1.5).
    if str(src.get("LossyImageCompression", "")) == "01":
        sc.LossyImageCompression = "01"
        for kw in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if kw in src:
                setattr(sc, kw, copy.deepcopy(src[kw].value))
    if use_template:
        _offer_image(key, sc, src, header, person_names, own, values)
    return sc


def _image_shape(
    src: Dataset, header: Dataset, person_names: Sequence[DataElement], prediction: Prediction
) -> tuple[Any, ...]:
    """What decides a secondary capture's or Parametric Map's constant content, besides its
    size (see :mod:`ai.templates`); the UIDs, the Patient and Study attributes, the times,
    the pixels and the Image Comments are filled in."""
    lossy = tuple(
        str(src.get(kw, ""))
        for kw in (
            "LossyImageCompression",
            "LossyImageCompressionRatio",
            "LossyImageCompressionMethod",
        )
    )
    return (
        prediction.model_name,
        prediction.model_version,
        prediction.task,
        tuple(c.name for c in prediction.classes),
        prediction.label.name,
        str(src.SOPClassUID),
        _header_shape(header, person_names),
        str(header.get("BodyPartExamined", "")),
        str(src.get("Laterality", "")),
        lossy,
    )


def _image_rule(
    roles: Mapping[tuple[str, str], tuple[Any, ...]], copied: frozenset[int]
) -> Callable[[], Callable[[DataElement, tuple[Dataset, ...]], Any]]:
    """A secondary capture's or map's slots: the common ones, the pixels, the comments."""

    def make() -> Callable[[DataElement, tuple[Dataset, ...]], Any]:
        common = _common_rule(roles, copied)

        def rule(elem: DataElement, parents: tuple[Dataset, ...]) -> Any:
            name = common(elem, parents)
            if name is None and not parents and elem.keyword in ("PixelData", "ImageComments"):
                return (elem.keyword,)
            return name

        return rule

    return make


def _image_values(
    src: Dataset,
    header: Dataset,
    person_names: Sequence[DataElement],
    own: Mapping[str, str],
    copied: frozenset[int],
    pixels: np.ndarray,
    comments: str,
) -> dict[Any, Value]:
    values = _common_values(header, person_names, copied)
    values.update(_uid_values([src], own))
    values[("PixelData",)] = np.ascontiguousarray(pixels).tobytes()
    values[("ImageComments",)] = comments
    return values


def _offer_image(
    key: tuple[Any, ...],
    built: Dataset,
    src: Dataset,
    header: Dataset,
    person_names: Sequence[DataElement],
    own: Mapping[str, str],
    values: Callable[[frozenset[int]], dict[Any, Value]],
) -> None:
    if not IMAGE_TEMPLATES.undecided(key):
        return
    kept = _Kept.of(built, header, person_names, str(src.SOPClassUID))
    if kept is not None:
        IMAGE_TEMPLATES.offer(
            key,
            built,
            _image_rule(_uid_roles([src], own), kept.copied),
            lambda: values(kept.copied),
            kept,
        )


# ------------------------------------------------------------------------------- PM

PM_SERIES_DESCRIPTION = f"AI HEATMAP MAP - {DISCLAIMER}"[:64]
PM_SCALE = 1000  # stored value = round(relevance * PM_SCALE); 16 bits (the IOD allows 16 or 32)
_GEOMETRY = ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient")
_NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")


def _spacing(ds: Dataset) -> list[float]:
    """The image's pixel spacing in mm (Pixel Spacing, else Imager Pixel Spacing), 1 mm when
    it states none or a value that is not a positive number."""
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            values = [float(str(v)) for v in _as_list(ds.get(kw))]
        except (TypeError, ValueError):
            continue
        if len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values):
            return values
    return [1.0, 1.0]


def build_pm(
    source: Dataset,
    heatmap: np.ndarray,
    prediction: Prediction,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9903,
    instance_number: int = 1,
    manufacturer: str = "pacs-node",
    software_version: str,
    use_template: bool = True,
    prepared: tuple[Dataset, list[DataElement]] | None = None,
) -> Dataset:
    """The Grad-CAM map of one source image as a DICOM Parametric Map, on the source's pixel
    grid, that viewers overlay on the image and switch on and off.

    Stored as 16-bit integers (relevance x 1000), uncompressed (Explicit VR Little Endian, which
    every peer accepts: the sender cannot transcode), with a Real World Value Mapping back to
    relevance in [0, 1]. A source without patient geometry (a projection
    radiograph has no Frame of Reference) gets the map in a new frame of reference of its own,
    with the image's pixel spacing (1 mm when it states none), as the Parametric Map IOD
    requires one; the map still lies pixel for pixel on its source (Spatial Locations
    Preserved), which is how viewers relate the two.
    """  # noqa: D401
    src = _check_source(source, "source")
    _check_common(
        prediction, series_instance_uid, sop_instance_uid, series_number, instance_number,
        manufacturer, software_version,
    )  # fmt: skip
    _check_new_uids([src], series_instance_uid, sop_instance_uid)
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != (int(src.Rows), int(src.Columns)):
        raise ValueError(f"heatmap must have the source's shape, got {heat.shape}")
    if not np.all(np.isfinite(heat)):
        raise ValueError("heatmap must be finite")
    stored = np.round(np.clip(heat, 0.0, 1.0) * PM_SCALE).astype(np.uint16)

    header, person_names = prepared or _header(src)
    comments = f"{DISCLAIMER}. {overlay_lines(prediction)[0]}. Grad-CAM relevance map."
    # a map of an image with its own geometry (CT) differs in it from slice to slice: built
    # in full; one in a frame of reference of its own (radiographs) is filled in
    has_geometry = all(kw in src and not src[kw].is_empty for kw in _GEOMETRY)
    key = (
        "PM",
        *_image_shape(src, header, person_names, prediction),
        prediction.label.meaning,
        stored.shape,
        tuple(_spacing(src)),
        (series_number, instance_number, manufacturer, software_version),
    )
    own = {
        "series": series_instance_uid,
        "sop": sop_instance_uid,
        "frame": _name_uid("frame-of-reference", sop_instance_uid),
        "dimensions": _name_uid("dimension-organization", sop_instance_uid),
    }

    def values(copied: frozenset[int]) -> dict[Any, Value]:
        return _image_values(src, header, person_names, own, copied, stored, comments)

    template = IMAGE_TEMPLATES.get(key) if use_template and not has_geometry else None
    if template is not None and template.info.fits(header):
        return read_template(template.fill(values(template.info.copied)))
    # the source as highdicom is given it: the header with the image's geometry (a copy: a
    # prepared header is shared, and the template's values come from it unchanged)
    geometry = copy.deepcopy(header)
    for kw in ("Rows", "Columns", *_GEOMETRY, "PixelSpacing", "SliceThickness"):
        if kw in src and not src[kw].is_empty:
            geometry[kw] = copy.deepcopy(src[kw])
    spacing = _spacing(src)
    if not all(kw in geometry for kw in _GEOMETRY):
        # the map's own frame of reference: the image plane at the origin, the source's pixel
        # spacing; given to highdicom as if the source had it (the source is not changed)
        geometry.FrameOfReferenceUID = own["frame"]
        geometry.ImagePositionPatient = [0.0, 0.0, 0.0]
        geometry.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        geometry.SliceThickness = 1.0
    geometry.PixelSpacing = spacing
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="GRADCAM",
        lut_explanation=f"Grad-CAM relevance for {prediction.label.meaning}"[:64],
        unit=_NO_UNITS,
        value_range=(0, PM_SCALE),
        slope=1.0 / PM_SCALE,
        intercept=0.0,
    )
    kwargs: dict[str, Any] = dict(
        source_images=[geometry],
        pixel_array=stored,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=prediction.model_name,
        software_versions=software_version,
        device_serial_number=prediction.model_version,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(window_center=PM_SCALE / 2, window_width=PM_SCALE)
        ],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_label="GRADCAM",
        content_description=f"Grad-CAM heatmap, {DISCLAIMER}"[:64],
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        contributing_equipment=[_ai_equipment(prediction, manufacturer)],
        series_description=PM_SERIES_DESCRIPTION,
    )
    pm = hd.pm.ParametricMap(**kwargs)
    pm.copy_patient_and_study_information(header)
    for elem in person_names:
        pm.add(elem)
    pm.BodyPartExamined = header.get("BodyPartExamined") or "CHEST"
    if src.get("Laterality") in ("R", "L"):
        pm.Laterality = src.Laterality
    pm.ImageComments = comments
    # highdicom's Dimension Organization UID is random: one derived from the map's, so that a
    # retry makes the same map (and a fill the same as highdicom)
    dimensions = str(pm.DimensionOrganizationSequence[0].DimensionOrganizationUID)
    _set_uids(pm, {dimensions: own["dimensions"]})
    if use_template and not has_geometry:
        _offer_image(key, pm, src, header, person_names, own, values)
    return pm


def _set_uids(ds: Dataset, new: Mapping[str, str]) -> None:
    """Replace the UI values *new* names, at every depth."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _set_uids(item, new)
        elif elem.VR == "UI" and isinstance(elem.value, str) and elem.value in new:
            elem.value = new[elem.value]
