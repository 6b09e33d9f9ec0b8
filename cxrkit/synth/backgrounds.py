"""Backgrounds for lesion insertion: real radiographs with lung boxes, and procedural chests.

A :class:`Background` is a float32 unit-intensity image (0 black .. 1 white, MONOCHROME2: dense
is bright), its two lung boxes (x0, y0, x1, y1 in its own pixels; index 0 is the lung on the
image's left, 1 the one on its right) and a pixel spacing in mm.

Pixel spacing of the real images is unknown (they are web figures, 157-4280 px), so it is
estimated from the lung boxes: an adult lung field is about ``LUNG_HEIGHT_MM`` (250 mm) from apex
to costophrenic angle on a frontal film. Lesion sizes in mm are converted with that estimate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ._ops import gaussian_blur, smooth_noise

__all__ = ["Background", "LUNG_HEIGHT_MM", "load_lungbox", "split_by_patient", "procedural_chest"]

LUNG_HEIGHT_MM = 250.0


@dataclass
class Background:
    image: np.ndarray  # (H, W) float32 in [0, 1]
    lungs_xyxy: np.ndarray  # (2, 4) float32: lung on the image's left, lung on its right
    spacing_mm: float
    source: str = ""
    patient: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


def _spacing_from_lungs(lungs: np.ndarray) -> float:
    h = float(np.mean(lungs[:, 3] - lungs[:, 1]))
    return LUNG_HEIGHT_MM / max(h, 1.0)


def load_lungbox(root: "str | Path", max_side: int = 1024) -> list[Background]:
    """Read the lungbox folder (``annotations.json`` + ``images/``), gray, longest side <= ``max_side``."""
    from PIL import Image

    root = Path(root)
    coco = json.loads((root / "annotations.json").read_text())
    by_img: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    out = []
    for rec in sorted(coco["images"], key=lambda r: r["file_name"]):
        anns = by_img.get(rec["id"], [])
        if len(anns) != 2:
            continue
        with Image.open(root / "images" / rec["file_name"]) as im:
            im = im.convert("L")
            scale = min(1.0, max_side / max(im.size))
            if scale < 1.0:
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
            arr = np.asarray(im, np.float32) / 255.0
        sx = arr.shape[1] / rec["width"]
        sy = arr.shape[0] / rec["height"]
        boxes = np.array([[b[0] * sx, b[1] * sy, (b[0] + b[2]) * sx, (b[1] + b[3]) * sy]
                          for b in (a["bbox"] for a in anns)], np.float32)
        boxes = boxes[np.argsort(boxes[:, 0] + boxes[:, 2])]  # image-left lung first
        meta = rec.get("metadata", {})
        out.append(Background(arr, boxes, _spacing_from_lungs(boxes), rec["file_name"],
                              str(meta.get("patientid", rec["file_name"])),
                              {"view": meta.get("view"), "finding": meta.get("finding")}))
    return out


def split_by_patient(bgs: Sequence[Background], fractions: Sequence[float] = (0.6, 0.2, 0.2),
                     seed: int = 0, names: Sequence[str] = ("train", "val", "test")) -> dict[str, list[Background]]:
    """Split so that no patient is in two parts; each part gets about its fraction of images."""
    patients = sorted({b.patient for b in bgs})
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    counts = {p: sum(b.patient == p for b in bgs) for p in patients}
    total = len(bgs)
    targets = [f * total for f in fractions]
    parts: dict[str, list[str]] = {n: [] for n in names}
    have = [0.0] * len(names)
    for p in patients:
        # Give the patient to the part furthest below its target (relative), last parts first on ties.
        i = max(range(len(names)), key=lambda j: (targets[j] - have[j]) / max(targets[j], 1e-9))
        parts[names[i]].append(p)
        have[i] += counts[p]
    return {n: [b for b in bgs if b.patient in set(parts[n])] for n in names}


def _superellipse(xx, yy, cx, cy, rx, ry, p=3.0):
    return (np.abs((xx - cx) / rx) ** p + np.abs((yy - cy) / ry) ** p) ** (1.0 / p)


def procedural_chest(rng: np.random.Generator, hw: tuple[int, int] = (512, 512)) -> Background:
    """A synthetic frontal chest: body, two lungs with domes, heart, spine, ribs, clavicles, vessels."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    u = np.full((h, w), 0.04 + 0.04 * rng.random(), np.float32)
    cx = w * (0.5 + 0.03 * rng.standard_normal())
    body = _superellipse(xx, yy, cx, h * 0.58, w * (0.44 + 0.04 * rng.random()), h * 0.62, 2.5)
    tissue = 0.55 + 0.15 * rng.random()
    u = np.where(body < 1, tissue + 0.1 * (1 - body), u).astype(np.float32)
    top = h * (0.10 + 0.05 * rng.random())
    bottom = h * (0.72 + 0.1 * rng.random())
    gap = w * (0.05 + 0.03 * rng.random())
    lung_w = w * (0.30 + 0.06 * rng.random())
    lungs = np.array([[cx - gap - lung_w, top, cx - gap, bottom],
                      [cx + gap, top + h * 0.01, cx + gap + lung_w, bottom - h * 0.02]], np.float32)
    level = 0.15 + 0.15 * rng.random()
    mask = np.zeros((h, w), np.float32)
    for x0, y0, x1, y1 in lungs:
        e = _superellipse(xx, yy, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2, 3.0)
        mask = np.maximum(mask, (e < 1).astype(np.float32))
    mask = gaussian_blur(mask, w / 150)
    lung_u = level + 0.12 * (yy / h)  # denser toward the bases
    u = u * (1 - mask) + lung_u * mask
    # Heart and mediastinum.
    heart = _superellipse(xx, yy, cx + w * 0.04, bottom - h * 0.12, w * (0.14 + 0.04 * rng.random()), h * 0.14, 2.0)
    medi = _superellipse(xx, yy, cx, top + h * 0.15, w * 0.06, h * 0.3, 2.0)
    soft = gaussian_blur(np.maximum((heart < 1), (medi < 1)).astype(np.float32), w / 120)
    u = u * (1 - soft) + (tissue + 0.05) * soft
    # Diaphragm domes below the lungs.
    for x0, y0, x1, y1 in lungs:
        dome = yy > y1 - (y1 - y0) * 0.08 * (1 - ((xx - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2)
        band = (xx > x0 - w * 0.02) & (xx < x1 + w * 0.02) & dome & (yy > y0 + (y1 - y0) * 0.5)
        u = np.where(band, np.maximum(u, tissue), u)
    # Spine, ribs, clavicles (bone adds density).
    bone = np.exp(-0.5 * ((xx - cx) / (w * 0.03)) ** 2) * 0.12 * (body < 1)
    for side in (-1, 1):
        for i in range(10):
            y0 = top + (bottom - top) * (i / 10.0) + h * 0.01 * rng.standard_normal()
            curve = y0 + h * 0.10 * ((xx - cx) / (w * 0.45)) ** 2 * side ** 2 - h * 0.02
            thick = h * (0.010 + 0.004 * rng.random())
            on_side = (xx - cx) * side > gap * 0.5
            bone += 0.07 * np.exp(-0.5 * ((yy - curve) / thick) ** 2) * on_side * (body < 1)
        clav_y = top + h * 0.02 + (xx - cx) * side * 0.15
        bone += 0.08 * np.exp(-0.5 * ((yy - clav_y) / (h * 0.012)) ** 2) * ((xx - cx) * side > 0) * (
            np.abs(xx - cx) < w * 0.3)
    u = u + bone.astype(np.float32)
    # Vessels: random walks from each hilum, tapering, only inside the lungs.
    ves = np.zeros((h, w), np.float32)
    for k, (x0, y0, x1, y1) in enumerate(lungs):
        hx, hy = (x1 if k == 0 else x0), (y0 + y1) / 2
        for _ in range(14):
            x, y = hx, hy + h * 0.05 * rng.standard_normal()
            ang = np.pi * (rng.random() - 0.5) + (np.pi if k == 0 else 0.0)
            amp = 0.08
            for _step in range(60):
                ang += 0.25 * rng.standard_normal()
                x += np.cos(ang) * w * 0.006
                y += np.sin(ang) * h * 0.006
                xi, yi = int(x), int(y)
                if 0 <= xi < w and 0 <= yi < h:
                    ves[yi, xi] += amp
                amp *= 0.96
    ves = gaussian_blur(ves, w / 400 + 0.6) * 6.0
    u = u + ves * mask
    u = u + 0.02 * smooth_noise(rng, (h, w), w / 40) + 0.01 * smooth_noise(rng, (h, w), w / 200)
    u = np.clip(gaussian_blur(u, 0.7) + 0.006 * rng.standard_normal((h, w)).astype(np.float32), 0, 1)
    return Background(u.astype(np.float32), lungs, _spacing_from_lungs(lungs), "procedural", "procedural")
