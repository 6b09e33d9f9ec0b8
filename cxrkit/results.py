"""Per-image results: Prediction and Finding (frozen; ``to_dict`` is JSON-ready), and the columns
of a batch they are views of.

The Detector post-processes a batch into one :class:`BatchColumns`: scores and decisions as
(B, K) arrays, boxes / box scores / points as flat arrays with one offset per (image, finding).
``Prediction.findings`` is then a read-only mapping over one row of it that makes a
:class:`Finding` only when a caller touches that key, and ``to_dict`` / ``to_json`` /
:func:`write_jsonl` read the columns directly. A ``Prediction`` built by hand (``findings`` a plain
dict of Findings) works exactly as before.

JSON: ``Prediction.to_json()`` (bytes, one object) and :func:`write_jsonl` (one object per line)
give the content of ``json.dumps(p.to_dict())``; with ``orjson`` installed they use it (same values,
compact separators), except for documents holding NaN or infinite numbers, which orjson cannot
write as the standard library does (``NaN``), and which therefore go through ``json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import IO, Any, Iterable, Iterator, Mapping

import numpy as np

from .errors import CxrkitError

try:  # optional speed-up of to_json / write_jsonl (same content)
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised where orjson is absent
    _orjson = None

__all__ = ["Finding", "Prediction", "BatchColumns", "write_jsonl"]

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


def _finding(key: str, score: float, positive: bool, threshold: float, boxes: np.ndarray, box_scores: np.ndarray,
             points: np.ndarray) -> Finding:
    """A Finding over arrays that are already (N, 4) / (N,) / (N, 2) read-only float32 (no copies)."""
    f = object.__new__(Finding)
    f.__dict__.update(key=key, score=score, positive=positive, threshold=threshold, boxes_xyxy=boxes,
                      box_scores=box_scores, points_xy=points)
    return f


class BatchColumns:
    """One batch's results as columns; row r is the r-th image that was inferred.

    labels: (K,) finding keys in model output order (any strings: a card's own labels included).
    scores: (B, K) float32 probabilities; positive: (B, K) bool decisions; thresholds: (K,) floats.
    offsets: (B * K + 1,) int64: the boxes of (row r, finding k) are rows
        ``offsets[r * K + k] : offsets[r * K + k + 1]`` of boxes_xyxy (N, 4), box_scores (N,) and
        points_xy (N, 2), all float32 in original image pixels and read-only.
    heatmaps: (B, K, h, w) float32 probabilities, or None.
    index: ``{label: column}`` of ``labels``, when the caller already has it.
    """

    __slots__ = ("labels", "scores", "positive", "thresholds", "offsets", "boxes_xyxy", "box_scores", "points_xy",
                 "heatmaps", "_index", "_py", "_json", "_finite")

    def __init__(self, labels: tuple[str, ...], scores: np.ndarray, positive: np.ndarray, thresholds: list[float],
                 offsets: np.ndarray, boxes_xyxy: np.ndarray, box_scores: np.ndarray, points_xy: np.ndarray,
                 heatmaps: np.ndarray | None = None, index: dict[str, int] | None = None) -> None:
        B, K = scores.shape
        if len(labels) != K or positive.shape != (B, K) or len(thresholds) != K or offsets.shape != (B * K + 1,):
            raise ValueError(f"inconsistent columns: {K} labels, scores {scores.shape}, positive {positive.shape}, "
                             f"{len(thresholds)} thresholds, offsets {offsets.shape}")
        n = int(offsets[-1])
        if boxes_xyxy.shape != (n, 4) or box_scores.shape != (n,) or points_xy.shape != (n, 2):
            raise ValueError(f"offsets end at {n} but boxes {boxes_xyxy.shape}, box scores {box_scores.shape}, "
                             f"points {points_xy.shape}")
        self.labels = tuple(labels)
        self.scores, self.positive, self.thresholds, self.offsets = scores, positive, thresholds, offsets
        self.boxes_xyxy, self.box_scores, self.points_xy = _ro(boxes_xyxy), _ro(box_scores), _ro(points_xy)
        self.heatmaps = heatmaps
        # label -> column; a Localizer passes its own (one dict for all its batches), never edited
        self._index = index if index is not None else {k: i for i, k in enumerate(self.labels)}
        self._py: tuple | None = None  # python lists of scores, decisions, offsets (made on first use)
        self._json: tuple | None = None  # rounded box columns for to_dict (made on first use)
        self._finite: bool | None = None  # all_finite(), once

    def __len__(self) -> int:
        return self.scores.shape[0]

    def _lists(self) -> tuple[list[list[float]], list[list[bool]], list[int]]:
        if self._py is None:
            self._py = (self.scores.tolist(), self.positive.tolist(), self.offsets.tolist())
        return self._py

    def _rounded(self) -> tuple[list, list, list, list[list[int]]]:
        """Box columns rounded as Finding.to_dict rounds them (elementwise, so the same values as
        rounding each finding's slice), as python lists, and per row the findings that have boxes."""
        if self._json is None:
            K = len(self.labels)
            shown = np.diff(self.offsets).reshape(-1, K)  # (B, K) boxes per (row, finding)
            self._json = (self.boxes_xyxy.round(2).tolist(), self.box_scores.round(5).tolist(),
                          self.points_xy.round(2).tolist(), [np.flatnonzero(r).tolist() for r in shown])
        return self._json

    def finding(self, row: int, k: int) -> Finding:
        scores, positive, off = self._lists()
        j = row * len(self.labels) + k
        a, b = off[j], off[j + 1]
        return _finding(self.labels[k], scores[row][k], positive[row][k], self.thresholds[k],
                        self.boxes_xyxy[a:b], self.box_scores[a:b], self.points_xy[a:b])

    def findings_dicts(self, row: int) -> dict[str, dict[str, Any]]:
        """``{key: Finding.to_dict()}`` of one row, read from the columns (fresh lists every call)."""
        scores, positive, off = self._lists()
        out = {key: {"score": s, "positive": p, "threshold": t, "boxes_xyxy": [], "box_scores": [], "points_xy": []}
               for key, s, p, t in zip(self.labels, scores[row], positive[row], self.thresholds)}
        boxes, box_scores, points, with_boxes = self._rounded()
        base = row * len(self.labels)
        for k in with_boxes[row]:
            a, b = off[base + k], off[base + k + 1]
            d = out[self.labels[k]]
            d["boxes_xyxy"] = [x[:] for x in boxes[a:b]]  # copies: a caller may edit what it gets
            d["box_scores"] = box_scores[a:b]
            d["points_xy"] = [x[:] for x in points[a:b]]
        return out

    def all_finite(self) -> bool:
        """No NaN or infinity in the numbers a row's JSON holds (orjson writes those as null)."""
        if self._finite is None:
            self._finite = bool(np.isfinite(self.scores).all() and np.isfinite(self.boxes_xyxy).all()
                                and np.isfinite(self.box_scores).all() and np.isfinite(self.points_xy).all()
                                and all(math.isfinite(t) for t in self.thresholds))
        return self._finite


class _FindingsView(Mapping[str, Finding]):
    """``Prediction.findings`` of a Detector result: row ``row`` of ``cols``; a Finding is made when
    a key is read (and kept). Read-only; equal to the dict of the same Findings."""

    __slots__ = ("_cols", "_row", "_made")

    def __init__(self, cols: BatchColumns, row: int) -> None:
        self._cols, self._row = cols, row
        self._made: dict[str, Finding] = {}

    def __getitem__(self, key: str) -> Finding:
        f = self._made.get(key)
        if f is None:
            k = self._cols._index[key]  # KeyError for an unknown key, as a dict
            f = self._made[key] = self._cols.finding(self._row, k)
        return f

    def __iter__(self) -> Iterator[str]:
        return iter(self._cols.labels)

    def __len__(self) -> int:
        return len(self._cols.labels)

    def __contains__(self, key: object) -> bool:
        return key in self._cols._index

    def __repr__(self) -> str:
        return repr(dict(self))

    def __reduce__(self):  # pickles (Ray, multiprocessing) as the plain dict it stands for
        return (dict, (dict(self),))


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
        fs = self.findings
        if type(fs) is _FindingsView:
            row = fs._cols._lists()[1][fs._row]
            return [k for k, pos in zip(fs._cols.labels, row) if pos]
        return [k for k, f in fs.items() if f.positive]

    def to_dict(self) -> dict[str, Any]:
        fs = self.findings
        if type(fs) is _FindingsView:
            findings = fs._cols.findings_dicts(fs._row)
        else:
            findings = {k: f.to_dict() for k, f in fs.items()}
        d: dict[str, Any] = {
            "source": self.source,
            "index": self.index,
            "model": self.model,
            "image_size": list(self.image_size) if self.image_size else None,
            "error": None
            if self.error is None
            else {"type": type(self.error).__name__, "message": str(self.error)},
            "findings": findings,
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
            "meta": {k: _jsonable(v) for k, v in self.meta.items()} if self.meta else {},
            "warnings": list(self.warnings),
        }
        return d

    def to_json(self) -> bytes:
        """``to_dict()`` as UTF-8 JSON (one object, no newline): the content of
        ``json.dumps(self.to_dict())``, written by orjson when it is installed (see module doc)."""
        return dumps_json(self.to_dict(), self._finite_hint())

    def _finite_hint(self) -> bool | None:
        """True when the columns are known to hold only finite numbers (None: not known)."""
        fs = self.findings
        if type(fs) is _FindingsView:
            return fs._cols.all_finite()
        return None


def dumps_json(d: Mapping[str, Any], finite: bool | None = None) -> bytes:
    """One JSON document as bytes with the content of ``json.dumps(d)``; ``finite``: the caller
    knows the findings hold no NaN / infinity (skips that scan)."""
    if _orjson is not None and _finite_doc(d, finite):
        try:
            return _orjson.dumps(d)
        except (TypeError, _orjson.JSONEncodeError):  # e.g. an int beyond 64 bits in meta
            pass
    return json.dumps(d).encode()


def _finite_doc(d: Mapping[str, Any], finite: bool | None) -> bool:
    if finite is None:
        return _finite(d)
    return finite and _finite(d.get("meta")) and _finite(d.get("timings_ms"))


def _finite(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return all(_finite(x) for x in v.values())
    if isinstance(v, list):
        return all(_finite(x) for x in v)
    return True


def write_jsonl(predictions: Iterable[Prediction], fp: IO[Any]) -> int:
    """Write one ``to_dict()`` JSON object per line to ``fp`` (binary or text); returns the count.

    The same content as ``fp.write(json.dumps(p.to_dict()) + "\\n")`` for each prediction (orjson
    when installed: compact separators, same values)."""
    binary = _is_binary(fp)
    n = 0
    for p in predictions:
        line = p.to_json() + b"\n"
        fp.write(line if binary else line.decode())
        n += 1
    return n


def _is_binary(fp: IO[Any]) -> bool:
    import io

    if isinstance(fp, io.TextIOBase):
        return False
    if isinstance(fp, (io.RawIOBase, io.BufferedIOBase)):
        return True
    return "b" in getattr(fp, "mode", "")


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


def _prediction(source: str, index: int, findings: Mapping[str, Finding], image_size: tuple[int, int] | None,
                error: CxrkitError | None, heatmaps: np.ndarray | None, timings_ms: Mapping[str, float],
                meta: Mapping[str, Any], warnings: tuple[str, ...], model: str) -> Prediction:
    """A Prediction without the dataclass __init__ (the Detector's hot path; same fields)."""
    p = object.__new__(Prediction)
    p.__dict__.update(source=source, index=index, findings=findings, image_size=image_size, error=error,
                      heatmaps=heatmaps, timings_ms=timings_ms, meta=meta, warnings=warnings, model=model)
    return p
