"""The CUDA kernels of ``csrc/cuda``: compiled at run time by CuPy (NVRTC) and cached.

CuPy caches the compiled binary on disk per architecture (``~/.cupy/kernel_cache``); this module
also keeps one ``RawModule`` and its functions per device for the process. Inputs are torch CUDA
tensors, CuPy arrays or any ``__dlpack__`` CUDA array, used in place (no copies when contiguous);
outputs are allocated by the input's library on its device and current stream, and every kernel
runs on that stream (torch's current stream for torch tensors), so nothing waits on the host.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import cupy as cp
import numpy as np

from . import is_torch
from .cuda_source import OPTIONS as _OPTIONS
from .cuda_source import source  # CuPy-free, so CI compiles the same text with NVRTC

__all__ = ["localize", "batched_nms", "source", "LOCALIZE_THREADS"]

LOCALIZE_THREADS = 256  # CXR_LOC_THREADS in localize.cu
_NMS_TILE = 64
_MAX_NMS_MASK_BYTES = 4 << 30
_HEAT_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}  # -> kernel name part

_lock = threading.Lock()
_modules: dict[int, Any] = {}
_functions: dict[tuple[int, str], Any] = {}
_thresholds: dict[tuple[str, int, bytes], Any] = {}


def _function(device_id: int, name: str):
    key = (device_id, name)
    fn = _functions.get(key)
    if fn is None:
        with _lock, cp.cuda.Device(device_id):
            mod = _modules.get(device_id)
            if mod is None:
                mod = _modules[device_id] = cp.RawModule(code=source(), options=_OPTIONS)
            fn = _functions[key] = mod.get_function(name)
    return fn


class _Arr(NamedTuple):
    """A contiguous CUDA array, its library ('torch' | 'cupy'), device and current stream."""

    obj: Any
    lib: str
    ptr: int
    shape: tuple
    dtype: str
    device_id: int
    stream_ptr: int


def _adapt(x: Any) -> _Arr:
    if is_torch(x):
        import torch

        if x.device.type != "cuda":
            raise ValueError(f"expected a CUDA tensor, got one on {x.device}")
        t = x.contiguous()
        return _Arr(t, "torch", t.data_ptr(), tuple(t.shape), str(t.dtype).rsplit(".", 1)[-1],
                    t.device.index, torch.cuda.current_stream(t.device).cuda_stream)
    a = x if isinstance(x, cp.ndarray) else cp.from_dlpack(x)
    with cp.cuda.Device(a.device.id):
        a = cp.ascontiguousarray(a)
        return _Arr(a, "cupy", a.data.ptr, tuple(a.shape), a.dtype.name, a.device.id,
                    cp.cuda.get_current_stream().ptr)


def _empty(like: _Arr, shape: tuple, dtype: str):
    if like.lib == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.obj.device)
    with cp.cuda.Device(like.device_id):
        return cp.empty(shape, dtype=dtype)


def _ptr(a: Any) -> np.uint64:
    return np.uint64(a.data_ptr() if is_torch(a) else a.data.ptr)


def _launch(fn, like: _Arr, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
    with cp.cuda.Device(like.device_id):
        if like.lib == "cupy":
            fn(grid, block, args, shared_mem=shared_mem)
            return
        stream = cp.cuda.Stream.null if like.stream_ptr == 0 else cp.cuda.ExternalStream(like.stream_ptr, like.device_id)
        with stream:
            fn(grid, block, args, shared_mem=shared_mem)


def _device_thresholds(like: _Arr, t_logit: np.ndarray):
    """(K,) float32 logit thresholds on the device, uploaded once per (device, values)."""
    key = (like.lib, like.device_id, t_logit.tobytes())
    t = _thresholds.get(key)
    if t is None:
        if like.lib == "torch":
            import torch

            t = torch.from_numpy(np.ascontiguousarray(t_logit, np.float32)).to(like.obj.device)
            torch.cuda.current_stream(like.obj.device).synchronize()  # once; later calls may be captured
        else:
            with cp.cuda.Device(like.device_id):
                t = cp.asarray(np.ascontiguousarray(t_logit, np.float32))
                cp.cuda.get_current_stream().synchronize()
        if len(_thresholds) >= 64:
            _thresholds.pop(next(iter(_thresholds)))
        _thresholds[key] = t
    return t


def _check_out(arr: Any, like: _Arr, name: str, shape: tuple, dtype: str) -> None:
    """A preallocated output must be written in place by the kernel: same library and device as the
    input, exact shape and dtype, C-contiguous (the kernel writes through its raw pointer)."""
    if like.lib == "torch":
        if not is_torch(arr) or arr.device.type != "cuda" or arr.device.index != like.device_id:
            raise ValueError(f"out.{name} must be a torch CUDA tensor on cuda:{like.device_id} like the heatmaps, "
                             f"got {type(arr).__name__} on {getattr(arr, 'device', '?')}")
        got_dtype = str(arr.dtype).rsplit(".", 1)[-1]
        contiguous = arr.is_contiguous()
    else:
        if not isinstance(arr, cp.ndarray) or arr.device.id != like.device_id:
            raise ValueError(f"out.{name} must be a CuPy array on device {like.device_id} like the heatmaps, "
                             f"got {type(arr).__name__}")
        got_dtype = arr.dtype.name
        contiguous = bool(arr.flags.c_contiguous)
    if tuple(arr.shape) != shape:
        raise ValueError(f"out.{name} must have shape {shape}, got {tuple(arr.shape)}")
    if got_dtype != dtype:
        raise TypeError(f"out.{name} must be {dtype}, got {got_dtype}")
    if not contiguous:
        raise ValueError(f"out.{name} must be C-contiguous (the kernel writes it through its pointer)")


def _fill(a: Any, value) -> None:
    if is_torch(a):
        a.fill_(value)
    else:
        a.fill(value)


def localize(heat: Any, t_logit: np.ndarray, max_peaks: int, region_fraction: float, max_extent: int,
             iou_threshold: float, out: tuple | None = None) -> tuple:
    """(B, K, h, w) fp16/bf16/fp32 CUDA logits -> (counts, scores, points, boxes) on the same device.

    ``out``: optional preallocated (counts, scores, points, boxes) of the input's library (lets the
    call run inside a CUDA graph capture: no allocation, no host transfer once thresholds are cached).
    """
    a = _adapt(heat)
    if len(a.shape) != 4:
        raise ValueError(f"heatmap_logits must be (B, K, h, w), got shape {a.shape}")
    if a.dtype not in _HEAT_DTYPES:
        raise TypeError(f"heatmap_logits must be float16, bfloat16 or float32 on the GPU, got {a.dtype}")
    B, K, h, w = a.shape
    if t_logit.shape != (K,):
        raise ValueError(f"peak_thresholds must have K={K} entries, got {t_logit.shape[0]}")
    if h * w >= 2**31:
        raise ValueError(f"h * w must be < 2**31, got {h} x {w}")
    M, E = int(max_peaks), int(max_extent)
    specs = (("counts", (B, K), "int32"), ("scores", (B, K, M), "float32"), ("points", (B, K, M, 2), "int32"),
             ("boxes", (B, K, M, 4), "float32"))
    if out is None:
        out = tuple(_empty(a, shape, dt) for _, shape, dt in specs)
    else:
        out = tuple(out)
        if len(out) != 4:
            raise ValueError(f"out must be (counts, scores, points, boxes), got {len(out)} arrays")
        for arr, spec in zip(out, specs):
            _check_out(arr, a, *spec)
    counts, scores, points, boxes = out
    if B * K == 0:
        return out
    if h * w == 0:
        for arr, v in zip(out, (0, -1.0, -1, 0.0)):
            _fill(arr, v)
        return out
    nw = (2 * E + 1 + 31) // 32
    nw = 5 if nw == 4 else nw
    name = f"cxr_localize_{_HEAT_DTYPES[a.dtype]}_w{nw}"
    fn = _function(a.device_id, name)
    t = _device_thresholds(a, t_logit)
    args = (np.uint64(a.ptr), _ptr(t), np.int32(K), np.int32(h), np.int32(w), np.int32(M), np.int32(E),
            np.float32(region_fraction), np.float32(iou_threshold),
            _ptr(counts), _ptr(scores), _ptr(points), _ptr(boxes))
    _launch(fn, a, (B * K,), (LOCALIZE_THREADS,), args)
    return out


def batched_nms(boxes: Any, scores: Any, idxs: Any, iou_threshold: float):
    """Greedy NMS per idxs group on the GPU -> kept indices (int64, same library and device).

    The kept count is data dependent, so this ends with one device-to-host read of it (as torchvision).
    """
    b, s, g = _adapt(boxes), _adapt(scores), _adapt(idxs)
    if len(b.shape) != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4), got {b.shape}")
    n = b.shape[0]
    if s.shape != (n,) or g.shape != (n,):
        raise ValueError(f"scores and idxs must be ({n},), got {s.shape} and {g.shape}")
    if len({b.device_id, s.device_id, g.device_id}) != 1 or len({b.lib, s.lib, g.lib}) != 1:
        raise ValueError("boxes, scores and idxs must be arrays of one library on one device")
    torch_lib = b.lib == "torch"
    if torch_lib:
        import torch
    b = b if b.dtype == "float32" else _adapt(b.obj.float() if torch_lib else b.obj.astype(cp.float32))
    s = s if s.dtype == "float32" else _adapt(s.obj.float() if torch_lib else s.obj.astype(cp.float32))
    g = g if g.dtype == "int64" else _adapt(g.obj.long() if torch_lib else g.obj.astype(cp.int64))
    if n == 0:
        return _empty(b, (0,), "int64")
    col_blocks = (n + _NMS_TILE - 1) // _NMS_TILE
    if n * col_blocks * 8 > _MAX_NMS_MASK_BYTES or n >= 2**31:
        raise ValueError(f"batched_nms on the GPU needs n * ceil(n / 64) * 8 bytes of mask; n={n} is too many "
                         "(split the boxes by idxs)")
    dev = b.device_id
    keys = _empty(b, (n,), "int64")
    _launch(_function(dev, "cxr_nms_keys"), b, ((n + 255) // 256,), (256,), (np.uint64(s.ptr), np.int32(n), _ptr(keys)))
    keys = torch.sort(keys).values if torch_lib else cp.sort(keys)
    sboxes, sidxs, order = _empty(b, (n, 4), "float32"), _empty(b, (n,), "int64"), _empty(b, (n,), "int64")
    _launch(_function(dev, "cxr_nms_gather"), b, ((n + 255) // 256,), (256,),
            (_ptr(keys), np.uint64(b.ptr), np.uint64(g.ptr), np.int32(n), _ptr(sboxes), _ptr(sidxs), _ptr(order)))
    mask = _empty(b, (n * col_blocks,), "int64")
    _launch(_function(dev, "cxr_nms_mask"), b, (col_blocks, col_blocks), (_NMS_TILE,),
            (_ptr(sboxes), _ptr(sidxs), np.int32(n), np.int32(col_blocks), np.float32(iou_threshold), _ptr(mask)))
    keep = _empty(b, (n,), "uint8")
    reduce_fn = _function(dev, "cxr_nms_reduce")
    smem = col_blocks * 8
    if smem > 48 * 1024:
        reduce_fn.max_dynamic_shared_size_bytes = smem
    _launch(reduce_fn, b, (1,), (1024,), (_ptr(mask), np.int32(n), np.int32(col_blocks), _ptr(keep)), shared_mem=smem)
    if torch_lib:
        return order[keep.bool()]
    with cp.cuda.Device(dev):
        return order[keep.astype(cp.bool_)]
