"""DICOMweb (PS3.18) over what the node holds: QIDO-RS, WADO-RS and STOW-RS under /dicomweb.

- QIDO-RS: studies, series and instances, matched by :mod:`storage.query` exactly as C-FIND
  matches (the same keys, wildcards, ranges and UID lists; a comma-separated UID list is a
  list), ``includefield`` (or ``all``), ``limit`` and ``offset``; ``application/dicom+json``.
- WADO-RS: instances, series and studies as ``multipart/related; type="application/dicom"``
  (the files as stored, streamed), their metadata as ``application/dicom+json`` (values over
  1 KiB, Pixel Data among them, as BulkDataURIs), frames as ``application/octet-stream`` in the
  stored transfer syntax, bulk data, and rendered images (PNG, or JPEG when asked) for
  thumbnails.
- STOW-RS: a ``multipart/related; type="application/dicom"`` body is read part by part to disk
  and each instance stored and queued exactly like a C-STORE (:func:`pacs_node.handlers.admit`);
  the answer lists what was stored and, for each failure, its Failure Reason (the C-STORE status
  code) with the reason in an ErrorComment.

Bad requests get a 4xx with the reason as text: an identifier that is not a UID (which also
keeps paths inside the storage folder), an unknown attribute, a wrong content type, a body that
is not the multipart it claims, one over ``web.max_upload_bytes``. Nothing is half stored: a
part that fails is removed with its temporary file.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.tag import BaseTag, Tag
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from pacs_node import audit, statuses, wake
from pacs_node.audit import AuditTrail
from pacs_node.config import Config
from pacs_node.handlers import Admission, admit
from pacs_node.web.multipart import MultipartError, TooLarge, content_type_params, read_parts
from pacs_node.web.multipart import related_body as _related_body
from storage import query, refusals
from storage.db import Database
from storage.errors import QueryError
from storage.files import FileStore
from storage.models import utcnow

log = logging.getLogger(__name__)

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
DICOM_JSON = "application/dicom+json"
BULK_THRESHOLD = 1024
CHUNK = 256 * 1024
NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}  # + deflated:
NATIVE.add("1.2.840.10008.1.2.1.99")  # pydicom inflates it on reading

# the attributes each level returns without includefield (PS3.18 table 10.6.3-3), of those the
# node indexes
DEFAULT_FIELDS = {
    query.Level.STUDY: (
        "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
        "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "StudyInstanceUID", "StudyID", "StudyDescription", "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    query.Level.SERIES: (
        "Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances", "StudyInstanceUID", "BodyPartExamined",
    ),
    query.Level.IMAGE: (
        "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
        "StudyInstanceUID", "SeriesInstanceUID",
    ),
}  # fmt: skip
_DA, _TM = r"\d{8}", r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?"
MATCH_FORMS = {  # a matching value of these VRs: one value or a range (PS3.4 C.2.2.2.5)
    "DA": re.compile(rf"({_DA})?-?({_DA})?"),
    "TM": re.compile(rf"({_TM})?-?({_TM})?"),
}
SPECIAL_PARAMS = {"limit", "offset", "includefield", "fuzzymatching"}


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _text(status: int, message: str) -> Response:
    return PlainTextResponse(message + "\n", status_code=status)


def _uid(request: Request, name: str) -> str:
    value = str(request.path_params.get(name, ""))
    if len(value) > 64 or not UID_RE.match(value):
        raise BadRequest(f"{name}: {value[:70]!r} is not a UID")
    return value


class DicomWeb:
    """The DICOMweb routes, bound to what they need (the way the DIMSE handlers are)."""

    def __init__(
        self, config: Config, db: Database, files: FileStore, base: str, trail: AuditTrail
    ) -> None:
        self.config, self.db, self.files, self.base = config, db, files, base
        self.workers = wake.Nudger(files.root, wake.WORK)  # told of a radiograph due at once
        self.trail = trail
        self.refused = refusals.Tally(db)

    def close(self) -> None:
        self.refused.close()

    def _client(self, request: Request, role: audit.Code | None) -> audit.Participant:
        address = request.client.host if request.client else ""
        return audit.Participant(f"http client {address or '?'}", True, role, address=address)

    def routes(self) -> list[Route]:
        s, se, i = "{study}", "{series}", "{instance}"
        qido = self.qido
        return [
            Route("/studies", qido, methods=["GET"]),
            Route("/studies", self.stow, methods=["POST"]),
            Route("/series", qido, methods=["GET"]),
            Route("/instances", qido, methods=["GET"]),
            Route(f"/studies/{s}", self.wado, methods=["GET"]),
            Route(f"/studies/{s}", self.stow, methods=["POST"]),
            Route(f"/studies/{s}/metadata", self.metadata, methods=["GET"]),
            Route(f"/studies/{s}/series", qido, methods=["GET"]),
            Route(f"/studies/{s}/instances", qido, methods=["GET"]),
            Route(f"/studies/{s}/series/{se}", self.wado, methods=["GET"]),
            Route(f"/studies/{s}/series/{se}/metadata", self.metadata, methods=["GET"]),
            Route(f"/studies/{s}/series/{se}/instances", qido, methods=["GET"]),
            Route(f"/studies/{s}/series/{se}/instances/{i}", self.wado, methods=["GET"]),
            Route(f"/studies/{s}/series/{se}/instances/{i}/metadata", self.metadata),
            Route(f"/studies/{s}/series/{se}/instances/{i}/rendered", self.rendered),
            Route(f"/studies/{s}/series/{se}/instances/{i}/thumbnail", self.rendered),
            Route(f"/studies/{s}/series/{se}/instances/{i}/frames/{{frames}}", self.frames),
            Route(
                f"/studies/{s}/series/{se}/instances/{i}/frames/{{frames}}/rendered",
                self.rendered,
            ),
            Route(f"/studies/{s}/series/{se}/instances/{i}/bulkdata/{{tag}}", self.bulkdata),
        ]

    # -- QIDO-RS ---------------------------------------------------------------------------

    async def qido(self, request: Request) -> Response:
        try:
            identifier, limit, offset = self._qido_identifier(request)
        except BadRequest as exc:
            return _text(exc.status, str(exc))
        asked = str(request.url.path) + ("?" + request.url.query if request.url.query else "")
        try:
            answers = await asyncio.to_thread(self._search, identifier, limit, offset)
        except QueryError as exc:
            self.trail.query(
                self._client(request, audit.SOURCE),
                sop_class="",
                query=asked.encode("utf-8"),
                outcome=audit.MINOR_FAILURE,
                description=str(exc),
            )
            return _text(400, str(exc))
        self.trail.query(self._client(request, audit.SOURCE), sop_class="", query=asked.encode())
        return JSONResponse(answers, media_type=DICOM_JSON)

    def _qido_identifier(self, request: Request) -> tuple[Dataset, int | None, int]:
        path = request.url.path
        level = (
            query.Level.STUDY
            if path.endswith("/studies")
            else query.Level.SERIES
            if path.endswith("/series")
            else query.Level.IMAGE
        )
        identifier = Dataset()
        identifier.QueryRetrieveLevel = level.name
        fields = list(DEFAULT_FIELDS[level])
        params = request.query_params
        for value in params.getlist("includefield"):
            for name in value.split(","):
                name = name.strip()
                if name == "all":
                    fields += [k for k, key in query.KEYS.items() if key.level <= level]
                elif name:
                    fields.append(_keyword(name))
        for keyword in dict.fromkeys(fields):
            if keyword in query.KEYS:
                setattr(identifier, keyword, None)
        for name, value in params.multi_items():
            if name in SPECIAL_PARAMS:
                continue
            keyword = _keyword(name)
            vr = dictionary_VR(keyword)
            if vr == "UI":
                value = "\\".join(v.strip() for v in value.split(","))
            elif vr in MATCH_FORMS and not MATCH_FORMS[vr].fullmatch(value):
                raise BadRequest(f"{name}: {value[:40]!r} is not a {vr} value or range of them")
            try:
                setattr(identifier, keyword, value)
            except Exception as exc:
                raise BadRequest(f"{name}: cannot match on {value!r}: {exc}") from None
        for name in ("study", "series"):
            if name in request.path_params:
                keyword = "StudyInstanceUID" if name == "study" else "SeriesInstanceUID"
                setattr(identifier, keyword, _uid(request, name))
        if params.get("fuzzymatching", "false") not in ("false", ""):
            raise BadRequest("fuzzymatching is not supported")
        limit, offset = _count(params.get("limit"), "limit"), _count(params.get("offset"), "offset")
        return identifier, limit, offset or 0

    def _search(self, identifier: Dataset, limit: int | None, offset: int) -> list[dict[str, Any]]:
        with self.db.read() as session:
            matches = query.find(session, identifier)
            stop = None if limit is None else offset + limit
            out = []
            for ds in itertools.islice(matches, offset, stop):
                del ds.QueryRetrieveLevel
                answer = _json(ds.to_json_dict())
                answer["00081190"] = {"vr": "UR", "Value": [self._retrieve_url(ds)]}
                out.append(answer)
            return out

    def _retrieve_url(self, ds: Dataset) -> str:
        url = f"{self.base}/studies/{ds.StudyInstanceUID}"
        if "SeriesInstanceUID" in ds and ds.SeriesInstanceUID:
            url += f"/series/{ds.SeriesInstanceUID}"
            if "SOPInstanceUID" in ds and ds.SOPInstanceUID:
                url += f"/instances/{ds.SOPInstanceUID}"
        return url

    # -- WADO-RS ---------------------------------------------------------------------------

    def _selected(self, request: Request) -> list[query.Stored]:
        identifier = Dataset()
        identifier.StudyInstanceUID = _uid(request, "study")
        level = query.Level.STUDY
        if "series" in request.path_params:
            identifier.SeriesInstanceUID = _uid(request, "series")
            level = query.Level.SERIES
        if "instance" in request.path_params:
            identifier.SOPInstanceUID = _uid(request, "instance")
            level = query.Level.IMAGE
        identifier.QueryRetrieveLevel = level.name
        with self.db.read() as session:
            found = query.retrieve(session, identifier)
            if found and self.trail.enabled:
                uids = [item.sop_instance_uid for item in found]
                self.trail.transferred(
                    audit.studies_of(query.subjects(session, uids)),
                    action=audit.READ,
                    source=self.trail.node(requestor=False, role=audit.SOURCE),
                    destination=self._client(request, audit.DESTINATION),
                )
        if not found:
            raise BadRequest("no such " + level.name.lower().replace("image", "instance"), 404)
        return sorted(found, key=lambda s: s.path)

    async def wado(self, request: Request) -> Response:
        accept = request.headers.get("accept", "")
        if accept and not any(
            t in accept for t in ("multipart/related", "application/dicom", "*/*")
        ):
            return _text(406, f"{accept!r}: this resource is multipart/related application/dicom")
        try:
            stored = await asyncio.to_thread(self._selected, request)
        except BadRequest as exc:
            return _text(exc.status, str(exc))
        boundary = secrets.token_hex(16)
        paths = [self.files.abspath(s.path) for s in stored]

        def parts() -> Iterator[tuple[dict[str, str], Iterator[bytes]]]:
            for path in paths:
                yield {"Content-Type": "application/dicom"}, _file_chunks(path)

        return StreamingResponse(
            _related_body(parts(), boundary),
            media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
        )

    async def metadata(self, request: Request) -> Response:
        try:
            stored = await asyncio.to_thread(self._selected, request)
            answer = await asyncio.to_thread(self._metadata, stored)
        except BadRequest as exc:
            return _text(exc.status, str(exc))
        return JSONResponse(answer, media_type=DICOM_JSON)

    def _metadata(self, stored: Sequence[query.Stored]) -> list[dict[str, Any]]:
        out = []
        for item in stored:
            ds = pydicom.dcmread(self.files.abspath(item.path), defer_size=BULK_THRESHOLD)
            base = (
                f"{self.base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                f"/instances/{ds.SOPInstanceUID}"
            )

            def bulk(elem: Any, base: str = base) -> str:
                return f"{base}/bulkdata/{elem.tag:08X}"

            answer = _json(
                ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=bulk)
            )
            answer["00083002"] = {"vr": "UI", "Value": [str(ds.file_meta.TransferSyntaxUID)]}
            out.append(answer)
        return out

    async def frames(self, request: Request) -> Response:
        try:
            numbers = _frame_numbers(str(request.path_params["frames"]))
            (item,) = await asyncio.to_thread(self._selected, request)
            syntax, data = await asyncio.to_thread(self._frames, item, numbers)
        except BadRequest as exc:
            return _text(exc.status, str(exc))
        boundary = secrets.token_hex(16)
        kind = f"application/octet-stream; transfer-syntax={syntax}"

        def parts() -> Iterator[tuple[dict[str, str], Iterator[bytes]]]:
            for frame in data:
                yield {"Content-Type": kind}, iter([frame])

        return StreamingResponse(
            _related_body(parts(), boundary),
            media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}',
        )

    def _frames(self, item: query.Stored, numbers: list[int]) -> tuple[str, list[bytes]]:
        ds = pydicom.dcmread(self.files.abspath(item.path))
        if "PixelData" not in ds:
            raise BadRequest("this instance has no Pixel Data", 404)
        count = int(ds.get("NumberOfFrames") or 1)
        if any(n > count for n in numbers):
            raise BadRequest(f"the instance has {count} frame(s)", 404)
        syntax = str(ds.file_meta.TransferSyntaxUID)
        if syntax in NATIVE:
            bits = int(ds.BitsAllocated)
            size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
            data = ds.PixelData
            return syntax, [data[(n - 1) * size : n * size] for n in numbers]
        frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        return syntax, [frames[n - 1] for n in numbers]

    async def bulkdata(self, request: Request) -> Response:
        try:
            tag = _tag(str(request.path_params["tag"]))
            (item,) = await asyncio.to_thread(self._selected, request)
            ds = await asyncio.to_thread(pydicom.dcmread, self.files.abspath(item.path))
            if tag not in ds:
                raise BadRequest(f"the instance has no {tag}", 404)
            value = ds[tag].value
        except BadRequest as exc:
            return _text(exc.status, str(exc))
        boundary = secrets.token_hex(16)
        body = value if isinstance(value, bytes) else str(value).encode()
        return StreamingResponse(
            _related_body(iter([({"Content-Type": "application/octet-stream"}, iter([body]))]),
                          boundary),
            media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}',
        )  # fmt: skip

    async def rendered(self, request: Request) -> Response:
        jpeg = "image/jpeg" in request.headers.get("accept", "")
        try:
            frame = _frame_numbers(str(request.path_params.get("frames", "1")))[0]
            (item,) = await asyncio.to_thread(self._selected, request)
            data = await asyncio.to_thread(self._render, item, frame, jpeg)
        except BadRequest as exc:
            return _text(exc.status, str(exc))
        return Response(data, media_type="image/jpeg" if jpeg else "image/png")

    def _render(self, item: query.Stored, frame: int, jpeg: bool) -> bytes:
        from PIL import Image  # pillow comes with matplotlib

        ds = pydicom.dcmread(self.files.abspath(item.path))
        if "PixelData" not in ds:
            raise BadRequest("this instance has no Pixel Data to render", 404)
        try:
            pixels = ds.pixel_array
        except Exception as exc:
            raise BadRequest(f"cannot decode the Pixel Data: {exc}", 422) from None
        count = int(ds.get("NumberOfFrames") or 1)
        if frame > count:
            raise BadRequest(f"the instance has {count} frame(s)", 404)
        if count > 1:
            pixels = pixels[frame - 1]
        image = _display(ds, np.asarray(pixels))
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="JPEG" if jpeg else "PNG")
        return out.getvalue()

    # -- STOW-RS ---------------------------------------------------------------------------

    async def stow(self, request: Request) -> Response:
        kind, params = content_type_params(request.headers.get("content-type", ""))
        part_type = params.get("type", "").lower()
        if kind != "multipart/related" or part_type not in ("application/dicom", ""):
            return _text(415, 'expected Content-Type: multipart/related; type="application/dicom"')
        study = None
        if "study" in request.path_params:
            try:
                study = _uid(request, "study")
            except BadRequest as exc:
                return _text(exc.status, str(exc))
        declared = request.headers.get("content-length")
        limit = self.config.web.max_upload_bytes
        if declared and declared.isdigit() and int(declared) > limit:
            return _text(413, f"the request body is over {limit} bytes")
        try:
            parts = await read_parts(
                request.stream(),
                params.get("boundary", ""),
                self.files.tmp_dir,
                limit,
                self.files.partial_prefix(),
            )
        except TooLarge as exc:
            return _text(413, str(exc))
        except MultipartError as exc:
            return _text(400, f"malformed multipart body: {exc}")
        if not parts:
            return _text(400, "the multipart body holds no part")
        sender = self._client(request, audit.SOURCE)
        results = await asyncio.to_thread(
            self._store_parts, parts, study, f"STOW-RS {sender.address or '?'}", sender
        )
        stored = [r for r in results if r.admission.stored]
        answer: dict[str, Any] = {}
        if study:
            answer["00081190"] = {"vr": "UR", "Value": [f"{self.base}/studies/{study}"]}
        if stored:
            answer["00081199"] = {"vr": "SQ", "Value": [
                {"00081150": {"vr": "UI", "Value": [r.sop_class]},
                 "00081155": {"vr": "UI", "Value": [r.sop_uid]},
                 "00081190": {"vr": "UR", "Value": [r.url]}}
                for r in stored
            ]}  # fmt: skip
        failed = [r for r in results if not r.admission.stored]
        if failed:
            answer["00081198"] = {
                "vr": "SQ",
                "Value": [
                    _failed_item(r.sop_class, r.sop_uid, r.admission.code, r.admission.comment)
                    for r in failed
                ],
            }
        code = 200 if not failed else 202 if stored else 409
        return JSONResponse(answer, status_code=code, media_type=DICOM_JSON)

    def _store_parts(
        self, parts: list[Any], study: str | None, source: str, sender: audit.Participant
    ) -> list[Stowed]:
        """What became of each part, in order; refusals counted, the stored audited per study."""
        results = []
        for part in parts:
            try:
                results.append(self._store_part(part, study, source))
            finally:
                part.path.unlink(missing_ok=True)  # adopted when stored; else gone
        studies: dict[str, audit.StudyRecord] = {}
        for r in results:
            if not r.admission.stored:
                self.refused.add("instance", r.admission.label)
            if r.subject is not None and r.subject.study_uid:
                record = studies.setdefault(r.subject.study_uid, r.subject)
                if r.admission.stored:
                    record.tally(r.sop_class)
                else:
                    record.refuse(r.admission.comment)
        self.trail.transferred(
            studies.values(),
            action=audit.CREATE,
            source=sender,
            destination=self.trail.node(requestor=False, role=audit.DESTINATION),
        )
        return results

    def _store_part(self, part: Any, study: str | None, source: str) -> Stowed:
        part_type, _ = content_type_params(part.content_type or "application/dicom")
        if part_type != "application/dicom":
            why = f"part is {part_type}, not application/dicom"
            return Stowed(
                "", "", Admission(statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, why, "media_type")
            )
        size = part.path.stat().st_size
        try:
            ds = pydicom.dcmread(part.path, defer_size=65536)
            sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
        except Exception as exc:
            why = f"not a DICOM file: {exc}"[:200]
            return Stowed("", "", Admission(statuses.CANNOT_UNDERSTAND, why, "unreadable"))
        subject = audit.from_dataset(ds)
        if not UID_RE.match(sop_uid) or len(sop_uid) > 64:
            why = "SOPInstanceUID is not a UID"
            refused = Admission(statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, why, "invalid_uid")
            return Stowed(sop_class, sop_uid, refused, subject=subject)
        if study is not None and str(ds.get("StudyInstanceUID", "")) != study:
            why = f"the instance belongs to study {ds.get('StudyInstanceUID', '')}, not {study}"
            refused = Admission(statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, why, "wrong_study")
            return Stowed(sop_class, sop_uid, refused, subject=subject)
        admission = admit(
            self.config,
            self.files,
            self.db,
            ds,
            part.path,
            size,
            source,
            how="STOW-RS",
            sender_ae="",  # no DICOM peer is owed the results: they are queried back
        )
        if admission.due is not None and admission.due <= utcnow():
            self.workers.nudge()
        url = (
            f"{self.base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{sop_uid}"
        )
        return Stowed(sop_class, sop_uid, admission, url, subject)


@dataclass
class Stowed:
    """What became of one STOW-RS part."""

    sop_class: str
    sop_uid: str
    admission: Admission
    url: str = ""
    subject: audit.StudyRecord | None = None  # its study and patient, when it could be read


def _json(answer: dict[str, Any]) -> dict[str, Any]:
    """pydicom's DICOM JSON made as PS3.18 F.2 and viewers expect: an empty attribute has no
    "Value" (pydicom writes an empty list for an empty sequence, which OHIF's SR reader trips
    on), and no group lengths (gggg0000, retired)."""
    out = {}
    for tag, element in answer.items():
        if tag.endswith("0000"):
            continue
        value = element.get("Value")
        if value == []:
            element = {k: v for k, v in element.items() if k != "Value"}
        elif element.get("vr") == "SQ" and value:
            element = {**element, "Value": [_json(item) for item in value]}
        out[tag] = element
    return out


def _failed_item(sop_class: str, sop_uid: str, code: int, reason: str) -> dict[str, Any]:
    item: dict[str, Any] = {"00081197": {"vr": "US", "Value": [code]}}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_uid:
        item["00081155"] = {"vr": "UI", "Value": [sop_uid]}
    if reason:
        item["00000902"] = {"vr": "LO", "Value": [reason[:64]]}
    return item


def _keyword(name: str) -> str:
    """A QIDO attribute, given by keyword or by tag (ggggeeee), as its keyword."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        keyword = keyword_for_tag(Tag(int(name, 16)))
        if keyword:
            return keyword
    elif tag_for_keyword(name) is not None:
        return name
    raise BadRequest(f"{name!r} is not a DICOM attribute keyword or tag")


def _count(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit() or len(value) > 9:
        raise BadRequest(f"{name} must be a non-negative integer, got {value[:20]!r}")
    return int(value)


def _frame_numbers(text: str) -> list[int]:
    numbers = []
    for part in text.split(","):
        if not part.isdigit() or int(part) < 1 or len(part) > 6:
            raise BadRequest(f"frame numbers are positive integers, got {text[:30]!r}")
        numbers.append(int(part))
    if len(numbers) > 1000:
        raise BadRequest("at most 1000 frames at a time")
    return numbers


def _tag(text: str) -> BaseTag:
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", text):
        raise BadRequest(f"{text[:20]!r} is not a tag (ggggeeee)")
    return Tag(int(text, 16))


def _display(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """8-bit pixels for a thumbnail: the first window if the header has one, else min-max;
    MONOCHROME1 inverted; colour images as they are."""
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        return np.asarray(pixels[..., :3], dtype=np.uint8)
    data = pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0
    )
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        low, high = c - w / 2, c + w / 2
    else:
        low, high = float(data.min()), float(data.max())
    scaled = np.clip((data - low) / max(high - low, 1e-6), 0, 1)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 1 - scaled
    return np.asarray(scaled * 255, dtype=np.uint8)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk
