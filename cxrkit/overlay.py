"""Overlay PNGs: the radiograph with each positive finding's boxes, points and name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .labels import display_name
from .results import Prediction

__all__ = ["render_overlay", "display_pixels"]

_COLORS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


def display_pixels(item, index: int = 0) -> np.ndarray:
    """The input as an 8-bit gray display image (bone bright), through the same io as prediction."""
    from .io import decode_pixels, load_item

    img = load_item(item, index)
    if img.pixels is None:
        img = decode_pixels(img)
    lo, hi = img.value_range
    u = (img.pixels.astype(np.float32) - lo) / max(hi - lo, 1e-6)
    return (np.clip(u, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_overlay(item, pred: Prediction, out_path: "str | Path", max_side: int = 1600) -> Path:
    from PIL import Image, ImageDraw

    gray = display_pixels(item, pred.index)
    im = Image.fromarray(gray).convert("RGB")
    scale = min(1.0, max_side / max(im.size))
    if scale < 1.0:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    width = max(2, round(max(im.size) / 400))
    y_text = 4
    for i, (key, f) in enumerate(pred.findings.items()):
        if not f.positive:
            continue
        color = _COLORS[i % len(_COLORS)]
        name = display_name(key)  # labels outside the ontology (imported models) too
        draw.text((6, y_text), f"{name} {f.score:.2f}", fill=color)
        y_text += 14
        for (x0, y0, x1, y1), (px, py), s in zip(f.boxes_xyxy * scale, f.points_xy * scale, f.box_scores):
            draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
            r = 2 * width
            draw.ellipse([px - r, py - r, px + r, py + r], outline=color, width=1)
            draw.text((x0 + 3, max(0, y0 - 13)), f"{name} {s:.2f}", fill=color)
    draw.text((6, im.height - 16), "cxrkit demo - not for clinical use", fill=(255, 255, 255))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    im.save(out_path)
    return out_path
