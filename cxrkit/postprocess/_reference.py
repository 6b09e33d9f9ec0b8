"""Plain-numpy ground truth for the post-processing ops. Slow, obviously right.

The C++ (``csrc/cpu``) and CUDA (``csrc/cuda``) kernels compute exactly these functions; the tests
hold them together. Every number is float32 unless named otherwise.

Definitions shared by all implementations
-----------------------------------------
sigmoid: ``p = 1 / (1 + e)`` in float32 with ``e = float32(exp(-float64(z)))``, i.e. ``exp`` rounded
    once to float32 (computed through float64). A float32 ``expf`` differs by an ulp between numpy,
    glibc and CUDA (2 ulp); the float64 route makes the three agree bit for bit (they could only
    differ when a float64 ``exp`` lands within one float64 ulp of a float32 rounding boundary,
    probability about 1e-9 per value).
peak threshold: ``t_logit = float32(log(t / (1 - t)))`` from the float32 probability ``t``, in
    float64 on the host (``t <= 0 -> -inf``, ``t >= 1 -> +inf``); a cell is a candidate iff
    ``z >= t_logit`` and ``z >=`` each in-bounds 8-neighbour.
order: ``z`` descending, ties by raster index ``y * w + x`` ascending (-0.0 equals +0.0).
region: 4-connected cells with ``p >= float32(region_fraction) * P`` containing the peak, inside
    the window ``[px - E, px + E] x [py - E, py + E]`` clipped to the map.
IoU: ``area = (x1 - x0) * (y1 - y0)``; ``iw = max(0, min(x1a, x1b) - max(x0a, x0b))``, ``ih`` likewise;
    ``inter = iw * ih``; ``iou = inter / ((area_a + area_b) - inter)``, each step rounded to float32
    (no fused multiply-add; min / max ignore a NaN operand like C's fminf / fmaxf); a box is
    dropped iff ``iou > float32(iou_threshold)`` (so a NaN IoU never suppresses).
NaN (one policy, shared by numpy, C++ and CUDA, tested on all three):
    heatmaps: every comparison with NaN is false, so a NaN logit is never a candidate nor part of a
    region, and a cell with a NaN 8-neighbour is not a candidate (a model that emits NaN yields no
    peaks there rather than peaks that depend on evaluation order).
    NMS scores: a NaN score (either sign, any payload) ranks after every number, ``-inf`` included;
    NaNs among themselves by index ascending. Such boxes are still kept unless suppressed.
    bfloat16 heatmaps are the function of their (exact) float32 widening.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from ..config import LocalizeConfig

__all__ = [
    "sigmoid_f32",
    "logit_thresholds",
    "iou_f32",
    "detect_reference",
    "batched_nms_reference",
]

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)


def sigmoid_f32(z: np.ndarray) -> np.ndarray:
    """float32 sigmoid with exp rounded once to float32 (see the module docstring)."""
    z = np.asarray(z, np.float32)
    with np.errstate(over="ignore"):
        e = np.exp(-z.astype(np.float64)).astype(np.float32)  # inf where exp overflows float32
    return np.asarray(_F1 / (_F1 + e), np.float32)


def logit_thresholds(peak_thresholds) -> np.ndarray:
    """(K,) float32 probabilities -> (K,) float32 logits, computed in float64 once on the host."""
    t32 = np.asarray(peak_thresholds, np.float32).reshape(-1)
    if np.isnan(t32).any():
        raise ValueError(f"peak_thresholds must not contain NaN, got {t32.tolist()}")
    t = t32.astype(np.float64)
    out = np.empty(t.shape, np.float64)
    lo, hi = t <= 0.0, t >= 1.0
    mid = ~(lo | hi)
    out[lo], out[hi] = -np.inf, np.inf
    out[mid] = np.log(t[mid] / (1.0 - t[mid]))
    return out.astype(np.float32)


def iou_f32(a, b) -> np.float32:
    """IoU of two (x0, y0, x1, y1) boxes, every step rounded to float32."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        area_a = (a[2] - a[0]) * (a[3] - a[1])
        area_b = (b[2] - b[0]) * (b[3] - b[1])
        # fmax / fmin (a NaN operand is ignored), as C's fmaxf and CUDA's fmaxf
        iw = np.fmax(_F0, np.fmin(a[2], b[2]) - np.fmax(a[0], b[0]))
        ih = np.fmax(_F0, np.fmin(a[3], b[3]) - np.fmax(a[1], b[1]))
        inter = iw * ih
        return np.float32(inter / ((area_a + area_b) - inter))


def _candidates(z: np.ndarray, t_logit: np.float32) -> np.ndarray:
    """Raster indices of the candidate cells of one (h, w) map, in the step-3 order."""
    h, w = z.shape
    pad = np.full((h + 2, w + 2), -np.inf, np.float32)  # out-of-bounds neighbours never win
    pad[1:-1, 1:-1] = z
    is_cand = z >= t_logit
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                is_cand &= z >= pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    idx = np.flatnonzero(is_cand)
    vals = z.reshape(-1)[idx]
    return idx[np.lexsort((idx, -vals))]  # z descending, raster index ascending (-0.0 == +0.0)


def _region_box(p: np.ndarray, px: int, py: int, thresh: np.float32, extent: int) -> tuple[int, int, int, int]:
    """Bounding box (edge units) of the 4-connected region {p >= thresh} around (px, py) in the window."""
    h, w = p.shape
    x_lo, x_hi = max(0, px - extent), min(w - 1, px + extent)
    y_lo, y_hi = max(0, py - extent), min(h - 1, py + extent)
    seen = {(px, py)}
    todo = deque([(px, py)])
    x0, y0, x1, y1 = px, py, px, py
    while todo:
        x, y = todo.popleft()
        x0, y0, x1, y1 = min(x0, x), min(y0, y), max(x1, x), max(y1, y)
        for nx, ny in ((x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)):
            if x_lo <= nx <= x_hi and y_lo <= ny <= y_hi and (nx, ny) not in seen and p[ny, nx] >= thresh:
                seen.add((nx, ny))
                todo.append((nx, ny))
    return x0, y0, x1 + 1, y1 + 1


def detect_reference(heatmap_logits: np.ndarray, peak_thresholds, cfg: LocalizeConfig = LocalizeConfig()):
    """Heatmap logits (B, K, h, w) -> (counts, scores, points, boxes) as numpy arrays.

    counts (B, K) int32, scores (B, K, M) float32, points (B, K, M, 2) int32 (x, y),
    boxes (B, K, M, 4) float32 (x0, y0, x1, y1) in heatmap-cell edge units; M = cfg.max_peaks;
    slots >= count hold score -1, point -1, box 0.
    """
    z_all = np.asarray(heatmap_logits).astype(np.float32)  # (B, K, h, w), fp16 -> fp32 is exact
    if z_all.ndim != 4:
        raise ValueError(f"heatmap_logits must be (B, K, h, w), got shape {z_all.shape}")
    B, K, h, w = z_all.shape
    t_logit = logit_thresholds(peak_thresholds)
    if t_logit.shape != (K,):
        raise ValueError(f"peak_thresholds must have K={K} entries, got {t_logit.shape[0]}")
    M, E = cfg.max_peaks, cfg.max_extent
    frac = np.float32(cfg.region_fraction)
    iou_t = np.float32(cfg.iou_threshold)

    counts = np.zeros((B, K), np.int32)
    scores = np.full((B, K, M), -1.0, np.float32)
    points = np.full((B, K, M, 2), -1, np.int32)
    boxes = np.zeros((B, K, M, 4), np.float32)
    for b in range(B):
        for k in range(K):
            z = z_all[b, k]
            p = sigmoid_f32(z)  # (h, w)
            peaks = []  # (score, (x, y), box) in the step-3 order
            for i in _candidates(z, t_logit[k])[:M]:
                py, px = divmod(int(i), w)
                score = p[py, px]
                box = _region_box(p, px, py, frac * score, E)
                peaks.append((score, (px, py), np.asarray(box, np.float32)))
            kept = []
            for peak in peaks:  # greedy NMS in the step-3 order
                if not any(iou_f32(other[2], peak[2]) > iou_t for other in kept):
                    kept.append(peak)
            counts[b, k] = len(kept)
            for j, (score, pt, box) in enumerate(kept):
                scores[b, k, j] = score
                points[b, k, j] = pt
                boxes[b, k, j] = box
    return counts, scores, points, boxes


def batched_nms_reference(boxes, scores, idxs, iou_threshold: float) -> np.ndarray:
    """Greedy NMS per idxs group; keep (int64) by score descending, ties by index ascending."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    idxs = np.asarray(idxs, np.int64).reshape(-1)
    n = len(boxes)
    if len(scores) != n or len(idxs) != n:
        raise ValueError(f"boxes, scores and idxs must have the same length, got {n}, {len(scores)}, {len(idxs)}")
    iou_t = np.float32(iou_threshold)
    order = np.lexsort((np.arange(n), -scores))  # numpy sorts NaN last: the NaN policy above
    kept: list[int] = []
    for i in order:
        if not any(idxs[j] == idxs[i] and iou_f32(boxes[j], boxes[i]) > iou_t for j in kept):
            kept.append(int(i))
    return np.asarray(kept, np.int64)
