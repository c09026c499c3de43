"""DICOM pixels and image files to model input; one path for training, ``classify`` and the node.

Pure functions: a dataset or file in, float arrays in [0, 1] out. Every input that cannot be
used raises :class:`UnusableInputError` with a reason an operator can read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from ai.eligibility import has_pixels
from ai.errors import UnusableInputError

# Lung window (centre, width) in Hounsfield units, applied to every CT slice.
LUNG_WINDOW = (-600.0, 1500.0)
# Refuse to decode anything whose raw pixels would exceed this (absurd or hostile dimensions).
MAX_PIXEL_BYTES = 512 * 2**20


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
    scale = 255.0
    if img.dtype == np.uint16:
        # a 12-bit (or 10-bit) export in a 16-bit PNG: scale by the bits it uses, not by 65535,
        # or the image comes out nearly black
        bits = max(8, int(np.ceil(np.log2(float(img.max()) + 1.0))))
        scale = float(2**bits - 1)
    return (img.astype(np.float32) / scale).clip(0, 1)


# ----------------------------------------------------------------- shortcut-removing options
#
# Named options applied by :func:`prepare`, the one place both training and serving call (through
# :func:`to_model_input` / :func:`batch`), in this order: crop, mask_border, then clahe or
# equalize. A model stores the options it was trained with in ``model.json["preprocessing"]`` so
# that serving applies exactly the same ones.
PREPROCESS_OPTIONS = {
    "body_crop": "CT: keep the patient's body (largest bright component, holes filled) cut to "
    "its bounding box and padded to a square, air, table and field of view blanked, so a DICOM "
    "slice looks like the body-cropped figures the model learned from (true/false)",
    "lung_crop": "chest X-ray: cut the square around the lung fields (the dark regions inside "
    "the body, the other lung mirrored when only one is found, widened by 8 %), instead of the "
    "square and central crop; where no lung field is found those apply as usual (true/false)",
    "square": "first cut the central square (the shorter side), so the aspect ratio of the "
    "source image is not squeezed into the model input as a shape the model can learn",
    "crop": "keep the central fraction (0-1] of each side, approximating a lung-centred crop",
    "mask_border": "set this fraction [0-0.5) of each edge to the mean of the rest (corner text)",
    "clahe": "CLAHE contrast normalisation with this clip limit (true = 2.0), 8x8 tiles",
    "equalize": "global histogram equalisation (true/false)",
}
CLAHE_DEFAULT_CLIP = 2.0
CLAHE_TILES = 8


def check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options as a plain, validated dict (``{}`` for none); ValueError when invalid."""
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if key not in PREPROCESS_OPTIONS:
            known = ", ".join(PREPROCESS_OPTIONS)
            raise ValueError(f"unknown preprocessing option {key!r} (known: {known})")
        if key in ("equalize", "square", "body_crop", "lung_crop"):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, not {value!r}")
            if value:
                out[key] = True
            continue
        if key == "clahe" and isinstance(value, bool):
            if value:
                out[key] = CLAHE_DEFAULT_CLIP
            continue
        number = float(value)
        ok = {
            "crop": 0.0 < number <= 1.0,
            "mask_border": 0.0 <= number < 0.5,
            "clahe": number > 0.0,
        }[key]
        if not ok or not np.isfinite(number):
            raise ValueError(f"preprocessing option {key}={value!r} is out of range")
        out[key] = number
    if out.get("clahe") and out.get("equalize"):
        raise ValueError("choose clahe or equalize, not both")
    if out.get("lung_crop") and out.get("body_crop"):
        raise ValueError("choose lung_crop (chest X-ray) or body_crop (CT), not both")
    return out


def parse_options(text: str) -> dict[str, Any]:
    """``"crop=0.8,mask_border=0.06,clahe"`` (a bare name means true) to a checked dict."""
    raw: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part or part.lower() == "none":
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or value.strip().lower() in ("true", "yes", "on"):
            raw[key] = True
        elif value.strip().lower() in ("false", "no", "off"):
            raw[key] = False
        else:
            try:
                raw[key] = float(value)
            except ValueError:
                raise ValueError(f"preprocessing option {part!r}: not a number") from None
    return check_options(raw)


def crop_box(shape: tuple[int, ...], fraction: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the central crop keeping *fraction* of each side."""
    h, w = shape[:2]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    return top, top + ch, left, left + cw


BODY_LEVEL = 0.55  # [0, 1] level above which a pixel is tissue (about -530 HU in the lung window)
BODY_MIN_FRACTION = 0.15  # a body smaller than this share of the image: none found, keep all


def body_mask(image: np.ndarray) -> np.ndarray | None:
    """The patient's body in a 2-D [0, 1] CT image: the largest component above
    :data:`BODY_LEVEL` with its holes (the lungs) filled; None when nothing body-sized is found."""
    bright = (np.asarray(image) > BODY_LEVEL).astype(np.uint8)
    # opening cuts thin bridges (mattress, table edge) between the body and the table
    tissue = cv2.morphologyEx(bright, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(tissue, connectivity=8)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, bw, bh = (int(v) for v in stats[largest, :4])
    h, w = tissue.shape
    top_and_bottom = y <= 2 and y + bh >= h - 2
    touching = (x <= 2) + (y <= 2) + (x + bw >= w - 2) + (y + bh >= h - 2)
    if top_and_bottom or touching >= 3:  # a tight crop (a figure): nothing around the body
        return None
    body = (labels == largest).astype(np.uint8)
    contours, _ = cv2.findContours(body, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(body)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    if filled.sum() < BODY_MIN_FRACTION * filled.size:
        return None
    return filled.astype(bool)


LUNG_WORK_SIZE = 256  # the lung fields are looked for on a copy this size (longer side)
LUNG_MIN_COMPONENT = 0.02  # a dark region smaller than this share of the image is not a lung
LUNG_MIN_BOX = 0.12  # lung fields whose box covers less than this share: none found
LUNG_MARGIN = 0.08  # the box widened by this fraction of its size on each side


def lung_box(image: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of a square inside a 2-D [0, 1] chest radiograph around its
    lung fields, or None when none are found.

    The lungs are the largest dark regions (below Otsu's level of the central part, after
    CLAHE) that do not touch the image's edge, where the air outside the body does; the two
    largest are kept, and a single one is mirrored about the image's middle (a collapsed or
    white lung is not dark). The box is widened by :data:`LUNG_MARGIN` and made square within
    the image around its centre."""
    h, w = image.shape[:2]
    scale = LUNG_WORK_SIZE / max(h, w)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    small = cv2.resize(np.asarray(image, np.float32), (sw, sh), interpolation=cv2.INTER_AREA)
    smooth = cv2.GaussianBlur(_clahe(_to_uint8(small), CLAHE_DEFAULT_CLIP), (5, 5), 0)
    inner = smooth[sh // 10 : sh - sh // 10, sw // 10 : sw - sw // 10]
    level, _ = cv2.threshold(inner, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = cv2.morphologyEx(
        (smooth < level).astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)
    )
    count, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    found = []
    for i in range(1, count):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        if x <= 1 or y <= 1 or x + bw >= sw - 1 or y + bh >= sh - 1:
            continue
        if area >= LUNG_MIN_COMPONENT * sh * sw:
            found.append((area, i))
    if not found:
        return None
    keep = [i for _, i in sorted(found, reverse=True)[:2]]
    rows, cols = np.nonzero(np.isin(labels, keep))
    top, bottom = int(rows.min()), int(rows.max()) + 1
    left, right = int(cols.min()), int(cols.max()) + 1
    if len(keep) == 1:  # one lung: the other is its mirror image about the image's middle
        left, right = min(left, sw - right), max(right, sw - left)
    if (bottom - top) * (right - left) < LUNG_MIN_BOX * sh * sw:
        return None
    cy, cx = (top + bottom) / 2 / scale, (left + right) / 2 / scale
    side = min(round(max(bottom - top, right - left) * (1 + 2 * LUNG_MARGIN) / scale), h, w)
    top_px = int(min(max(0, round(cy - side / 2)), h - side))
    left_px = int(min(max(0, round(cx - side / 2)), w - side))
    return top_px, top_px + side, left_px, left_px + side


def _body_box(shape: tuple[int, ...], mask: np.ndarray | None) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the body *mask* (None: the whole image of *shape*) padded
    to a square (may reach past the image)."""
    h, w = shape[:2]
    if mask is None:
        top, bottom, left, right = 0, h, 0, w
    else:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(bottom - top, right - left)
    top -= (side - (bottom - top)) // 2
    left -= (side - (right - left)) // 2
    return top, top + side, left, left + side


Crop = tuple[tuple[int, int, int, int], "np.ndarray | None"]  # (box, body mask) of an image


def plan_crop(image: np.ndarray, options: Mapping[str, Any] | None) -> Crop:
    """What :func:`prepare` keeps of *image* (its box, and the body mask with ``body_crop``),
    found once: :func:`to_model_input` and :func:`heatmap_in_image_frame` take it instead of
    looking for the lungs or the body again."""
    return _box_and_mask(np.shape(image), check_options(options), image)


def prepared_box(
    shape: tuple[int, ...], options: Mapping[str, Any], image: np.ndarray | None = None
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): the part of an image of *shape* that :func:`prepare` keeps
    (the body's square with ``body_crop``, the lungs' square with ``lung_crop``, both of which
    need *image*; else the central square; then the central crop of it). The box may reach past
    the image where the body was padded."""
    return _box_and_mask(shape, options, image)[0]


def _box_and_mask(
    shape: tuple[int, ...], options: Mapping[str, Any], image: np.ndarray | None
) -> tuple[tuple[int, int, int, int], np.ndarray | None]:
    """:func:`prepared_box` and the body mask it was found from (``body_crop``; else None),
    so that :func:`prepare` looks for the body once."""
    h, w = shape[:2]
    top, bottom, left, right = 0, h, 0, w
    if (options.get("body_crop") or options.get("lung_crop")) and image is None:
        raise ValueError("body_crop, lung_crop: the box depends on the image; pass it")
    lungs = lung_box(image) if options.get("lung_crop") and image is not None else None
    if lungs is not None:
        return lungs, None
    mask = None
    if options.get("body_crop") and image is not None:
        mask = body_mask(image)
        top, bottom, left, right = _body_box(shape, mask)
    elif options.get("square"):
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        bottom, right = top + side, left + side
    if options.get("crop", 1.0) < 1.0:
        box = crop_box((bottom - top, right - left), options["crop"])
        top, bottom, left, right = top + box[0], top + box[1], left + box[2], left + box[3]
    return (top, bottom, left, right), mask


def prepare(
    image: np.ndarray, options: Mapping[str, Any] | None = None, crop: Crop | None = None
) -> np.ndarray:
    """Apply the shortcut-removing *options* to a 2-D [0, 1] image; no options: unchanged.
    *crop*: :func:`plan_crop` of this image and options, when already found."""
    opts = check_options(options)
    if not opts:
        return image
    out = np.asarray(image, dtype=np.float32)
    (top, bottom, left, right), mask = (
        crop if crop is not None else _box_and_mask(out.shape, opts, out)
    )
    if opts.get("body_crop"):
        if mask is not None:
            out = np.where(mask, out, 0.0).astype(np.float32)
        out = _cut(out, top, bottom, left, right)
    else:
        out = out[top:bottom, left:right]
    if opts.get("mask_border", 0.0) > 0.0:
        h, w = out.shape
        dy, dx = round(h * opts["mask_border"]), round(w * opts["mask_border"])
        inner = out[dy : h - dy, dx : w - dx]
        fill = float(inner.mean()) if inner.size else float(out.mean())
        out = out.copy()
        out[:dy, :] = fill
        out[h - dy :, :] = fill
        out[:, :dx] = fill
        out[:, w - dx :] = fill
    if opts.get("clahe") or opts.get("equalize"):
        as8 = _to_uint8(out)
        as8 = _clahe(as8, float(opts["clahe"])) if opts.get("clahe") else cv2.equalizeHist(as8)
        out = as8.astype(np.float32) / 255.0
    return np.ascontiguousarray(out, dtype=np.float32)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """A [0, 1] image as 8-bit grey levels (rounded)."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _clahe(as8: np.ndarray, clip: float) -> np.ndarray:
    """CLAHE of an 8-bit image with *clip* limit, :data:`CLAHE_TILES` tiles a side."""
    return np.asarray(
        cv2.createCLAHE(clipLimit=clip, tileGridSize=(CLAHE_TILES, CLAHE_TILES)).apply(as8)
    )


def _cut(image: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """``image[top:bottom, left:right]`` where the box may reach past the image (zeros there)."""
    h, w = image.shape[:2]
    out = np.zeros((bottom - top, right - left), dtype=np.float32)
    t, b, lft, r = max(0, top), min(h, bottom), max(0, left), min(w, right)
    if b > t and r > lft:
        out[t - top : b - top, lft - left : r - left] = image[t:b, lft:r]
    return out


def heatmap_in_image_frame(
    heatmap: np.ndarray,
    shape: tuple[int, ...],
    options: Mapping[str, Any] | None = None,
    image: np.ndarray | None = None,
    crop: Crop | None = None,
) -> np.ndarray:
    """A Grad-CAM map computed on the prepared image, placed over the original image of *shape*.

    The map is resized into the kept box and zero outside it, so overlays line up with the
    original; a box that is the whole image (no crop, or a lung box that spans it) gets the
    map resized to the image, one already of the image's shape is returned unchanged.
    *crop*: :func:`plan_crop` of the image, when already found.
    """
    opts = check_options(options)
    if crop is not None:
        top, bottom, left, right = crop[0]
    else:
        top, bottom, left, right = prepared_box(shape, opts, image)
    if (top, left, bottom, right) == (0, 0, shape[0], shape[1]) and heatmap.shape == shape[:2]:
        return heatmap
    placed = cv2.resize(
        heatmap.astype(np.float32), (right - left, bottom - top), interpolation=cv2.INTER_LINEAR
    )
    h, w = shape[:2]
    full = np.zeros((h, w), dtype=np.float32)
    t, b, lft, r = max(0, top), min(h, bottom), max(0, left), min(w, right)
    if b > t and r > lft:
        full[t:b, lft:r] = placed[t - top : b - top, lft - left : r - left]
    return np.clip(full, 0.0, 1.0)


def to_model_input(
    image: np.ndarray,
    size: int,
    channels: int = 1,
    options: Mapping[str, Any] | None = None,
    crop: Crop | None = None,
) -> np.ndarray:
    """Prepare (see :func:`prepare`), resize a [0, 1] image to ``size x size`` and give it the
    model's channel count (grey replicated)."""
    image = prepare(image, options, crop)
    interp = cv2.INTER_AREA if min(image.shape[:2]) > size else cv2.INTER_LINEAR
    resized = cv2.resize(image.astype(np.float32), (size, size), interpolation=interp)
    resized = resized[..., np.newaxis]
    if channels > 1:
        resized = np.repeat(resized, channels, axis=-1)
    return resized.astype(np.float32)


def batch(
    images: Sequence[np.ndarray],
    size: int,
    channels: int = 1,
    options: Mapping[str, Any] | None = None,
    crops: Sequence[Crop] | None = None,
) -> np.ndarray:
    """:func:`to_model_input` of each image (*crops*: their :func:`plan_crop`, if found)."""
    if not images:
        return np.zeros((0, size, size, channels), np.float32)
    plans = crops if crops is not None else [None] * len(images)
    return np.stack(
        [to_model_input(i, size, channels, options, c) for i, c in zip(images, plans, strict=True)]
    )


def read_inputs(
    paths: Sequence[str | Path],
    size: int,
    channels: int = 1,
    options: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Image files read (:func:`read_image_file`) and prepared as one model input batch."""
    return batch([read_image_file(p) for p in paths], size, channels, options)
