"""Stage 3, infer (and localize): a preprocessed batch -> columns, with the out-of-memory retry.

The batch runs in slices. A device out-of-memory anywhere in a slice's handled region (the
runner's inference, which includes a lazy CUDA-graph capture, and localization + the device-to-host
copy) halves the slice and retries; later batches start from the slice size that last worked.
Out of memory at one image fails that image (``OutOfMemoryError``). Any other exception raised
for a slice fails the images of that slice with a ``BatchFailedError`` (a ``BackendError``) whose
``__cause__`` is the original; nothing escapes ``Detector.predict`` as a raw exception.

Callers hold the Detector's inference lock (runners, DALI pipelines and CUDA graphs are not
re-entrant).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import BatchFailedError, CxrkitError, OutOfMemoryError
from ..results import BatchColumns

__all__ = ["Inference", "Inferred"]

log = logging.getLogger("cxrkit.api")  # the retry warnings have always come from the Detector's logger


def _as_oom(exc: BaseException, what: str) -> OutOfMemoryError | None:
    try:
        from ..backends.base import as_out_of_memory
    except ImportError:  # pragma: no cover - an older tree without it
        return exc if isinstance(exc, OutOfMemoryError) else None
    return as_out_of_memory(exc, what)


@dataclass
class Inferred:
    """Columns per slice: ``parts`` holds (first row, columns) in row order; failed rows in ``errors``."""

    parts: list[tuple[int, BatchColumns]] = field(default_factory=list)
    errors: dict[int, CxrkitError] = field(default_factory=dict)  # row -> error
    infer_ms: float = 0.0
    postprocess_ms: float = 0.0


class Inference:
    """Runs one runner and one localizer over batches; remembers the slice size that fit."""

    def __init__(self, runner: Any, localize: Callable[[dict[str, Any], Sequence[Any], bool], BatchColumns]) -> None:
        self.runner = runner
        self.localize = localize
        self.step: int | None = None  # slice size that fit after an out-of-memory retry

    def run(self, batch: Any, transforms: Sequence[Any], return_heatmaps: bool) -> Inferred:
        res = Inferred()
        n = len(transforms)
        start, step = 0, min(n, self.step or n)
        while start < n:
            stop = min(n, start + step)
            ti = time.perf_counter()
            tp = ti
            try:
                out = self.runner.infer(batch[start:stop])
                tp = time.perf_counter()
                cols = self.localize(out, transforms[start:stop], return_heatmaps)
            except Exception as e:  # noqa: BLE001 - sorted below: retry, or typed errors for the slice
                oom = _as_oom(e, "localize" if tp > ti else "")
                if oom is None:
                    log.warning("%s failed on a batch of %d: %s: %s", getattr(self.runner, "name", "runner"),
                                stop - start, type(e).__name__, e, exc_info=not isinstance(e, CxrkitError))
                    self._fail(res, start, stop, e)
                    start = stop
                elif step == 1:
                    for r in range(start, stop):
                        res.errors[r] = oom
                    start = stop
                else:
                    step = max(1, step // 2)
                    self.step = step
                    log.warning("out of memory at batch %d; retrying with batches of %d", stop - start, step)
                continue
            te = time.perf_counter()
            res.infer_ms += (tp - ti) * 1e3
            res.postprocess_ms += (te - tp) * 1e3
            res.parts.append((start, cols))
            start = stop
        return res

    def _fail(self, res: Inferred, start: int, stop: int, e: BaseException) -> None:
        stage = "inference or post-processing"
        for r in range(start, stop):  # one error object per item (each may be raised on its own)
            err = BatchFailedError(f"{stage} failed for a batch of {stop - start} images on "
                                   f"{getattr(self.runner, 'name', 'the runner')}: {type(e).__name__}: {e}")
            err.__cause__ = e
            res.errors[r] = err
