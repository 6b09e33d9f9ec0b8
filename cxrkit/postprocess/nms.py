"""Batched greedy NMS with torchvision's semantics (boxes of different idxs never suppress each other).

keep = kept indices (int64) by score descending, ties by index ascending; a box is dropped iff its
float32 IoU with an already kept box of the same idx is > iou_threshold (the IoU formula is in
:mod:`cxrkit.postprocess._reference`). Implementation picked like :func:`cxrkit.postprocess.detect`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import kernels
from ._reference import batched_nms_reference

__all__ = ["batched_nms"]


def _host(a: Any, dtype) -> np.ndarray:
    a = a.detach().numpy() if kernels.is_torch(a) else np.asarray(a)
    return np.ascontiguousarray(a, dtype)


def batched_nms(boxes: Any, scores: Any, idxs: Any, iou_threshold: float, *, impl: str = "auto"):
    """boxes (N, 4) float32 x0, y0, x1, y1; scores (N,) float32; idxs (N,) int64 -> keep (int64).

    NaN scores rank after every number (see ``_reference``).

    Returns an array of the input's library on its device (numpy for host arrays other than torch).
    """
    which = kernels.resolve_impl(boxes, impl)
    if which == "cuda":
        try:
            return kernels.cuda_module().batched_nms(boxes, scores, idxs, float(iou_threshold))
        except (ValueError, TypeError):
            raise
        except Exception as e:  # out of device memory -> cxrkit's OutOfMemoryError
            kernels.raise_if_oom(e, "batched_nms (CUDA)")
            raise
    b, s, g = _host(boxes, np.float32).reshape(-1, 4), _host(scores, np.float32).reshape(-1), _host(idxs, np.int64).reshape(-1)
    if not (len(b) == len(s) == len(g)):
        raise ValueError(f"boxes, scores and idxs must have the same length, got {len(b)}, {len(s)}, {len(g)}")
    if which == "reference":
        keep = batched_nms_reference(b, s, g, iou_threshold)
    else:
        keep = kernels.cpu_module().batched_nms(b, s, g, float(np.float32(iou_threshold)))
    if kernels.is_torch(boxes):
        import torch

        return torch.from_numpy(keep)
    return keep
