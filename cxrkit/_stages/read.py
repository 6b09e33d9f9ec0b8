"""Stage 1, read: a chunk of (index, item) -> one LoadedImage or one typed error per item.

File paths are read in bulk: a few tasks on the Detector's I/O pool, each reading a run of paths
(``cxrkit.io.read_bytes``: one open, fstat and read per file, the GIL released while the kernel
copies), and nothing else. The bytes are then sniffed and their JPEG/PNG headers parsed here, a
few microseconds each. Work that is heavy per item (DICOM parsing and decoding, pydicom Datasets,
float and colour arrays) goes to the same pool one item per task, so that it uses every core;
model-size uint8/uint16 arrays and JPEG/PNG bytes never leave this thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .. import io as _io
from ..config import Limits
from ..errors import CxrkitError, DecodeError, ImageTooLargeError, InputError
from ..io.sources import describe_item, read_bytes

__all__ = ["Reader", "ReadBatch"]

log = logging.getLogger(__name__)

_PNG = b"\x89PNG\r\n\x1a\n"
_CHEAP_ARRAY_ELEMENTS = 1 << 18  # float / colour arrays up to this size are checked inline


@dataclass
class ReadBatch:
    chunk: Sequence[tuple[int, Any]]  # (index in the caller's inputs, item)
    loaded: list[Any]  # LoadedImage or None, per position
    errors: dict[int, CxrkitError]  # position -> typed error
    load_ms: list[float]  # per position


def _cheap(obj: Any) -> bool:
    """True for items whose reading is a header parse or a view: done inline, never on the pool."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        head = bytes(obj[:8])
        return head.startswith(b"\xff\xd8\xff") or head == _PNG  # JPEG / PNG; DICOM is decoded
    if isinstance(obj, np.ndarray):
        if obj.ndim == 2 and obj.dtype.kind == "u" and obj.dtype.itemsize in (1, 2):
            return True
        return obj.size <= _CHEAP_ARRAY_ELEMENTS
    return False


class Reader:
    """Reads chunks of inputs with the options of one Detector; owns its I/O thread pool."""

    def __init__(self, *, limits: Limits, voi_window_index: int, keep_j2k_frame: bool, strict: bool,
                 num_threads: int) -> None:
        self.limits = limits
        self.voi_window_index = int(voi_window_index)
        self.keep_j2k_frame = bool(keep_j2k_frame)
        self.strict = bool(strict)
        self.num_threads = max(1, int(num_threads))
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- one item ------------------------------------------------------------------------------
    def load(self, index: int, item: Any, source: str | None = None) -> tuple[Any, CxrkitError | None, float]:
        """(LoadedImage | None, error | None, milliseconds) of one in-memory item or path."""
        t0 = time.perf_counter()
        try:
            img = _io.load_item(item, index, limits=self.limits, voi_window_index=self.voi_window_index,
                            keep_j2k_frame=self.keep_j2k_frame, strict=self.strict, source=source)
        except InputError as e:
            return None, e, (time.perf_counter() - t0) * 1e3
        except Exception as e:  # a decoder bug must never take the batch down
            log.exception("unexpected error reading input #%d", index)
            return None, DecodeError(source or describe_item(item, index), f"unexpected {type(e).__name__}: {e}"), 0.0
        return img, None, (time.perf_counter() - t0) * 1e3

    def _read_run(self, runs: Sequence[tuple[int, Any]]) -> list[tuple[Any, CxrkitError | None, float]]:
        """(bytes | None, error | None, ms) for each (index, path): file reads only."""
        out = []
        for index, path in runs:
            t0 = time.perf_counter()
            source = os.fspath(path)
            try:
                out.append((read_bytes(path, limits=self.limits, source=source), None,
                            (time.perf_counter() - t0) * 1e3))
            except InputError as e:
                out.append((None, e, (time.perf_counter() - t0) * 1e3))
            except MemoryError as e:
                err = ImageTooLargeError(source, "out of memory while reading the item")
                err.__cause__ = e
                out.append((None, err, 0.0))
            except Exception as e:  # as load_item's own safety net
                log.debug("unexpected error reading %s", source, exc_info=True)
                err = DecodeError(source, f"unexpected {type(e).__name__} while reading: {e}")
                err.__cause__ = e
                out.append((None, err, 0.0))
        return out

    # -- a chunk -------------------------------------------------------------------------------
    def read(self, chunk: Sequence[tuple[int, Any]]) -> ReadBatch:
        n = len(chunk)
        res = ReadBatch(chunk, [None] * n, {}, [0.0] * n)
        pool = self._executor() if n > 1 and self.num_threads > 1 else None
        is_path = [isinstance(item, (str, os.PathLike)) for _, item in chunk]
        path_pos = [p for p in range(n) if is_path[p]]
        reads: list[tuple[list[int], Future]] = []
        if pool is not None and len(path_pos) > 1:
            k = min(self.num_threads, len(path_pos))  # k tasks, each a contiguous run of paths
            for g in range(k):
                run = path_pos[g * len(path_pos) // k:(g + 1) * len(path_pos) // k]
                reads.append((run, pool.submit(self._read_run, [chunk[p] for p in run])))
        heavy: list[tuple[int, Future]] = []

        def take(pos: int, obj: Any, source: str | None, extra_ms: float) -> None:
            index = chunk[pos][0]
            if pool is not None and not _cheap(obj):
                heavy.append((pos, pool.submit(self.load, index, obj, source)))
                res.load_ms[pos] = extra_ms
                return
            img, err, ms = self.load(index, obj, source)
            self._store(res, pos, img, err, ms + extra_ms)

        for pos, (index, item) in enumerate(chunk):
            if not is_path[pos]:
                take(pos, item, None, 0.0)
            elif not reads:  # a single path, or no pool: read it here
                data, err, ms = self._read_run([(index, item)])[0]
                if err is not None:
                    self._store(res, pos, None, err, ms)
                else:
                    take(pos, data, os.fspath(item), ms)
        for run, fut in reads:
            for pos, (data, err, ms) in zip(run, fut.result()):
                if err is not None:
                    self._store(res, pos, None, err, ms)
                else:
                    take(pos, data, os.fspath(chunk[pos][1]), ms)
        for pos, fut in heavy:
            img, err, ms = fut.result()
            self._store(res, pos, img, err, res.load_ms[pos] + ms)
        return res

    @staticmethod
    def _store(res: ReadBatch, pos: int, img: Any, err: CxrkitError | None, ms: float) -> None:
        res.load_ms[pos] = ms
        if err is not None:
            res.errors[pos] = err
        else:
            res.loaded[pos] = img

    # -- lifecycle -----------------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor | None:
        with self._lock:
            if self._pool is None and not self._closed:
                self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="cxrkit-load")
            return self._pool

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
