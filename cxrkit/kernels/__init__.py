"""Kernel loader and the one dispatch rule of the post-processing ops.

Host arrays (numpy, torch CPU tensors, lists) run on ``cxrkit._C`` (C++, built by ``pip install .``);
device arrays (torch CUDA tensors, CuPy arrays, other ``__dlpack__`` CUDA arrays) run on the CUDA
kernels of ``csrc/cuda`` that CuPy compiles at run time (NVRTC) and caches per device. The numpy
reference (``cxrkit.postprocess._reference``) runs only when asked for with ``impl="reference"``.

Heavy imports (cupy, torch) happen lazily, the first time a device array arrives.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import BackendUnavailableError

__all__ = ["IMPLS", "array_device", "resolve_impl", "cpu_module", "cuda_module", "is_torch", "is_cupy",
           "raise_if_oom"]

IMPLS = ("auto", "reference", "cpu", "cuda")

_DLPACK_HOST = {1, 3}  # kDLCPU, kDLCUDAHost
_DLPACK_CUDA = {2, 13}  # kDLCUDA, kDLCUDAManaged


def is_torch(x: Any) -> bool:
    return type(x).__module__.split(".", 1)[0] == "torch"


def is_cupy(x: Any) -> bool:
    return type(x).__module__.split(".", 1)[0] == "cupy"


def array_device(x: Any) -> str:
    """'cuda' for device arrays, 'cpu' for everything else (numpy, torch CPU tensors, lists)."""
    if is_torch(x):
        return "cuda" if x.device.type == "cuda" else "cpu"
    if is_cupy(x):
        return "cuda"
    dev = getattr(x, "__dlpack_device__", None)
    if dev is not None:
        kind = int(dev()[0])
        if kind in _DLPACK_CUDA:
            return "cuda"
        if kind not in _DLPACK_HOST:
            raise ValueError(f"arrays on DLPack device type {kind} are not supported (expected CPU or CUDA)")
    return "cpu"


def resolve_impl(x: Any, impl: str = "auto") -> str:
    """The dispatch rule: 'auto' follows the array's device (CUDA -> 'cuda', host -> 'cpu').

    'reference' and 'cpu' need a host array and 'cuda' a device array: moving data between host and
    device is the caller's decision, never done silently here.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    device = array_device(x)
    if impl == "auto":
        return "cuda" if device == "cuda" else "cpu"
    if impl == "cuda" and device != "cuda":
        raise ValueError("impl='cuda' needs a CUDA array (torch CUDA tensor or CuPy array), got a host array; "
                         "move it to the GPU first, or use impl='auto'")
    if impl in ("reference", "cpu") and device == "cuda":
        raise ValueError(f"impl={impl!r} needs a host array, got a CUDA array; copy it to the host first "
                         "(e.g. tensor.cpu()), or use impl='auto'")
    return impl


def cpu_module():
    """cxrkit._C, the C++ CPU kernels; BackendUnavailableError (never a silent fallback) when not built."""
    try:
        return importlib.import_module("cxrkit._C")
    except ImportError as exc:
        raise BackendUnavailableError(
            "cxrkit._C (the C++ CPU kernels) is not built in this installation: run `pip install .` "
            "(or `pip install --no-build-isolation -e .`) in the cxrkit source tree, which needs a C++17 "
            "compiler; impl='reference' runs the slow numpy version meanwhile"
        ) from exc


def cuda_module():
    """cxrkit.kernels._cuda (imports cupy); BackendUnavailableError when CuPy is missing."""
    try:
        importlib.import_module("cupy")
    except ImportError as exc:
        raise BackendUnavailableError(
            "the CUDA post-processing kernels need CuPy: pip install cupy-cuda13x "
            "(or pip install 'cxrkit[gpu]')"
        ) from exc
    return importlib.import_module("cxrkit.kernels._cuda")


def raise_if_oom(exc: BaseException, what: str) -> None:
    """Raise cxrkit's OutOfMemoryError (from ``exc``) if ``exc`` is an out-of-device-memory error of
    CuPy, torch or CUDA; return otherwise (the caller re-raises ``exc``)."""
    from ..backends.base import as_out_of_memory

    oom = as_out_of_memory(exc, what)
    if oom is not None:
        raise oom from exc
