"""Stage 0 and the hand-off: inputs -> chunks of ``(index, item)``, prepared one chunk ahead.

``Prefetcher.run`` yields prepared chunks in order. With more than one chunk, chunk n + 1 is
prepared (read, preprocessed) on the Detector's prefetch thread while the caller infers and
assembles chunk n, so the decoder and the network overlap; the very first two chunks are prepared
at the same time, one by the caller and one by the thread. A single chunk (a ``predict`` call that
fits in one batch) is prepared by the caller alone: no thread hand-off on the latency path.

The thread is made once per Detector (on first need, after the runner's ``prepare``) and joined by
``close()``; ``predict`` calls never create threads.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

__all__ = ["chunks", "Prefetcher"]

P = TypeVar("P")
Chunk = list[tuple[int, Any]]


def chunks(inputs: Iterable[Any], size: int) -> Iterator[Chunk]:
    """Consecutive lists of up to ``size`` (index, item) pairs; reads ``inputs`` lazily."""
    it = iter(enumerate(inputs))
    return iter(lambda: list(itertools.islice(it, size)), [])


class Prefetcher:
    """One prefetch thread shared by a Detector's calls (each call keeps at most one chunk ahead)."""

    def __init__(self, name: str = "cxrkit-prefetch", workers: int = 2) -> None:
        self._name, self._workers = name, workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                from ..errors import DetectorClosedError

                raise DetectorClosedError("this Detector is closed; create a new one to predict")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix=self._name)
            return self._pool

    def run(self, parts: Iterator[Chunk], prepare: Callable[[Chunk], P], prefetch: bool = True) -> Iterator[P]:
        first = next(parts, None)
        if first is None:
            return
        second = next(parts, None) if prefetch else None
        if second is None:  # one chunk, or no prefetch: the caller prepares each in turn
            yield prepare(first)
            for c in parts:
                yield prepare(c)
            return
        fut: Future = self._executor().submit(prepare, second)
        try:
            cur = prepare(first)  # in parallel with the thread's work on the second chunk
            while True:
                yield cur  # the caller infers and assembles `cur` meanwhile
                nxt = next(parts, None)
                cur = fut.result()
                if nxt is None:
                    break
                fut = self._executor().submit(prepare, nxt)
            fut = None
            yield cur
        finally:
            if fut is not None:
                fut.cancel()  # an abandoned iterator: drop the chunk not yet started

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
