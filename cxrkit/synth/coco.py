"""Write a synthetic evaluation set: PNG images with inserted lesions + COCO ``annotations.json``.

    python -m cxrkit.synth.coco --lungbox /path/to/lungbox --split test --out /tmp/cxr29-eval

Each background of the chosen patient split gets ``per_background`` variants; a variant has no
lesion with probability ``p_normal``, else 1..``max_lesions`` lesions of random findings. Boxes are
in the written image's pixels; every annotation carries ``size_mm``. Deterministic by seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .backgrounds import Background, load_lungbox, split_by_patient
from .lesions import SYNTH_LABELS, insert_lesion

__all__ = ["choose_labels", "write_coco_set"]


def choose_labels(rng: np.random.Generator, labels: Sequence[str], p_normal: float, max_lesions: int,
                  weights: Sequence[float] | None = None) -> list[str]:
    """Random finding list for one image (``weights``: relative frequency per label, default
    uniform); cardiomegaly at most once."""
    if rng.random() < p_normal:
        return []
    n = int(rng.integers(1, max_lesions + 1))
    out: list[str] = []
    p = None if weights is None else np.asarray(weights, np.float64) / float(np.sum(weights))
    for _ in range(n):
        lab = labels[int(rng.choice(len(labels), p=p))] if p is not None else labels[int(rng.integers(0, len(labels)))]
        if lab == "cardiomegaly" and lab in out:
            continue
        out.append(lab)
    return out


def write_coco_set(backgrounds: Sequence[Background], out_dir: "str | Path", *, per_background: int = 20,
                   seed: int = 0, labels: Sequence[str] = SYNTH_LABELS, p_normal: float = 0.25,
                   max_lesions: int = 2, description: str = "") -> Path:
    """Write ``out_dir/images/*.png`` and ``out_dir/annotations.json``; returns the json path."""
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": k} for i, k in enumerate(labels)]
    cat_id = {k: i + 1 for i, k in enumerate(labels)}
    images, anns = [], []
    rng = np.random.default_rng(seed)
    for bi, bg in enumerate(backgrounds):
        for v in range(per_background):
            sub = np.random.default_rng([seed, bi, v])
            labs = choose_labels(sub, list(labels), p_normal, max_lesions)
            img = bg.image.astype(np.float32, copy=True)
            lesions = [insert_lesion(img, bg.lungs_xyxy, bg.spacing_mm, lab, sub) for lab in labs]
            image_id = len(images) + 1
            name = f"{image_id:05d}_{Path(bg.source).stem[:40]}.png"
            Image.fromarray(np.round(img * 255.0).astype(np.uint8)).save(out / "images" / name)
            images.append({"id": image_id, "file_name": name, "height": bg.hw[0], "width": bg.hw[1],
                           "background": bg.source, "patient": bg.patient, "spacing_mm_estimate": round(bg.spacing_mm, 4)})
            for les in lesions:
                x0, y0, x1, y1 = les.box_xyxy
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat_id[les.label],
                             "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                             "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0, "size_mm": round(les.size_mm, 2)})
    del rng
    coco = {"info": {"description": description or "cxrkit.synth synthetic lesions on real radiographs",
                     "seed": seed, "per_background": per_background, "p_normal": p_normal, "max_lesions": max_lesions},
            "categories": cats, "images": images, "annotations": anns}
    path = out / "annotations.json"
    path.write_text(json.dumps(coco, indent=1) + "\n")
    return path


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrkit.synth.coco", description=__doc__.split("\n")[0])
    ap.add_argument("--lungbox", required=True, help="the lungbox folder (annotations.json + images/)")
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-background", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--max-side", type=int, default=1024)
    a = ap.parse_args(argv)
    bgs = split_by_patient(load_lungbox(a.lungbox, a.max_side), seed=a.split_seed)[a.split]
    path = write_coco_set(bgs, a.out, per_background=a.per_background, seed=a.seed,
                          description=f"lungbox {a.split} split (split seed {a.split_seed})")
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
