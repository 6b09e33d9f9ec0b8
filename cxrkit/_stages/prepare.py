"""Stages 1 + 2 for one chunk: read every item, then preprocess the readable ones as one batch.

Preprocessing runs under the Detector's preprocessing lock (DALI pipelines are not re-entrant);
reading does not, so concurrent callers read in parallel.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import DetectorClosedError
from .read import ReadBatch, Reader

__all__ = ["Prepared", "prepare"]


def closed_error() -> DetectorClosedError:
    return DetectorClosedError("this Detector is closed; create a new one to predict")


@dataclass
class Prepared:
    read: ReadBatch  # per position: LoadedImage or error, load ms
    ok: list[int] = field(default_factory=list)  # positions in the batch, row order
    batch: Any = None  # (len(ok), 1, H, W) model input (numpy, or a CUDA tensor)
    transforms: list[Any] = field(default_factory=list)  # one letterbox transform per row
    preprocess_ms: float = 0.0

    @property
    def chunk(self) -> Sequence[tuple[int, Any]]:
        return self.read.chunk


def prepare(chunk: Sequence[tuple[int, Any]], reader: Reader, preprocessor: Any, lock: threading.Lock,
            is_closed: Callable[[], bool]) -> Prepared:
    if is_closed():
        raise closed_error()
    read = reader.read(chunk)
    prep = Prepared(read)
    ok_pos = [p for p, img in enumerate(read.loaded) if img is not None]
    if ok_pos:
        t0 = time.perf_counter()
        with lock:
            if is_closed():  # close() may have run while this call was reading its inputs
                raise closed_error()
            pre = preprocessor.run([read.loaded[p] for p in ok_pos])
        prep.preprocess_ms = (time.perf_counter() - t0) * 1e3
        for p_local, err in pre.errors.items():
            read.errors[ok_pos[p_local]] = err
        prep.ok = [ok_pos[p] for p in pre.ok_positions]
        prep.batch, prep.transforms = pre.batch, pre.transforms
    return prep
