"""Keep numpy's OpenBLAS to one thread while the preprocessor runs its own thread pool.

The reference resize is two blocked float32 matmuls per image (sgemm). OpenBLAS threads each
call over all cores and busy-waits between calls; with the preprocessor's own per-image threads
on top, or on a shared, loaded machine, that costs up to 10x the CPU time (measured on a loaded
2-core box: 215 vs 26 CPU ms per 2048^2 JPEG). One BLAS thread per image, images in parallel, is
the cheap way. Uses threadpoolctl when installed, else OpenBLAS' own setter found among the loaded
libraries (Linux); does nothing where neither is available.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["blas_single_thread"]

_lock = threading.Lock()
_depth = 0
_saved: int | None = None

_SETTERS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads")
_GETTERS = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads")


@functools.lru_cache(maxsize=1)
def _openblas() -> tuple[Any, Any] | None:
    """(set_num_threads, get_num_threads) of the OpenBLAS that numpy loaded, or None."""
    import numpy  # noqa: F401  (make sure numpy's BLAS is loaded)

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in zip(_SETTERS, _GETTERS):
            setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
            if setter is not None and getter is not None:
                getter.restype = ctypes.c_int
                return setter, getter
    return None


@functools.lru_cache(maxsize=1)
def _threadpool_limits() -> Any:
    """threadpoolctl's threadpool_limits, or None; looked up once (a failed import is not cached by
    Python: it searched sys.path again on every call, ~0.1-0.4 ms per batch)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits


@contextlib.contextmanager
def blas_single_thread() -> Iterator[None]:
    """Within the block (re-entrant, process-wide), numpy's BLAS uses one thread."""
    global _depth, _saved
    threadpool_limits = _threadpool_limits()
    if threadpool_limits is not None:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
        return
    fns = _openblas()
    if fns is None:
        yield
        return
    setter, getter = fns
    with _lock:
        if _depth == 0:
            _saved = int(getter())
            setter(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                setter(_saved)
                _saved = None
