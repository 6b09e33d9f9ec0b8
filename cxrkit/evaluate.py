"""`cxrkit eval`: measure a model on labelled images, optionally choose its thresholds there.

    cxrkit eval nih14/images nih14/labels.json --split models/cxr29-demo/split.json --part val
    cxrkit eval nih14/images nih14/labels.json --model my-model/ --tune-thresholds --card-out my-model/card.json
    cxrkit eval synth/images synth/annotations.json            # COCO boxes (cxrkit.eval)

The annotation format is recognised from the file: an nih14 ``labels.json`` (a list of records,
:mod:`cxrkit.eval_nih14`) or COCO (:mod:`cxrkit.eval`). The model is measured, not its card's
operating point: every finding is enabled and every heatmap peak above ``--peak-floor`` is
reported (``boxes="all"``), so FROC curves and AUROCs of disabled findings are measured too.
``--tune-thresholds`` then chooses per-label thresholds and the enabled flags by
:mod:`cxrkit.tune`'s stated bar and writes them into a card (``--card-out``, default the model's
own card.json when the model is a folder).

:func:`package_report` is what ``python -m cxrkit.train`` runs on a freshly trained package: the
val-part evaluation with tuning, the leave-one-renderer-out synthetic-nodule test, and the card's
description and metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["cmd_eval", "add_eval_args", "eval_card_package", "evaluate_nih14", "evaluate_coco",
           "write_nodule_set", "package_report"]


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", help="nih14: a patient split manifest (models/cxr29-demo/split.json)")
    p.add_argument("--part", default="val", help="nih14: which part of --split to evaluate (default: val)")
    p.add_argument("--peak-floor", type=float, default=0.01, help="report heatmap peaks down to this probability")
    p.add_argument("--tune-thresholds", action="store_true",
                   help="choose per-label operating and heatmap thresholds and enabled flags on these images")
    p.add_argument("--card-out", help="with --tune-thresholds: write the tuned card here (default: the model's card.json)")


def eval_card_package(model: Any, peak_floor: float = 0.01):
    """The model package with every label enabled and heatmap thresholds at ``peak_floor``: what
    is measured is the network, not the card's operating point."""
    from .models import ModelCard, ModelPackage, load_model_package

    pkg = model if isinstance(model, ModelPackage) else load_model_package(model)
    raw = json.loads(json.dumps(pkg.card.raw))
    raw["enabled"] = {k: True for k in raw["labels"]}
    raw["heatmap_thresholds"] = {k: float(peak_floor) for k in raw["labels"]}
    return pkg, ModelPackage(pkg.root, ModelCard(raw))


def _is_nih14(path: "str | Path") -> bool:
    with open(path) as f:
        head = f.read(4096).lstrip()
    return head.startswith("[")


def evaluate_nih14(det, images: "str | Path", labels_json: "str | Path", split: "str | Path | None" = None,
                   part: str = "val", tune: bool = False):
    """Metrics (and, with ``tune``, the chosen thresholds) of Detector ``det`` on nih14-format data."""
    from .eval_nih14 import collect, match_labels, nih14_metrics
    from .training.nih14 import load_nih14
    from .tune import choose_thresholds

    recs = load_nih14(labels_json)
    if split is not None:
        sp = json.loads(Path(split).read_text())
        if part not in sp:
            raise ValueError(f"{split}: no part {part!r} (have {[k for k in sp if isinstance(sp[k], dict)]})")
        keep = set(sp[part]["images"])
        recs = [r for r in recs if r.image in keep]
        if not recs:
            raise ValueError(f"{split}: none of part {part!r}'s images are in {labels_json}")
    labels = list(det.card.labels)
    col = collect(det.predict, images, recs, labels, batch_size=det.batch_size)
    res = nih14_metrics(col, recs, labels)
    res["data"] = {"labels": str(labels_json), "images": str(images), "split": None if split is None else str(split),
                   "part": part if split is not None else None}
    chosen = None
    if tune:
        match = match_labels(labels)
        failed = set(col.failed)
        truth, froc_by = {}, {}
        for n, lab in match.items():
            names = [q for q, lq in match.items() if lq == lab]
            y = np.array([any(q in r.names for q in names) for r in recs])
            truth[lab] = y
            loc = res["findings"][n].get("localization")
            if loc is not None:  # the box finding of this label (one per label in NIH14)
                froc_by[lab] = loc
        for lab in truth:
            froc_by.setdefault(lab, None)
        scores = {lab: np.where([r.image in failed for r in recs], np.nan, col.scores[lab]) for lab in truth}
        chosen = choose_thresholds(truth, scores, col.peaks, froc_by)
    return res, chosen


def evaluate_coco(det, images: "str | Path", annotations: "str | Path", out_json: "str | Path | None" = None,
                  tune: bool = False):
    from .eval import _load_coco, _resolve_images, run_eval
    from .tune import choose_thresholds

    captured: list[Any] = []

    def predict(paths):
        got = det.predict(paths)
        captured.extend(got)
        return got

    res = run_eval(predict, images, annotations, out_json=out_json)
    chosen = None
    if tune:
        from .eval import _Peaks, _peaks_of

        coco = _load_coco(annotations)
        cats = {c["id"]: c["name"] for c in coco["categories"]}
        items = _resolve_images(images, coco)
        has: dict[int, set[str]] = {}
        for a in coco["annotations"]:
            if not (a.get("iscrowd") or a.get("ignore")):
                has.setdefault(a["image_id"], set()).add(cats[a["category_id"]])
        labels = [k for k in dict.fromkeys(cats.values()) if k in det.card.labels]
        ok = [getattr(p, "error", None) is None for p in captured]
        truth = {k: np.array([k in has.get(rec["id"], set()) for rec, _ in items]) for k in labels}
        scores = {k: np.array([float(p.findings[k].score) if o else np.nan for p, o in zip(captured, ok)]) for k in labels}
        peaks = {k: [_peaks_of(p.findings[k]) if o else None for p, o in zip(captured, ok)] for k in labels}
        empty = _Peaks(np.zeros(0), np.zeros((0, 2)), None)
        peaks = {k: [p if p is not None else empty for p in v] for k, v in peaks.items()}
        froc_by = {k: res["findings"][k]["froc"] if res["findings"][k].get("evaluated") else None for k in labels}
        chosen = choose_thresholds(truth, scores, peaks, froc_by)
    return res, chosen


def cmd_eval(a: argparse.Namespace) -> int:
    """The `cxrkit eval` subcommand."""
    from .api import Detector
    from .eval import format_table
    from .eval_nih14 import format_nih14
    from .tune import apply_to_card, write_card

    pkg, measured = eval_card_package(a.model, a.peak_floor)
    det = Detector(measured, device=a.device, backend=a.backend, precision=a.precision, batch_size=a.batch_size,
                   boxes="all")
    try:
        if _is_nih14(a.annotations):
            res, chosen = evaluate_nih14(det, a.images, a.annotations, a.split, a.part, a.tune_thresholds)
            print(format_nih14(res))
        else:
            res, chosen = evaluate_coco(det, a.images, a.annotations, None, a.tune_thresholds)
            print(format_table(res))
    finally:
        det.close()
    if chosen is not None:
        res["tuned"] = chosen
        src = f"{a.annotations}" + (f" ({a.part} part of {a.split})" if getattr(a, "split", None) else "")
        card = apply_to_card(pkg.card.raw, chosen, src)
        dest = Path(a.card_out) if a.card_out else pkg.root / "card.json"
        write_card(card, dest)
        on = [k for k, c in chosen.items() if c["enabled"]]
        print(f"tuned {len(chosen)} labels ({len(on)} enabled: {', '.join(on) or 'none'}); wrote {dest}", file=sys.stderr)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2, default=_json_default) + "\n")
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# --- synthetic nodules from a held-out renderer (leave-one-renderer-out) --------------------------

def write_nodule_set(recs: Sequence[Any], images_dir: "str | Path", out_dir: "str | Path", renderer: str, *,
                     seed: int = 1234, d_mm: tuple[float, float] = (10.0, 30.0), with_normals: bool = True) -> Path:
    """For each record WITHOUT a real nodule or mass label: one copy with one ``renderer`` nodule
    (``d_mm`` diameter, in that image's mm) and, with ``with_normals``, the untouched image; PNGs
    plus COCO ``annotations.json`` (category "nodule", ``size_mm``, ``renderer``)."""
    from PIL import Image

    from .synth.nodules import insert_nodule
    from .training.nih14 import template_lungs

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for bi, r in enumerate(recs):
        if {"Nodule", "Mass"} & set(r.names):
            continue
        with Image.open(Path(images_dir) / r.image) as im:
            base = np.asarray(im.convert("L"), np.float32) / 255.0
        h, w = base.shape
        lungs = template_lungs(1) * np.array([w, h, w, h], np.float32)
        variants = [True, False] if with_normals else [True]
        for v, lesion in enumerate(variants):
            img = base.copy()
            rng = np.random.default_rng([seed, bi, v])
            les = insert_nodule(img, lungs, r.spacing_mm * 1024.0 / w, rng, renderers=[renderer], d_mm=d_mm,
                                label="nodule") if lesion else None
            image_id = len(images) + 1
            name = f"{image_id:05d}_{Path(r.image).stem}.png"
            Image.fromarray(np.round(np.clip(img, 0, 1) * 255.0).astype(np.uint8)).save(out / "images" / name)
            images.append({"id": image_id, "file_name": name, "height": h, "width": w, "background": r.image,
                           "patient": r.patient, "labels": "|".join(r.names) or "No Finding"})
            if les is not None:
                x0, y0, x1, y1 = les.box_xyxy
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1,
                             "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                             "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0, "size_mm": round(les.size_mm, 2),
                             "renderer": renderer})
    coco = {"info": {"description": f"{renderer} nodules {d_mm[0]:g}-{d_mm[1]:g} mm on real NIH radiographs "
                                    "without a nodule or mass label", "seed": seed},
            "categories": [{"id": 1, "name": "nodule"}], "images": images, "annotations": anns}
    path = out / "annotations.json"
    path.write_text(json.dumps(coco, indent=1) + "\n")
    return path


# --- the report of a freshly trained package ---------------------------------------------------

def _r(v: Any, n: int = 3) -> Any:
    return None if v is None else round(float(v), n)


def package_report(out: "str | Path", *, nih14: "str | Path | None" = None, split_path: "str | Path",
                   holdout_renderer: str = "sphere", threads: int = 1, report_dir: "str | Path | None" = None,
                   work_dir: "str | Path | None" = None) -> dict[str, Any]:
    """Measure package ``out`` on the val patients (nih14 labels and boxes; thresholds chosen and
    findings enabled there) and on ``holdout_renderer`` nodules, and write the card's figures."""
    import tempfile

    from .api import Detector
    from .eval_nih14 import format_nih14
    from .eval import format_table
    from .training.nih14 import default_nih14_root, load_nih14
    from .tune import BAR, apply_to_card, write_card

    out = Path(out)
    root = Path(nih14) if nih14 is not None else default_nih14_root()
    pkg, measured = eval_card_package(out)
    det = Detector(measured, device="cpu", boxes="all", num_threads=threads, batch_size=16)
    try:
        res, chosen = evaluate_nih14(det, root / "images", root / "labels.json", split_path, "val", tune=True)
        log.info("nih14 val:\n%s", format_nih14(res))
        synth = None
        if holdout_renderer and holdout_renderer != "none":
            sp = json.loads(Path(split_path).read_text())
            keep = set(sp["val"]["images"])
            val = [r for r in load_nih14(root) if r.image in keep]
            wd = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="cxr29-loro-"))
            ann = write_nodule_set(val, root / "images", wd, holdout_renderer)
            synth, _ = evaluate_coco(det, wd / "images", ann)
            log.info("%s nodules (held-out renderer):\n%s", holdout_renderer, format_table(synth))
    finally:
        det.close()
    card = apply_to_card(pkg.card.raw, chosen or {}, f"nih14 val part of {Path(split_path).name} "
                         f"({res['n_evaluated']} images, {res['patients']} patients)")
    s = res["summary"]
    per = {}
    for n, m in res["findings"].items():
        if not m.get("evaluated"):
            continue
        p = m.get("paired", {})
        loc = m.get("localization")
        per[n] = {"label": m["model_label"], "auroc": _r(m["auroc"]), "n_pos": m["n_pos"], "n_neg": m["n_neg"],
                  "paired_auroc": _r(p.get("auroc")), "chexnet_auroc": _r(p.get("chexnet_auroc")),
                  "paired_gap": _r(p.get("gap")), "paired_n_pos": p.get("n_pos"),
                  **({"boxes": loc["n_lesions"], "loc_images": loc["images"],
                      "loc_sensitivity": {k: _r(v) for k, v in loc["sensitivity"].items()}} if loc else {})}
    metrics: dict[str, Any] = {
        "measured_by": "cxrkit eval (cxrkit.evaluate) via cxrkit.Detector(boxes='all'), fp32, ONNX Runtime; every "
                       "finding enabled, peaks down to 0.01",
        "nih14_val": {"images": res["n_evaluated"], "patients": res["patients"], "paired_images": res["n_paired"],
                      "hit_rule": res["hit_rule"], "per_finding": per,
                      "summary": {k: (_r(v) if isinstance(v, float) else v) for k, v in s.items()}},
    }
    if synth is not None:
        nm = synth["findings"]["nodule"]
        metrics["held_out_renderer_nodules"] = {
            "renderer": holdout_renderer, "sizes_mm": [10, 30],
            "images": synth["n_images"], "lesions": nm["froc"]["n_lesions"],
            "backgrounds": "val-patient radiographs without a nodule or mass label; each once with one nodule, once without",
            "auroc": _r(nm["auroc"]), "sensitivity": {k: _r(v) for k, v in nm["froc"]["sensitivity"].items()},
            "hit_rule": synth["hit_rule"],
        }
    card["metrics"] = metrics
    on = sorted(k for k, v in card["enabled"].items() if v)
    gap = s.get("mean_paired_gap_8")
    tr = card.get("training", {}).get("split", {}).get("train", {})
    card["description"] = (
        f"Demonstration detector for the 29 cxrkit findings (cxrnet, {card['input_size'][0]}x{card['input_size'][1]} input, "
        f"heatmap stride 8), trained from scratch on {tr.get('images', '?')} real NIH ChestX-ray14 radiographs of "
        f"{tr.get('patients', '?')} patients (image-level labels, CheXNet soft targets, radiologist boxes) plus synthetic "
        f"nodules. Measured on {res['n_evaluated']} radiographs of {res['patients']} other patients: mean AUROC over the 8 box findings {_r(s.get('mean_auroc_8'))}; on the images that CheXNet "
        f"scored, {_r(s.get('mean_paired_auroc_8'))} vs CheXNet's {_r(s.get('mean_paired_chexnet_auroc_8'))} (gap "
        f"{'-' if gap is None else f'{gap:+.3f}'}); localization sensitivity at 1 FP/image against the real boxes "
        f"{_r(s.get('mean_loc_sensitivity_at_1fp_8'))}. Enabled (val AUROC >= {BAR['min_auroc']} with >= "
        f"{int(BAR['min_pos'])} positives, and localization sensitivity >= {BAR['min_loc_sens']} at 1 FP/image where "
        f"boxes exist): {', '.join(on) or 'none'}; every other finding is disabled (never positive, no boxes). The 16 "
        "findings NIH does not label are untrained. Input: 8-bit unit range, letterboxed, mean 0.5 / std 0.25."
    )
    card["intended_use"] = (f"demonstration only, NOT for clinical use: trained on {tr.get('images', '?')} images; "
                            "not a medical device")
    write_card(card, out / "card.json")
    report = {"nih14_val": res, "tuned": chosen, "held_out_renderer_nodules": synth}
    if report_dir is not None:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / "evaluation.json").write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    return report
