"""DICOM and image files to model input, on every file in the shared data that holds pixels."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from ai.analysis import profile
from ai.errors import UnusableInputError
from ai.preprocess import (
    LUNG_WINDOW,
    dicom_to_image,
    has_pixels,
    read_image_file,
    to_model_input,
)
from tests.conftest import CR_CHEST, CT_SERIES, DICOM, SHARED_DATA

ALL_DICOM = sorted(DICOM.rglob("*.dcm"))
# Files that hold pixels no decoder here can read, with the reason expected.
UNDECODABLE = {
    "pydicom_wheel__JPEG-lossy.dcm": r"cannot be decoded \(JPEG Extended",
    "dwv__leadtools-flowers-16-mono2-rle.dcm": "modality LUT or rescale is malformed",
}


@pytest.mark.parametrize("path", ALL_DICOM, ids=lambda p: p.name[:40])
def test_every_shared_dicom_file_decodes_or_says_why(path):
    ds = pydicom.dcmread(path)
    if not has_pixels(ds):
        with pytest.raises(UnusableInputError, match="no pixel data"):
            dicom_to_image(ds)
        return
    if path.name in UNDECODABLE:
        with pytest.raises(UnusableInputError, match=UNDECODABLE[path.name]):
            dicom_to_image(ds)
        return
    window = LUNG_WINDOW if ds.get("Modality") == "CT" else None
    image = dicom_to_image(ds, window=window)
    assert image.ndim == 2 and image.dtype == np.float32
    assert 0.0 <= image.min() < image.max() <= 1.0
    x = to_model_input(image, 64, channels=3)
    assert x.shape == (64, 64, 3)


def test_monochrome1_is_inverted_so_bone_is_bright():
    ds = pydicom.dcmread(CR_CHEST)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    image = dicom_to_image(ds)
    h, w = image.shape
    # the spine/mediastinum (centre) is brighter than the air-filled lungs beside it
    centre = image[h // 3 : 2 * h // 3, w // 2 - w // 20 : w // 2 + w // 20].mean()
    lungs = image[h // 3 : 2 * h // 3, w // 4 - w // 20 : w // 4 + w // 20].mean()
    assert centre > lungs


def test_ct_lung_window_is_applied_in_hounsfield_units():
    ds = pydicom.dcmread(CT_SERIES[15])
    hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
    image = dicom_to_image(ds, window=LUNG_WINDOW)
    low = LUNG_WINDOW[0] - LUNG_WINDOW[1] / 2
    assert np.allclose(image[hu < 150], (hu[hu < 150] - low) / LUNG_WINDOW[1], atol=1e-5)
    assert image[hu >= 150].min() == 1.0  # soft tissue and bone saturate


def test_multiframe_segmentation_gives_one_frame():
    ds = pydicom.dcmread(DICOM / "seg_with_ct" / "dcmqi__liver.dcm")
    assert int(ds.NumberOfFrames) > 1
    assert dicom_to_image(ds).ndim == 2


def test_absurd_dimensions_are_refused_before_decoding():
    ds = pydicom.dcmread(CR_CHEST)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1
    with pytest.raises(UnusableInputError, match="too large"):
        dicom_to_image(ds)


def test_short_pixel_data_is_a_clear_error():
    ds = pydicom.dcmread(CR_CHEST)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    with pytest.raises(UnusableInputError, match="cannot be decoded"):
        dicom_to_image(ds)


def test_jpeg_files_read_as_grey_in_unit_range():
    path = next((SHARED_DATA / "cxr" / "normal").glob("*.jpg"))
    image = read_image_file(path)
    assert image.ndim == 2 and 0.0 <= image.min() < image.max() <= 1.0


def test_not_an_image_file(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(UnusableInputError, match="not a readable PNG or JPEG"):
        read_image_file(bad)


@pytest.mark.parametrize(
    ("path", "task", "expected"),
    [
        (CR_CHEST, "cxr", None),
        (DICOM / "cxr" / "pydicom_data__RG1_J2KI.dcm", "cxr", None),
        (DICOM / "format_only" / "highdicom__dx_image.dcm", "cxr", "not to be human"),
        (DICOM / "compressed" / "pydicom_data__RG3_J2KI.dcm", "cxr", "body part EXTREMITY"),
        (CT_SERIES[0], "ct", None),
        (DICOM / "sr" / "dcmqi__sr.dcm", "ct", "not an image"),
    ],
)
def test_eligibility(path, task, expected):
    reason = profile(task).eligibility(pydicom.dcmread(path, stop_before_pixels=False))
    if expected is None:
        assert reason is None
    else:
        assert expected in reason


def test_body_crop_cuts_the_body_out_of_a_dicom_slice_and_leaves_a_figure_whole():
    import cv2

    from ai.preprocess import LUNG_WINDOW, body_mask, dicom_to_image, heatmap_in_image_frame
    from ai.preprocess import prepare as prepare_image
    from tests.conftest import CT_SERIES, SHARED_DATA

    image = dicom_to_image(pydicom.dcmread(CT_SERIES[15]), window=LUNG_WINDOW)
    mask = body_mask(image)
    assert mask is not None and 0.2 < mask.mean() < 0.8  # the body, not the field of view
    assert not mask[0, 0] and mask[image.shape[0] // 2, image.shape[1] // 2]
    out = prepare_image(image, {"body_crop": True})
    assert out.shape[0] == out.shape[1]  # padded to a square
    assert out[0, 0] == 0.0 and out[-1, -1] == 0.0  # air, table and corners blanked
    heat = heatmap_in_image_frame(np.ones((4, 4), np.float32), image.shape, {"body_crop": True},
                                  image)  # fmt: skip
    assert heat.shape == image.shape and heat[0, 0] == 0.0 and heat[256, 256] == 1.0
    # a figure crop whose body fills the frame (most of them) is only padded, never masked
    figures = sorted((SHARED_DATA / "ct" / "covid").glob("*"))[:20]
    pictures = [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255 for f in figures]
    tight = next(p for p in pictures if body_mask(p) is None)
    padded = prepare_image(tight, {"body_crop": True})
    h, w = tight.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    assert padded.shape == (side, side)
    assert np.array_equal(padded[top : top + h, left : left + w], tight)


def test_a_12_bit_png_reads_like_its_8_bit_original(tmp_path):
    """Issue 10: a 16-bit PNG holding 12-bit values is scaled by 4095, not 65535."""
    import cv2

    from ai.preprocess import read_image_file

    jpeg = sorted((SHARED_DATA / "cxr_adult" / "normal").glob("*.jpg"))[0]
    eight = read_image_file(jpeg)
    twelve = np.round(eight * 4095).astype(np.uint16)
    path = tmp_path / "twelve.png"
    assert cv2.imwrite(str(path), twelve)
    assert np.abs(read_image_file(path) - eight).max() < 1e-3


def test_lung_crop_finds_the_lungs_of_real_radiographs_and_follows_them():
    """Issue 8: the lung-centred crop is found on real adult and child films of every class, is
    a square inside the image around its middle, stays on the lungs when the film is padded
    (where the central crop would move), and falls back to the square and crop without them."""
    from ai.preprocess import lung_box, prepared_box
    from ai.preprocess import prepare as prepare_image

    films = []
    for folder in ("cxr_adult/normal", "cxr_adult/covid", "cxr_adult/pneumonia", "cxr/normal"):
        films += sorted((SHARED_DATA / folder).glob("*"))[:10]
    found = 0
    for path in films:
        image = read_image_file(path)
        h, w = image.shape
        box = lung_box(image)
        if box is None:
            continue
        found += 1
        top, bottom, left, right = box
        assert bottom - top == right - left  # square
        assert 0 <= top < bottom <= h and 0 <= left < right <= w
        assert left < w / 2 < right and top < h / 2 < bottom
        assert 0.2 < (bottom - top) * (right - left) / (h * w) <= 1.0
    assert found >= 0.8 * len(films)

    image = read_image_file(sorted((SHARED_DATA / "cxr_adult" / "normal").glob("*"))[0])
    box = lung_box(image)
    assert box is not None
    h, w = image.shape
    padded = np.zeros((h, w + w // 2), np.float32)
    padded[:, :w] = image  # a film with a wide black band on its right
    moved = lung_box(padded)
    assert moved is not None
    shift = max(abs(a - b) for a, b in zip(box, moved, strict=True))
    assert shift < 0.1 * (box[1] - box[0]) < w // 4  # the central square moves by w // 4
    out = prepare_image(padded, {"lung_crop": True, "square": True, "crop": 0.8})
    assert out.shape == (moved[1] - moved[0],) * 2
    from ai.preprocess import heatmap_in_image_frame

    heat = heatmap_in_image_frame(np.ones((7, 7), np.float32), padded.shape, {"lung_crop": True},
                                  padded)  # fmt: skip
    rows, cols = np.nonzero(heat)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == moved  # Grad-CAM lines up

    blank = np.tile(np.linspace(0, 1, 300, dtype=np.float32), (300, 1))  # no lungs at all
    assert lung_box(blank) is None
    with_lungs = {"lung_crop": True, "square": True, "crop": 0.8}
    assert prepared_box(blank.shape, with_lungs, blank) == prepared_box(
        blank.shape, {"square": True, "crop": 0.8}
    )
    assert np.array_equal(
        prepare_image(blank, with_lungs), prepare_image(blank, {"square": True, "crop": 0.8})
    )
    with pytest.raises(ValueError, match="depends on the image"):
        prepared_box(blank.shape, with_lungs)
    with pytest.raises(ValueError, match="not both"):
        prepare_image(blank, {"lung_crop": True, "body_crop": True})


def test_a_lung_box_spanning_the_whole_film_still_gives_a_heatmap_of_its_shape():
    """The shared CR's lung square is the whole image: the 7 x 7 Grad-CAM map is resized to
    it (the node's SC and parametric map need the source's shape), not returned as it is."""
    import pydicom

    from ai.preprocess import dicom_to_image, heatmap_in_image_frame, prepared_box
    from tests.conftest import CR_CHEST

    image = dicom_to_image(pydicom.dcmread(CR_CHEST))
    options = {"square": True, "crop": 0.8, "lung_crop": True, "mask_border": 0.06}
    assert prepared_box(image.shape, options, image) == (0, image.shape[0], 0, image.shape[1])
    heat = heatmap_in_image_frame(np.ones((7, 7), np.float32), image.shape, options, image)
    assert heat.shape == image.shape and heat.min() == 1.0
    same = np.random.default_rng(0).random(image.shape, dtype=np.float32)
    assert heatmap_in_image_frame(same, image.shape, {}, image) is same  # already its shape


@pytest.mark.parametrize(
    "options",
    [
        {"square": True, "crop": 0.8, "lung_crop": True, "mask_border": 0.06},
        {"body_crop": True},
        {"square": True, "crop": 0.9, "clahe": 2.0},
    ],
    ids=["lung_crop", "body_crop", "square"],
)
def test_a_crop_found_once_gives_what_finding_it_each_time_gives(options):
    """The node looks for the lungs (or the body) once per image: the model input and the
    heatmap's place are those found without the plan, on a radiograph, a CT slice and a
    radiograph whose lungs lie inside the film."""
    from ai.preprocess import LUNG_WINDOW, batch, heatmap_in_image_frame, plan_crop

    images = [
        dicom_to_image(pydicom.dcmread(CR_CHEST)),
        dicom_to_image(pydicom.dcmread(CT_SERIES[15]), window=LUNG_WINDOW),
        np.pad(dicom_to_image(pydicom.dcmread(CR_CHEST)), 120),  # the lungs well inside
    ]
    crops = [plan_crop(image, options) for image in images]
    assert np.array_equal(batch(images, 96, 3, options, crops), batch(images, 96, 3, options))
    heat = np.random.default_rng(1).random((7, 7), dtype=np.float32)
    for image, crop in zip(images, crops, strict=True):
        planned = heatmap_in_image_frame(heat, image.shape, options, image, crop)
        assert np.array_equal(planned, heatmap_in_image_frame(heat, image.shape, options, image))
