"""The per-finding loop the columnar localize stage replaced: slow, obviously right.

``findings_reference`` is the Detector's post-processing as it was written before the columns
(one Finding per image and finding, each box list mapped through its image's transform on its
own). tests/test_stages.py holds :class:`~cxrkit._stages.localize.Localizer` equal to it bit for
bit on random heatmaps, every letterbox fit and both ``boxes`` policies.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..config import LocalizeConfig
from ..results import Finding
from .localize import sigmoid, to_numpy

__all__ = ["findings_reference"]


def findings_reference(card: Any, cfg: LocalizeConfig, boxes: str, out: dict[str, Any],
                       transforms: Sequence[Any], return_heatmaps: bool) -> list[dict[str, Any]]:
    """[{"findings": {key: Finding}, "heatmaps": (K, h, w) | absent}] per image of the batch."""
    from ..postprocess import detect

    thresholds, enabled = card.thresholds, card.enabled
    logits = to_numpy(out["logits"]).astype(np.float32, copy=False)  # (B, K)
    heat = out["heatmaps"]  # (B, K, h, w)
    det = detect(heat, card.heatmap_thresholds, cfg)
    counts = to_numpy(det.counts)  # (B, K)
    scores_b = to_numpy(det.scores)  # (B, K, M)
    points_b = to_numpy(det.points)  # (B, K, M, 2)
    boxes_b = to_numpy(det.boxes)  # (B, K, M, 4)
    probs = sigmoid(logits)  # (B, K)
    s = float(card.heatmap_stride)
    heat_np = sigmoid(to_numpy(heat)) if return_heatmaps else None
    res = []
    for b, tf in enumerate(transforms):
        findings = {}
        for k, key in enumerate(card.labels):
            score = float(probs[b, k])
            positive = bool(enabled[k] and score >= thresholds[k])
            c = int(counts[b, k])
            if c and (positive or boxes == "all"):
                bx = tf.boxes_to_source(boxes_b[b, k, :c].astype(np.float64) * s)
                pts = tf.points_to_source((points_b[b, k, :c].astype(np.float64) + 0.5) * s)
                bs = scores_b[b, k, :c]
            else:
                bx, pts, bs = np.zeros((0, 4), np.float32), np.zeros((0, 2), np.float32), np.zeros((0,), np.float32)
            findings[key] = Finding(key=key, score=score, positive=positive, threshold=float(thresholds[k]),
                                    boxes_xyxy=bx, box_scores=bs, points_xy=pts)
        r: dict[str, Any] = {"findings": findings}
        if heat_np is not None:
            r["heatmaps"] = heat_np[b]
        res.append(r)
    return res
