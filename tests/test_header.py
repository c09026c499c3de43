"""``storage.header.read_header`` against pydicom's own reader, on every DICOM file of the
shared data and on files made to be awkward: the same elements (tag, VR, length, value or its
place in the file), the same file meta and encoding, the same values once decoded, and a clean
``None`` (pydicom reads it then) for what it does not read itself."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from storage.header import read_header
from tests.conftest import CR_CHEST, CT_SERIES, DICOM

DEFER = 65536


def _files() -> list[Path]:
    return sorted(p for p in DICOM.rglob("*") if p.is_file())


def _pydicom(path: Path) -> pydicom.FileDataset:
    return pydicom.dcmread(path, defer_size=DEFER)


def _same(path: Path) -> bool:
    """True when read_header read *path*; asserts that it read it as pydicom does."""
    ours = read_header(path, DEFER)
    if ours is None:
        return False
    theirs = _pydicom(path)
    assert ours.preamble == theirs.preamble
    assert ours.file_meta == theirs.file_meta
    meta_tags = list(theirs.file_meta.keys())
    assert list(ours.file_meta.keys()) == meta_tags
    for tag in meta_tags:  # the raw elements alike (storage/header.py reads the meta itself)
        a = ours.file_meta.get_item(tag)
        b = theirs.file_meta.get_item(tag)
        if isinstance(a, RawDataElement) and isinstance(b, RawDataElement):
            assert tuple(a) == tuple(b), (path.name, tag)
    assert ours.file_meta.original_encoding == theirs.file_meta.original_encoding
    assert ours.original_encoding == theirs.original_encoding
    assert ours.original_character_set == theirs.original_character_set
    tags = list(theirs.keys())  # (iterating a Dataset gives its elements)
    assert list(ours.keys()) == tags
    for tag in tags:
        a = ours.get_item(tag, keep_deferred=True)
        b = theirs.get_item(tag, keep_deferred=True)
        if isinstance(a, RawDataElement) and isinstance(b, RawDataElement):
            assert tuple(a) == tuple(b), (path.name, tag)
        elif isinstance(a, RawDataElement) and a.length == 0xFFFFFFFF:
            # an undefined-length sequence, parsed by pydicom at once, by this reader on use
            assert a.VR == "SQ" and not isinstance(b, RawDataElement), (path.name, tag)
            decoded = ours[tag]
            assert (decoded.VR, decoded.file_tell, decoded.is_undefined_length) == (
                b.VR, b.file_tell, b.is_undefined_length
            ), (path.name, tag)  # fmt: skip
        # else decoded already by one of them while reading (the character set; Pixel
        # Representation, which a sequence's decoding reads): the values are compared below
    for elem in theirs:  # decoded the same, deferred values read from the file alike
        assert ours[elem.tag].value == elem.value, (path.name, elem.tag)
    return True


def test_every_shared_dicom_file_reads_as_pydicom_reads_it_or_falls_back():
    files = _files()
    assert len(files) > 50
    read = 0
    for path in files:
        try:
            _pydicom(path)
        except Exception:  # pydicom cannot read it: this reader must not claim to
            try:
                result = read_header(path, DEFER)
            except Exception:
                result = None
            assert result is None, path.name
            continue
        read += _same(path)
    assert read >= 40, read  # the shared data is mostly explicit VR little endian
    assert all(_same(p) for p in CT_SERIES)
    assert _same(CR_CHEST)


def _explicit_file(tmp_path: Path, syntax: str = ExplicitVRLittleEndian) -> Path:
    ds = pydicom.dcmread(CT_SERIES[0])
    ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "f.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_implicit_vr_reads_as_pydicom_reads_it(tmp_path):
    path = _explicit_file(tmp_path, ImplicitVRLittleEndian)
    assert _same(path)


def test_a_cut_off_file_keeps_what_pydicom_keeps(tmp_path):
    path = _explicit_file(tmp_path)
    data = path.read_bytes()
    for keep in (len(data) - 1000, len(data) - 300_000, 2000, 700):
        cut = tmp_path / f"cut{keep}.dcm"
        cut.write_bytes(data[:keep])
        try:
            _pydicom(cut)
        except Exception:
            continue
        result = read_header(cut, DEFER)
        if result is not None:
            assert _same(cut)


def test_an_undefined_length_sequence_is_read_as_pydicom_reads_it(tmp_path):
    ds = pydicom.dcmread(CT_SERIES[0])
    item = pydicom.Dataset()
    item.CodeValue, item.CodeMeaning = "1", "Ärger"  # text decoded with the file's charset
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ProcedureCodeSequence = [item]
    ds["ProcedureCodeSequence"].is_undefined_length = True
    path = tmp_path / "undefined.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert _same(path)
    assert read_header(path, DEFER).ProcedureCodeSequence[0].CodeMeaning == "Ärger"


def test_encapsulated_pixel_data_and_an_unknown_vr_are_left_to_pydicom(tmp_path):
    compressed = [p for p in _files() if _syntax(p).startswith("1.2.840.10008.1.2.4.")]
    assert compressed
    for path in compressed:
        assert read_header(path, DEFER) is None, path.name
    data = bytearray(_explicit_file(tmp_path).read_bytes())
    at = data.index(struct.pack("<HH", 0x0008, 0x0060))  # Modality's VR "CS" made "ZZ"
    data[at + 4 : at + 6] = b"ZZ"
    odd = tmp_path / "odd.dcm"
    odd.write_bytes(bytes(data))
    assert read_header(odd, DEFER) is None


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_big_endian_and_deflated_are_left_to_pydicom(tmp_path, syntax):
    ds = pydicom.dcmread(CT_SERIES[0])
    if syntax == ExplicitVRBigEndian:  # pydicom swaps no pixel bytes: a header-only file
        del ds.PixelData
    ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "other.dcm"
    dcmwrite(path, ds, implicit_vr=False, little_endian=syntax != ExplicitVRBigEndian,
             enforce_file_format=True)  # fmt: skip
    assert _syntax(path) == syntax  # pydicom reads it back
    assert read_header(path, DEFER) is None
    for shared in (p for p in _files() if _syntax(p) == syntax):
        assert read_header(shared, DEFER) is None, shared.name


def _syntax(path: Path) -> str:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    except Exception:
        return ""
