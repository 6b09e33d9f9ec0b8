"""Train cxr29-demo on real NIH ChestX-ray14 labels and boxes, and package it.

    python -m cxrkit.train --out cxrkit/models/cxr29-demo            # the bundled model (resumable)
    python -m cxrkit.train --out /tmp/lc25 --train-fraction 0.25      # a learning-curve point

Data: ``../shared/data/nih14`` (939 radiographs, 830 patients), split BY PATIENT into train / val
by the manifest ``models/cxr29-demo/split.json`` (80 / 20 % of images, seed 0; written on first
use). Training sees the train patients only: image-level NIH labels mapped onto the ontology
(``cxrkit.labels.NIH14_TO_FINDING``), blended with the CheXNet probabilities where an image has
them, CenterNet heatmaps at the real boxes, and synthetic nodules from the renderers of
:mod:`cxrkit.synth.nodules` minus ``--holdout-renderer`` (kept out for the leave-one-renderer-out
test). The run is a fixed schedule (no early stopping, no checkpoint chosen on validation); the
last EMA weights are packaged. Then ``cxrkit.evaluate`` measures the package through
``cxrkit.Detector`` on the val patients, chooses operating thresholds there, enables the findings
that clear the bar, and writes the figures into the card (``--no-eval`` skips that).

Checkpoints (``--ckpt-dir``, default ``$CXRKIT_CACHE_DIR/train/<out name>``) are written every
``--ckpt-every`` steps; the same command resumes where it stopped; ``--max-minutes`` trains in
chunks. ``--device cuda`` trains on a GPU (``--workers`` prepare batches in parallel there).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("cxrkit.train")

MEAN, STD = 0.5, 0.25
REPO = Path(__file__).resolve().parents[1]


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cxrkit.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="package folder to write (card.json, weights, ONNX)")
    ap.add_argument("--name", default="cxr29-demo")
    ap.add_argument("--version", default="0.2.0")
    ap.add_argument("--nih14", default=None, help="nih14 folder (labels.json + images/); default ../shared/data/nih14")
    ap.add_argument("--split", default=str(REPO / "models" / "cxr29-demo" / "split.json"),
                    help="patient split manifest (written on first use)")
    ap.add_argument("--train-fraction", type=float, default=1.0,
                    help="train on this fraction of the train PATIENTS (nested seeded subsets; learning curve)")
    ap.add_argument("--epochs", type=float, default=40.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--input-size", type=int, default=384)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p-synth", type=float, default=0.3, help="probability of synthetic nodules in a sample")
    ap.add_argument("--holdout-renderer", default="sphere",
                    help="nodule renderer kept out of training (tested on it); 'none' to use all five")
    ap.add_argument("--chexnet-weight", type=float, default=0.5,
                    help="weight of the CheXNet probability in the image-level target (0: labels only)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine 2 threads stall on each other)")
    ap.add_argument("--workers", type=int, default=0, help="batch-preparing processes (useful with --device cuda)")
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--ckpt-every", type=int, default=46)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (checkpointed) after this long; rerun to resume")
    ap.add_argument("--monitor-every", type=int, default=184, help="log val AUROC every N steps (not used to choose anything)")
    ap.add_argument("--no-eval", action="store_true", help="package without measuring / tuning on val")
    ap.add_argument("--no-int8", action="store_true", help="skip the guarded int8 / fp16 forms")
    ap.add_argument("--report-dir", default=None, help="also write the full evaluation JSON here "
                    "(the bundled model's goes to models/cxr29-demo/)")
    ap.add_argument("--package-only", action="store_true",
                    help="do not train: (re)measure and finish the package already in --out")
    ap.add_argument("--pids-file", default="/tmp/cxrkit-pausable.pids",
                    help="append this process id here so quiet benchmarks can pause it ('' to skip)")
    return ap.parse_args(argv)


def _register_pausable(path: str) -> None:
    """Append this process id to the pausable-jobs file (quiet benchmarks SIGSTOP/SIGCONT it) and
    take it out again at exit, so a later process that reuses the id is never paused by mistake."""
    import atexit

    me = str(os.getpid())
    with open(path, "a") as f:
        f.write(me + "\n")

    def drop() -> None:
        try:
            lines = Path(path).read_text().splitlines()
            Path(path).write_text("".join(ln + "\n" for ln in lines if ln.strip() != me))
        except OSError:
            pass

    atexit.register(drop)


def train_subset(split: dict[str, Any], fraction: float, seed: int) -> list[str]:
    """Nested patient subsets of the train part: the first ``fraction`` of a seeded permutation."""
    pats = list(split["train"]["patients"])
    order = np.random.default_rng([seed, 99]).permutation(len(pats))
    n = max(1, int(round(fraction * len(pats))))
    return sorted(pats[i] for i in order[:n])


def main(argv: Sequence[str] | None = None) -> int:
    a = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    import torch

    from .labels import FINDING_KEYS
    from .nets import create_net, export_onnx, save_weights
    from .synth.nodules import NODULE_RENDERERS
    from .training.fit import fit, predict_arrays
    from .training.nih14 import TRAINED_KEYS, image_cache, load_nih14, load_or_make_split
    from .training.real import RealSamples

    if a.pids_file:
        _register_pausable(a.pids_file)
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    labels = list(FINDING_KEYS)
    recs = load_nih14(a.nih14)
    split = load_or_make_split(recs, a.split)
    pats = set(train_subset(split, a.train_fraction, a.seed))
    train_idx = [i for i, r in enumerate(recs) if r.patient in pats]
    val_set = set(split["val"]["images"])
    val_idx = [i for i, r in enumerate(recs) if r.image in val_set]
    if set(recs[i].patient for i in train_idx) & set(recs[i].patient for i in val_idx):
        raise RuntimeError("a patient is in both train and val")
    renderers = [n for n in NODULE_RENDERERS if n != a.holdout_renderer]
    log.info("train %d images / %d patients, val %d images; nodule renderers %s (held out: %s)",
             len(train_idx), len(pats), len(val_idx), renderers, a.holdout_renderer)
    cache = image_cache(recs, a.nih14, a.input_size)
    samples = RealSamples(cache, recs, labels, TRAINED_KEYS, a.stride, MEAN, STD, p_synth=a.p_synth,
                          renderers=renderers, chexnet_weight=a.chexnet_weight)
    steps = int(round(a.epochs * len(train_idx) / a.batch_size))
    net = create_net("cxrnet", num_classes=len(labels), width=a.width, stride=a.stride)

    from .eval import auroc
    from .training.nih14 import BOX_NAMES
    from .labels import NIH14_TO_FINDING

    val_x = samples.eval_inputs(val_idx)

    def monitor(ema, step: int) -> dict[str, Any]:
        probs, _ = predict_arrays(ema, val_x)
        out = {}
        for n in BOX_NAMES:
            y = [n in recs[i].names for i in val_idx]
            out[n] = round(auroc(probs[:, labels.index(NIH14_TO_FINDING[n])], y) or float("nan"), 4)
        out["mean8"] = round(float(np.mean(list(out.values()))), 4)
        return out

    ckpt = Path(a.ckpt_dir) if a.ckpt_dir else (
        Path(os.environ.get("CXRKIT_CACHE_DIR") or Path.home() / ".cache" / "cxrkit") / "train" / Path(a.out).name)
    config = {"input_size": a.input_size, "stride": a.stride, "width": a.width, "p_synth": a.p_synth,
              "renderers": renderers, "chexnet_weight": a.chexnet_weight, "train_fraction": a.train_fraction,
              "split": split["seed"], "epochs": a.epochs}
    if a.package_only:
        finish_package(a, Path(a.out), ckpt)
        return 0
    ema, run = fit(net, samples, train_idx, steps=steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                   ckpt_dir=ckpt, ckpt_every=a.ckpt_every, device=a.device, workers=a.workers,
                   max_minutes=a.max_minutes, monitor=monitor, monitor_every=a.monitor_every, config=config)
    if not run["done"]:
        log.info("stopped at step %d of %d (checkpoint in %s): run the same command again to go on",
                 run["steps"], steps, ckpt)
        return 3
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model.*.onnx*"):  # int8 / fp16 forms of older weights
        stale.unlink()
    save_weights(ema, out / "weights.safetensors", metadata={"arch": "cxrnet"})
    export_onnx(ema, out / "model.onnx", (a.input_size, a.input_size))
    from .models import sha256_file

    card: dict[str, Any] = {
        "schema_version": 1,
        "name": a.name,
        "version": a.version,
        "arch": "cxrnet",
        "arch_kwargs": {"num_classes": len(labels), "width": a.width, "stride": a.stride},
        "labels": labels,
        "input_size": [a.input_size, a.input_size],
        "normalization": {"mean": MEAN, "std": STD},
        "heatmap_stride": a.stride,
        "thresholds": {k: 0.5 for k in labels},
        "heatmap_thresholds": {k: 0.5 for k in labels},
        "enabled": {k: False for k in labels},
        "files": {"onnx": "model.onnx", "weights": "weights.safetensors"},
        "sha256": {n: sha256_file(out / n) for n in ("model.onnx", "weights.safetensors")},
        "description": "",
        "intended_use": "demonstration only, NOT for clinical use",
        "training": {
            "command": "python -m cxrkit.train " + " ".join(argv if argv is not None else sys.argv[1:]),
            "data": ("NIH ChestX-ray14 (../shared/data/nih14): real frontal radiographs with image-level labels "
                     "(report-mined, ~90% precise) and radiologist boxes for 8 findings; NIH Clinical Center"),
            "split": {"manifest": "models/cxr29-demo/split.json", "by": "patient", "seed": split["seed"],
                      "train": {"images": len(train_idx), "patients": len(pats),
                                "fraction_of_train_patients": a.train_fraction},
                      "val": {"images": len(val_idx), "patients": len(split["val"]["patients"])}},
            "trained_findings": list(TRAINED_KEYS),
            "targets": ("image: BCE on log-sum-exp pooled heatmap logits, target = NIH label blended "
                        f"{1 - a.chexnet_weight:g}/{a.chexnet_weight:g} with the CheXNet probability where the image has "
                        "one; heatmaps: CenterNet Gaussians at the real boxes (penalty-reduced focal loss), "
                        "unsupervised for a positive label without a box"),
            "synthetic": {"p": a.p_synth, "renderers": renderers, "held_out_renderer": a.holdout_renderer,
                          "sizes_mm": [6, 45], "label": "nodule (<= 30 mm) / mass (> 30 mm)"},
            "augmentation": ("affine (scale 0.9-1.1, rotation +-6 deg, shift +-5 %) on 75 % of samples, gamma, "
                             "contrast, brightness, blur (20 %), noise (30 %); no flips"),
            "pretrained": "none: random initialisation (no permissively licensed CXR or ImageNet weights in reach)",
            "run": {**{k: v for k, v in run.items() if k != "monitor"}, "epochs": a.epochs, "total_steps": steps,
                    "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed, "device": a.device, "threads": a.threads,
                    "torch": torch.__version__},
            "val_monitor": run["monitor"],
            "checkpoint_choice": "the last EMA weights of the fixed schedule (none chosen on validation)",
        },
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    log.info("wrote %s (%.1f min)", out, (time.perf_counter() - t_start) / 60)
    if not a.no_eval:
        finish_package(a, out, ckpt)
    return 0


def finish_package(a: argparse.Namespace, out: Path, work: Path) -> None:
    """Measure on val (thresholds, enabled flags, figures into the card), then the int8 forms."""
    from .evaluate import package_report
    from .labels import FINDING_KEYS
    from .training.nih14 import default_nih14_root, load_nih14, load_or_make_split
    from .training.ship import guard_set, ship_int8

    root = Path(a.nih14) if a.nih14 else default_nih14_root()
    loro = work / "held-out-renderer-set"
    package_report(out, nih14=root, split_path=a.split, holdout_renderer=a.holdout_renderer, threads=a.threads,
                   report_dir=getattr(a, "report_dir", None), work_dir=loro)
    if getattr(a, "no_int8", False):
        return
    recs = load_nih14(root)
    split = load_or_make_split(recs, a.split)
    train_imgs = sorted(split["train"]["images"])
    pick = np.random.default_rng([a.seed, 5]).choice(len(train_imgs), min(128, len(train_imgs)), replace=False)
    calib = [str(root / "images" / train_imgs[i]) for i in sorted(pick)]
    holdout, labels = guard_set(recs, split, root, list(FINDING_KEYS), loro if loro.is_dir() else None)
    summary = ship_int8(out, calib, holdout, labels, threads=a.threads)
    log.info("int8: %s", summary)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
