"""Evaluation on NIH ChestX-ray14-format labels (``labels.json`` of ``../shared/data/nih14``).

    recs = load_nih14("nih14/")                       # or a subset (a split's val part)
    preds = collect(det, "nih14/images", recs)        # scores + every heatmap peak, per image
    res = nih14_metrics(preds, recs, det.card.labels)
    print(format_nih14(res))

Per NIH finding (the 14 names), with the model label matched by ontology key or by NIH name
(:func:`match_labels`, so imported models with labels such as ``"Effusion"`` work too):

- **AUROC** over all evaluated images (truth: the NIH label), and on the images that carry CheXNet
  probabilities, the model's AUROC and **CheXNet's AUROC on the same images** (paired) and the gap.
  ``summary`` gives the mean paired gap over the 8 box findings with a 95 % bootstrap interval
  (images resampled by patient, 1000 times).
- **Localization** (8 box findings): FROC of the model's heatmap peaks against the real boxes; a
  peak HITS a box when its point lies inside it (no IoU rule). Images with a box of the finding are
  lesion images; images negative for the model label are normal; images positive for the model
  label (by any NIH name mapped to it) WITHOUT a box of this finding are left out (the lesion is
  there, its place unknown, so a peak there is neither a hit nor a false positive). Sensitivity at
  0.5 / 1 / 2 false positives per image, per image of the counted set.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .eval import FP_RATES, _ImageTruth, _Peaks, auroc, froc
from .labels import NIH14_TO_FINDING
from .training.nih14 import BOX_NAMES, NIH14_NAMES, Nih14Record

log = logging.getLogger(__name__)

__all__ = ["match_labels", "collect", "nih14_metrics", "format_nih14", "Collected"]


def _norm(s: str) -> str:
    return re.sub(r"[^a-z]", "", s.lower())


def match_labels(model_labels: Sequence[str]) -> dict[str, str]:
    """NIH name -> the model label that scores it: the label named by the NIH name itself
    (``"Effusion"``, ``"pleural thickening"``, ``"Infiltrate"``), else the ontology key
    (``"pleural_effusion"``). NIH names with no matching label are left out."""
    by_norm = {_norm(m): m for m in model_labels}
    out = {}
    for n in NIH14_NAMES:
        for cand in (n, "Infiltrate" if n == "Infiltration" else None, NIH14_TO_FINDING[n]):
            if cand is not None and _norm(cand) in by_norm:
                out[n] = by_norm[_norm(cand)]
                break
    return out


class Collected:
    """What a predictor said about each image: label -> score (N,), and label -> per-image peaks."""

    def __init__(self, images: list[str], scores: dict[str, np.ndarray], peaks: dict[str, list[_Peaks]],
                 failed: list[str]) -> None:
        self.images, self.scores, self.peaks, self.failed = images, scores, peaks, failed


def collect(predict_fn: Callable[[list], Sequence[Any]], images_dir: "str | Path", recs: Sequence[Nih14Record],
            labels: Sequence[str], batch_size: int = 16) -> Collected:
    """Run ``predict_fn`` (e.g. ``Detector(boxes="all").predict``) over the records' images."""
    root = Path(images_dir)
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is not a folder of images")
    paths = [str(root / r.image) for r in recs]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} images named in the labels are not in {str(root)!r}, e.g. {missing[:3]}")
    scores = {k: np.full(len(recs), np.nan) for k in labels}
    peaks: dict[str, list[_Peaks]] = {k: [] for k in labels}
    failed = []
    for s in range(0, len(paths), batch_size):
        got = list(predict_fn(paths[s:s + batch_size]))
        if len(got) != len(paths[s:s + batch_size]):
            raise ValueError(f"predict_fn returned {len(got)} predictions for {len(paths[s:s + batch_size])} images")
        for j, p in enumerate(got):
            i = s + j
            if getattr(p, "error", None) is not None:
                failed.append(paths[i])
            for k in labels:
                f = None if getattr(p, "error", None) is not None else p.findings.get(k)
                if f is None:
                    peaks[k].append(_Peaks(np.zeros(0), np.zeros((0, 2)), None))
                    continue
                scores[k][i] = float(f.score)
                pts = np.asarray(f.points_xy, np.float64).reshape(-1, 2)
                bs = getattr(f, "box_scores", None)
                sc = (np.asarray(bs, np.float64).reshape(-1) if bs is not None and len(bs) == len(pts)
                      else np.full(len(pts), float(f.score)))
                peaks[k].append(_Peaks(sc, pts, None))  # point-in-box hits only
    if failed:
        log.warning("%d of %d images failed to predict and are left out", len(failed), len(paths))
    return Collected([r.image for r in recs], scores, peaks, failed)


def _paired_gap_ci(recs, ok, model_scores, chex_scores, truths, names, n_boot: int = 1000, seed: int = 0):
    """95 % bootstrap interval (by patient) of the mean over ``names`` of AUROC(model) - AUROC(CheXNet)."""
    idx = [i for i in ok if recs[i].chexnet is not None]
    pats = sorted({recs[i].patient for i in idx})
    by_p: dict[str, list[int]] = {}
    for i in idx:
        by_p.setdefault(recs[i].patient, []).append(i)
    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(n_boot):
        take = [i for p in rng.choice(len(pats), len(pats)) for i in by_p[pats[p]]]
        g = []
        for n in names:
            y = truths[n][take]
            a, b = auroc(model_scores[n][take], y), auroc(chex_scores[n][take], y)
            if a is not None and b is not None:
                g.append(a - b)
        if len(g) == len(names):
            gaps.append(float(np.mean(g)))
    if len(gaps) < n_boot // 2:
        return None
    return [round(float(np.percentile(gaps, 2.5)), 4), round(float(np.percentile(gaps, 97.5)), 4)]


def nih14_metrics(col: Collected, recs: Sequence[Nih14Record], labels: Sequence[str],
                  fp_rates: Sequence[float] = FP_RATES) -> dict[str, Any]:
    """AUROC, paired CheXNet AUROC and localization FROC per NIH finding (see the module docstring)."""
    match = match_labels(labels)
    failed = set(col.failed)
    ok = np.array([i for i, r in enumerate(recs) if r.image not in failed and not any(
        np.isnan(col.scores[k][i]) for k in set(match.values()))], int)
    findings: dict[str, Any] = {}
    truths = {n: np.array([n in r.names for r in recs]) for n in NIH14_NAMES}
    model_scores = {n: col.scores[match[n]] for n in match}
    chex = {n: np.array([r.chexnet.get(n, np.nan) if r.chexnet else np.nan for r in recs]) for n in NIH14_NAMES}
    paired_idx = np.array([i for i in ok if recs[i].chexnet is not None], int)
    for n in NIH14_NAMES:
        if n not in match:
            findings[n] = {"evaluated": False, "reason": "no model label matches (by ontology key or NIH name)"}
            continue
        lab = match[n]
        y, s = truths[n], model_scores[n]
        m: dict[str, Any] = {"evaluated": True, "model_label": lab, "n_pos": int(y[ok].sum()), "n_neg": int((~y[ok]).sum()),
                             "auroc": auroc(s[ok], y[ok])}
        if len(paired_idx):
            m["paired"] = {"n_images": int(len(paired_idx)), "n_pos": int(y[paired_idx].sum()),
                           "auroc": auroc(s[paired_idx], y[paired_idx]),
                           "chexnet_auroc": auroc(chex[n][paired_idx], y[paired_idx])}
            a, b = m["paired"]["auroc"], m["paired"]["chexnet_auroc"]
            m["paired"]["gap"] = None if a is None or b is None else a - b
        if n in BOX_NAMES:
            same = [q for q, lq in match.items() if lq == lab]  # NIH names scored by the same label
            truth, peaks, kept = [], [], 0
            for i in ok:
                r = recs[i]
                bx = np.array([b[1:] for b in r.boxes if b[0] == n], np.float64).reshape(-1, 4)
                if len(bx) == 0 and any(q in r.names for q in same):
                    continue  # positive without a box of this finding: location unknown, left out
                truth.append(_ImageTruth(bx, np.zeros((0, 4))))
                peaks.append(col.peaks[lab][i])
                kept += 1
            fr = froc(truth, peaks, fp_rates)
            m["localization"] = {"images": kept, "lesion_images": int(sum(len(t.boxes) > 0 for t in truth)), **fr}
        findings[n] = m
    box_eval = [n for n in BOX_NAMES if findings[n].get("evaluated")]
    gaps = [findings[n]["paired"]["gap"] for n in box_eval if findings[n].get("paired", {}).get("gap") is not None]
    sens1 = [findings[n]["localization"]["sensitivity"]["1"] for n in box_eval
             if findings[n]["localization"]["sensitivity"].get("1") is not None]
    summary = {
        "box_findings": list(BOX_NAMES),
        "mean_auroc_8": _mean([findings[n]["auroc"] for n in box_eval]),
        "mean_paired_auroc_8": _mean([findings[n]["paired"]["auroc"] for n in box_eval if "paired" in findings[n]]),
        "mean_paired_chexnet_auroc_8": _mean([findings[n]["paired"]["chexnet_auroc"] for n in box_eval if "paired" in findings[n]]),
        "mean_paired_gap_8": _mean(gaps) if len(gaps) == len(BOX_NAMES) else None,
        "mean_paired_gap_8_ci95": (_paired_gap_ci(recs, ok, model_scores, chex, truths, BOX_NAMES)
                                   if len(gaps) == len(BOX_NAMES) else None),
        "mean_loc_sensitivity_at_1fp_8": _mean(sens1) if len(sens1) == len(BOX_NAMES) else None,
    }
    return {"format": "nih14", "n_images": len(recs), "n_failed": len(failed), "n_evaluated": int(len(ok)),
            "n_paired": int(len(paired_idx)), "patients": len({recs[i].patient for i in ok}),
            "label_match": match, "fp_rates": list(fp_rates),
            "hit_rule": "heatmap peak point inside a real box; positives without a box of the finding left out",
            "findings": findings, "summary": summary}


def _mean(v: Sequence[Any]) -> float | None:
    v = [x for x in v if x is not None]
    return float(np.mean(v)) if v else None


def format_nih14(res: Mapping[str, Any]) -> str:
    rates = [f"{r:g}" for r in res.get("fp_rates", FP_RATES)]
    head = ["finding", "label", "pos/neg", "AUROC", "paired", "CheXNet", "gap", "boxes"] + [f"loc@{r}FP" for r in rates]
    f3 = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = []
    for n, m in res["findings"].items():
        if not m.get("evaluated"):
            rows.append([n, "-", "-", "-", "-", "-", "-", "-"] + ["-"] * len(rates))
            continue
        p = m.get("paired", {})
        loc = m.get("localization")
        rows.append([n, m["model_label"], f"{m['n_pos']}/{m['n_neg']}", f3(m["auroc"]), f3(p.get("auroc")),
                     f3(p.get("chexnet_auroc")), "-" if p.get("gap") is None else f"{p['gap']:+.3f}",
                     str(loc["n_lesions"]) if loc else "-"]
                    + [f3(loc["sensitivity"][r]) if loc else "-" for r in rates])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    s = res["summary"]
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    ci = s.get("mean_paired_gap_8_ci95")
    out.append(f"{res['n_evaluated']} images ({res['patients']} patients), {res['n_paired']} with CheXNet; "
               f"{res['n_failed']} failed. 8 box findings: mean AUROC {f3(s['mean_auroc_8'])}, paired "
               f"{f3(s['mean_paired_auroc_8'])} vs CheXNet {f3(s['mean_paired_chexnet_auroc_8'])}, gap "
               + ("-" if s["mean_paired_gap_8"] is None else f"{s['mean_paired_gap_8']:+.3f}")
               + (f" (95% CI {ci[0]:+.3f}..{ci[1]:+.3f})" if ci else "")
               + f"; localization sensitivity at 1 FP/image {f3(s['mean_loc_sensitivity_at_1fp_8'])}")
    out.append(f"hit: {res['hit_rule']}")
    return "\n".join(out)
