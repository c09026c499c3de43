"""Is this image something a model was built for? Checks on the header, before any decoding.

A model trained on frontal human chest radiographs says nothing useful about a lateral view, a
leg or a dog; a CT model nothing about a head CT or a scout image. Such inputs are stored and
their job is skipped with the reason returned here.
"""

from __future__ import annotations

from pydicom.charset import python_encoding
from pydicom.dataset import Dataset

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

CHEST_BODY_PARTS = {
    "",
    "CHEST",
    "THORAX",
    "LUNG",
    "CHESTABDOMEN",
    "CHESTABDPELVIS",
    "HEART",
    "CHEST_TO_PELVIS",
    "WHOLEBODY",
    "TORSO",
    "BREAST",
}
FRONTAL_VIEWS = {"", "PA", "AP"}
LATERAL_VIEWS = {"LL", "RL", "LLD", "RLD", "LAT", "LATERAL", "LLO", "RLO"}
ANIMAL_WORDS = ("CANINE", "FELINE", "EQUINE", "BOVINE", "VETERINAR", "PORCINE", "MURINE")
MIN_CXR_SIDE_PX = 256


def has_pixels(ds: Dataset) -> bool:
    """Whether the data set carries an image (any of the pixel data elements)."""
    return any(k in ds for k in PIXEL_KEYWORDS)


def _words(ds: Dataset, *keywords: str) -> str:
    parts = []
    for keyword in keywords:
        try:
            value = ds.get(keyword)
        except Exception:
            continue
        if value:
            parts.append(str(value).upper())
    return " ".join(parts)


def _species_reason(ds: Dataset) -> str | None:
    species = _words(ds, "PatientSpeciesDescription")
    if species and "HUMAN" not in species and "HOMO" not in species:
        return f"patient is not human (species {species.title()})"
    text = _words(
        ds,
        "AcquisitionDeviceProcessingDescription",
        "InstitutionName",
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
    )
    for word in ANIMAL_WORDS:
        if word in text:
            return "patient appears not to be human (veterinary acquisition)"
    return None


def cxr_reason(ds: Dataset) -> str | None:
    """Why a chest X-ray model must not read this image, or None when it may."""
    if not has_pixels(ds):
        return "not an image"
    body_part = _words(ds, "BodyPartExamined").strip()
    if body_part not in CHEST_BODY_PARTS:
        return f"body part {body_part} is not the chest"
    reason = _species_reason(ds)
    if reason:
        return reason
    view = _words(ds, "ViewPosition").strip()
    if view in LATERAL_VIEWS:
        return f"view position {view} is lateral; the model reads frontal (PA/AP) chest images"
    if view not in FRONTAL_VIEWS and view:
        return f"view position {view} is not a frontal (PA/AP) chest view"
    described = _words(
        ds,
        "AcquisitionDeviceProcessingDescription",
        "SeriesDescription",
        "ProtocolName",
        "ViewName",
    )
    if "LATERAL" in described.split() or " LAT " in f" {described} ":
        return "lateral view; the model reads frontal (PA/AP) chest images"
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if min(rows, cols) < MIN_CXR_SIDE_PX:
        return (
            f"image is {rows}x{cols} px, too small for a chest radiograph (min {MIN_CXR_SIDE_PX})"
        )
    return None


def ct_reason(ds: Dataset) -> str | None:
    """Why a CT model must not read this slice, or None when it may."""
    if not has_pixels(ds):
        return "not an image"
    image_type = _words(ds, "ImageType")
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return "localizer (scout) image"
    body_part = _words(ds, "BodyPartExamined").strip()
    if body_part not in CHEST_BODY_PARTS:
        return f"body part {body_part} is not the chest"
    return _species_reason(ds)


def charset_terms(ds: Dataset) -> tuple[list[str], list[str]] | None:
    """The data set's Specific Character Set terms and those pydicom does not know; None when
    it has no Specific Character Set."""
    if "SpecificCharacterSet" not in ds:
        return None
    raw = ds["SpecificCharacterSet"].value
    values = [raw] if raw is None or isinstance(raw, str | bytes) else list(raw)
    terms = [
        (t.decode("ascii", "replace") if isinstance(t, bytes) else str(t or "")).strip()
        for t in values
    ]
    return terms, [t for t in terms if t and t not in python_encoding]


def charset_warning(ds: Dataset) -> str | None:
    """What is wrong with the data set's Specific Character Set, if anything: an empty value or
    a term pydicom does not know. Its text was then read in the default repertoire (and the
    results are written in UTF-8): the analysis goes on, and the job says so."""
    found = charset_terms(ds)
    if found is None:
        return None
    terms, unknown = found
    if not any(terms):
        return "empty Specific Character Set: text read in the default repertoire"
    if unknown:
        return (
            f"unknown Specific Character Set {chr(92).join(unknown)}: text read in the default "
            "repertoire, results written in UTF-8"
        )
    return None
