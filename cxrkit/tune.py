"""Operating thresholds chosen on labelled data, and the bar a finding must clear to be enabled.

Per model label with labelled data (at least one positive and one negative image):

- image threshold: the score maximizing Youden's J (sensitivity + specificity - 1), clipped to
  [0.01, 0.99];
- heatmap (peak) threshold: where the labelled boxes exist, the peak score at which the FROC
  reaches 1 false positive per image; otherwise the 10th percentile of the top peak score of the
  images called positive (so about 9 in 10 positive calls come with a box), at most the image
  threshold;
- enabled when AUROC >= ``min_auroc`` (0.70) with >= ``min_pos`` (10) positive images and, where
  boxes exist, localization sensitivity at 1 FP/image >= ``min_loc_sens`` (0.30): the stated bar.

Labels with no labelled data keep their card values (a bundled card sets them disabled).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .eval import _Peaks, auroc

__all__ = ["BAR", "choose_thresholds", "apply_to_card", "write_card"]

BAR: dict[str, float] = {"min_auroc": 0.70, "min_pos": 10, "min_loc_sens": 0.30}


def _youden(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    best_t, best_j = 0.5, -1.0
    for t in np.unique(s):
        j = float((s[y] >= t).mean() + (s[~y] < t).mean() - 1.0)
        if j > best_j:
            best_j, best_t = j, float(t)
    return best_t, best_j


def choose_thresholds(truth: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray],
                      peaks: Mapping[str, Sequence[_Peaks]], froc_by_label: Mapping[str, Mapping[str, Any] | None],
                      bar: Mapping[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Per label: AUROC, thresholds, the figures the bar looks at, and ``enabled``."""
    bar = {**BAR, **(bar or {})}
    out: dict[str, dict[str, Any]] = {}
    for lab, y in truth.items():
        y = np.asarray(y, bool)
        s = np.asarray(scores[lab], np.float64)
        keep = ~np.isnan(s)
        y, s = y[keep], s[keep]
        if y.all() or not y.any():
            continue
        auc = auroc(s, y)
        t, j = _youden(s, y)
        t = float(np.clip(t, 0.01, 0.99))
        fr = froc_by_label.get(lab)
        sens1 = None if fr is None else fr["sensitivity"].get("1")
        if fr is not None and fr["score_at"].get("1") is not None:
            ht, how = float(fr["score_at"]["1"]), "FROC at 1 FP/image on the labelled boxes"
        else:
            pk = [p for p, k in zip(peaks[lab], keep) if k]
            top = np.array([float(p.scores.max()) if len(p.scores) else 0.0 for p in pk])
            called = top[s >= t]
            ht = float(np.percentile(called, 10)) if len(called) else 0.5 * t
            ht, how = min(ht, t), "10th percentile of the top peak of positive calls"
        ht = float(np.clip(ht, 0.01, 0.99))
        enabled = bool(auc is not None and auc >= bar["min_auroc"] and int(y.sum()) >= bar["min_pos"]
                       and (sens1 is None or sens1 >= bar["min_loc_sens"]))
        out[lab] = {"auroc": auc, "n_pos": int(y.sum()), "n_neg": int((~y).sum()), "threshold": t, "youden_j": j,
                    "sensitivity": float((s[y] >= t).mean()), "specificity": float((s[~y] < t).mean()),
                    "heatmap_threshold": ht, "heatmap_threshold_rule": how, "loc_sensitivity_at_1fp": sens1,
                    "enabled": enabled}
    return out


def apply_to_card(raw: Mapping[str, Any], chosen: Mapping[str, Mapping[str, Any]], source: str,
                  bar: Mapping[str, float] | None = None) -> dict[str, Any]:
    """A copy of card ``raw`` with the chosen thresholds / heatmap thresholds / enabled flags and a
    ``tuning`` record (data, rule, bar, per-label figures)."""
    card = copy.deepcopy(dict(raw))
    labels = list(card["labels"])
    for key in ("thresholds", "heatmap_thresholds", "enabled"):
        card.setdefault(key, {})
    for lab, c in chosen.items():
        if lab not in labels:
            continue
        card["thresholds"][lab] = round(c["threshold"], 4)
        card["heatmap_thresholds"][lab] = round(c["heatmap_threshold"], 4)
        card["enabled"][lab] = c["enabled"]
    card["tuning"] = {
        "data": source,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "rule": ("image threshold: max Youden J; heatmap threshold: 1 FP/image on the boxes where they exist, "
                 "else the 10th percentile of positive calls' top peak"),
        "bar": {**BAR, **(bar or {})},
        "per_label": {lab: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()}
                      for lab, c in chosen.items() if lab in labels},
        "untuned": [lab for lab in labels if lab not in chosen],
    }
    return card


def write_card(card: Mapping[str, Any], path: "str | Path") -> Path:
    """Write a card atomically (same folder, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(card, indent=2) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, p)
    return p
