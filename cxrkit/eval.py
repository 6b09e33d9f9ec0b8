"""Evaluation on a folder of images with COCO-style boxes: image-level AUROC and lesion FROC.

    res = run_eval(det.predict, "eval/images", "eval/annotations.json", out_json="metrics.json")
    print(format_table(res))

``predict_fn(list_of_paths) -> list of predictions``, one per path, each with ``.findings[key]``
carrying ``.score`` (image-level probability) and ``.points_xy`` (N, 2) / ``.boxes_xyxy`` (N, 4)
in original-image pixels, optionally ``.box_scores`` (N,) (else every point gets ``.score``); a
prediction with a non-None ``.error`` is counted as failed and left out. For a full FROC the
predictor must report every heatmap peak, not only those of positive findings
(``Detector(..., boxes="all")``); the curve can only reach the false-positive rates that the
reported peaks reach (``fp_per_image_max`` says how far it got).

Definitions
-----------
- Categories are the COCO ``categories``; each ``name`` is a finding key. An image is positive for
  a finding when it has at least one (non-ignored) box of it; every other listed image is negative.
- AUROC: Mann-Whitney over images (ties count one half); ``None`` with no positives or no negatives.
- FROC, per finding, pooled over images: peaks sorted by score, descending; a peak *hits* a true
  box when its point lies inside the box or its box has IoU >= 0.3 with it. A hit on an unmatched
  box is a true positive (the box is then matched); a hit on an already matched or an ignored box
  (``iscrowd`` or ``ignore`` set) counts as nothing; anything else is a false positive.
  Sensitivity at r FP/image is the highest sensitivity reached with at most r FP per image.
- Size strata: when boxes carry ``size_mm`` (our synthetic sets do), ``min_size_mm`` adds a row
  per entry, e.g. ``nodule>=10mm``: smaller boxes of that finding become ignored boxes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["run_eval", "format_table", "auroc", "froc", "FP_RATES", "IOU_HIT"]

FP_RATES: tuple[float, ...] = (0.5, 1.0, 2.0)
IOU_HIT = 0.3


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve by the rank-sum formula, ties averaged; None if a class is empty."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _hits(point: np.ndarray, box: np.ndarray | None, gt: np.ndarray) -> bool:
    x, y = float(point[0]), float(point[1])
    if gt[0] <= x <= gt[2] and gt[1] <= y <= gt[3]:
        return True
    return box is not None and _iou(box, gt) >= IOU_HIT


@dataclass
class _ImageTruth:
    boxes: np.ndarray  # (N, 4) counted
    ignored: np.ndarray  # (M, 4) neither TP nor FP


@dataclass
class _Peaks:
    scores: np.ndarray  # (N,)
    points: np.ndarray  # (N, 2)
    boxes: np.ndarray | None  # (N, 4) or None
    extra: dict = field(default_factory=dict)


def froc(truth: Sequence[_ImageTruth], peaks: Sequence[_Peaks], fp_rates: Sequence[float] = FP_RATES) -> dict[str, Any]:
    """Pooled FROC of one finding over images (see the module docstring for the rules)."""
    n_img = len(truth)
    n_gt = int(sum(len(t.boxes) for t in truth))
    cand = [(float(s), i, j) for i, p in enumerate(peaks) for j, s in enumerate(p.scores)]
    cand.sort(key=lambda c: (-c[0], c[1], c[2]))
    matched = [np.zeros(len(t.boxes), bool) for t in truth]
    tp = fp = 0
    curve = [(0.0, 0.0, float("inf"))]  # (fp/image, sensitivity, score threshold)
    for score, i, j in cand:
        p, t = peaks[i], truth[i]
        pt = p.points[j]
        bx = None if p.boxes is None else p.boxes[j]
        hit_free = [g for g in range(len(t.boxes)) if not matched[i][g] and _hits(pt, bx, t.boxes[g])]
        if hit_free:
            g = max(hit_free, key=lambda g: _iou(bx, t.boxes[g]) if bx is not None else 0.0)
            matched[i][g] = True
            tp += 1
        elif any(_hits(pt, bx, b) for b in t.boxes) or any(_hits(pt, bx, b) for b in t.ignored):
            continue
        else:
            fp += 1
        curve.append((fp / max(n_img, 1), tp / n_gt if n_gt else 0.0, score))
    sens = {}
    for r in fp_rates:
        ok = [c[1] for c in curve if c[0] <= r + 1e-12]
        sens[_rate_key(r)] = float(max(ok)) if n_gt else None
    return {
        "n_lesions": n_gt,
        "sensitivity": sens,
        "fp_per_image_max": curve[-1][0],
        "sensitivity_max": curve[-1][1] if n_gt else None,
        "score_at": {_rate_key(r): _score_at(curve, r) for r in fp_rates},
    }


def _score_at(curve, r: float) -> float | None:
    ok = [c for c in curve if c[0] <= r + 1e-12 and np.isfinite(c[2])]
    return float(ok[-1][2]) if ok else None


def _rate_key(r: float) -> str:
    return f"{r:g}"


def _load_coco(annotations_json: "str | Path") -> dict:
    data = json.loads(Path(annotations_json).read_text())
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{annotations_json}: not a COCO file (no {key!r})")
    return data


def _resolve_images(images_dir_or_list, coco: dict) -> list[tuple[dict, str]]:
    recs = sorted(coco["images"], key=lambda r: r["id"])
    if isinstance(images_dir_or_list, (str, Path)):
        root = Path(images_dir_or_list)
        if not root.is_dir():
            raise ValueError(f"{str(root)!r} is not a folder of images")
        return [(r, str(root / r["file_name"])) for r in recs]
    by_name = {Path(p).name: str(p) for p in images_dir_or_list}
    out = []
    for r in recs:
        name = Path(r["file_name"]).name
        if name in by_name:
            out.append((r, by_name[name]))
    if not out:
        raise ValueError("none of the given image paths is named in the annotations' images")
    return out


def _peaks_of(finding: Any) -> _Peaks:
    pts = np.asarray(getattr(finding, "points_xy", np.zeros((0, 2))), np.float64).reshape(-1, 2)
    boxes = getattr(finding, "boxes_xyxy", None)
    boxes = None if boxes is None else np.asarray(boxes, np.float64).reshape(-1, 4)
    if boxes is not None and len(boxes) != len(pts):
        boxes = None
    bs = getattr(finding, "box_scores", None)
    scores = (np.asarray(bs, np.float64).reshape(-1) if bs is not None and len(bs) == len(pts)
              else np.full(len(pts), float(finding.score)))
    return _Peaks(scores, pts, boxes)


def run_eval(predict_fn: Callable[[list], Sequence[Any]], images_dir_or_list: "str | Path | Sequence[str]",
             annotations_json: "str | Path", out_json: "str | Path | None" = None, *,
             batch_size: int = 16, min_size_mm: Mapping[str, float] | None = None,
             fp_rates: Sequence[float] = FP_RATES) -> dict[str, Any]:
    """Run ``predict_fn`` over the annotated images and measure AUROC and FROC per finding."""
    coco = _load_coco(annotations_json)
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    keys = list(dict.fromkeys(cats.values()))
    strata = dict({"nodule": 10.0} if min_size_mm is None else min_size_mm)
    strata = {k: v for k, v in strata.items() if k in keys}
    items = _resolve_images(images_dir_or_list, coco)
    anns: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)

    preds: list[Any] = []
    for s in range(0, len(items), batch_size):
        chunk = [p for _, p in items[s:s + batch_size]]
        got = list(predict_fn(chunk))
        if len(got) != len(chunk):
            raise ValueError(f"predict_fn returned {len(got)} predictions for {len(chunk)} images")
        preds.extend(got)

    ok = [i for i, p in enumerate(preds) if getattr(p, "error", None) is None]
    failed = [items[i][1] for i in range(len(items)) if i not in set(ok)]
    if failed:
        log.warning("%d of %d images failed to predict and are left out", len(failed), len(items))

    def truth_for(rec: dict, key: str, min_mm: float | None) -> _ImageTruth:
        keep, ign = [], []
        for a in anns.get(rec["id"], []):
            if cats.get(a["category_id"]) != key:
                continue
            x, y, w, h = a["bbox"]
            box = [x, y, x + w, y + h]
            small = min_mm is not None and a.get("size_mm") is not None and a["size_mm"] < min_mm
            (ign if (a.get("iscrowd") or a.get("ignore") or small) else keep).append(box)
        return _ImageTruth(np.asarray(keep, np.float64).reshape(-1, 4), np.asarray(ign, np.float64).reshape(-1, 4))

    def measure(key: str, min_mm: float | None) -> dict[str, Any]:
        truth, peaks, scores, labels = [], [], [], []
        for i in ok:
            rec, p = items[i][0], preds[i]
            f = p.findings.get(key) if hasattr(p.findings, "get") else None
            if f is None:
                return {"evaluated": False, "reason": f"the predictions have no finding {key!r}"}
            t = truth_for(rec, key, min_mm)
            truth.append(t)
            peaks.append(_peaks_of(f))
            if min_mm is not None and len(t.boxes) == 0 and len(t.ignored):
                continue  # only small lesions: neither positive nor negative for this stratum
            scores.append(float(f.score))
            labels.append(len(t.boxes) > 0)
        n_pos = int(sum(labels))
        return {"evaluated": True, "n_pos_images": n_pos, "n_neg_images": len(labels) - n_pos,
                "auroc": auroc(scores, labels), "froc": froc(truth, peaks, fp_rates)}

    findings = {k: measure(k, None) for k in keys}
    strata_res = {f"{k}>={v:g}mm": measure(k, v) for k, v in strata.items()}
    result = {
        "n_images": len(items),
        "n_failed": len(failed),
        "failed": failed[:20],
        "annotations": str(annotations_json),
        "fp_rates": list(fp_rates),
        "hit_rule": f"peak point inside the true box, or peak box IoU >= {IOU_HIT}",
        "findings": findings,
        "strata": strata_res,
    }
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: Mapping[str, Any]) -> str:
    """A plain-text table of ``run_eval``'s result: one row per finding (and per size stratum)."""
    rates = [_rate_key(r) for r in result.get("fp_rates", FP_RATES)]
    head = ["finding", "pos/neg img", "AUROC", "lesions"] + [f"sens@{r}FP" for r in rates] + ["maxFP/img"]
    rows = []
    for name, m in list(result["findings"].items()) + list(result.get("strata", {}).items()):
        if not m.get("evaluated", False):
            rows.append([name, "-", "-", "-"] + ["-"] * len(rates) + [m.get("reason", "")])
            continue
        fr = m["froc"]
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        rows.append([name, f"{m['n_pos_images']}/{m['n_neg_images']}", fmt(m["auroc"]), str(fr["n_lesions"])]
                    + [fmt(fr["sensitivity"][r]) for r in rates] + [f"{fr['fp_per_image_max']:.2f}"])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append(f"{result['n_images']} images, {result['n_failed']} failed; hit: {result['hit_rule']}")
    return "\n".join(out)
