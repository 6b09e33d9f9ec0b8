"""Stage 4, localize: one batch's network outputs -> :class:`~cxrkit.results.BatchColumns`.

Heatmap peaks, regions and boxes come from :func:`cxrkit.postprocess.detect` (C++ on the host,
CUDA on a GPU), brought to the host with the logits in one transfer (:func:`to_host`). Everything
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
from ..results import BatchColumns

__all__ = ["Localizer", "sigmoid", "to_numpy", "map_to_source"]


def sigmoid(x: Any) -> np.ndarray:
    """float32 ``1 / (1 + exp(-x))`` (numpy float32 exp), as the Detector has always computed scores."""
    x = np.asarray(x, np.float32)
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


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
    out = np.empty_like(xy)
    np.divide(xy[:, 0] - g[:, 0], g[:, 2], out=out[:, 0])
    np.divide(xy[:, 1] - g[:, 1], g[:, 3], out=out[:, 1])
    np.clip(out[:, 0], 0.0, g[:, 4], out=out[:, 0])
    np.clip(out[:, 1], 0.0, g[:, 5], out=out[:, 1])
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
        # maps whose peak threshold is >= 1 (a disabled finding's 2.0): their threshold logit is +inf,
        # so only a +inf cell could be a peak there; on the host they are not searched unless a batch
        # holds such a cell (cxr29-demo: 20 of 29 maps, ~40% of the C++ kernel's time)
        never = np.asarray(self.heat_thresholds, np.float32) >= 1.0
        self.dead = np.flatnonzero(never)
        self.live = np.flatnonzero(~never)

    def __call__(self, out: dict[str, Any], transforms: Sequence[Any], return_heatmaps: bool) -> BatchColumns:
        from ..postprocess import detect

        heat = out["heatmaps"]  # (B, K, h, w), numpy or device array
        B, K = heat.shape[:2]
        maps = None  # the finding indices detect() searched (None: all K)
        if isinstance(heat, np.ndarray) and self.dead.size and self.live.size and heat.max() < np.inf:
            maps = self.live  # no +inf (nor NaN) anywhere: the dead maps cannot hold a peak
        # one host thread: the maps of a batch take ~20 µs per image, less than starting threads (and
        # the prefetch thread is preprocessing the next batch on the other cores meanwhile)
        if maps is None:
            det = detect(heat, self.heat_thresholds, self.cfg, num_threads=1)  # on the heatmaps' device
        else:  # the live maps of every image as one (1, B * K', h, w) batch: a row gather, no strided copy
            rows = (np.arange(B)[:, None] * K + maps[None, :]).reshape(-1)  # (B * K',)
            live = heat.reshape(B * K, *heat.shape[2:])[rows][None]  # (1, B * K', h, w)
            det = detect(live, np.tile(self.heat_thresholds[maps], B), self.cfg, num_threads=1)
        logits, det = _to_host(out["logits"], det)  # (B, K) float32 + Detections of numpy arrays
        probs = sigmoid(logits)  # (B, K)
        positive = (probs >= self.thresholds) & self.enabled  # (B, K)
        if maps is None:
            counts = np.asarray(det.counts)  # (B, K)
        else:
            counts = np.zeros((B, K), np.int32)
            counts[:, maps] = np.asarray(det.counts).reshape(B, len(maps))
        shown = counts if self.report_all else np.where(positive, counts, 0)  # (B, K) peaks reported
        offsets = np.zeros(B * K + 1, np.int64)
        np.cumsum(shown.reshape(-1), out=offsets[1:])
        n = int(offsets[-1])
        if n:
            M = det.scores.shape[2]
            searched = shown if maps is None else shown[:, maps]  # the dead maps add no peaks in between
            keep = (np.arange(M) < searched[:, :, None]).reshape(det.counts.shape + (M,))  # (image, finding, peak)
            rows = np.repeat(np.arange(B), shown.sum(axis=1))  # (n,) image of each kept peak
            s, geo = self.stride, _geometry(transforms)
            boxes = map_to_source(np.asarray(det.boxes)[keep].astype(np.float64).reshape(-1, 2) * s,
                                  np.repeat(rows, 2), geo).reshape(-1, 4)  # (n, 4)
            points = map_to_source((np.asarray(det.points)[keep].astype(np.float64) + 0.5) * s, rows,
                                   geo)  # (n, 2)
            box_scores = np.ascontiguousarray(np.asarray(det.scores)[keep], np.float32)  # (n,)
        else:
            boxes, points, box_scores = (np.zeros((0, 4), np.float32), np.zeros((0, 2), np.float32),
                                         np.zeros((0,), np.float32))
        heatmaps = sigmoid(to_numpy(heat)) if return_heatmaps else None  # (B, K, h, w)
        return BatchColumns(self.labels, probs, positive, self.threshold_list, offsets, boxes, box_scores,
                            points, heatmaps)
