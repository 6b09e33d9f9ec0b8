"""Stage 4, localize: one batch's network outputs -> :class:`~cxrkit.results.BatchColumns`.

Heatmap peaks, regions and boxes come from :func:`cxrkit.postprocess.detect` (C++ on the host,
CUDA on a GPU), brought to the host with the logits in one transfer (:func:`to_host`); numpy
heatmaps (CPU runners) go to the C++ kernel directly, with the thresholds' logits made once per
Localizer instead of once per batch (``detect``'s dispatch is ~15 µs, a batch of one ~10). Everything
after that is a handful of numpy operations per batch, none per finding: scores and decisions as
(B, K) arrays; the kept peaks of the reported findings gathered into flat arrays in (image,
finding, peak) order; mapped back to original pixels through each image's letterbox transform
in one vectorised step. ``_reference.py`` holds the per-finding loop this replaces; the tests
hold the two equal bit for bit.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..config import LocalizeConfig
from ..errors import CxrkitError
from ..results import BatchColumns

__all__ = ["Localizer", "sigmoid", "to_numpy", "map_to_source"]


def sigmoid(x: Any) -> np.ndarray:
    """float32 ``1 / (1 + exp(-x))`` (numpy float32 exp), as the Detector has always computed scores."""
    out = np.negative(np.asarray(x, np.float32))  # -x, a new float32 array; then each step in place
    np.exp(out, out=out)
    np.add(out, np.float32(1.0), out=out)
    return np.divide(np.float32(1.0), out, out=out)


def to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach"):  # torch
        return a.detach().float().cpu().numpy() if a.dtype.is_floating_point else a.detach().cpu().numpy()
    if hasattr(a, "get"):  # cupy
        return a.get()
    return np.asarray(a)


def _to_host(logits: Any, det: Any) -> tuple[np.ndarray, Any]:
    try:
        from ..postprocess import to_host
    except ImportError:  # pragma: no cover - to_host (issue 12) missing from an older tree
        from ..postprocess import Detections

        return to_numpy(logits).astype(np.float32, copy=False), Detections(*(to_numpy(a) for a in (
            det.counts, det.scores, det.points, det.boxes)))
    return to_host(logits, det)


def _geometry(transforms: Sequence[Any]) -> np.ndarray:
    """(B, 6) float64 left, top, scale x, scale y, width, height of each image's transform."""
    return np.array([(tf.offset_yx[1], tf.offset_yx[0], tf.scale_x, tf.scale_y, tf.src_hw[1], tf.src_hw[0])
                     for tf in transforms], np.float64).reshape(-1, 6)


def map_to_source(xy: np.ndarray, rows: np.ndarray, transforms: "Sequence[Any] | np.ndarray") -> np.ndarray:
    """(N, 2) float64 model-input x, y of images ``rows`` (N,) -> (N, 2) float32 source x, y, clipped
    to each image: ``LetterboxTransform.points_to_source`` for all rows at once (same float64 steps).
    ``transforms``: the images' transforms, or their ``_geometry``."""
    geo = transforms if isinstance(transforms, np.ndarray) else _geometry(transforms)
    g = geo[rows]  # (N, 6)
    out = np.subtract(xy, g[:, 0:2])  # x - left, y - top
    np.divide(out, g[:, 2:4], out=out)  # / scale x, / scale y
    np.clip(out, 0.0, g[:, 4:6], out=out)  # to [0, width], [0, height]
    return out.astype(np.float32)


class Localizer:
    """Network outputs of a batch -> BatchColumns, for one model card and ``boxes`` policy."""

    def __init__(self, card: Any, cfg: LocalizeConfig, boxes: str) -> None:
        self.labels: tuple[str, ...] = tuple(card.labels)
        self.cfg = cfg
        self.report_all = boxes == "all"
        self.thresholds = card.thresholds  # (K,)
        self.threshold_list = [float(t) for t in self.thresholds]
        self.heat_thresholds = card.heatmap_thresholds  # (K,)
        self.enabled = np.asarray(card.enabled, bool)  # (K,)
        self.stride = float(card.heatmap_stride)
        self.index = {k: i for i, k in enumerate(self.labels)}  # shared by every batch's columns
        # Host heatmaps (numpy) go straight to the C++ kernel with what detect() would derive per
        # call made once (postprocess.host_detector). A disabled finding's map (peak threshold 2.0,
        # logit +inf) costs the kernel one vector scan. One host thread: the maps of a batch take a
        # few µs per image, less than starting threads (and the prefetch thread is preprocessing the
        # next batch on the other cores meanwhile).
        self._host = None
        self._gather = None  # cxrkit._C.gather_peaks: _kept_numpy in one call
        try:
            from ..kernels import cpu_module
            from ..postprocess import host_detector

            self._gather = getattr(cpu_module(), "gather_peaks", None)
            self._host = host_detector(self.heat_thresholds, cfg, num_threads=1)
        except (ImportError, ValueError, CxrkitError):  # no cxrkit._C, or thresholds detect() refuses per batch
            self._host = None

    def _detect_host(self, heat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """(counts, scores, points, boxes) of C-contiguous float32 / float16 numpy maps (what
        ``detect(heat, impl="cpu", num_threads=1)`` returns), else None."""
        if (self._host is None or heat.dtype not in (np.float32, np.float16) or heat.ndim != 4
                or heat.shape[1] != len(self.labels) or not heat.flags.c_contiguous):
            return None
        return self._host(heat)

    def _kept(self, shown: np.ndarray, scores: np.ndarray, points: np.ndarray, boxes: np.ndarray,
              transforms: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """offsets (B * K + 1,) and the reported peaks in (image, finding, peak) order: boxes (n, 4)
        and points (n, 2) in source pixels, their scores (n,); the first shown[b, k] of each (b, k)'s
        slots. One C++ call (``cxrkit._C.gather_peaks``, the same float64 steps) or numpy."""
        if self._gather is not None:  # (the kernel's arrays and np.where's are already these: no copies)
            return self._gather(np.ascontiguousarray(shown, np.int32), np.ascontiguousarray(scores, np.float32),
                                np.ascontiguousarray(points, np.int32), np.ascontiguousarray(boxes, np.float32),
                                _geometry(transforms), self.stride)
        return self._kept_numpy(shown, scores, points, boxes, transforms)

    def _kept_numpy(self, shown: np.ndarray, scores: np.ndarray, points: np.ndarray, boxes: np.ndarray,
                    transforms: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_kept` in numpy: the peaks gathered by slot index, boxes and points mapped in one call."""
        B, K = shown.shape
        offsets = np.empty(B * K + 1, np.int64)
        offsets[0] = 0
        shown.reshape(-1).cumsum(out=offsets[1:])
        n = int(offsets[-1])
        if not n:
            return offsets, np.zeros((0, 4), np.float32), np.zeros((0, 2), np.float32), np.zeros((0,), np.float32)
        M = scores.shape[2]
        g = np.repeat(np.arange(shown.size), shown.reshape(-1))  # (n,) (image, finding) of each peak
        slot = g * M + (np.arange(n) - offsets[g])  # (n,) its slot among the B * K * M
        rows = g // K  # (n,) its image
        xy = np.empty((3 * n, 2), np.float64)  # 2n box corners, then n points, in model-input cells
        xy[:2 * n] = boxes.reshape(-1, 4)[slot].reshape(-1, 2)
        pts = xy[2 * n:]
        pts[:] = points.reshape(-1, 2)[slot]
        pts += 0.5  # a cell's centre
        xy *= self.stride  # model-input pixels
        src = map_to_source(xy, np.concatenate((np.repeat(rows, 2), rows)), _geometry(transforms))  # (3n, 2)
        return offsets, src[:2 * n].reshape(-1, 4), src[2 * n:], scores.reshape(-1)[slot].astype(np.float32, copy=False)

    def __call__(self, out: dict[str, Any], transforms: Sequence[Any], return_heatmaps: bool) -> BatchColumns:
        heat = out["heatmaps"]  # (B, K, h, w), numpy or device array
        got = self._detect_host(heat) if type(heat) is np.ndarray else None
        if got is not None:
            counts, det_scores, det_points, det_boxes = got  # (B, K), (B, K, M), (B, K, M, 2), (B, K, M, 4)
            logits = to_numpy(out["logits"]).astype(np.float32, copy=False)  # (B, K)
        else:
            from ..postprocess import detect

            det = detect(heat, self.heat_thresholds, self.cfg, num_threads=1)  # on the heatmaps' device
            logits, det = _to_host(out["logits"], det)  # (B, K) float32 + Detections of numpy arrays
            counts, det_scores, det_points, det_boxes = (np.asarray(a) for a in (det.counts, det.scores, det.points,
                                                                                  det.boxes))
        probs = sigmoid(logits)  # (B, K)
        positive = (probs >= self.thresholds) & self.enabled  # (B, K)
        shown = counts if self.report_all else np.where(positive, counts, 0)  # (B, K) peaks reported
        offsets, boxes, points, box_scores = self._kept(shown, det_scores, det_points, det_boxes, transforms)
        heatmaps = sigmoid(to_numpy(heat)) if return_heatmaps else None  # (B, K, h, w)
        return BatchColumns(self.labels, probs, positive, self.threshold_list, offsets, boxes, box_scores,
                            points, heatmaps, index=self.index)
