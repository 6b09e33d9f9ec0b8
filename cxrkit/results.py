"""Per-image results: Prediction and Finding (frozen; ``to_dict`` is JSON-ready)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .errors import CxrkitError

__all__ = ["Finding", "Prediction"]

_EMPTY_BOXES = np.zeros((0, 4), np.float32)


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


@dataclass(frozen=True)
class Finding:
    """One finding of one image.

    score: image-level probability (sigmoid of the logit).
    positive: score >= the card's operating threshold (and the finding is enabled).
    boxes_xyxy: (N, 4) float32 boxes in ORIGINAL image pixels, x0, y0, x1, y1.
    box_scores: (N,) float32 peak probabilities of the boxes, descending.
    points_xy: (N, 2) float32 peak locations (x, y) in original image pixels.
    """

    key: str
    score: float
    positive: bool
    threshold: float
    boxes_xyxy: np.ndarray = field(default_factory=lambda: _EMPTY_BOXES)
    box_scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    points_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))

    def __post_init__(self) -> None:
        object.__setattr__(self, "boxes_xyxy", _ro(np.asarray(self.boxes_xyxy, np.float32).reshape(-1, 4)))
        object.__setattr__(self, "box_scores", _ro(np.asarray(self.box_scores, np.float32).reshape(-1)))
        object.__setattr__(self, "points_xy", _ro(np.asarray(self.points_xy, np.float32).reshape(-1, 2)))
        n = len(self.boxes_xyxy)
        if len(self.box_scores) != n or len(self.points_xy) != n:
            raise ValueError("boxes_xyxy, box_scores and points_xy must have the same length")

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": float(self.score),
            "positive": bool(self.positive),
            "threshold": float(self.threshold),
            "boxes_xyxy": self.boxes_xyxy.round(2).tolist(),
            "box_scores": self.box_scores.round(5).tolist(),
            "points_xy": self.points_xy.round(2).tolist(),
        }


@dataclass(frozen=True)
class Prediction:
    """The result for one input item, in input order.

    ``error`` is None on success; otherwise the typed error and ``findings`` is empty.
    ``heatmaps`` is (K, h, w) float32 probabilities in model-input heatmap space, only when asked.
    """

    source: str
    index: int
    findings: Mapping[str, Finding] = field(default_factory=dict)
    image_size: tuple[int, int] | None = None
    error: CxrkitError | None = None
    heatmaps: np.ndarray | None = None
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    model: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def positive_findings(self) -> list[str]:
        return [k for k, f in self.findings.items() if f.positive]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "source": self.source,
            "index": self.index,
            "model": self.model,
            "image_size": list(self.image_size) if self.image_size else None,
            "error": None
            if self.error is None
            else {"type": type(self.error).__name__, "message": str(self.error)},
            "findings": {k: f.to_dict() for k, f in self.findings.items()},
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
            "meta": {k: _jsonable(v) for k, v in self.meta.items()},
            "warnings": list(self.warnings),
        }
        return d


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)
