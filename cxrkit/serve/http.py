"""Request plumbing of the service: bounded body reads, multipart parts, error -> HTTP status.

Nothing here knows about the model; ``app.py`` uses these to turn an HTTP request into the list
of byte strings it submits, and a typed cxrkit error into the status a client can act on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from ..errors import (
    BackendError,
    CxrkitError,
    DetectorClosedError,
    ImageTooLargeError,
    InputError,
    QueueFullError,
    UnsupportedFormatError,
)

__all__ = ["HTTPProblem", "Part", "read_body", "parse_multipart", "status_for"]

Receive = Callable[[], Awaitable[dict[str, Any]]]


class HTTPProblem(Exception):
    """An error answered with ``status`` and a JSON body ``{"error": {"type", "message"}}``."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = dict(headers or {})


class ClientGone(Exception):
    """The client closed the connection before its request body arrived whole."""


@dataclass(frozen=True)
class Part:
    """One file of a multipart request: the form field's name, the part's filename (or None), its bytes."""

    field: str
    filename: str | None
    data: bytes


def too_large(limit: int, what: str) -> HTTPProblem:
    return HTTPProblem(413, "PayloadTooLarge",
                       f"{what} exceeds the service's request limit of {limit} bytes (--max-body-mb); "
                       "send a smaller file, or ask the operator to raise the limit",
                       headers={"Connection": "close"})


async def read_body(headers: dict[str, str], receive: Receive, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    A ``Content-Length`` over the limit is refused before a single body byte is read (and before
    uvicorn answers an ``Expect: 100-continue``); a chunked body is refused at the chunk that
    crosses the limit. The 413 carries ``Connection: close`` so the rest is never read.
    Raises ``ClientGone`` if the client disconnects first.
    """
    cl = headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise HTTPProblem(400, "BadRequest", f"Content-Length {cl!r} is not a number") from None
        if n > limit:
            raise too_large(limit, f"the request body ({n} bytes, from Content-Length)")
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        body = msg.get("body", b"")
        if body:
            size += len(body)
            if size > limit:
                raise too_large(limit, f"the request body (more than {size} bytes so far, chunked)")
            chunks.append(body)
        if not msg.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_multipart(body: bytes, content_type: str, max_parts: int) -> list[Part]:
    """The file parts of a ``multipart/form-data`` body (already bounded in size), in order.

    Every part with a filename, or any part if none has one, is an image. Raises ``HTTPProblem``
    400 on a malformed body, a missing boundary, no parts, or more than ``max_parts`` parts.
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPProblem(400, "BadRequest", "multipart/form-data request without a boundary parameter in "
                          "Content-Type; let the HTTP client build the multipart body (e.g. curl -F file=@x.dcm)")
    parts: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}
    hname: list[bytes] = []
    hval: list[bytes] = []

    def on_part_begin() -> None:
        cur.clear()
        cur.update(headers={}, data=[])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        hname.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        hval.append(data[start:end])

    def on_header_end() -> None:
        cur["headers"][b"".join(hname).lower()] = b"".join(hval)
        hname.clear()
        hval.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        cur["data"].append(data[start:end])

    def on_part_end() -> None:
        if len(parts) >= max_parts:
            raise HTTPProblem(400, "BadRequest", f"more than {max_parts} parts in one multipart request "
                              "(--max-parts); split the request")
        parts.append({"headers": cur["headers"], "data": b"".join(cur["data"])})

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except HTTPProblem:
        raise
    except Exception as e:  # python-multipart raises its own MultipartParseError and ValueErrors
        raise HTTPProblem(400, "BadRequest", f"malformed multipart/form-data body: {e}") from e
    out: list[Part] = []
    for i, p in enumerate(parts):
        _, disp = parse_options_header(p["headers"].get(b"content-disposition", b""))
        field = disp.get(b"name", b"").decode("utf-8", "replace") or f"part{i}"
        fn = disp.get(b"filename")
        out.append(Part(field, fn.decode("utf-8", "replace") if fn is not None else None, p["data"]))
    if any(p.filename is not None for p in out):
        out = [p for p in out if p.filename is not None]
    if not out:
        raise HTTPProblem(400, "BadRequest", "multipart/form-data request with no parts; send one file part per "
                          "image (e.g. curl -F file=@a.png -F file=@b.dcm)")
    return out


def status_for(err: BaseException) -> int:
    """The HTTP status for a typed cxrkit error (of one item or of the request)."""
    if isinstance(err, UnsupportedFormatError):
        return 415
    if isinstance(err, ImageTooLargeError):
        return 413
    if isinstance(err, InputError):
        return 422
    if isinstance(err, (QueueFullError, DetectorClosedError)):
        return 503
    if isinstance(err, BackendError):
        return 500
    if isinstance(err, CxrkitError):
        return 500
    return 500


def retry_after_s(queue_depth: int, seconds_per_item: float | None, floor: int = 1, cap: int = 30) -> int:
    """Whole seconds until a queue of ``queue_depth`` should have drained (for ``Retry-After``)."""
    if not seconds_per_item or seconds_per_item <= 0:
        return floor
    return int(min(cap, max(floor, math.ceil(queue_depth * seconds_per_item))))
