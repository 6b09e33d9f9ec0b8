"""Numpy ground truth of class activation maps (what every converted graph must compute).

For a classifier ``logits = W @ mean_hw(F) + b`` over a feature map ``F`` (B, C, h, w), the class
activation map of class k is ``CAM_k = sum_c W[k, c] F[c] + b[k]`` (B, K, h, w), and
``mean_hw(CAM_k) == logits_k`` exactly (the mean is linear). Computed here in float64.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cam_reference", "logits_reference"]


def cam_reference(features: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """(B, C, h, w) feature map, (K, C) weight, (K,) bias -> (B, K, h, w) float64 CAM logits."""
    f = np.asarray(features, np.float64)
    w = np.asarray(weight, np.float64)
    if f.ndim != 4 or w.ndim != 2 or w.shape[1] != f.shape[1]:
        raise ValueError(f"features (B, C, h, w) and weight (K, C) must agree, got {f.shape} and {w.shape}")
    cam = np.einsum("kc,bchw->bkhw", w, f)  # (B, K, h, w)
    if bias is not None:
        cam += np.asarray(bias, np.float64)[None, :, None, None]
    return cam


def logits_reference(features: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """(B, C, h, w), (K, C), (K,) -> (B, K) float64: the classifier on the global average of F."""
    pooled = np.asarray(features, np.float64).mean(axis=(2, 3))  # (B, C)
    out = pooled @ np.asarray(weight, np.float64).T  # (B, K)
    return out if bias is None else out + np.asarray(bias, np.float64)[None, :]
