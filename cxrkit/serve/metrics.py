"""Prometheus metrics of the service (one registry per app, text exposition format on /metrics).

Names (all prefixed ``cxrkit_``):

==================================  =========  ==============================================================
``serve_requests_total``            counter    HTTP requests by ``path`` and ``status``
``serve_request_seconds``           histogram  request wall time in the server by ``path``
``serve_errors_total``              counter    errors by ``type`` (the typed error's class, or PayloadTooLarge,
                                               BadRequest, ClientDisconnected, ...)
``serve_in_flight``                 gauge      requests being handled now
``serve_queue_depth``               gauge      requests waiting for a batch (BatchingDetector.queue_depth)
``serve_ready``                     gauge      1 when /readyz answers 200
``serve_dropped_total``             counter    accepted images that got no result (``reason``: disconnect
                                               while queued, disconnect while running, shutdown deadline)
``batch_size``                      histogram  images per detector batch
``batch_seconds``                   histogram  wall time of one batch's ``predict`` (``failed`` label)
``stage_seconds``                   histogram  per image, by ``stage``: read (request body), queue, load,
                                               preprocess, infer, postprocess (the batch's time shared out
                                               per image, as ``Prediction.timings_ms``), respond (JSON),
                                               dicom (making DICOM outputs, ?dicom=)
==================================  =========  ==============================================================
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

__all__ = ["ServeMetrics", "STAGES"]

STAGES = ("read", "queue", "load", "preprocess", "infer", "postprocess", "respond", "dicom")
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """The service's metrics. ``queue_depth``, ``in_flight`` and ``ready`` are read at scrape time."""

    def __init__(self, queue_depth: Callable[[], float], in_flight: Callable[[], float],
                 ready: Callable[[], float]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("cxrkit_serve_requests", "HTTP requests by path and status", ["path", "status"],
                                registry=r)
        self.request_seconds = Histogram("cxrkit_serve_request_seconds", "HTTP request wall time in the server",
                                         ["path"], buckets=_TIME_BUCKETS, registry=r)
        self.errors = Counter("cxrkit_serve_errors", "errors by type", ["type"], registry=r)
        self.dropped = Counter("cxrkit_serve_dropped", "accepted images that got no result, by reason", ["reason"],
                               registry=r)
        Gauge("cxrkit_serve_in_flight", "requests being handled", registry=r).set_function(in_flight)
        Gauge("cxrkit_serve_queue_depth", "requests waiting for a batch", registry=r).set_function(queue_depth)
        Gauge("cxrkit_serve_ready", "1 when /readyz answers 200", registry=r).set_function(ready)
        self.batch_size = Histogram("cxrkit_batch_size", "images per detector batch", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("cxrkit_batch_seconds", "wall time of one batch's predict", ["failed"],
                                       buckets=_TIME_BUCKETS, registry=r)
        stage = Histogram("cxrkit_stage_seconds", "per-image time by stage", ["stage"], buckets=_TIME_BUCKETS,
                          registry=r)
        self.stage = {s: stage.labels(stage=s) for s in STAGES}  # children bound once (no label lookups per image)
        self._batch_ok = self.batch_seconds.labels(failed="false")
        self._batch_failed = self.batch_seconds.labels(failed="true")
        self._req_children: dict[tuple[str, int], Any] = {}
        self._sec_children: dict[str, Any] = {}
        self.seconds_per_item_ewma: float | None = None  # for Retry-After
        self.last_batch_end = time.monotonic()

    # -- observers -------------------------------------------------------------------------------
    def observe_batch(self, size: int, seconds: float, failed: bool) -> None:
        """``BatchingDetector.add_batch_observer`` callback (runs in the worker thread)."""
        self.batch_size.observe(size)
        (self._batch_failed if failed else self._batch_ok).observe(seconds)
        per = seconds / max(1, size)
        e = self.seconds_per_item_ewma
        self.seconds_per_item_ewma = per if e is None else 0.8 * e + 0.2 * per
        self.last_batch_end = time.monotonic()

    def observe_timings(self, timings_ms: Mapping[str, float]) -> None:
        for k, v in timings_ms.items():
            h = self.stage.get(k)
            if h is not None:
                h.observe(v / 1e3)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        c = self._req_children.get((path, status))
        if c is None:
            c = self._req_children[(path, status)] = self.requests.labels(path=path, status=str(status))
        c.inc()
        h = self._sec_children.get(path)
        if h is None:
            h = self._sec_children[path] = self.request_seconds.labels(path=path)
        h.observe(seconds)

    def error(self, type_: str, n: int = 1) -> None:
        self.errors.labels(type=type_).inc(n)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
