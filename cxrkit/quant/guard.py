"""Accuracy guard: a lower-precision graph against fp32 on a held-out set, in ONNX Runtime.

Measured per finding: the largest |score difference| (scores are sigmoid probabilities), the
AUROC of each precision and its drop when labels are given, otherwise the agreement of positive
decisions at the card's operating thresholds; and the mean IoU of matched boxes (heatmap peaks to
boxes through ``cxrkit.postprocess.detect``, when that module is present).

The rule (DESIGN: a cheaper precision must not cost accuracy): a finding fails when its AUROC
drops by more than ``max_auroc_drop`` (0.005), or, without labels, when fewer than
``min_agreement`` (0.99) of its decisions agree with fp32. :func:`enforce` raises
:class:`AccuracyGuardError` naming the failing findings unless the caller allows the drop.

A guard on too few images proves nothing, so it cannot pass on them: without labels the held-out
set needs at least :func:`min_images_for_agreement` images (100 for 0.99: the fewest on which one
disagreement is still within the rule); with labels every enabled finding needs at least
``MIN_CLASS_IMAGES`` (10) positive and negative images and enough pairs that one swapped pair
moves its AUROC by at most a fifth of ``max_auroc_drop`` (1,000 pairs for 0.005). Findings short
of that are reported as ``insufficient`` (with their counts), and the report does not pass.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AccuracyGuardError
from ..eval import auroc
from ..models import ModelPackage

__all__ = ["GuardReport", "compare", "enforce", "auroc", "run_graph", "MAX_AUROC_DROP", "MIN_AGREEMENT",
           "MIN_CLASS_IMAGES", "min_images_for_agreement", "min_pairs_for_auroc"]

log = logging.getLogger(__name__)

MAX_AUROC_DROP = 0.005
MIN_AGREEMENT = 0.99
MIN_CLASS_IMAGES = 10  # with labels: positives and negatives an enabled finding needs to be judged


def min_images_for_agreement(min_agreement: float = MIN_AGREEMENT) -> int:
    """The fewest held-out images on which the agreement rule can tolerate one disagreement
    (fewer, and a single flip fails the graph while zero flips proves next to nothing)."""
    if min_agreement <= 0:
        return 1
    if min_agreement >= 1:
        raise ValueError(f"min_agreement must be < 1, got {min_agreement}")
    return int(math.ceil(round(1.0 / (1.0 - min_agreement), 6)))


def min_pairs_for_auroc(max_auroc_drop: float = MAX_AUROC_DROP) -> int:
    """Positive x negative pairs needed so that one swapped pair moves AUROC by <= max_auroc_drop / 5."""
    return int(math.ceil(round(5.0 / max_auroc_drop, 6)))


@dataclass
class GuardReport:
    precision: str
    n_images: int
    labels_given: bool
    max_abs_score_diff: float
    mean_abs_score_diff: float
    max_abs_heatmap_prob_diff: float
    per_finding: dict[str, dict[str, Any]]
    failed_findings: list[str]
    passed: bool
    box_mean_iou: float | None = None
    box_match_rate: float | None = None
    max_auroc_drop: float = MAX_AUROC_DROP
    min_agreement: float = MIN_AGREEMENT
    overridden: bool = False
    # findings the held-out set is too small to judge (see the module docstring), and why
    insufficient: dict[str, str] = field(default_factory=dict)
    min_images: int | None = None  # without labels: the held-out size the rule needs
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: "str | Path") -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return p


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def run_graph(graph: Any, x: np.ndarray, batch_size: int = 8, num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, K), heatmaps (N, K, h, w)) float32 of an ONNX graph (path or proto) in ORT."""
    from .calibrate import ort_session

    sess = ort_session(graph, num_threads)
    name = sess.get_inputs()[0].name
    lg, hm = [], []
    for s in range(0, len(x), batch_size):
        a, b = sess.run(["logits", "heatmaps"], {name: x[s:s + batch_size]})
        lg.append(a.astype(np.float32))
        hm.append(b.astype(np.float32))
    return np.concatenate(lg), np.concatenate(hm)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes a (n, 4) and b (m, 4), xyxy."""
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def _box_agreement(model: ModelPackage, heat_ref: np.ndarray, heat_low: np.ndarray) -> tuple[float | None, float | None]:
    """Mean IoU of greedily matched boxes (ref vs low) and the fraction of ref boxes matched."""
    try:
        from ..config import LocalizeConfig
        from ..postprocess import detect
    except ImportError:
        return None, None
    loc = LocalizeConfig(**dict(model.card.raw.get("localize", {})))
    thr = model.card.heatmap_thresholds
    try:
        d_ref = detect(heat_ref, thr, loc)
        d_low = detect(heat_low, thr, loc)
    except Exception as e:  # postprocess under construction: report, do not fail the guard
        log.warning("box agreement skipped: cxrkit.postprocess.detect failed: %s", e)
        return None, None
    c_ref, c_low = np.asarray(d_ref.counts), np.asarray(d_low.counts)  # (B, K)
    b_ref, b_low = np.asarray(d_ref.boxes), np.asarray(d_low.boxes)  # (B, K, M, 4)
    ious, n_ref = [], 0
    for i, k in zip(*np.nonzero(c_ref)):
        r = b_ref[i, k, : c_ref[i, k]]
        n_ref += len(r)
        lo = b_low[i, k, : c_low[i, k]]
        if not len(lo):
            continue
        m = _iou(r, lo)
        while m.size and m.max() > 0:
            a, b = np.unravel_index(np.argmax(m), m.shape)
            ious.append(float(m[a, b]))
            m[a, :] = -1
            m[:, b] = -1
    if n_ref == 0:
        return None, None
    return (float(np.mean(ious)) if ious else 0.0), len(ious) / n_ref


def compare(model: ModelPackage, ref: tuple[np.ndarray, np.ndarray], low: tuple[np.ndarray, np.ndarray],
            precision: str, labels: np.ndarray | None = None, *, max_auroc_drop: float = MAX_AUROC_DROP,
            min_agreement: float = MIN_AGREEMENT) -> GuardReport:
    """Compare fp32 outputs ``ref`` with lower-precision outputs ``low`` (each (logits, heatmaps))."""
    names = model.card.labels
    p_ref, p_low = _sigmoid(ref[0]), _sigmoid(low[0])  # (N, K)
    n = len(p_ref)
    diff = np.abs(p_ref - p_low)
    hm_diff = float(np.abs(_sigmoid(ref[1]) - _sigmoid(low[1])).max()) if ref[1].size else 0.0
    thr = model.card.thresholds.astype(np.float64)  # (K,)
    enabled = model.card.enabled
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != p_ref.shape:
            raise ValueError(f"labels have shape {labels.shape}; expected (N, K) = {p_ref.shape}")
    per: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    insufficient: dict[str, str] = {}
    need_n = None if labels is not None else min_images_for_agreement(min_agreement)
    need_pairs = min_pairs_for_auroc(max_auroc_drop)
    for k, name in enumerate(names):
        agree = float(np.mean((p_ref[:, k] >= thr[k]) == (p_low[:, k] >= thr[k])))
        row: dict[str, Any] = {"max_abs_score_diff": float(diff[:, k].max()), "decision_agreement": agree}
        bad = False
        if labels is not None:
            a_ref, a_low = auroc(p_ref[:, k], labels[:, k]), auroc(p_low[:, k], labels[:, k])
            row.update(auroc_fp32=a_ref, auroc=a_low, auroc_drop=None if a_ref is None else a_ref - a_low)
            bad = a_ref is not None and a_ref - a_low > max_auroc_drop
            n_pos = int(np.sum(labels[:, k] > 0))
            n_neg = n - n_pos
            row.update(n_pos=n_pos, n_neg=n_neg)
            if n_pos < MIN_CLASS_IMAGES or n_neg < MIN_CLASS_IMAGES or n_pos * n_neg < need_pairs:
                why = (f"{n_pos} positive / {n_neg} negative held-out images; needs >= {MIN_CLASS_IMAGES} of each "
                       f"and >= {need_pairs} pairs")
            else:
                why = ""
        else:
            bad = agree < min_agreement
            why = f"{n} held-out images; the agreement rule >= {min_agreement} needs >= {need_n}" if n < need_n else ""
        if enabled[k]:
            if bad:
                failed.append(name)
            if why:
                insufficient[name] = why
        per[name] = row
    box_iou, box_rate = _box_agreement(model, ref[1], low[1])
    if insufficient:
        log.warning("%s accuracy guard: too few held-out images to judge %d finding(s): %s", precision,
                    len(insufficient), "; ".join(f"{k}: {v}" for k, v in list(insufficient.items())[:4]))
    return GuardReport(
        precision=precision, n_images=n, labels_given=labels is not None,
        max_abs_score_diff=float(diff.max()), mean_abs_score_diff=float(diff.mean()),
        max_abs_heatmap_prob_diff=hm_diff, per_finding=per, failed_findings=failed,
        passed=not failed and not insufficient,
        box_mean_iou=box_iou, box_match_rate=box_rate, max_auroc_drop=max_auroc_drop, min_agreement=min_agreement,
        insufficient=insufficient, min_images=need_n,
    )


def enforce(report: GuardReport, allow_accuracy_drop: bool = False) -> GuardReport:
    """Raise AccuracyGuardError for a failed report unless ``allow_accuracy_drop``; mark overrides."""
    if report.passed:
        return report
    if report.insufficient and not report.failed_findings:
        names = list(report.insufficient)
        msg = (f"the {report.precision} graph cannot be judged on {report.n_images} held-out images: too few for "
               f"{len(names)} finding(s) ({'; '.join(f'{k}: {report.insufficient[k]}' for k in names[:6])}"
               f"{'; ...' if len(names) > 6 else ''}). Give the guard a larger held-out set (holdout= / --holdout; "
               "by default every 4th calibration image is held out), or pass allow_accuracy_drop=True to keep the "
               "graph unjudged")
        if allow_accuracy_drop:
            log.warning("%s; kept because allow_accuracy_drop=True", msg)
            report.overridden = True
            return report
        err = AccuracyGuardError(msg)
        err.report = report  # type: ignore[attr-defined]
        raise err
    rule = (f"AUROC drop > {report.max_auroc_drop}" if report.labels_given
            else f"decision agreement with fp32 < {report.min_agreement}")
    detail = ", ".join(
        f"{f} ({'AUROC drop %.4f' % report.per_finding[f]['auroc_drop'] if report.labels_given else 'agreement %.3f' % report.per_finding[f]['decision_agreement']})"
        for f in report.failed_findings)
    if report.insufficient:
        detail += f"; and too few held-out images to judge {', '.join(report.insufficient)}"
    if allow_accuracy_drop:
        log.warning("%s graph fails the accuracy guard (%s: %s); kept because allow_accuracy_drop=True",
                    report.precision, rule, detail)
        report.overridden = True
        return report
    err = AccuracyGuardError(
        f"the {report.precision} graph loses accuracy against fp32 on {report.n_images} held-out images: "
        f"{rule} for {detail}. Calibrate on more representative images, keep sensitive layers in fp32 "
        "(keep_fp32 / auto_keep_fp32), try method='minmax' (heatmap detectors carry their "
        "signal in rare large activations that percentile and entropy clip), or pass allow_accuracy_drop=True to keep it anyway"
    )
    err.report = report  # type: ignore[attr-defined]
    raise err
