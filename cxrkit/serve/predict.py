"""``POST /v1/predict`` as a plain ASGI endpoint (the hot path: no FastAPI dependency solving, no
Starlette middleware stack; measured on the 2-core box, those layers were ~1/6 of the event
loop's time per request).

One image as the raw body (JPEG, PNG or DICOM, sniffed from the content, never from headers), or
several as ``multipart/form-data`` file parts. Single image: the Prediction JSON, status 200 or the
4xx of its typed input error (415 unsupported format, 413 image over the pixel/file limits, 422
corrupt or inconsistent), with the same content as a line of ``cxrkit predict``'s JSONL.
Multipart: ``{"predictions": [...], "statuses": [...]}`` in part order, each source the part's
filename; 200 if any image succeeded, otherwise the first image's status.

``?dicom=sr`` (or ``sr,gsps,sc``, any of them): for one image, its DICOM outputs from
``cxrkit.dicom.make_outputs`` (TID 1500 Comprehensive SR, presentation state, burned-in Secondary
Capture) as ``multipart/related; type="application/dicom"``, a JPEG/PNG source's own Secondary
Capture first (the outputs reference it). A failed image answers its 4xx JSON as usual.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from ..batching import restamp
from ..errors import DetectorClosedError, QueueFullError
from ..results import Prediction
from .http import ClientGone, HTTPProblem, parse_multipart, read_body, status_for

if TYPE_CHECKING:
    from .app import Service

__all__ = ["PredictEndpoint", "prediction_json", "error_body", "dicom_outputs_available"]

log = logging.getLogger(__name__)

_JSON_HEADERS = [(b"content-type", b"application/json")]


def prediction_json(pred: Prediction) -> bytes:
    """The Prediction as JSON bytes: the same content as a line of ``cxrkit predict``'s JSONL."""
    fast = getattr(pred, "to_json", None)  # results.py's serializer from columns, where it has one
    if callable(fast):
        out = fast()
        return out.encode() if isinstance(out, str) else out
    return json.dumps(pred.to_dict(), separators=(",", ":")).encode()


def error_body(type_: str, message: str) -> bytes:
    return json.dumps({"error": {"type": type_, "message": message}}).encode()


def dicom_outputs_available() -> bool:
    """cxrkit.dicom (make_outputs) and highdicom are importable."""
    import importlib.util

    return importlib.util.find_spec("cxrkit.dicom") is not None and importlib.util.find_spec("highdicom") is not None


def dicom_multipart(pred: Prediction, source: bytes, kinds: tuple[str, ...], model: Any) -> tuple[bytes, str]:
    """The DICOM outputs of ``pred`` as a ``multipart/related; type="application/dicom"`` body (the
    DICOMweb form), in the order to store them: for a JPEG/PNG source the Secondary Capture holding
    the input image (the others reference it) comes first. Runs off the event loop (highdicom)."""
    import io
    import uuid

    from ..dicom import make_outputs

    outs = make_outputs(pred, source, kinds=kinds, model=model)
    boundary = uuid.uuid4().hex
    parts = []
    for ds in outs.datasets():
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        parts.append(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + buf.getvalue()
                     + b"\r\n")
    body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


async def respond(send: Any, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    h = [(b"content-length", str(len(body)).encode())]
    if headers:
        h += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if not headers or "Content-Type" not in headers:
        h += _JSON_HEADERS
    await send({"type": "http.response.start", "status": status, "headers": h})
    await send({"type": "http.response.body", "body": body})


class PredictEndpoint:
    """The ASGI app of ``POST /v1/predict`` (also counts itself in the request metrics)."""

    def __init__(self, service: "Service") -> None:
        self.svc = service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        svc = self.svc
        t0 = time.perf_counter()
        status = 500
        svc.in_flight += 1
        try:
            status, body, headers = await self._handle(scope, receive)
        except HTTPProblem as e:
            svc.metrics.error(e.type)
            status, body, headers = e.status, error_body(e.type, e.message), e.headers
        except Exception as e:  # noqa: BLE001 - answer 500 with the reason and keep serving
            log.exception("POST /v1/predict failed")
            svc.metrics.error(type(e).__name__)
            status, body, headers = 500, error_body(type(e).__name__, f"internal error: {e}"), None
        finally:
            svc.in_flight -= 1
        try:
            if status != 499:  # 499: the client is gone, nobody to answer
                await respond(send, status, body, headers)
        finally:
            svc.metrics.observe_request("/v1/predict", status, time.perf_counter() - t0)

    async def _handle(self, scope: dict, receive: Any) -> tuple[int, bytes, dict[str, str] | None]:
        svc = self.svc
        cfg = svc.config
        if scope["method"] != "POST":
            raise HTTPProblem(405, "MethodNotAllowed", f"{scope['method']} /v1/predict: only POST is allowed",
                              {"Allow": "POST"})
        kinds = None
        if scope["query_string"]:
            kinds = _check_query(dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)))
        bd = svc.accepting()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k in (b"content-length", b"content-type")}
        t0 = time.perf_counter()
        try:
            body = await read_body(headers, receive, cfg.max_body_bytes)
        except ClientGone:
            svc.metrics.error("ClientDisconnected")
            return 499, b"", None
        ctype = headers.get("content-type", "")
        multipart = ctype.lower().startswith("multipart/form-data")
        if multipart:
            if kinds:
                raise HTTPProblem(400, "BadRequest", "?dicom= takes one image per request (the raw body), not "
                                  "multipart; post each image on its own")
            parts = parse_multipart(body, ctype, cfg.max_parts)
            items = [p.data for p in parts]
        elif not body:
            raise HTTPProblem(400, "BadRequest", "empty request body: POST the bytes of one JPEG, PNG or DICOM "
                              "file (curl --data-binary @scan.dcm), or multipart/form-data file parts")
        else:
            items = [body]
        futs: list[Future] = []
        try:
            for it in items:
                futs.append(bd.submit(it))
        except (QueueFullError, DetectorClosedError) as e:
            for f in futs:
                f.cancel()
            raise HTTPProblem(503, type(e).__name__, str(e), {"Retry-After": svc.retry_after()}) from None
        t_read = time.perf_counter() - t0
        res = await svc.results(futs, receive)
        if res is None:
            return 499, b"", None  # nobody is listening; counted as a drop
        t1 = time.perf_counter()
        m = svc.metrics
        out: list[bytes] = []
        statuses: list[int] = []
        for i, r in enumerate(res):
            if isinstance(r, BaseException):
                if isinstance(r, DetectorClosedError):
                    m.dropped.labels(reason="shutdown_deadline").inc()
                st = status_for(r)
                if not multipart:
                    raise HTTPProblem(st, type(r).__name__, str(r), {"Retry-After": svc.retry_after()} if st == 503
                                      else None)
                m.error(type(r).__name__)
                out.append(json.dumps({"source": parts[i].filename, "index": i,
                                       "error": {"type": type(r).__name__, "message": str(r)}}).encode())
                statuses.append(st)
                continue
            if multipart:
                r = restamp(r, 0, index=i, source=parts[i].filename)
            if r.error is None:
                m.stage["read"].observe(t_read / len(items))
                m.observe_timings(r.timings_ms)
                statuses.append(200)
            else:
                m.error(type(r.error).__name__)
                statuses.append(status_for(r.error))
            out.append(prediction_json(r))
        if multipart:
            status = 200 if 200 in statuses else statuses[0]
            payload = b'{"predictions":[' + b",".join(out) + b'],"statuses":' + json.dumps(statuses).encode() + b"}"
        elif kinds and statuses[0] == 200:
            return await self._dicom(res[0], body, kinds)
        else:
            status, payload = statuses[0], out[0]
        m.stage["respond"].observe((time.perf_counter() - t1) / len(items))
        return status, payload, None

    async def _dicom(self, pred: Prediction, source: bytes,
                     kinds: tuple[str, ...]) -> tuple[int, bytes, dict[str, str] | None]:
        import asyncio

        from ..errors import InputError

        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            body, ctype = await loop.run_in_executor(None, dicom_multipart, pred, source, kinds, self.svc.detector)
        except InputError as e:
            raise HTTPProblem(422, type(e).__name__, f"no DICOM outputs: {e}") from None
        self.svc.metrics.stage["dicom"].observe(time.perf_counter() - t0)
        return 200, body, {"Content-Type": ctype}


def _check_query(q: dict[str, str]) -> tuple[str, ...] | None:
    """The DICOM output kinds asked for with ``?dicom=sr[,gsps,sc]``, or None."""
    unknown = sorted(set(q) - {"dicom"})
    if unknown:
        raise HTTPProblem(400, "BadRequest", f"unknown query parameter(s) {unknown}; /v1/predict takes only "
                          "?dicom=sr (or a comma-separated list of sr, gsps, sc)")
    d = q.get("dicom")
    if d is None:
        return None
    kinds = tuple(dict.fromkeys(k.strip() for k in d.split(",") if k.strip()))
    bad = [k for k in kinds if k not in ("sr", "gsps", "sc")]
    if bad or not kinds:
        raise HTTPProblem(400, "BadRequest", f"dicom={d!r}: expected sr, gsps, sc or a comma-separated list of them")
    if not dicom_outputs_available():
        raise HTTPProblem(501, "NotImplemented",
                          "DICOM outputs (?dicom=sr) need cxrkit.dicom and highdicom, which this installation lacks: "
                          "pip install 'cxrkit[dicom]'; or call /v1/predict without ?dicom for the JSON result")
    return kinds


PREDICT_OPENAPI: dict[str, Any] = {
    "post": {
        "summary": "Predict findings for one image (raw body) or several (multipart/form-data)",
        "description": (__doc__ or "").split("\n\n", 1)[-1],
        "parameters": [{"name": "dicom", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "sr, gsps, sc or a comma-separated list: answer with those DICOM outputs "
                                       "(multipart/related; type=application/dicom) instead of JSON; one image "
                                       "per request"}],
        "requestBody": {"required": True, "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}}
               for t in ("application/octet-stream", "image/jpeg", "image/png", "application/dicom")},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        }},
        "responses": {
            "200": {"description": "Prediction JSON (multipart: predictions and statuses); with ?dicom=: "
                           "multipart/related DICOM outputs"},
            "400": {"description": "malformed request"}, "413": {"description": "body or image over the limits"},
            "415": {"description": "not a JPEG, PNG or DICOM"}, "422": {"description": "corrupt image"},
            "501": {"description": "?dicom= asked where cxrkit.dicom / highdicom are not installed"},
            "503": {"description": "queue full, loading or shutting down (Retry-After)"},
        },
    }
}
