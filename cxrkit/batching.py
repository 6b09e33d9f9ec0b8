"""Dynamic batching: many concurrent single-image callers, one Detector, full batches.

A web service or a pool of worker threads usually holds one image per request. Calling
``Detector.predict`` once per request runs batches of one, serialized on the Detector's lock.
``BatchingDetector`` puts a queue in front of the Detector: one worker thread takes the first
waiting request, gathers more until it has ``max_batch`` of them or ``max_delay_ms`` have passed
since that first request arrived, runs one ``predict`` on the batch, and hands each caller its own
Prediction through a ``concurrent.futures.Future``. While a batch runs the next one fills, so
under load batches form with no added wait at all.

>>> with cxrkit.BatchingDetector("cxr-probe", max_batch=32, max_delay_ms=5) as bd:  # doctest: +SKIP
...     fut = bd.submit("a.png")          # Future[Prediction]
...     pred = bd.predict(jpeg_bytes)     # blocking
...     pred = await bd.apredict(array)   # asyncio, does not block the event loop

Each caller sees the Prediction that ``Detector.predict([item])`` returns for its item alone:
``index`` is 0 and ``source`` describes the caller's item (``timings_ms`` gains ``queue``, the
milliseconds the request waited before its batch started; the other timings are the batch's,
shared out per image as Detector does).

Errors: a bad item resolves its own future with a Prediction whose ``error`` is set (the other
requests of its batch are unaffected). A failure of a whole batch is a ``BatchFailedError`` (a
``BackendError``) whose ``__cause__`` is the original exception, one per request: as the future's
exception when the detector raises, and as each Prediction's ``error`` when a cxrkit Detector's
inference or post-processing fails (the Detector reports that per item and does not raise). A full
queue raises ``QueueFullError`` at ``submit`` (or waits, with ``block=True``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import threading
import time
import warnings
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Iterable

from .errors import BackendError, BatchFailedError, DetectorClosedError, InputError, QueueFullError
from .models import ModelPackage
from .results import Prediction

__all__ = ["BatchingDetector", "BatchFailedError", "DetectorClosedError"]

log = logging.getLogger(__name__)

_SINGLE = (str, bytes, bytearray, memoryview, os.PathLike)


@dataclasses.dataclass(eq=False)  # compared by identity (a cancelled one is removed from the queue)
class _Request:
    item: Any
    future: Future
    t_enqueue: float  # time.monotonic() at submit


def _is_single(item: Any) -> bool:
    if isinstance(item, _SINGLE) or type(item).__module__.startswith(("numpy", "pydicom")):
        return True
    return not isinstance(item, Iterable)


def restamp(pred: Prediction, position: int, index: int = 0, source: str | None = None) -> Prediction:
    """Return ``pred`` as if its item had been at ``index`` of its own call (and named ``source``).

    Detector names an unnamed item by its position in the call (``<bytes 812 B #5>``); a batch
    built from many callers' requests renumbers that to ``index`` so each caller sees the
    Prediction of a call of its own. Path sources are left alone unless ``source`` is given.
    """
    old = pred.source
    new = source
    if new is None:
        suffix = f" #{position}>"
        new = old[: -len(suffix)] + f" #{index}>" if old.endswith(suffix) and old.startswith("<") else old
    err = pred.error
    if new != old and isinstance(err, InputError) and err.source == old:
        renamed = type(err)(new, err.message)
        renamed.__cause__ = err.__cause__
        err = renamed
    if new == old and index == pred.index and err is pred.error:
        return pred
    return dataclasses.replace(pred, source=new, index=index, error=err)


class _Core:
    """The queue and the worker. Holds no reference to the BatchingDetector, so that one can be
    garbage collected (and closed by its finalizer) while the worker thread runs."""

    def __init__(self, detector: Any, owns_detector: bool, max_batch: int, max_delay_s: float,
                 max_queue: int, return_heatmaps: bool, name: str) -> None:
        self.detector = detector
        self.owns_detector = owns_detector
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.return_heatmaps = return_heatmaps
        bs = getattr(detector, "batch_size", None)
        self.detector_batch = bs if isinstance(bs, int) and bs > 0 else None
        self.pending: collections.deque[_Request] = collections.deque()
        self.lock = threading.Lock()
        self.has_work = threading.Condition(self.lock)  # worker waits here
        self.has_room = threading.Condition(self.lock)  # blocked submitters wait here
        self.closing = False
        self.closed = False
        self.n_requests = 0
        self.n_batches = 0
        self.n_batched_items = 0
        self.max_batch_seen = 0
        self.observers: list[Callable[[int, float, bool], None]] = []  # see BatchingDetector.add_batch_observer
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)
        self.thread.start()

    # -- producer side -------------------------------------------------------------------------
    def submit(self, item: Any, block: bool, timeout: float | None) -> Future:
        fut: Future = Future()
        with self.lock:
            if self.closing:
                raise DetectorClosedError("this BatchingDetector is closed; create a new one to submit more work")
            if len(self.pending) >= self.max_queue:
                if not block:
                    raise QueueFullError(
                        f"request queue is full ({self.max_queue} waiting, max_queue={self.max_queue}); "
                        "retry later (e.g. answer HTTP 503 / 429), pass block=True with a timeout to wait "
                        "for room, or raise max_queue")
                deadline = None if timeout is None else time.monotonic() + timeout
                while len(self.pending) >= self.max_queue and not self.closing:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise QueueFullError(
                            f"request queue stayed full ({self.max_queue} waiting, max_queue={self.max_queue}) "
                            f"for the whole timeout of {timeout:g} s; retry later or raise max_queue")
                    self.has_room.wait(left)
                if self.closing:
                    raise DetectorClosedError("this BatchingDetector was closed while waiting for queue room")
            req = _Request(item, fut, time.monotonic())
            self.pending.append(req)
            self.n_requests += 1
            self.has_work.notify()
        fut.add_done_callback(lambda f: self._forget(req) if f.cancelled() else None)
        return fut

    def _forget(self, req: _Request) -> None:
        """A request cancelled while queued leaves the queue at once (its slot counts no more)."""
        with self.lock:
            try:
                self.pending.remove(req)
            except ValueError:  # the worker already took it (and skips it)
                return
            self.has_room.notify()

    # -- worker side ---------------------------------------------------------------------------
    def _next_batch(self) -> list[_Request] | None:
        with self.lock:
            while not self.pending:
                if self.closing:
                    return None
                self.has_work.wait()
            # The batch closes max_delay after its FIRST request arrived (not after the worker woke):
            # requests that queued while the previous batch ran go out at once.
            deadline = self.pending[0].t_enqueue + self.max_delay_s
            while len(self.pending) < self.max_batch and not self.closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.has_work.wait(left)
            n = min(self.max_batch, len(self.pending))
            batch = [self.pending.popleft() for _ in range(n)]
            self.has_room.notify(n)
        return batch

    def run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            # Skip requests their callers cancelled; the others can no longer be cancelled.
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if live:
                self._run_batch(live)

    def _run_batch(self, batch: list[_Request]) -> None:
        t0 = time.monotonic()
        items = [r.item for r in batch]
        n = len(items)
        try:
            # The gathered batch runs in the detector's own batch size (its engine's largest shape).
            kwargs: dict[str, Any] = {"batch_size": min(n, self.detector_batch) if self.detector_batch else n}
            if self.return_heatmaps:
                kwargs["return_heatmaps"] = True
            preds = list(self.detector.predict(items, **kwargs))
            if len(preds) != n:
                raise BackendError(f"detector returned {len(preds)} predictions for a batch of {n} inputs")
        except BaseException as e:  # noqa: BLE001 - every caller must hear about it; the worker goes on
            log.warning("batch of %d failed: %s: %s", n, type(e).__name__, e)
            self._notify(n, time.monotonic() - t0, True)
            for r in batch:
                # One exception object per future: a shared one would collect every thread's traceback.
                err = BatchFailedError(f"the detector failed on a batch of {n} requests: {type(e).__name__}: {e}")
                err.__cause__ = e
                r.future.set_exception(err)
            return
        with self.lock:
            self.n_batches += 1
            self.n_batched_items += n
            self.max_batch_seen = max(self.max_batch_seen, n)
        self._notify(n, time.monotonic() - t0, False)
        for pos, (r, p) in enumerate(zip(batch, preds)):
            try:
                p = restamp(p, pos)
                timings = dict(p.timings_ms)
                timings["queue"] = (t0 - r.t_enqueue) * 1e3
                p = dataclasses.replace(p, timings_ms=timings)
            except Exception as e:  # noqa: BLE001 - a foreign detector's odd result must not kill the worker
                r.future.set_exception(e)
                continue
            r.future.set_result(p)

    def _notify(self, n: int, seconds: float, failed: bool) -> None:
        for fn in self.observers:
            try:
                fn(n, seconds, failed)
            except Exception:  # noqa: BLE001 - a metrics callback must not kill the worker
                log.warning("batch observer %r failed", fn, exc_info=True)

    # -- shutdown ------------------------------------------------------------------------------
    def shutdown(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting work, finish (drain) or fail the waiting requests, join the worker.
        Returns False if the worker did not stop within ``timeout``."""
        with self.lock:
            self.closing = True
            cancelled = [] if drain else list(self.pending)
            if not drain:
                self.pending.clear()
            self.has_work.notify_all()
            self.has_room.notify_all()
        for r in cancelled:
            if r.future.set_running_or_notify_cancel():
                r.future.set_exception(DetectorClosedError(
                    "BatchingDetector.close(drain=False) was called before this request ran; submit it again "
                    "to a new BatchingDetector or Detector"))
        stopped = True
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)
            stopped = not self.thread.is_alive()
        if not stopped:
            log.warning("BatchingDetector worker still running a batch after %s s; leaving it (daemon)", timeout)
            return False
        with self.lock:
            if self.closed:
                return True
            self.closed = True
        if self.owns_detector and hasattr(self.detector, "close"):
            self.detector.close()
        return True


def _finalize(core: _Core) -> None:  # garbage collection or interpreter exit
    try:
        core.shutdown(drain=False, timeout=10.0)
    except Exception:  # noqa: BLE001 - nothing may escape a finalizer
        log.debug("BatchingDetector finalizer failed", exc_info=True)


class BatchingDetector:
    """Gather concurrent single-item requests into batches for one Detector.

    ``detector_or_model``: a ``Detector`` (or any object with ``predict(inputs, batch_size=...) ->
    list[Prediction]``), which stays the caller's to close; or a model name / path, for which a
    Detector is made with ``Detector.from_pretrained(model, batch_size=max_batch,
    **detector_kwargs)`` and closed with this object.

    ``max_batch``: most requests per ``predict`` call. ``max_delay_ms``: longest a batch waits for
    more requests after its first one arrived (0 = never wait; batches still form under load).
    ``max_queue``: most requests waiting (not counting the batch being run; a request cancelled
    while waiting leaves the queue at once); past it ``submit`` raises ``QueueFullError``.
    ``return_heatmaps`` is passed to every ``predict``.

    Thread-safe: ``submit``, ``predict`` and ``apredict`` may be called from any thread or event
    loop. One daemon worker thread runs the batches; ``close`` joins it, and a BatchingDetector
    that is garbage collected or still open at interpreter exit is closed with ``drain=False``.
    """

    def __init__(self, detector_or_model: Any, max_batch: int = 32, max_delay_ms: float = 5.0,
                 max_queue: int = 1024, *, return_heatmaps: bool = False, **detector_kwargs: Any) -> None:
        if int(max_batch) < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not max_delay_ms >= 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        if int(max_queue) < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if isinstance(detector_or_model, (str, os.PathLike, ModelPackage)):
            from .api import Detector

            detector_kwargs.setdefault("batch_size", int(max_batch))
            if isinstance(detector_or_model, (str, os.PathLike)):
                detector = Detector.from_pretrained(detector_or_model, **detector_kwargs)
            else:
                detector = Detector(detector_or_model, **detector_kwargs)
            owns = True
        elif callable(getattr(detector_or_model, "predict", None)):
            if detector_kwargs:
                raise TypeError(f"detector options {sorted(detector_kwargs)} apply only when a model name or path "
                                "is given; this detector is already built")
            detector, owns = detector_or_model, False
        else:
            raise TypeError("BatchingDetector needs a Detector (an object with predict(inputs, batch_size=...)) or "
                            f"a model name or path, got {type(detector_or_model).__name__}")
        bs = getattr(detector, "batch_size", None)
        if isinstance(bs, int) and 0 < bs < int(max_batch):
            warnings.warn(f"max_batch={max_batch} exceeds the detector's batch_size={bs}: each gathered batch runs "
                          f"as chunks of {bs}; build the Detector with batch_size={max_batch} to run them whole",
                          stacklevel=2)
        self.detector = detector
        self.max_batch = int(max_batch)
        self.max_delay_ms = float(max_delay_ms)
        self.max_queue = int(max_queue)
        self._core = _Core(detector, owns, self.max_batch, self.max_delay_ms / 1e3, self.max_queue,
                           bool(return_heatmaps), name=f"cxrkit-batching-{id(self):x}")
        self._finalizer = weakref.finalize(self, _finalize, self._core)

    # -- requests ------------------------------------------------------------------------------
    def submit(self, item: Any, *, block: bool = False, timeout: float | None = None) -> "Future[Prediction]":
        """Queue one input (path, bytes, numpy array or pydicom Dataset); returns a Future of its Prediction.

        With a full queue: raises ``QueueFullError`` at once, or with ``block=True`` waits for room
        up to ``timeout`` seconds (None: no limit) and then raises it. After ``close`` raises
        ``DetectorClosedError``. Cancelling the future before its batch starts drops the request.
        """
        if not _is_single(item):
            raise TypeError(f"submit takes one input, got a {type(item).__name__}; submit each item on its own "
                            "(or call Detector.predict for a whole list)")
        return self._core.submit(item, block, timeout)

    def predict(self, item: Any, timeout: float | None = None) -> Prediction:
        """Blocking convenience: waits for queue room and for the result, ``timeout`` seconds each
        (``QueueFullError`` or ``concurrent.futures.TimeoutError`` past it)."""
        return self.submit(item, block=True, timeout=timeout).result(timeout)

    async def apredict(self, item: Any) -> Prediction:
        """asyncio convenience: awaits the Prediction without blocking the event loop.

        A full queue raises ``QueueFullError`` at once (waiting for room would block the loop).
        Cancelling the awaiting task drops the request if its batch has not started.
        """
        return await asyncio.wrap_future(self.submit(item))

    # -- introspection -------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._core.closing

    def queue_depth(self) -> int:
        """Requests waiting for a batch (the batch being run not included)."""
        return len(self._core.pending)

    def add_batch_observer(self, fn: Callable[[int, float, bool], None]) -> None:
        """Call ``fn(batch_size, seconds, failed)`` in the worker thread after each batch's ``predict``
        (e.g. to feed metrics histograms). ``fn`` must be quick and thread-safe; its exceptions are
        logged and ignored."""
        self._core.observers.append(fn)

    def stats(self) -> dict[str, float]:
        """Counters since creation: requests, batches run, mean and largest batch size."""
        c = self._core
        with c.lock:
            return {"requests": c.n_requests, "batches": c.n_batches,
                    "mean_batch_size": c.n_batched_items / c.n_batches if c.n_batches else 0.0,
                    "max_batch_size": c.max_batch_seen, "queue_depth": len(c.pending)}

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests and join the worker thread.

        ``drain=True`` runs every request already queued first; ``drain=False`` fails them with
        ``DetectorClosedError`` (the batch already running always finishes). A Detector made from
        a model name is closed too. Idempotent. ``timeout`` bounds the join (seconds)."""
        if self._core.shutdown(drain=drain, timeout=timeout):
            self._finalizer.detach()

    def __enter__(self) -> "BatchingDetector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(drain=True)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"BatchingDetector({self.detector!r}, max_batch={self.max_batch}, max_delay_ms={self.max_delay_ms:g}, "
                f"max_queue={self.max_queue}, {state})")
