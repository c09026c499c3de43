"""multipart/related (RFC 2387) both ways: read a STOW-RS body into files, write WADO-RS answers.

The reader streams: each part goes to its own temporary file as it arrives, so a request of
several gigabytes costs a chunk of memory, and it stops at the first thing wrong (no boundary,
a part without its header block, more bytes than allowed, a body that ends before the closing
delimiter) with :class:`MultipartError`, whose message is the reason the client is told.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

MAX_HEADER_BYTES = 16 * 1024  # one part's header block
MAX_PARTS = 10_000


class MultipartError(ValueError):
    """The body is not the multipart/related it claims to be (the client's fault: 400)."""


class TooLarge(MultipartError):
    """More bytes than the server takes in one request (413)."""


@dataclass
class Part:
    headers: dict[str, str]  # lower-case names
    path: Path

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def content_type_params(value: str) -> tuple[str, dict[str, str]]:
    """The media type (lower case) and its parameters, quotes removed."""
    message = Message()
    message["content-type"] = value
    params = {k.lower(): v for k, v in message.get_params(failobj=[])[1:]}
    return message.get_content_type(), params


async def read_parts(
    chunks: AsyncIterator[bytes], boundary: str, folder: Path, max_bytes: int, prefix: str = ""
) -> list[Part]:
    """The parts of a multipart body with *boundary*, each written to a file in *folder*
    (named *prefix*...``.part``). On any error every file written so far is removed before
    :class:`MultipartError`."""
    if not boundary or len(boundary) > 70:
        raise MultipartError("the multipart boundary is missing or longer than 70 characters")
    parts: list[Part] = []
    try:
        await _read(chunks, boundary.encode("latin-1"), folder, max_bytes, parts, prefix)
    except BaseException:
        for part in parts:
            part.path.unlink(missing_ok=True)
        raise
    return parts


async def _read(
    chunks: AsyncIterator[bytes],
    boundary: bytes,
    folder: Path,
    max_bytes: int,
    parts: list[Part],
    prefix: str,
) -> None:
    first = b"--" + boundary
    delimiter = b"\r\n--" + boundary
    buffer = b""
    total = 0
    state = "preamble"
    out = None

    async def more() -> bool:
        nonlocal buffer, total
        async for chunk in chunks:
            total += len(chunk)
            if total > max_bytes:
                raise TooLarge(f"the request body is over {max_bytes} bytes")
            buffer += chunk
            return True
        return False

    try:
        while True:
            if state == "preamble":
                at = buffer.find(first)
                if at < 0:
                    if len(buffer) > MAX_HEADER_BYTES:
                        raise MultipartError("no multipart boundary where the body starts")
                    if not await more():
                        raise MultipartError("the body holds no part (boundary not found)")
                    continue
                buffer = buffer[at + len(first) :]
                state = "after-boundary"
            elif state == "after-boundary":
                if len(buffer) < 2 and await more():
                    continue
                if buffer.startswith(b"--"):
                    return  # the closing delimiter; an epilogue after it is ignored
                if not buffer.startswith(b"\r\n"):
                    if len(buffer) < 2:
                        raise MultipartError("the body ends after a boundary")
                    raise MultipartError("a boundary is not followed by a line break")
                buffer = buffer[2:]
                state = "headers"
            elif state == "headers":
                at = buffer.find(b"\r\n\r\n")
                if at < 0 and buffer.startswith(b"\r\n"):
                    at = -2  # a part with no headers at all
                if at == -1:
                    if len(buffer) > MAX_HEADER_BYTES:
                        raise MultipartError("a part's header block is too long")
                    if not await more():
                        raise MultipartError("the body ends inside a part's headers")
                    continue
                block, buffer = buffer[: max(at, 0)], buffer[at + 4 :]
                headers = _headers(block)
                if len(parts) >= MAX_PARTS:
                    raise MultipartError(f"more than {MAX_PARTS} parts")
                fd, name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=folder)
                out = os.fdopen(fd, "wb")
                parts.append(Part(headers, Path(name)))
                state = "body"
            elif state == "body":
                assert out is not None
                at = buffer.find(delimiter)
                if at >= 0:
                    out.write(buffer[:at])
                    out.close()
                    out = None
                    buffer = buffer[at + len(delimiter) :]
                    state = "after-boundary"
                    continue
                keep = len(delimiter)  # the delimiter may straddle two chunks
                if len(buffer) > keep:
                    out.write(buffer[:-keep])
                    buffer = buffer[-keep:]
                if not await more():
                    raise MultipartError("the body ends inside a part (no closing boundary)")
    finally:
        if out is not None:
            out.close()


def _headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw in block.split(b"\r\n"):
        if not raw:
            continue
        line = raw.decode("latin-1")
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
            raise MultipartError(f"a part header is not 'Name: value': {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


def related_body(
    parts: Iterator[tuple[dict[str, str], Iterator[bytes]]], boundary: str
) -> Iterator[bytes]:
    """A multipart/related body from (headers, chunks of the body) pairs, as it is sent."""
    for headers, body in parts:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        yield f"--{boundary}\r\n{head}\r\n".encode("latin-1")
        yield from body
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("latin-1")
