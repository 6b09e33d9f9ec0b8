"""Train the cxr29 demonstration model on synthetic lesions and package it.

    python -m cxrkit.train --out cxrkit/models/cxr29-demo --minutes 22

Data: the lungbox radiographs (51 images, 30 patients) split BY PATIENT into train / val / test
(60 / 20 / 20 % of images, split seed 0), plus procedural chests for training only. Lesions are
inserted by :mod:`cxrkit.synth`. Training sees augmented train backgrounds; thresholds are chosen
on val; the metrics in the card are measured by :func:`cxrkit.eval.run_eval` through
``cxrkit.Detector`` (ONNX Runtime, the package as written) on a synthetic set built from the test
patients only, which training never saw. Findings that cannot be rendered are ``enabled: false``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("cxrkit.train")

MEAN, STD = 0.5, 0.25


def _default_lungbox() -> str:
    root = os.environ.get("CXRKIT_SHARED_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    return str(Path(root) / "lungbox")


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cxrkit.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="package folder to write (card.json, weights, ONNX)")
    ap.add_argument("--name", default="cxr29-demo")
    ap.add_argument("--lungbox", default=_default_lungbox(), help="lungbox folder (annotations.json + images/)")
    ap.add_argument("--minutes", type=float, default=22.0, help="wall-clock budget of the optimisation loop")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--input-size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine 2 threads stall on each other)")
    ap.add_argument("--workers", type=int, default=1, help="sample-generating processes")
    ap.add_argument("--label-weights", default='{"nodule": 3, "calcification": 1.5, "opacity": 1.5}',
                    help="JSON: relative frequency of findings in training samples (default 1 each)")
    ap.add_argument("--replay", type=int, default=1, help="reused (mirrored) samples per fresh sample")
    ap.add_argument("--n-aug", type=int, default=8, help="cached augmentations per real train background")
    ap.add_argument("--n-procedural", type=int, default=120)
    ap.add_argument("--val-per-background", type=int, default=20)
    ap.add_argument("--eval-dir", default=None, help="where the test set is written (default: a temp folder)")
    ap.add_argument("--eval-per-background", type=int, default=30)
    ap.add_argument("--eval-seed", type=int, default=1234)
    ap.add_argument("--no-eval", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    import torch

    from .labels import FINDING_KEYS
    from .models import sha256_file
    from .nets import create_net, export_onnx, save_weights
    from .synth import SYNTH_LABELS, load_lungbox, split_by_patient
    from .training.data import SampleStream, build_bank, make_sample
    from .training.loop import choose_operating_points, forward_arrays, train

    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    input_hw = tuple(a.input_size)
    labels, trained = list(FINDING_KEYS), [k for k in FINDING_KEYS if k in SYNTH_LABELS]

    real = load_lungbox(a.lungbox, max_side=1024)
    split = split_by_patient(real, seed=a.split_seed)
    split_info = {k: {"images": len(v), "patients": sorted({b.patient for b in v})} for k, v in split.items()}
    log.info("split by patient: %s", {k: (v["images"], len(v["patients"])) for k, v in split_info.items()})

    bank = build_bank(split["train"], rng, n_aug=a.n_aug, n_procedural=a.n_procedural)
    log.info("background bank: %d (%d real x %d augmentations + %d procedural), %.0fs", len(bank),
             len(split["train"]), a.n_aug, a.n_procedural, time.perf_counter() - t_start)
    vrng = np.random.default_rng([a.seed, 1])
    val = [make_sample(split["val"], vrng, labels, trained, input_hw, MEAN, STD, a.stride, p_normal=0.25, max_lesions=2)
           for _ in range(a.val_per_background * len(split["val"]))]
    val_x = np.stack([v[0] for v in val])
    val_boxes = [v[3] for v in val]

    net = create_net("cxrnet", num_classes=len(labels), width=a.width, stride=a.stride)
    stream = SampleStream(bank, labels, trained, input_hw, MEAN, STD, a.stride, seed=a.seed, replay=a.replay,
                          label_weights=json.loads(a.label_weights))
    ema, run = train(net, stream, minutes=a.minutes, max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr,
                     workers=a.workers)
    log.info("trained %d steps (%d images) in %.0fs", run["steps"], run["images_seen"], run["train_seconds"])

    probs, heats = forward_arrays(ema, val_x)
    ops = choose_operating_points(probs, heats, val_boxes, labels, trained, a.stride)
    for k, v in ops.items():
        log.info("val %-18s AUROC %s  thr %.3f  heat thr %.3f  enabled %s", k,
                 "-" if v["auroc"] is None else f"{v['auroc']:.3f}", v["threshold"], v["heatmap_threshold"], v["enabled"])

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    arch_kwargs = {"num_classes": len(labels), "width": a.width, "stride": a.stride}
    save_weights(ema, out / "weights.safetensors", metadata={"arch": "cxrnet"})
    export_onnx(ema, out / "model.onnx", input_hw)
    enabled = {k: bool(ops.get(k, {}).get("enabled", False)) for k in labels}
    card: dict[str, Any] = {
        "schema_version": 1,
        "name": a.name,
        "version": "0.1.0",
        "arch": "cxrnet",
        "arch_kwargs": arch_kwargs,
        "labels": labels,
        "input_size": list(input_hw),
        "normalization": {"mean": MEAN, "std": STD},
        "heatmap_stride": a.stride,
        "thresholds": {k: round(ops[k]["threshold"], 4) if k in ops else 0.5 for k in labels},
        "heatmap_thresholds": {k: round(ops[k]["heatmap_threshold"], 4) if k in ops else 0.5 for k in labels},
        "enabled": enabled,
        "files": {"onnx": "model.onnx", "weights": "weights.safetensors"},
        "sha256": {n: sha256_file(out / n) for n in ("model.onnx", "weights.safetensors")},
        "description": (
            "Demonstration detector for the 29 cxrkit findings, trained only on SYNTHETIC lesions inserted "
            "into a few dozen public radiographs. Of the 29 outputs, the findings cxrkit.synth renders are "
            f"trained ({', '.join(trained)}); the other {len(labels) - len(trained)} are untrained and "
            "disabled (enabled: false: never reported positive, no boxes). A trained finding whose validation "
            "AUROC fell below 0.75 is disabled too"
            + (f" (this run: {', '.join(k for k in trained if not enabled[k])})" if not all(enabled[k] for k in trained) else "")
            + ". Input: 8-bit unit range, letterboxed to "
            f"{input_hw[0]}x{input_hw[1]}, normalized with mean {MEAN} / std {STD}. Heatmap thresholds are set "
            "low (about 2 false-positive peaks per image on validation) so evaluation can trace the FROC curve."
        ),
        "intended_use": "demonstration only, NOT for clinical use: it has never seen a real lesion",
        "training": {
            "command": "python -m cxrkit.train " + " ".join(argv if argv is not None else sys.argv[1:]),
            "data": ("lungbox: 51 public COVID-era chest radiographs (web figures, 8-bit, many with real COVID-19 "
                     "opacities, unlabeled here) with radiologist lung boxes used to place lesions; plus "
                     f"{a.n_procedural} procedural chests (training only). All positive findings are synthetic "
                     "(cxrkit.synth); sizes in mm use a spacing estimated from the lung boxes (250 mm lung height)."),
            "split": {"by": "patient", "seed": a.split_seed, "fractions": [0.6, 0.2, 0.2], **split_info},
            "augmentation": "random crop keeping both lungs, horizontal flip, rescale, gamma, contrast, brightness, blur, noise",
            "targets": "CenterNet Gaussian heatmaps (peak cell = 1, sigma 0.2 x box) with penalty-reduced focal loss; "
                       "image-level BCE on log-sum-exp pooled logits",
            "trained_findings": trained,
            "run": {**run, "input_size": list(input_hw), "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed,
                    "threads": a.threads, "workers": a.workers, "replay": a.replay,
                    "label_weights": json.loads(a.label_weights), "torch": torch.__version__},
            "validation": {"images": len(val), "per_finding": ops},
        },
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")

    if not a.no_eval:
        card["metrics"] = _evaluate(a, out, split["test"])
        (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    log.info("wrote %s in %.1f min total", out, (time.perf_counter() - t_start) / 60)
    return 0


def _evaluate(a: argparse.Namespace, out: Path, test_bgs) -> dict[str, Any]:
    from . import Detector
    from .eval import format_table, run_eval
    from .synth.coco import write_coco_set

    eval_dir = Path(a.eval_dir) if a.eval_dir else Path(tempfile.mkdtemp(prefix="cxr29-eval-"))
    ann = write_coco_set(test_bgs, eval_dir, per_background=a.eval_per_background, seed=a.eval_seed,
                         description=f"lungbox test split (patients unseen in training), split seed {a.split_seed}")
    t0 = time.perf_counter()
    with Detector.from_pretrained(str(out), device="cpu", boxes="all", num_threads=a.threads) as det:
        backend = det.backend_name
        res = run_eval(det.predict, eval_dir / "images", ann, out_json=eval_dir / "metrics.json")
    log.info("eval on %d test images in %.0fs via %s:\n%s", res["n_images"], time.perf_counter() - t0, backend,
             format_table(res))
    slim = lambda m: ({"auroc": m["auroc"], "pos_neg_images": [m["n_pos_images"], m["n_neg_images"]],  # noqa: E731
                       "lesions": m["froc"]["n_lesions"], "froc_sensitivity": m["froc"]["sensitivity"],
                       "froc_max_fp_per_image": round(m["froc"]["fp_per_image_max"], 3)}
                      if m.get("evaluated") else None)
    return {
        "measured_by": "cxrkit.eval.run_eval via cxrkit.Detector(boxes='all'), fp32, backend " + backend,
        "test_set": {
            "how": (f"python -m cxrkit.synth.coco --lungbox <lungbox> --split test --split-seed {a.split_seed} "
                    f"--seed {a.eval_seed} --per-background {a.eval_per_background} --out DIR; "
                    "then: cxrkit eval DIR/images DIR/annotations.json --model cxr29-demo"),
            "images": res["n_images"], "backgrounds": len(test_bgs),
            "note": "synthetic lesions on real radiographs of test patients never seen in training; "
                    "real COVID opacities in these backgrounds are unlabeled and count as negatives",
        },
        "hit_rule": res["hit_rule"],
        "per_finding": {k: slim(m) for k, m in res["findings"].items()},
        "strata": {k: slim(m) for k, m in res["strata"].items()},
    }


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
