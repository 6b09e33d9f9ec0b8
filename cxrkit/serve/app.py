"""The FastAPI app: ``POST /v1/predict``, ``GET /healthz``, ``/readyz``, ``/metrics``, ``/v1/models``.

One ``Service`` per app holds the BatchingDetector (built in a background thread at startup, so
liveness answers while a model loads or a TensorRT engine builds), the metrics and the drain
state. Every accepted image ends in exactly one of: its Prediction (200, or the 4xx of its typed
input error), a 503 (queue full, shutting down), or a counted drop (the client went away first).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from ..batching import BatchingDetector
from .http import HTTPProblem, retry_after_s
from .metrics import ServeMetrics
from .predict import PREDICT_OPENAPI, PredictEndpoint, error_body

__all__ = ["ServeConfig", "Service", "create_app"]

log = logging.getLogger(__name__)

_PATHS = ("/v1/predict", "/v1/models", "/healthz", "/readyz", "/metrics")
_JSON = "application/json"


@dataclass(frozen=True)
class ServeConfig:
    """Service settings. ``max_batch`` / ``max_delay_ms`` / ``max_queue`` go to the BatchingDetector.

    ``max_body_bytes``: largest request body (413 past it, decided from Content-Length before
    the body is read). ``max_parts``: most files in one multipart request. ``drain_timeout_s``: after
    SIGTERM, how long queued requests may still run; at the deadline the ones not yet started get
    503 and the batch running finishes. ``ready_queue_fraction``: /readyz answers 503 while the
    queue holds at least this fraction of ``max_queue``. ``stall_timeout_s``: /healthz answers 503
    when requests wait and no batch has finished for this long (a wedged device). ``otel``: keep
    FastAPI's native OpenTelemetry hooks (off by default: they cost time on every request).
    """

    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 256
    max_body_bytes: int = 64 * 1024 * 1024
    max_parts: int = 64
    drain_timeout_s: float = 20.0
    ready_queue_fraction: float = 0.9
    stall_timeout_s: float = 120.0
    otel: bool = False  # FastAPI's native OpenTelemetry (where the installed FastAPI has it)


class Service:
    """State shared by the routes: the detector (once loaded), metrics, drain state."""

    def __init__(self, detector_factory: Callable[[], Any], config: ServeConfig, model: Any = None) -> None:
        self.factory = detector_factory
        self.config = config
        self.model = model  # ModelPackage, for /v1/models before the detector is loaded
        self.detector: Any = None
        self.bd: BatchingDetector | None = None
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()
        self.draining = False
        self.deadline_passed = False
        self.in_flight = 0  # HTTP requests being handled (all paths)
        self.waiting = 0  # predict requests holding submitted images
        self.busy_since = time.monotonic()
        self.on_fatal: Callable[[], None] | None = None  # the runner asks uvicorn to exit
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loader: threading.Thread | None = None
        self.metrics = ServeMetrics(self.queue_depth, lambda: self.in_flight, lambda: float(self.readiness()[0]))

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._loader = threading.Thread(target=self._load, name="cxrkit-serve-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            det = self.factory()
            c = self.config
            bd = BatchingDetector(det, max_batch=c.max_batch, max_delay_ms=c.max_delay_ms, max_queue=c.max_queue)
            bd.add_batch_observer(self.metrics.observe_batch)
            self.detector, self.bd = det, bd
            if self.model is None:
                self.model = getattr(det, "model", None)
            log.info("model loaded in %.1f s: %r", time.perf_counter() - t0, det)
        except BaseException as e:  # noqa: BLE001 - reported by /readyz and the exit code
            self.load_error = e
            log.error("the model failed to load: %s: %s", type(e).__name__, e)
            if self.on_fatal is not None:
                self.on_fatal()
        finally:
            self.loaded.set()

    def request_drain(self) -> None:
        """Start draining (thread- and signal-safe): /readyz 503, no new work, a deadline for the queue."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        depth = self.queue_depth()
        log.info("draining: %d request(s) in flight, %d image(s) queued; deadline %.1f s",
                 self.waiting, depth, self.config.drain_timeout_s)
        assert self.loop is not None
        self.loop.call_later(self.config.drain_timeout_s, self._deadline)

    def _deadline(self) -> None:
        bd = self.bd
        self.deadline_passed = True
        if bd is not None and (self.waiting or bd.queue_depth()):
            log.warning("drain deadline (%.1f s) passed: %d queued image(s) get 503, the running batch finishes",
                        self.config.drain_timeout_s, bd.queue_depth())
            assert self.loop is not None
            self.loop.run_in_executor(None, lambda: bd.close(drain=False))

    def close(self, timeout: float = 15.0) -> None:
        """Finish the queue and close the detector, each step bounded by ``timeout`` seconds: a batch
        wedged in the device must not keep the process from exiting (it is logged, not waited for)."""
        if self._loader is not None:
            self._loader.join(timeout)
        bd, det = self.bd, self.detector
        if bd is not None:
            bd.close(drain=True, timeout=timeout)
        if det is not None and hasattr(det, "close"):
            closer = threading.Thread(target=det.close, name="cxrkit-serve-close", daemon=True)
            closer.start()
            closer.join(timeout)
            if closer.is_alive():
                log.error("the detector did not close within %.0f s (a batch still running?); exiting without it",
                          timeout)
                return
        log.info("stopped")

    # -- state -----------------------------------------------------------------------------------
    def queue_depth(self) -> int:
        bd = self.bd
        return bd.queue_depth() if bd is not None else 0

    def readiness(self) -> tuple[bool, str]:
        if self.load_error is not None:
            return False, f"the model failed to load: {type(self.load_error).__name__}: {self.load_error}"
        if self.bd is None:
            return False, "loading the model"
        if self.draining:
            return False, "draining: the server is shutting down"
        limit = self.config.ready_queue_fraction * self.config.max_queue
        depth = self.queue_depth()
        if depth >= limit:
            return False, f"queue saturated: {depth} waiting, max_queue={self.config.max_queue}"
        return True, "ready"

    def stalled_for(self) -> float:
        """Seconds that requests have waited with no batch finishing (0 when idle or moving)."""
        if not self.waiting:
            return 0.0
        return time.monotonic() - max(self.busy_since, self.metrics.last_batch_end)

    def retry_after(self) -> str:
        return str(retry_after_s(self.queue_depth() or self.config.max_queue, self.metrics.seconds_per_item_ewma))

    def accepting(self) -> BatchingDetector:
        bd = self.bd
        if self.draining or self.deadline_passed:
            raise HTTPProblem(503, "ShuttingDown", "the server is shutting down; retry on another replica",
                              {"Retry-After": "1"})
        if bd is None:
            if self.load_error is not None:
                raise HTTPProblem(503, "ModelUnavailable", self.readiness()[1])
            raise HTTPProblem(503, "ModelLoading", "the model is still loading; retry shortly (see /readyz)",
                              {"Retry-After": "5"})
        return bd

    # -- waiting on results ----------------------------------------------------------------------
    async def results(self, futs: list[Future], receive: Callable[[], Any]) -> list[Any] | None:
        """Each future's Prediction or exception, or None if the client disconnected first (the futures
        not yet started are cancelled, so their images never run)."""
        if self.waiting == 0:
            self.busy_since = time.monotonic()
        self.waiting += 1
        afut = asyncio.gather(*(asyncio.wrap_future(f) for f in futs), return_exceptions=True)
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            done, _ = await asyncio.wait((afut, watch), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # uvicorn's graceful-shutdown backstop cancelled this request
            self._drop(futs, "shutdown")
            afut.cancel()
            raise
        finally:
            self.waiting -= 1
            watch.cancel()
        if afut in done:
            return afut.result()
        self._drop(futs, "disconnect")
        afut.cancel()
        return None

    def _drop(self, futs: list[Future], why: str) -> None:
        queued = sum(1 for f in futs if f.cancel())
        running = sum(1 for f in futs if not f.cancelled() and not f.done())
        if queued:
            self.metrics.dropped.labels(reason=f"{why}_queued").inc(queued)
        if running:
            self.metrics.dropped.labels(reason=f"{why}_running").inc(running)
        self.metrics.error("ClientDisconnected" if why == "disconnect" else "ShutdownCancelled")
        log.info("%s: %d image(s) cancelled before their batch, %d finishing unread", why, queued, running)


async def _disconnected(receive: Callable[[], Any]) -> None:
    while True:  # after the body was read whole, receive() returns only when the client goes away
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


class _Instrument:
    """Pure ASGI middleware: request counts by path and status, wall time, requests in flight."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app = app
        self.svc = service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in _PATHS else "other"
        status = 500  # if the app raises before it answers
        t0 = time.perf_counter()

        async def send_status(msg: dict) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        self.svc.in_flight += 1
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.svc.in_flight -= 1
            self.svc.metrics.observe_request(path, status, time.perf_counter() - t0)


class _App(FastAPI):
    """FastAPI for every route but the hot one: ``POST /v1/predict`` goes straight to its ASGI endpoint."""

    def __init__(self, predict: PredictEndpoint, **kw: Any) -> None:
        super().__init__(**kw)
        self._predict = predict

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/predict":
            await self._predict(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        if not self.openapi_schema:
            schema = super().openapi()
            schema.setdefault("paths", {})["/v1/predict"] = PREDICT_OPENAPI
            self.openapi_schema = schema
        return self.openapi_schema


def create_app(detector_factory: Callable[[], Any], config: ServeConfig | None = None, *,
               model: Any = None) -> FastAPI:
    """The ASGI app. ``detector_factory()`` builds the Detector (or any object with
    ``predict(inputs, batch_size=...)``) in a background thread at startup; the app closes it at
    shutdown. ``model``: its ModelPackage, for /v1/models while it loads."""
    cfg = config or ServeConfig()
    svc = Service(detector_factory, cfg, model)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        svc.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, svc.close)

    kw: dict[str, Any] = dict(title="cxrkit", lifespan=lifespan,
                              summary="Chest X-ray findings (demonstration models; not for clinical use)")
    try:  # FastAPI >= 0.16x checks OpenTelemetry providers on every request (~10% of the loop's time here)
        app = _App(PredictEndpoint(svc), telemetry={"tracing": cfg.otel, "metrics": cfg.otel, "logs": cfg.otel},
                   **kw)
    except TypeError:  # an older FastAPI without native telemetry
        app = _App(PredictEndpoint(svc), **kw)
    app.state.service = svc
    app.add_middleware(_Instrument, service=svc)

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem) -> Response:
        svc.metrics.error(exc.type)
        return Response(error_body(exc.type, exc.message), exc.status, headers=exc.headers, media_type=_JSON)

    @app.get("/healthz")
    async def healthz() -> Response:
        """Liveness: 200 while the process serves; 503 if the model failed to load or batches stall."""
        stalled = svc.stalled_for()
        if svc.load_error is not None or stalled > cfg.stall_timeout_s:
            why = svc.readiness()[1] if svc.load_error is not None else f"no batch finished for {stalled:.0f} s"
            return Response(json.dumps({"status": "unhealthy", "reason": why}), 503, media_type=_JSON)
        return Response(b'{"status":"ok"}', 200, media_type=_JSON)

    @app.get("/readyz")
    async def readyz() -> Response:
        """Readiness: 200 when the model is loaded, the queue is not saturated and no drain is under way."""
        ok, why = svc.readiness()
        body = {"status": "ready" if ok else "not ready", "reason": why, "queue_depth": svc.queue_depth(),
                "max_queue": cfg.max_queue}
        return Response(json.dumps(body), 200 if ok else 503, media_type=_JSON)

    @app.get("/metrics")
    async def metrics() -> Response:
        data, ctype = svc.metrics.render()
        return Response(data, 200, media_type=ctype)

    @app.get("/v1/models")
    async def models() -> Response:
        """The served model's card summary."""
        return Response(json.dumps({"models": [_model_summary(svc)]}), 200, media_type=_JSON)

    return app


def _model_summary(svc: Service) -> dict[str, Any]:
    pkg = svc.model
    det = svc.detector
    out: dict[str, Any] = {"loaded": svc.bd is not None}
    if pkg is not None:
        raw = pkg.card.raw
        card = pkg.card
        out.update(name=card.name, version=card.version, description=raw.get("description", ""),
                   intended_use=raw.get("intended_use", ""), labels=list(card.labels),
                   enabled=[k for k, e in zip(card.labels, card.enabled) if e],
                   input_size=list(card.input_hw), heatmap_stride=card.heatmap_stride,
                   thresholds={k: float(v) for k, v in zip(card.labels, card.thresholds)},
                   sha256=dict(raw.get("sha256", {})))
    if det is not None:
        for key, attr in (("backend", "backend_name"), ("device", "device_str")):
            v = getattr(det, attr, None)
            if v is not None:
                out[key] = str(v)
        prec = getattr(det, "precision", None)
        if prec is not None:
            out["precision"] = getattr(prec, "value", str(prec))
    out["max_batch"] = svc.config.max_batch
    out["max_queue"] = svc.config.max_queue
    return out
