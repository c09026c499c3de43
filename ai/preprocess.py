"""DICOM pixels and image files to model input; one path for training, ``classify`` and the node.

Pure functions: a dataset or file in, float arrays in [0, 1] out. Every input that cannot be
used raises :class:`UnusableInputError` with a reason an operator can read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from pacs_node.errors import UnusableInputError

# Lung window (centre, width) in Hounsfield units, applied to every CT slice.
LUNG_WINDOW = (-600.0, 1500.0)
# Refuse to decode anything whose raw pixels would exceed this (absurd or hostile dimensions).
MAX_PIXEL_BYTES = 512 * 2**20
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def has_pixels(ds: Dataset) -> bool:
    return any(k in ds for k in PIXEL_KEYWORDS)


def _declared_bytes(ds: Dataset) -> int:
    rows = int(ds.get("Rows") or 0)
    cols = int(ds.get("Columns") or 0)
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.get("BitsAllocated") or 8)
    return rows * cols * frames * samples * max(1, bits // 8)


def _transfer_syntax_name(ds: Dataset) -> str:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return UID(ts).name if ts else "unknown transfer syntax"


def decode(ds: Dataset) -> np.ndarray:
    """The dataset's stored pixels (one frame: the middle one of a multi-frame image)."""
    if not has_pixels(ds):
        raise UnusableInputError("no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise UnusableInputError("Rows or Columns missing or invalid") from None
    if rows < 1 or cols < 1:
        raise UnusableInputError(f"image has no pixels ({rows}x{cols})")
    if _declared_bytes(ds) > MAX_PIXEL_BYTES:
        raise UnusableInputError(
            f"image too large to decode safely ({rows}x{cols}, "
            f"{int(ds.get('NumberOfFrames') or 1)} frames)"
        )
    frames = int(ds.get("NumberOfFrames") or 1)
    try:
        index = frames // 2 if frames > 1 else None
        arr = ds.pixel_array if index is None else _frame(ds, index)
    except Exception as exc:  # any decoder failure is an unusable input, not a crash
        raise UnusableInputError(
            f"pixel data cannot be decoded ({_transfer_syntax_name(ds)}): "
            f"{type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    return np.asarray(arr)


def _frame(ds: Dataset, index: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    return pixel_array(ds, index=index)


def dicom_to_image(ds: Dataset, *, window: tuple[float, float] | None = None) -> np.ndarray:
    """A 2-D float32 image in [0, 1], as a radiologist would see it (bright = dense).

    Order: modality LUT (rescale slope/intercept), then the given *window* (e.g. the lung window
    for CT) or else the dataset's VOI LUT / window, or a robust min-max; MONOCHROME1 is inverted;
    colour is converted to grey.
    """
    arr = decode(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        gray = cv2.cvtColor(arr[..., :3].astype(np.float32), cv2.COLOR_RGB2GRAY)
        return _minmax(gray)
    if arr.ndim != 2:
        raise UnusableInputError(f"unexpected pixel array shape {arr.shape}")
    if photometric == "PALETTE COLOR":
        raise UnusableInputError("palette colour images are not supported")
    try:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    except Exception as exc:  # e.g. a Modality LUT Sequence without a descriptor
        raise UnusableInputError(f"modality LUT or rescale is malformed: {exc}") from exc
    if window is not None:
        centre, width = window
        low, high = centre - width / 2, centre + width / 2
        image = (np.clip(values, low, high) - low) / (high - low)
    elif "WindowCenter" in ds or "VOILUTSequence" in ds:
        try:
            image = _minmax(np.asarray(apply_voi_lut(values, ds), dtype=np.float32), robust=False)
        except Exception:  # a malformed VOI LUT: fall back to the data's own range
            image = _minmax(values)
    else:
        image = _minmax(values)
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return image.astype(np.float32)


def _minmax(values: np.ndarray, robust: bool = True) -> np.ndarray:
    values = values.astype(np.float32)
    if robust:
        low, high = np.percentile(values, (0.5, 99.5))
    else:
        low, high = float(values.min()), float(values.max())
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        raise UnusableInputError("image is blank (no contrast)")
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


def read_image_file(path: str | Path) -> np.ndarray:
    """A PNG or JPEG file as a 2-D float32 image in [0, 1]."""
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if img is None:
        raise UnusableInputError(f"{Path(path).name}: not a readable PNG or JPEG image")
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    return (img.astype(np.float32) / scale).clip(0, 1)


def to_model_input(image: np.ndarray, size: int, channels: int = 1) -> np.ndarray:
    """Resize a [0, 1] image to ``size x size`` and give it the model's channel count."""
    interp = cv2.INTER_AREA if min(image.shape[:2]) > size else cv2.INTER_LINEAR
    resized = cv2.resize(image.astype(np.float32), (size, size), interpolation=interp)
    resized = resized[..., np.newaxis]
    if channels > 1:
        resized = np.repeat(resized, channels, axis=-1)
    return resized.astype(np.float32)


def batch(images: Sequence[np.ndarray], size: int, channels: int = 1) -> np.ndarray:
    return (
        np.stack([to_model_input(i, size, channels) for i in images])
        if images
        else np.zeros((0, size, size, channels), np.float32)
    )
