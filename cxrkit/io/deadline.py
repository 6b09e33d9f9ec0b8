"""A wall-clock limit on one decode (``Limits.decode_timeout_s``).

``call_with_deadline(fn, timeout_s, source)`` runs ``fn()`` on a daemon worker thread and waits at
most ``timeout_s`` seconds for it. If the decode finishes in time its result (or its exception) is
returned (raised) as if ``fn`` had been called directly. If not, ``DecodeError`` "decoding took
longer than N s" is raised for the item, and the caller moves on.

What this can and cannot do:
- Python cannot kill a thread. A decode that overruns keeps running in the background until the
  decoder returns on its own (it then frees its memory; the result is dropped). It still uses a
  core meanwhile; ``abandoned_decodes()`` counts the ones still running and each overrun is logged.
  Allocation is bounded separately, before decoding, by the header checks against
  ``Limits.max_pixels`` and ``Limits.max_file_bytes``, so an abandoned decode holds at most one
  image's worth of memory.
- The waiting thread needs the GIL to notice the deadline: a decoder that spins in C while holding
  the GIL delays the error until it lets go. Pillow, libjpeg, OpenJPEG and CharLS release it while
  decoding; pydicom's parser is Python and is preempted normally.
- Decodes run on reusable worker threads (at most ``MAX_IDLE_WORKERS`` kept idle); a call never
  waits for a busy worker: it takes an idle one or starts a new one, so a stuck decode occupies
  only its own thread.

``timeout_s`` of None, 0, a negative number or infinity turns the limit off (``fn`` runs inline).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from typing import Callable, TypeVar

from cxrkit.errors import DecodeError

__all__ = ["call_with_deadline", "abandoned_decodes"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_lock = threading.Lock()
_abandoned = 0
_idle: list["_Worker"] = []
#: Idle decode threads kept for reuse. Reuse keeps each decode on a thread (and so a malloc arena)
#: that has decoded before: fresh threads spread allocations over up to 8 x cores glibc arenas,
#: each keeping its own high-water mark (measured: RSS 73 -> 145 MB over 600 DICOM reads).
MAX_IDLE_WORKERS = 4


def abandoned_decodes() -> int:
    """How many decodes that overran their deadline are still running in the background."""
    return _abandoned


def _limit_on(timeout_s: float | None) -> bool:
    return timeout_s is not None and timeout_s > 0 and math.isfinite(timeout_s)


class _Job:
    __slots__ = ("fn", "done", "value", "error", "abandoned", "source")

    def __init__(self, fn: Callable[[], object], source: str) -> None:
        self.fn, self.source = fn, source
        self.done = threading.Event()
        self.value: object = None
        self.error: BaseException | None = None
        self.abandoned = False


class _Worker:
    """A daemon thread that runs jobs one at a time; it returns to the idle list after each job
    (unless the list is full), so an overrunning job keeps only its own thread busy."""

    def __init__(self) -> None:
        self.jobs: "queue.SimpleQueue[_Job]" = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="cxrkit-decode", daemon=True).start()

    def _loop(self) -> None:
        global _abandoned
        while True:
            job = self.jobs.get()
            try:
                job.value = job.fn()
            except BaseException as exc:  # handed to the caller, re-raised there
                job.error = exc
            job.fn = None  # type: ignore[assignment]  # drop the closure (and the item's bytes)
            with _lock:
                job.done.set()
                if job.abandoned:
                    _abandoned -= 1
                    logger.info("%s: the overrunning decode finished in the background", job.source)
                    job.value = job.error = None
                if len(_idle) >= MAX_IDLE_WORKERS:
                    return
                _idle.append(self)


def call_with_deadline(fn: Callable[[], T], timeout_s: float | None, source: str, what: str = "decoding") -> T:
    """``fn()``, or ``DecodeError`` naming ``source`` if it takes longer than ``timeout_s`` seconds."""
    global _abandoned
    if not _limit_on(timeout_s):
        return fn()
    job = _Job(fn, source)
    with _lock:
        worker = _idle.pop() if _idle else None
    (worker or _Worker()).jobs.put(job)
    if not job.done.wait(timeout_s):
        with _lock:
            late = not job.done.is_set()
            if late:
                job.abandoned = True
                _abandoned += 1
                running = _abandoned
        if late:
            logger.warning("%s: %s overran limits.decode_timeout_s = %g s; left running in the background "
                           "(%d such decodes running now)", source, what, timeout_s, running)
            raise DecodeError(
                source,
                f"{what} took longer than {timeout_s:g} s (limits.decode_timeout_s); the item is skipped "
                "(the decoder thread cannot be stopped and finishes in the background)",
            )
    if job.error is not None:
        exc, job.error = job.error, None
        raise exc
    return job.value  # type: ignore[return-value]
