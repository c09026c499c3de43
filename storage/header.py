"""A received file's data set, read as ``pydicom.dcmread(path, defer_size=...)`` reads it, in
about half the time, for the encodings nearly every sender uses.

The receive role reads every file pynetdicom streamed to disk once, to check and index it; that
read was 1.2-1.7 ms of the 12 ms of CPU a C-STORE of a CT slice cost (pydicom's element
generator is written for every encoding and option). :func:`read_header` walks the top level of
a Part 10 file whose data set is little endian with explicit or implicit VR and builds the
same :class:`~pydicom.dataset.FileDataset`: the same raw elements, values
longer than *defer_bytes* left in the file, the same file meta and original encoding. Anything
it does not read exactly as pydicom would (encapsulated pixel data and other elements of
undefined length that are not sequences; a VR that is not one of the Standard's; an implicit VR
data set that looks explicit) returns ``None``, and the caller reads the file with pydicom. A
sequence of undefined length (real scanners write them) is kept as its items' bytes, which
pydicom parses when the sequence is first read (pydicom parses it at once): the same Sequence,
later.
``tests/test_header.py`` compares both readers on every DICOM file of the shared data.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import cast

from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import (
    DataElement,
    RawDataElement,
    convert_raw_data_element,
    empty_value_for_VR,
)
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import UID, ImplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

try:  # pydicom's own reader of the file meta (private; tested against dcmread)
    from pydicom.filereader import _read_file_meta_info
except ImportError:  # a pydicom without it: every file is left to dcmread
    _read_file_meta_info = None  # type: ignore[assignment]

STANDARD_VRS = {vr.value.encode(): vr.value for vr in VR}
LONG_VRS = {VR(vr).value for vr in EXPLICIT_VR_LENGTH_32}
UNDEFINED = 0xFFFFFFFF
CHARSET = 0x00080005
_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHL")
_LONG = struct.Struct("<L")
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def read_header(path: Path, defer_bytes: int) -> FileDataset | None:
    """The file's data set as pydicom reads it with ``defer_size=defer_bytes``; ``None`` when
    the file is not one this reader reads exactly (pydicom reads it then)."""
    if _read_file_meta_info is None:
        return None
    with open(path, "rb") as fp:
        preamble = read_preamble(fp, False)
        meta_start = fp.tell()
        with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as data:
            found = _file_meta(data, meta_start)
            if found is None:  # left to pydicom's reader (an implicit VR meta, say)
                fp.seek(meta_start)
                file_meta, start = _read_file_meta_info(fp), fp.tell()
            else:
                file_meta, start = found
            syntax = UID(str(file_meta.get("TransferSyntaxUID", "")))
            if syntax == ImplicitVRLittleEndian:
                implicit = True
            elif syntax.is_transfer_syntax and syntax.is_little_endian and not syntax.is_deflated:
                implicit = False
                if syntax.is_implicit_VR or syntax.is_private:
                    return None
            else:
                return None
            try:
                elements, _ = _walk(data, start, implicit, defer_bytes)
            except _Unsure:
                return None
    dataset = Dataset(cast("dict[BaseTag, RawDataElement | DataElement]", elements))
    encoding: str | list[str] = default_encoding
    if CHARSET in elements:
        charset = convert_raw_data_element(elements[BaseTag(CHARSET)]).value
        encoding = convert_encodings(charset)
    dataset.set_original_encoding(implicit, True, encoding)
    ds = FileDataset(str(path), dataset, preamble, file_meta, implicit, True)
    ds.set_original_encoding(implicit, True, dataset._character_set)
    return ds


def _file_meta(data: mmap.mmap, pos: int) -> tuple[FileMetaDataset, int] | None:
    """The File Meta Information at *pos* (explicit VR little endian, PS3.10 7.1) as pydicom's
    ``_read_file_meta_info`` reads it, and where the data set starts; ``None`` for anything
    that reader would treat in its own way."""
    try:
        elements, end = _walk(data, pos, False, UNDEFINED, group=0x0002)  # nothing deferred
    except _Unsure:
        return None
    if not elements:
        return None
    file_meta = FileMetaDataset(cast("dict[BaseTag, RawDataElement | DataElement]", elements))
    file_meta.set_original_encoding(
        is_implicit_vr=False, is_little_endian=True, character_encoding=default_encoding
    )
    return file_meta, end


class _Unsure(Exception):
    """Something pydicom reads in its own way: leave the file to it."""


def _dictionary_vr(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _element(data: mmap.mmap, pos: int, implicit: bool) -> tuple[int, str | None, int, int]:
    """The element header at *pos*: tag, VR (None when implicit), length, header size."""
    if implicit:
        group, elem, length = _IMPLICIT.unpack_from(data, pos)
        return group << 16 | elem, None, length, 8
    group, elem, raw_vr, length = _EXPLICIT.unpack_from(data, pos)
    tag = group << 16 | elem
    if tag in (ITEM, ITEM_END, SEQUENCE_END):  # no VR: the tag and a 4-byte length
        return tag, None, _LONG.unpack_from(data, pos + 4)[0], 8
    vr = STANDARD_VRS.get(raw_vr)
    if vr is None:
        raise _Unsure  # pydicom guesses what an unknown VR means
    if vr in LONG_VRS:
        if pos + 12 > len(data):
            raise _Unsure
        return tag, vr, _LONG.unpack_from(data, pos + 8)[0], 12
    return tag, vr, length, 8


def _sequence_end(data: mmap.mmap, pos: int, implicit: bool) -> int:
    """Where the items of an undefined-length sequence starting at *pos* end (its Sequence
    Delimitation Item's offset)."""
    while True:
        if pos + 8 > len(data):
            raise _Unsure  # cut off inside the sequence
        group, elem, length = _IMPLICIT.unpack_from(data, pos)  # an item: tag and length
        tag = group << 16 | elem
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            raise _Unsure
        pos += 8
        if length != UNDEFINED:
            pos += length
            continue
        while True:  # an item of undefined length: its elements up to the Item Delimiter
            if pos + 8 > len(data):
                raise _Unsure
            tag, vr, length, header = _element(data, pos, implicit)
            if tag == ITEM_END:
                pos += 8
                break
            pos += header
            if length == UNDEFINED:
                if not (vr == "SQ" or (vr is None and _dictionary_vr(tag) == "SQ")):
                    raise _Unsure
                pos = _sequence_end(data, pos, implicit) + 8
            else:
                pos += length


def _walk(
    data: mmap.mmap, pos: int, implicit: bool, defer_bytes: int, group: int | None = None
) -> tuple[dict[BaseTag, RawDataElement], int]:
    """The top-level elements from *pos* (only those of *group*, when given: the walk stops
    at the first element of another), and where the walk stopped."""
    size = len(data)
    elements: dict[BaseTag, RawDataElement] = {}
    if implicit and pos + 6 <= size and all(0x40 < b < 0x5B for b in data[pos + 4 : pos + 6]):
        raise _Unsure  # "implicit" data that looks explicit: pydicom decides
    while pos + 8 <= size:
        if group is not None and _IMPLICIT.unpack_from(data, pos)[0] != group:
            break  # checked before the VR: what follows may be implicit VR
        tag, vr, length, header = _element(data, pos, implicit)
        if tag == ITEM_END:  # an item delimiter where an element belongs: pydicom stops
            break
        if tag in (ITEM, SEQUENCE_END):  # an item where an element belongs: malformed
            raise _Unsure
        value_tell = pos + header
        value: bytes | None
        if length == UNDEFINED:
            if not (vr == "SQ" or (vr is None and _dictionary_vr(tag) == "SQ")):
                raise _Unsure  # encapsulated pixel data, an undefined-length UN
            end = _sequence_end(data, value_tell, implicit)
            # the items' bytes: pydicom parses them when the sequence is read
            elements[BaseTag(tag)] = RawDataElement(
                BaseTag(tag), "SQ", length, data[value_tell:end], value_tell, implicit, True
            )
            pos = end + 8
            continue
        if length > defer_bytes and tag != CHARSET:
            value = None  # left in the file, read when asked for
        elif length == 0:
            value = empty_value_for_VR(vr, raw=True)  # type: ignore[assignment]
        else:
            value = data[value_tell : value_tell + length]  # short at a cut-off end, as pydicom
        elements[BaseTag(tag)] = RawDataElement(
            BaseTag(tag), vr, length, value, value_tell, implicit, True
        )
        pos = value_tell + length
    return elements, pos
