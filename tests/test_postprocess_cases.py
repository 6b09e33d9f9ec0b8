"""Random and hand-made inputs shared by the post-processing tests (CPU and GPU)."""

from __future__ import annotations

import numpy as np

from cxrkit.config import LocalizeConfig


def blur(x: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur (applied twice) over the last two axes, edge-padded."""
    if radius <= 0:
        return x
    k = np.ones(2 * radius + 1) / (2 * radius + 1)
    for _ in range(2):
        for axis in (-1, -2):
            pad = [(0, 0)] * x.ndim
            pad[axis] = (radius, radius)
            xp = np.pad(x, pad, mode="edge")
            x = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), axis, xp)
    return x


def smooth_logits(rng, shape, radius=3, offset=-2.0, scale=6.0, dtype=np.float32) -> np.ndarray:
    """Blurred noise rescaled to logits: real peaks and regions, mostly negative background."""
    x = blur(rng.standard_normal(shape), radius)
    x = x / np.maximum(x.std(axis=(-2, -1), keepdims=True), 1e-3)
    return np.clip(offset + scale * x / 3.0, -60, 60).astype(dtype)


def case_maps(rng, shape, dtype=np.float32):
    """(name, logits) variants on one shape: smooth, raw noise, plateaus, all-equal, empty, one peak."""
    B, K, h, w = shape
    yield "smooth", smooth_logits(rng, shape, radius=max(1, min(h, w) // 10), dtype=dtype)
    yield "noise", rng.standard_normal(shape).astype(dtype)
    yield "plateaus", (np.round(smooth_logits(rng, shape, radius=2) * 2) / 2).astype(dtype)
    yield "coarse", rng.integers(-2, 3, shape).astype(dtype)
    yield "all_equal", np.full(shape, 1.5, dtype)
    yield "empty", np.full(shape, -20.0, dtype)
    one = np.full(shape, -8.0, dtype)
    one[..., rng.integers(h), rng.integers(w)] = 3.0
    yield "one_peak", one
    border = smooth_logits(rng, shape, radius=1, dtype=dtype)
    border[..., 0, :] += 4
    border[..., :, -1] += 4
    yield "border", border


def nan_maps(rng, shape, dtype=np.float32):
    """(name, logits) with NaN and infinite cells: the NaN policy of ``_reference`` (a NaN cell is never a
    peak nor in a region, a NaN 8-neighbour blocks a peak), which every implementation must share."""
    z = smooth_logits(rng, shape, radius=2, dtype=np.float32)
    sprinkled = z.copy()
    sprinkled[rng.random(shape) < 0.05] = np.nan
    yield "nan_sprinkled", sprinkled.astype(dtype)
    next_to_peaks = z.copy()  # NaN right beside the strongest cells, and a NaN run through a region
    flat = next_to_peaks.reshape(-1, shape[-2] * shape[-1])
    top = flat.argmax(axis=1)
    for row, i in enumerate(top):
        flat[row, min(i + 1, flat.shape[1] - 1)] = np.nan
    next_to_peaks[..., shape[-2] // 2, :] = np.nan
    yield "nan_beside_peaks", next_to_peaks.astype(dtype)
    signs = z.copy()  # negative-signed NaN (sign bit set) and infinities
    neg_nan = np.array(np.nan, np.float32)
    neg_nan = np.copysign(neg_nan, -1.0)
    signs[rng.random(shape) < 0.03] = neg_nan
    signs[rng.random(shape) < 0.01] = np.inf
    signs[rng.random(shape) < 0.01] = -np.inf
    yield "nan_inf_signs", signs.astype(dtype)
    yield "all_nan", np.full(shape, np.nan, dtype)


def nan_scores(rng, n):
    """Scores with NaN of both signs, infinities, zeros of both signs and ties."""
    s = np.round(rng.random(n) * 4) / 4
    s = s.astype(np.float32)
    r = rng.random(n)
    s[r < 0.15] = np.nan
    s[(r >= 0.15) & (r < 0.22)] = np.copysign(np.float32(np.nan), -1.0)
    s[(r >= 0.22) & (r < 0.27)] = -np.inf
    s[(r >= 0.27) & (r < 0.30)] = np.inf
    s[(r >= 0.30) & (r < 0.35)] = -0.0
    return s


CONFIGS = [
    LocalizeConfig(),
    LocalizeConfig(max_peaks=1, region_fraction=1.0, max_extent=0, iou_threshold=0.0),
    LocalizeConfig(max_peaks=4, region_fraction=0.9, max_extent=3, iou_threshold=0.5),
    LocalizeConfig(max_peaks=64, region_fraction=0.05, max_extent=64, iou_threshold=1.0),
    LocalizeConfig(max_peaks=7, region_fraction=0.3, max_extent=31, iou_threshold=0.1),
    LocalizeConfig(max_peaks=16, region_fraction=0.5, max_extent=47, iou_threshold=0.3),
]


def thresholds(rng, K) -> np.ndarray:
    t = rng.uniform(0.05, 0.9, K).astype(np.float32)
    if K > 1:
        t[0] = 0.0  # -inf logit: every local maximum is a candidate
    if K > 2:
        t[1] = 1.0  # +inf logit: only +inf cells
    return t


def random_boxes(rng, n, n_groups=3, integer=False, tie_scores=False):
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(1, 30, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    if integer:
        boxes = np.round(boxes)
    scores = rng.random(n)
    if tie_scores:
        scores = np.round(scores * 5) / 5
    idxs = rng.integers(0, n_groups, n)
    return boxes.astype(np.float32), scores.astype(np.float32), idxs.astype(np.int64)


def brute_force_nms(boxes, scores, idxs, iou_threshold):
    """torchvision's semantics written independently: greedy per group, then merged by score."""
    from cxrkit.postprocess._reference import iou_f32

    keep = []
    for g in np.unique(idxs):
        members = np.flatnonzero(idxs == g)
        members = members[np.argsort(-scores[members], kind="stable")]
        kept = []
        for i in members:
            if all(not (iou_f32(boxes[j], boxes[i]) > np.float32(iou_threshold)) for j in kept):
                kept.append(i)
        keep.extend(kept)
    keep = np.asarray(keep, np.int64)
    return keep[np.lexsort((keep, -scores[keep]))] if len(keep) else keep


def assert_keep_equal(k_ref, k_other, scores):
    """Exact, or, like torchvision's tests, indices that differ only where scores are equal."""
    k_ref, k_other = np.asarray(k_ref), np.asarray(k_other)
    if np.array_equal(k_ref, k_other):
        return
    assert k_ref.shape == k_other.shape, (k_ref, k_other)
    np.testing.assert_array_equal(scores[k_ref], scores[k_other])


def assert_detections_equal(a, b, msg=""):
    for name in ("counts", "scores", "points", "boxes"):
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.dtype == y.dtype and x.shape == y.shape, (name, x.dtype, y.dtype, x.shape, y.shape, msg)
        if not np.array_equal(x, y):
            bad = np.argwhere(x != y)[:5]
            raise AssertionError(f"{msg}: {name} differs at {bad.tolist()}: {x[tuple(bad[0])]} vs {y[tuple(bad[0])]}")
