"""Result objects made from the bytes of an earlier one of the same shape.

highdicom takes 10-25 ms to build an SR, a secondary capture or a Parametric Map and pydicom
another 5-13 ms to write it; two results of the same *shape* (same model, classes, label, source
header attributes, image size...) differ only in a known set of elements: the UIDs, the
Patient and Study attributes copied from the source, the creation times, the pixels and a few
values (probabilities, a region's box, a text). A :class:`Template` is the encoded file of one
result, split at those elements; :meth:`Template.fill` joins the constant bytes with this
input's elements, encoded alone (well under a millisecond).

Which elements vary is said by a *rule*, given each element with its ancestors, which returns
the element's *slot* (a hashable name; ``None``: constant). UIDs are slotted by their *role*
(the SR's own series, the first source's study...) rather than by value, so two templates made
from different inputs of one shape, filled with the same values, must give the same bytes:
:class:`Templates` checks exactly that on the second input of every shape (built both ways)
before it trusts the template, and never uses a shape for which the two differ.

Only what pydicom writes for the node's results is parsed here: Explicit VR Little Endian,
sequences and items of undefined length (pydicom's writer) or of defined length.
"""

from __future__ import annotations

import io
import logging
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

log = logging.getLogger(__name__)

_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_TAG = struct.Struct("<HH")
_PREAMBLE = 132  # 128 bytes of preamble and "DICM"


class TemplateError(ValueError):
    """The encoded file is not one this module can split (or does not match its dataset)."""


@dataclass(slots=True)
class _Span:
    tag: int
    vr: bytes
    start: int  # of the element (its tag)
    end: int  # after its value (a sequence: after its delimiter)
    items: list[list[_Span]] | None  # a sequence's items


def _parse(
    buf: bytes, pos: int, end: int | None, lengths: list[tuple[int, int, int]]
) -> tuple[list[_Span], int]:
    """The elements from *pos* to *end*, or up to an item delimiter when *end* is None;
    returns them and the position after them (after the delimiter). Every defined length of
    a sequence or item is added to *lengths* as (where it is written, value start, value
    end): a fill that changes what they hold must write them again."""
    spans: list[_Span] = []
    while end is None or pos < end:
        if pos + 8 > len(buf):
            raise TemplateError(f"truncated at {pos}")
        group, element = _TAG.unpack_from(buf, pos)
        tag = group << 16 | element
        if tag == _ITEM_END:
            if end is not None:
                raise TemplateError(f"item delimiter in a defined-length item at {pos}")
            return spans, pos + 8
        vr = buf[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", buf, pos + 8)
            value = pos + 12
        else:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            value = pos + 8
        if vr == b"SQ":
            if length != _UNDEFINED:
                lengths.append((pos + 8, value, value + length))
            items, after = _parse_items(buf, value, length, lengths)
        elif length == _UNDEFINED:
            raise TemplateError(f"undefined length outside a sequence at {pos}")
        else:
            items, after = None, value + length
        spans.append(_Span(tag, vr, pos, after, items))
        pos = after
    if pos != end:
        raise TemplateError(f"element overruns its item at {pos}")
    return spans, pos


def _parse_items(
    buf: bytes, pos: int, length: int, lengths: list[tuple[int, int, int]]
) -> tuple[list[list[_Span]], int]:
    end = None if length == _UNDEFINED else pos + length
    items: list[list[_Span]] = []
    while end is None or pos < end:
        group, element = _TAG.unpack_from(buf, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_END and end is None:
            return items, pos + 8
        if tag != _ITEM:
            raise TemplateError(f"expected an item at {pos}")
        (item_length,) = struct.unpack_from("<I", buf, pos + 4)
        if item_length == _UNDEFINED:
            spans, pos = _parse(buf, pos + 8, None, lengths)
        else:
            lengths.append((pos + 4, pos + 8, pos + 8 + item_length))
            spans, pos = _parse(buf, pos + 8, pos + 8 + item_length, lengths)
        items.append(spans)
    return items, pos


Rule = Callable[[DataElement, tuple[Dataset, ...]], Hashable | None]
# a slot's value: a str (text or UID, ASCII), bytes (a binary value: Pixel Data) or a
# DataElement (encoded by pydicom in the template's character set)
Value = str | bytes | DataElement


@dataclass(frozen=True, slots=True)
class _Slot:
    start: int
    end: int
    tag: int
    vr: bytes
    name: Hashable


def _slots(
    ds: Dataset, spans: list[_Span], rule: Rule, parents: tuple[Dataset, ...]
) -> list[_Slot]:
    tags = sorted(ds.keys())  # the order they are written in
    if [int(t) for t in tags] != [s.tag for s in spans]:
        raise TemplateError("the encoded file and its dataset differ")
    found: list[_Slot] = []
    for tag, span in zip(tags, spans, strict=True):
        elem = ds[tag]  # decoded once, when the template is made
        name = rule(elem, parents)
        if name is not None:
            found.append(_Slot(span.start, span.end, span.tag, span.vr, name))
        elif span.items is not None:
            for item, item_spans in zip(elem.value, span.items, strict=True):
                found += _slots(item, item_spans, rule, (*parents, item))
    return found


def _encode_text(tag: int, vr: bytes, value: str) -> bytes:
    data = value.encode("ascii")
    if len(data) % 2:
        data += b"\0" if vr == b"UI" else b" "
    head = _TAG.pack(tag >> 16, tag & 0xFFFF) + vr
    if vr in _LONG_VRS:
        return head + b"\0\0" + struct.pack("<I", len(data)) + data
    if len(data) > 0xFFFF:
        raise ValueError(f"value too long for {vr.decode()}")
    return head + struct.pack("<H", len(data)) + data


def encode_binary(tag: int, vr: str, data: bytes) -> bytes:
    """A binary element (Pixel Data), padded to an even length."""
    if len(data) % 2:
        data += b"\0"
    return (
        _TAG.pack(tag >> 16, tag & 0xFFFF)
        + vr.encode()
        + b"\0\0"
        + struct.pack("<I", len(data))
        + data
    )


class Template:
    """One encoded result, split at its slots (see the module docstring)."""

    def __init__(self, ds: Dataset, rule: Rule) -> None:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        if data[128:132] != b"DICM":
            raise TemplateError("no DICOM preamble")
        meta_end = _meta_end(data)
        lengths: list[tuple[int, int, int]] = []
        meta_spans, _ = _parse(data, _PREAMBLE, meta_end, lengths)
        body, _ = _parse(data, meta_end, len(data), lengths)
        written = pydicom.dcmread(io.BytesIO(data))  # what was written, meta included
        meta_ds = Dataset()
        for elem in written.file_meta:
            if elem.tag != 0x00020000:
                meta_ds.add(elem)
        slots = _slots(meta_ds, meta_spans[1:], rule, ()) + _slots(written, body, rule, ())
        # the File Meta Information Group Length holds the group like a defined length
        lengths.append((_PREAMBLE + 8, _PREAMBLE + 12, meta_end))
        self.data = data
        self.slots = slots
        # each length that holds a slot (where it is written, its value, the slots inside);
        # one inside a slot is written with the slot's new element
        self.lengths: list[tuple[int, int, list[int]]] = []
        for at, start, end in lengths:
            inside = [i for i, s in enumerate(slots) if start <= s.start and s.end <= end]
            if inside and not any(s.start <= at < s.end for s in slots):
                self.lengths.append((at, struct.unpack_from("<I", data, at)[0], inside))
        # the order in which the constant bytes, slots and lengths are joined
        self.parts = sorted(
            [(s.start, s.end, i) for i, s in enumerate(slots)]
            + [(at, at + 4, -1 - j) for j, (at, _, _) in enumerate(self.lengths)]
        )
        self.names = frozenset(s.name for s in slots)
        self.encodings = convert_encodings(written.get("SpecificCharacterSet"))
        self.info: Any = None  # what the caller keeps with it (Templates.offer)

    def fill(self, values: Mapping[Hashable, Value]) -> bytes:
        """The file with each slot's element replaced by *values* [slot] (a :data:`Value`)
        and the lengths that hold them written again; a missing value is a KeyError."""
        new = [self._encode(slot, values[slot.name]) for slot in self.slots]
        delta = [len(b) - (s.end - s.start) for b, s in zip(new, self.slots, strict=True)]
        lengths = [
            struct.pack("<I", length + sum(delta[i] for i in inside))
            for _, length, inside in self.lengths
        ]
        data = self.data
        out = []
        pos = 0
        for start, end, index in self.parts:
            out.append(data[pos:start])
            out.append(new[index] if index >= 0 else lengths[-1 - index])
            pos = end
        out.append(data[pos:])
        return b"".join(out)

    def _encode(self, slot: _Slot, value: Value) -> bytes:
        if isinstance(value, bytes):
            return encode_binary(slot.tag, slot.vr.decode(), value)
        if isinstance(value, str) and value.isascii() and slot.vr != b"SQ":
            return _encode_text(slot.tag, slot.vr, value)
        elem = (
            value
            if isinstance(value, DataElement)
            else DataElement(slot.tag, slot.vr.decode(), value)
        )
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, self.encodings)
        return fp.getvalue()


def _meta_end(data: bytes) -> int:
    if data[_PREAMBLE : _PREAMBLE + 8] != b"\x02\x00\x00\x00UL\x04\x00":
        raise TemplateError("no File Meta Information Group Length")
    (length,) = struct.unpack_from("<I", data, _PREAMBLE + 8)
    return _PREAMBLE + 12 + length


def read(data: bytes) -> Dataset:
    """The dataset of a filled file, holding the file itself for :func:`encoded`."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.__dict__["_pacs_node_encoded"] = data
    return ds


def encoded(ds: Dataset) -> bytes:
    """*ds* as a DICOM file: the bytes a template filled for it, else pydicom's encoding."""
    data = ds.__dict__.get("_pacs_node_encoded")
    if data is not None:
        return data
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def forget_encoding(ds: Dataset) -> None:
    """Call before changing a dataset :func:`read` made: its file no longer says the same."""
    ds.__dict__.pop("_pacs_node_encoded", None)


class _Pending:
    """A shape seen once: its template, not yet checked against a second input."""

    def __init__(self, template: Template) -> None:
        self.template = template


class Templates:
    """Templates by shape, one store per process (bounded; thread-safe).

    :meth:`get` gives a template only once it has passed its check: the first input of a
    shape is built by the caller and kept (:meth:`offer`); the second is built by the caller
    too and both templates are filled with the second's values; equal bytes make the shape
    trusted, different ones rule it out (logged once: a slot the rule misses).
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, Template | _Pending | None] = OrderedDict()

    def get(self, key: Hashable) -> Template | None:
        with self._lock:
            found = self._items.get(key)
            if isinstance(found, Template):
                self._items.move_to_end(key)
                return found
            return None

    def undecided(self, key: Hashable) -> bool:
        """Whether an input of shape *key* would still make or check a template (neither
        trusted nor ruled out yet): otherwise :meth:`offer` has nothing to do."""
        with self._lock:
            return key not in self._items or isinstance(self._items[key], _Pending)

    def offer(
        self,
        key: Hashable,
        built: Dataset,
        rule: Callable[[], Rule],
        values: Callable[[], Mapping[Hashable, Value]],
        info: Any = None,
    ) -> None:
        """*built* is what the caller built (the slow way) for an input of shape *key*;
        *rule* makes a fresh rule for it (rules may count what they slot) and *values* gives
        that input's slot values, for the check; *info* is kept on the template
        (:attr:`Template.info`), for the caller's fills."""
        if not self.undecided(key):
            return
        with self._lock:
            pending = self._items.get(key)
        try:
            template = Template(built, rule())
            template.info = info
        except (TemplateError, ValueError, KeyError) as exc:
            log.warning("no template for a %s result: %s", built.get("Modality", "?"), exc)
            self._put(key, None)
            return
        if not isinstance(pending, _Pending):
            self._put(key, _Pending(template))
            return
        try:
            mine = values()
            same = template.names == pending.template.names and template.fill(
                mine
            ) == pending.template.fill(mine)
        except (KeyError, ValueError, TypeError) as exc:
            log.debug("template check failed: %s", exc)
            same = False
        if not same:
            log.warning(
                "the %s results of one shape differ outside their slots: built in full",
                built.get("Modality", "?"),
            )
        self._put(key, pending.template if same else None)

    def _put(self, key: Hashable, value: Template | _Pending | None) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
