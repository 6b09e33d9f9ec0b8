"""Heatmap localization: logits (B, K, h, w) -> peaks, regions, boxes, per-finding NMS.

The function is defined once in :mod:`cxrkit.postprocess._reference` (numpy); ``csrc/cpu`` and
``csrc/cuda`` compute it bit for bit. :func:`detect` picks the implementation by the array's device
(:func:`cxrkit.kernels.resolve_impl`), or by ``impl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .. import kernels
from ..config import LocalizeConfig
from ._reference import detect_reference, logit_thresholds

__all__ = ["Detections", "detect", "host_detector", "logit_thresholds"]


@dataclass(frozen=True)
class Detections:
    """Per (image, finding) peaks, M = max_peaks slots each; arrays of the input's library and device.

    counts: (B, K) int32, number of kept peaks.
    scores: (B, K, M) float32 peak probabilities, descending in each row; -1 in empty slots.
    points: (B, K, M, 2) int32 peak cells (x, y); -1 in empty slots.
    boxes: (B, K, M, 4) float32 (x0, y0, x1, y1) in heatmap-cell edge units (a region over cells
        xmin..xmax gives x0 = xmin, x1 = xmax + 1); 0 in empty slots.
    """

    counts: Any
    scores: Any
    points: Any
    boxes: Any

    def numpy(self) -> "Detections":
        """Host numpy copies (a device-to-host transfer for GPU arrays)."""
        return Detections(*(_to_numpy(a) for a in (self.counts, self.scores, self.points, self.boxes)))


def _to_numpy(a: Any) -> np.ndarray:
    if kernels.is_torch(a):
        return a.detach().cpu().numpy()
    if kernels.is_cupy(a):
        return a.get()
    return np.asarray(a)


def _host_thresholds(peak_thresholds: Any) -> np.ndarray:
    if kernels.is_torch(peak_thresholds) or kernels.is_cupy(peak_thresholds):
        peak_thresholds = _to_numpy(peak_thresholds)  # K values: a small transfer
    return logit_thresholds(peak_thresholds)


def _host_heat(heatmap_logits: Any) -> np.ndarray:
    if kernels.is_torch(heatmap_logits):
        t = heatmap_logits.detach()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16; widening to float32 is exact
            t = t.float()
        heat = t.numpy()
    else:
        heat = np.asarray(heatmap_logits)
    if heat.dtype not in (np.float16, np.float32):
        raise TypeError(f"heatmap_logits must be float16, bfloat16 (torch) or float32, got {heat.dtype}")
    if heat.ndim != 4:
        raise ValueError(f"heatmap_logits must be (B, K, h, w), got shape {heat.shape}")
    return np.ascontiguousarray(heat)


def _like_input(x: Any, arrays: tuple) -> tuple:
    if kernels.is_torch(x):  # torch CPU tensor in -> torch CPU tensors out
        import torch

        return tuple(torch.from_numpy(a) for a in arrays)
    return arrays


def detect(heatmap_logits: Any, peak_thresholds: Any, cfg: LocalizeConfig = LocalizeConfig(), *,
           impl: str = "auto", num_threads: int = 0, out: Detections | None = None) -> Detections:
    """Heatmap logits (B, K, h, w) float32 / float16 / bfloat16 (torch) -> :class:`Detections`.

    bfloat16 maps are widened to float32 exactly (on the GPU inside the kernel, on the host by one
    cast), so every dtype gives the function of its float32 values.

    peak_thresholds: (K,) probabilities; a cell is a peak candidate iff its logit is >= the logit of
        its threshold and >= its 8 neighbours. See ``_reference`` for the full definition.
    impl: "auto" (by device: CUDA arrays -> CUDA kernel, host arrays -> C++), "reference" (numpy),
        "cpu" (C++, cxrkit._C) or "cuda" (CuPy/NVRTC kernel).
    num_threads: C++ worker threads (0: all cores).
    out: preallocated Detections (CUDA only), e.g. for CUDA graph capture: arrays of the input's
        library on its device, C-contiguous, with exactly the shapes and dtypes documented on
        :class:`Detections` (M = cfg.max_peaks); anything else raises ValueError / TypeError.

    NaN logits: a NaN cell is never a peak nor part of a region, and a cell with a NaN 8-neighbour
    is not a peak (all three implementations; see ``_reference``).
    """
    which = kernels.resolve_impl(heatmap_logits, impl)
    t_logit = _host_thresholds(peak_thresholds)
    if which == "cuda":
        try:
            res = kernels.cuda_module().localize(
                heatmap_logits, t_logit, cfg.max_peaks, cfg.region_fraction, cfg.max_extent, cfg.iou_threshold,
                out=None if out is None else (out.counts, out.scores, out.points, out.boxes))
        except (ValueError, TypeError):
            raise
        except Exception as e:  # CuPy / torch out of device memory -> cxrkit's OutOfMemoryError
            kernels.raise_if_oom(e, "localize (CUDA)")
            raise
        return Detections(*res)
    if out is not None:
        raise ValueError("out= is supported for impl='cuda' only")
    heat = _host_heat(heatmap_logits)
    if t_logit.shape != (heat.shape[1],):
        raise ValueError(f"peak_thresholds must have K={heat.shape[1]} entries, got {t_logit.shape[0]}")
    if which == "reference":
        res = detect_reference(heat, peak_thresholds if not kernels.is_torch(peak_thresholds)
                               else _to_numpy(peak_thresholds), cfg)
    else:
        res = kernels.cpu_module().localize(heat, t_logit, *_cpu_params(cfg), num_threads)
    return Detections(*_like_input(heatmap_logits, tuple(res)))


def _cpu_params(cfg: LocalizeConfig) -> tuple[int, float, int, float]:
    """The C++ kernel's arguments after the thresholds: max_peaks, region_fraction (a float32 value),
    max_extent, iou_threshold (a float32 value)."""
    return cfg.max_peaks, float(np.float32(cfg.region_fraction)), cfg.max_extent, float(np.float32(cfg.iou_threshold))


def host_detector(peak_thresholds: Any, cfg: LocalizeConfig = LocalizeConfig(), *,
                  num_threads: int = 1) -> Callable[[np.ndarray], tuple]:
    """``detect(heat, peak_thresholds, cfg, impl="cpu")`` for many batches with one set of thresholds:
    their logits and the kernel's arguments are made once here (``detect`` makes them per call, ~15
    µs). The returned function takes C-contiguous float32 / float16 numpy maps (B, K, h, w), checked
    by the caller, and returns the kernel's (counts, scores, points, boxes) numpy arrays.
    Raises ImportError without cxrkit._C, ValueError for thresholds ``detect`` would refuse."""
    fn = kernels.cpu_module().localize
    t_logit = np.ascontiguousarray(_host_thresholds(peak_thresholds), np.float32)  # (K,)
    args = _cpu_params(cfg)
    return lambda heat: fn(heat, t_logit, *args, num_threads)
