"""ai.templates: results filled from the bytes of an earlier one of the same shape."""

from __future__ import annotations

import io

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ai.templates import Template, Templates, encoded, read


def _file(uid: str, text: str, undefined: bool) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = uid
    ds.PatientName = "Doe^Jane"
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = uid
    inner.CodeMeaning = text
    outer = Dataset()
    outer.ContentSequence = [inner, Dataset()]
    ds.ContentSequence = [outer]
    if undefined:
        ds["ContentSequence"].is_undefined_length = True
    ds.BitsAllocated = 8
    ds.PixelData = b"\x01\x02\x03\x04"
    return ds


def _rule(elem, parents):
    if elem.keyword in ("SOPInstanceUID", "ReferencedSOPInstanceUID", "MediaStorageSOPInstanceUID"):
        return ("uid",)
    if elem.keyword in ("PatientName", "PixelData"):
        return (elem.keyword,)
    return None


def test_a_fill_rewrites_the_lengths_that_hold_its_slots():
    """Longer and shorter values deep in defined- and undefined-length sequences: the filled
    file reads back with the new values, and the File Meta group length is right."""
    for undefined in (False, True):
        template = Template(_file("1.2.3", "constant", undefined), _rule)
        new_uid = generate_uid()
        data = template.fill({("uid",): new_uid, ("PatientName",): "Someone^Else^With^A^Long^Name",
                              ("PixelData",): b"\x09" * 7})  # fmt: skip
        back = pydicom.dcmread(io.BytesIO(data))
        assert back.SOPInstanceUID == back.file_meta.MediaStorageSOPInstanceUID == new_uid
        assert back.ContentSequence[0].ContentSequence[0].ReferencedSOPInstanceUID == new_uid
        assert back.ContentSequence[0].ContentSequence[0].CodeMeaning == "constant"
        assert len(back.ContentSequence[0].ContentSequence) == 2
        assert str(back.PatientName) == "Someone^Else^With^A^Long^Name"
        assert back.PixelData == b"\x09" * 7 + b"\x00"
        rewritten = io.BytesIO()
        back.save_as(rewritten, enforce_file_format=True)
        assert rewritten.getvalue() == data  # what pydicom itself writes for these values


def test_a_shape_whose_inputs_differ_outside_the_slots_is_never_filled():
    store = Templates()
    values = {("uid",): "1.2.3", ("PatientName",): "A^B", ("PixelData",): b"\0\0"}
    store.offer("k", _file("1.2.3", "one", False), lambda: _rule, lambda: values)
    assert store.get("k") is None  # kept, not yet checked
    store.offer("k", _file("1.2.4", "two", False), lambda: _rule, lambda: values)
    assert store.get("k") is None  # CodeMeaning differs and is no slot: ruled out
    store.offer("k", _file("1.2.5", "one", False), lambda: _rule, lambda: values)
    assert store.get("k") is None  # for good

    store.offer("j", _file("1.2.3", "one", False), lambda: _rule, lambda: values)
    store.offer("j", _file("1.2.6", "one", False), lambda: _rule, lambda: values)
    template = store.get("j")
    assert template is not None
    ds = read(template.fill(values))
    assert encoded(ds) == template.fill(values)
    assert ds.SOPInstanceUID == "1.2.3"
