"""One device-to-host transfer per batch: logits + Detections -> numpy.

:func:`to_host` is what the Detector's post-processing calls after :func:`~cxrkit.postprocess.detect`.
On the CPU it returns numpy views of its inputs (no copy). On CUDA it packs the five arrays
(logits (B, K) and counts, scores, points, boxes) into one device buffer of 32-bit words (one
``cat`` kernel), copies that buffer to page-locked host memory in **one** asynchronous copy on the
current stream, waits for that copy only (an event, not the device or the default stream), and
returns numpy views of the host buffer: five small copies with a synchronisation each become one.

Page-locked memory comes from the library's caching host allocator (torch's
``CachingHostAllocator`` / CuPy's pinned memory pool): a block is reused by later batches once
every array viewing it is gone, so there is no per-batch ``cudaHostAlloc`` and the returned arrays
are owned by the caller (they are never overwritten by a later call).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import kernels
from .localize import Detections

__all__ = ["to_host"]

# (name, numpy dtype) of the packed sections, in order; every one is 4 bytes per element
_SECTIONS = (("logits", np.float32), ("counts", np.int32), ("scores", np.float32), ("points", np.int32),
             ("boxes", np.float32))


def _host_view(a: Any, dtype) -> np.ndarray:
    """numpy view of a host array (torch CPU tensor or numpy), cast only when its dtype differs."""
    if kernels.is_torch(a):
        import torch

        t = a.detach()
        want = {np.float32: torch.float32, np.int32: torch.int32}[dtype]
        if t.dtype != want:
            t = t.to(want)  # e.g. bf16 logits of a CPU runner: numpy has no bf16
        return t.numpy()
    return np.asarray(a).astype(dtype, copy=False)


def to_host(logits: Any, detections: Detections) -> tuple[np.ndarray, Detections]:
    """(logits (B, K), Detections) of one batch -> (float32 numpy logits, Detections of numpy arrays).

    Host inputs (numpy, torch CPU tensors) come back as numpy without copying (a dtype cast only
    where needed: logits become float32, counts / points int32). CUDA inputs (torch CUDA tensors or
    CuPy arrays, all of one library and device) cost one packed device-to-host copy into pinned
    memory (module doc). Mixed host / device inputs are refused: move them to one place first.
    """
    arrays = (logits, detections.counts, detections.scores, detections.points, detections.boxes)
    devices = {kernels.array_device(a) for a in arrays}
    if devices == {"cpu"}:
        lg, counts, scores, points, boxes = (_host_view(a, dt) for a, (_, dt) in zip(arrays, _SECTIONS))
        return lg, Detections(counts, scores, points, boxes)
    if devices != {"cuda"}:
        raise ValueError("to_host: logits and detections must all be host arrays or all CUDA arrays, got a mix; "
                         "keep the runner's outputs and detect() on one device")
    shapes = [tuple(int(d) for d in a.shape) for a in arrays]
    if all(kernels.is_torch(a) for a in arrays):
        pack = _pack_torch
    elif all(kernels.is_cupy(a) for a in arrays):
        pack = _pack_cupy
    else:
        raise ValueError("to_host: CUDA arrays must all be torch tensors or all CuPy arrays")
    try:
        words = pack(arrays)
    except ValueError:
        raise
    except Exception as e:  # device or pinned-host out of memory -> cxrkit's OutOfMemoryError
        kernels.raise_if_oom(e, "to_host")
        raise
    out, off = [], 0
    for (name, dt), shape in zip(_SECTIONS, shapes):
        n = int(np.prod(shape, dtype=np.int64))
        out.append(words[off:off + n].view(dt).reshape(shape))
        off += n
    lg, counts, scores, points, boxes = out
    return lg, Detections(counts, scores, points, boxes)


def _pack_torch(arrays: tuple) -> np.ndarray:
    import torch

    dev = arrays[0].device
    if any(a.device != dev for a in arrays):
        raise ValueError(f"to_host: arrays on several devices {sorted({str(a.device) for a in arrays})}")
    want = (torch.float32, torch.int32, torch.float32, torch.int32, torch.float32)
    parts = []
    for a, dt in zip(arrays, want):
        a = a.detach()
        if a.dtype != dt:
            a = a.to(dt)  # fp16 / bf16 logits of a runner; never the kernels' outputs
        parts.append(a.reshape(-1).view(torch.int32))  # reinterpret 4-byte words, no conversion
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev)
        packed = torch.cat(parts)  # one kernel on the current stream
        host = torch.empty(packed.shape, dtype=torch.int32, pin_memory=True)
        host.copy_(packed, non_blocking=True)  # one DMA, ordered after the kernels on this stream
        done = torch.cuda.Event()
        done.record(stream)
    done.synchronize()  # waits for this copy only
    return host.numpy()  # keeps `host` alive; the block returns to the pinned cache when unused


def _pack_cupy(arrays: tuple) -> np.ndarray:
    import cupy as cp
    import cupyx

    dev = arrays[0].device.id
    if any(a.device.id != dev for a in arrays):
        raise ValueError("to_host: CuPy arrays on several devices")
    want = (cp.float32, cp.int32, cp.float32, cp.int32, cp.float32)
    with cp.cuda.Device(dev):
        parts = [cp.ascontiguousarray(a if a.dtype == dt else a.astype(dt)).ravel().view(cp.int32)
                 for a, dt in zip(arrays, want)]
        packed = cp.concatenate(parts)
        host = cupyx.empty_pinned(packed.shape, dtype=np.int32)
        stream = cp.cuda.get_current_stream()
        packed.get(stream=stream, out=host, blocking=False)
        done = stream.record()
    done.synchronize()
    return host
