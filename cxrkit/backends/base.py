"""The Runner contract, the backend registry and ``backend="auto"``.

A Runner turns a preprocessed batch (B, 1, H, W) float32 into ``{"logits": (B, K),
"heatmaps": (B, K, h, w)}``. Public methods check inputs and outputs; subclasses implement
``_load_impl`` and ``_infer_impl`` only (the Polygraphy pattern).

Arrays: on the CPU, numpy in and numpy out. On CUDA, a torch CUDA tensor (or anything that
speaks DLPack) in, torch CUDA tensors out; heatmaps may be fp16 or bf16.

``prepare(batch_sizes)`` does the per-shape set-up ahead of time (CUDA graph capture for the torch
and TensorRT runners, one graph per batch-size bucket); the Detector calls it once at construction,
before any prefetch thread exists, so that no capture ever runs while another thread uses the GPU.

Out of device memory: every runner raises :class:`cxrkit.errors.OutOfMemoryError` (never the
library's own exception); :func:`as_out_of_memory` recognises the libraries' OOM errors (torch,
CuPy, DALI, cuDNN / cuBLAS status strings) and is used by the kernels and the DALI pipeline too.
"""

from __future__ import annotations

import abc
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..config import Device, Precision
from ..errors import BackendError, BackendUnavailableError, OutOfMemoryError
from ..models import ModelPackage

__all__ = ["Runner", "register_backend", "create_runner", "available_backends", "BACKENDS", "AUTO_ORDER",
           "as_out_of_memory", "buckets"]

log = logging.getLogger(__name__)

# Substrings of out-of-memory errors that arrive as plain RuntimeError / MemoryError: torch
# ("CUDA out of memory"), cuBLAS / cuDNN status codes, CUDA runtime and driver error names (CuPy,
# DALI, nvImageCodec), DALI's CUDABadAlloc ("CUDA allocation failed"), nvJPEG / nvJPEG2000
# allocator failures, and std::bad_alloc translated by pybind11.
_OOM_MARKERS = (
    "out of memory", "cudaerrormemoryallocation", "cuda_error_out_of_memory", "cuda allocation failed",
    "alloc_failed", "allocator_failure", "bad_alloc", "failed to allocate",
    "can't allocate memory", "cannot allocate memory",  # torch's CPU allocator (ENOMEM)
)


def as_out_of_memory(exc: BaseException, what: str = "") -> OutOfMemoryError | None:
    """``exc`` as a cxrkit :class:`OutOfMemoryError` (itself if it already is one), or None when it
    is not an out-of-memory error. ``what`` names the stage for the message (e.g. "localize")."""
    if isinstance(exc, OutOfMemoryError):
        return exc
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(seen) < 8 and cur not in seen:  # an OOM may hide behind a follow-up error
        seen.append(cur)  # (e.g. ending a CUDA graph capture that the OOM interrupted)
        cur = cur.__cause__ or cur.__context__
    hit = next((e for e in seen if type(e).__name__ in ("OutOfMemoryError", "MemoryError", "CUDABadAlloc")
                or any(m in str(e).lower() for m in _OOM_MARKERS)), None)
    if hit is None:
        return None
    if isinstance(hit, OutOfMemoryError):
        return hit
    exc = hit
    name = type(exc).__name__
    text = str(exc)
    first = text.strip().splitlines()[0][:300] if text.strip() else name
    err = OutOfMemoryError(f"{what + ': ' if what else ''}out of device memory ({type(exc).__module__}.{name}: "
                           f"{first}); the Detector retries with smaller batches")
    err.__cause__ = exc
    return err


def buckets(max_batch: int) -> list[int]:
    """The batch-size buckets of a CUDA-graph runner: 1, 2, 4, ... < max_batch, then max_batch."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


class Runner(abc.ABC):
    name: str = "base"
    #: devices and precisions the backend supports
    devices: tuple[Device, ...] = (Device.CPU,)
    precisions: tuple[Precision, ...] = (Precision.FP32,)

    def __init__(self, model: ModelPackage, device: str | Device = "cpu",
                 precision: str | Precision = "fp32", **options: Any) -> None:
        self.model = model
        self.device_str = str(device.value if isinstance(device, Device) else device)
        self.device = Device.parse(device)
        self.precision = Precision.parse(precision)
        self.options = options
        if self.device not in self.devices:
            raise BackendUnavailableError(f"backend {self.name!r} does not run on {self.device.value}")
        if self.precision not in self.precisions:
            raise BackendUnavailableError(
                f"backend {self.name!r} supports precisions {[p.value for p in self.precisions]}, "
                f"not {self.precision.value}"
            )
        self._loaded = False
        self._lock = threading.Lock()

    # -- public contract -------------------------------------------------------------------
    def load(self) -> "Runner":
        with self._lock:
            if not self._loaded:
                self._load_impl()
                self._loaded = True
        return self

    def prepare(self, batch_sizes: Sequence[int]) -> None:
        """Do the per-shape set-up for these batch sizes now (loads the runner first).

        CUDA-graph runners capture the graph of every bucket that a batch of one of these sizes
        runs in (the smallest bucket >= the size), so that ``infer`` never captures later. Call it
        once, before other threads use the GPU (the Detector calls it at construction). Other
        runners: a no-op. Raises OutOfMemoryError when a capture does not fit.

        A Detector with ``batch_size=B`` passes ``range(1, B + 1)``: every bucket up to B (a tail
        batch and every halved batch after an out-of-memory retry then find their graph; the
        buckets share one memory pool and are captured largest first, so the smaller ones mostly reuse
        the largest one's freed memory; their static outputs add up).
        """
        sizes = sorted({int(b) for b in batch_sizes})
        if any(b < 1 for b in sizes):
            raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
        self.load()
        with self._lock:
            self._prepare_impl(sizes)

    def infer(self, batch: Any) -> dict[str, Any]:
        if not self._loaded:
            self.load()
        shape = tuple(batch.shape)
        H, W = self.model.card.input_hw
        if len(shape) != 4 or shape[1] != 1 or shape[2:] != (H, W) or shape[0] < 1:
            raise BackendError(f"{self.name}: expected a batch (B, 1, {H}, {W}), got {shape}")
        out = self._infer_impl(batch)
        K = self.model.card.num_classes
        h, w = self.model.card.heatmap_hw
        lg, hm = out.get("logits"), out.get("heatmaps")
        if lg is None or hm is None:
            raise BackendError(f"{self.name}: model must output 'logits' and 'heatmaps', got {sorted(out)}")
        if tuple(lg.shape) != (shape[0], K) or tuple(hm.shape) != (shape[0], K, h, w):
            raise BackendError(
                f"{self.name}: output shapes logits {tuple(lg.shape)} heatmaps {tuple(hm.shape)} do not match "
                f"the card (B={shape[0]}, K={K}, heatmap {h}x{w})"
            )
        return out

    def close(self) -> None:
        with self._lock:
            if self._loaded:
                self._close_impl()
                self._loaded = False

    def __enter__(self) -> "Runner":
        return self.load()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model.name!r}, device={self.device_str!r}, precision={self.precision.value!r})"

    # -- for subclasses ----------------------------------------------------------------------
    @abc.abstractmethod
    def _load_impl(self) -> None: ...

    @abc.abstractmethod
    def _infer_impl(self, batch: Any) -> dict[str, Any]: ...

    def _prepare_impl(self, batch_sizes: list[int]) -> None:
        """Per-shape set-up (sorted, unique, >= 1); default: nothing to do."""

    def _close_impl(self) -> None:
        pass


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[[], type[Runner]]
    available: Callable[[Device, Precision], str | None]  # None if usable, else why not


BACKENDS: dict[str, _Entry] = {}


#: the order ``backend="auto"`` tries, per device (DESIGN.md: TensorRT, then torch on CUDA, then ORT on CPU)
AUTO_ORDER: dict[Device, tuple[str, ...]] = {
    Device.CUDA: ("tensorrt", "torch", "onnxruntime"),
    Device.CPU: ("onnxruntime", "torch"),
}


def register_backend(name: str, factory: Callable[[], type[Runner]],
                     available: Callable[[Device, Precision], str | None]) -> None:
    """Register a backend. ``factory`` imports lazily; ``available`` says why it cannot run, or None."""
    BACKENDS[name] = _Entry(name, factory, available)


def available_backends(device: str | Device = "cpu", precision: str | Precision = "fp32") -> dict[str, str | None]:
    """name -> None if usable for (device, precision), else the reason it is not."""
    d, p = Device.parse(device), Precision.parse(precision)
    return {n: e.available(d, p) for n, e in sorted(BACKENDS.items())}


def create_runner(model: ModelPackage, backend: str = "auto", device: str | Device = "cpu",
                  precision: str | Precision = "fp32", **options: Any) -> Runner:
    d, p = Device.parse(device), Precision.parse(precision)
    if backend == "auto":
        reasons = {}
        for name in AUTO_ORDER[d]:
            e = BACKENDS.get(name)
            if e is None:
                continue
            why = e.available(d, p)
            if why is None and e.name == "torch" and model.card.arch is None:
                why = "the card names no torch arch"
            if why is None and e.name in ("onnxruntime", "tensorrt") and model.onnx_path is None:
                why = "the card names no ONNX file"
            if why is None:
                log.info("backend='auto' picked %r for device=%s precision=%s", e.name, d.value, p.value)
                return e.factory()(model, device, precision, **options)
            reasons[e.name] = why
        detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
        raise BackendUnavailableError(f"no backend can run {model.name!r} on {d.value} in {p.value} ({detail})")
    if backend not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {backend!r}; registered: {sorted(BACKENDS)}")
    e = BACKENDS[backend]
    why = e.available(d, p)
    if why is not None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run on {d.value} in {p.value}: {why}")
    log.info("backend %r on device=%s precision=%s", backend, d.value, p.value)
    return e.factory()(model, device, precision, **options)
