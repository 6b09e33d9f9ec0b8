"""Training samples from real NIH radiographs: labels, boxes, CheXNet soft targets, synthetic nodules.

One sample (:meth:`RealSamples.sample`) from a cached image (``nih14.image_cache``):

1. with probability ``p_synth`` 1-2 synthetic nodules (or masses, 6-45 mm) from the allowed
   renderers (:mod:`cxrkit.synth.nodules`) are drawn into it, each with its box;
2. a random affine (scale 0.9-1.1, rotation +-6 deg, shift +-5 %; none with probability 0.25, so
   training also sees the exact inference input), gamma / contrast / brightness, sometimes blur
   and noise; boxes go through the same affine;
3. targets: image level, per trained finding, the NIH label (1/0), blended with the CheXNet
   probability where the image has one (``(1 - w) label + w p``, ``w = chexnet_weight``), 1 for a
   synthetic lesion; heatmaps, CenterNet Gaussians (peak cell 1) at the boxes. A finding's heatmap
   is supervised only where its location is known: boxed, or absent (label negative); a positive
   label without a box leaves that heatmap unsupervised (``heat_mask`` 0), and so do the findings
   NIH does not label (they stay untrained and disabled in the card).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..labels import NIH14_TO_FINDING
from ..synth._ops import gaussian_blur
from ..synth.nodules import insert_nodule
from .data import SIGMA_FRACTION
from .nih14 import Nih14Record, template_lungs

__all__ = ["RealSamples", "gaussian_targets"]


def gaussian_targets(boxes: Sequence[tuple[int, float, float, float, float]], K: int, hw: tuple[int, int],
                     stride: int) -> np.ndarray:
    """(K, h, w) CenterNet targets: per box (k, x0, y0, x1, y1) in input pixels, a Gaussian whose
    peak cell (the one holding the box centre) is exactly 1, sigma = SIGMA_FRACTION x box size."""
    h, w = hw[0] // stride, hw[1] // stride
    heat = np.zeros((K, h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for k, bx0, by0, bx1, by1 in boxes:
        cx, cy = (bx0 + bx1) / 2 / stride, (by0 + by1) / 2 / stride
        ci, cj = min(h - 1, max(0, int(cy))), min(w - 1, max(0, int(cx)))
        sx = max(0.6, SIGMA_FRACTION * (bx1 - bx0) / stride)
        sy = max(0.6, SIGMA_FRACTION * (by1 - by0) / stride)
        g = np.exp(-0.5 * (((xx - cj) / sx) ** 2 + ((yy - ci) / sy) ** 2))
        heat[k] = np.maximum(heat[k], g)
    return heat


def _affine(rng: np.random.Generator, S: int) -> np.ndarray:
    """3x3 matrix mapping OUTPUT pixel coords to SOURCE pixel coords (PIL's convention)."""
    s = float(rng.uniform(0.9, 1.1))
    a = np.deg2rad(float(rng.uniform(-6, 6)))
    tx, ty = rng.uniform(-0.05, 0.05, 2) * S
    c = S / 2.0
    # forward: p_out = R s (p_src - c) + c + t ; inverse: p_src = (R^T (p_out - c - t)) / s + c
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    inv = R.T / s
    off = c - inv @ np.array([c + tx, c + ty])
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = inv, off
    return m


class RealSamples:
    def __init__(self, cache: np.ndarray, recs: Sequence[Nih14Record], labels: Sequence[str],
                 trained: Sequence[str], stride: int, mean: float, std: float, *, p_synth: float = 0.3,
                 renderers: Sequence[str] | None = None, chexnet_weight: float = 0.5, augment: bool = True) -> None:
        if len(cache) != len(recs):
            raise ValueError(f"cache has {len(cache)} images for {len(recs)} records")
        self.cache, self.recs = cache, list(recs)
        self.S = int(cache.shape[1])
        self.labels, self.index = list(labels), {k: i for i, k in enumerate(labels)}
        self.trained = [k for k in trained if k in self.index]
        self.stride, self.mean, self.std = int(stride), float(mean), float(std)
        self.p_synth, self.renderers = float(p_synth), None if renderers is None else list(renderers)
        self.chexnet_weight, self.augment = float(chexnet_weight), bool(augment)
        self.lungs = template_lungs(self.S)

    def image_targets(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(K,) soft image-level targets and (K,) mask of supervised findings for record ``i``."""
        r, K = self.recs[i], len(self.labels)
        present, mask = np.zeros(K, np.float32), np.zeros(K, np.float32)
        for k in self.trained:
            mask[self.index[k]] = 1.0
        for n in r.names:
            present[self.index[NIH14_TO_FINDING[n]]] = 1.0
        if r.chexnet and self.chexnet_weight > 0:
            soft: dict[int, float] = {}
            for n, p in r.chexnet.items():
                k = self.index.get(NIH14_TO_FINDING.get(n, ""), None)
                if k is not None:
                    soft[k] = max(soft.get(k, 0.0), float(p))
            for k, p in soft.items():
                present[k] = (1 - self.chexnet_weight) * present[k] + self.chexnet_weight * p
        return present, mask

    def sample(self, i: int, rng: np.random.Generator):
        """x (1, S, S) float32 normalized, heat (K, h, w), heat_mask (K,), present (K,), present_mask (K,)."""
        from PIL import Image

        r, S, K = self.recs[i], self.S, len(self.labels)
        img = self.cache[i].astype(np.float32) / 255.0
        scale = S / 1024.0
        boxes = [(self.index[NIH14_TO_FINDING[n]], x0 * scale, y0 * scale, x1 * scale, y1 * scale)
                 for n, x0, y0, x1, y1 in r.boxes]
        present, pmask = self.image_targets(i)
        boxed = {b[0] for b in boxes}
        positive = {self.index[NIH14_TO_FINDING[n]] for n in r.names}
        heat_mask = np.zeros(K, np.float32)
        for k in self.trained:
            j = self.index[k]
            heat_mask[j] = 1.0 if (j in boxed or j not in positive) else 0.0
        if self.augment and rng.random() < self.p_synth:
            spacing = r.spacing_mm / scale
            for _ in range(int(rng.integers(1, 3))):
                les = insert_nodule(img, self.lungs, spacing, rng, renderers=self.renderers, d_mm=(6.0, 45.0))
                j = self.index[les.label]
                boxes.append((j, *les.box_xyxy))
                present[j] = 1.0
                # a real unboxed lesion of this finding would be a false "negative" cell: keep it unsupervised
                heat_mask[j] = 1.0 if (j in boxed or j not in positive) else 0.0
        if self.augment:
            if rng.random() < 0.75:
                m = _affine(rng, S)
                im = Image.fromarray(img, mode="F").transform((S, S), Image.AFFINE, tuple(m[:2].reshape(-1)),
                                                              Image.BILINEAR, fillcolor=0.0)
                img = np.asarray(im, np.float32)
                fwd = np.linalg.inv(m)
                moved = []
                for k, x0, y0, x1, y1 in boxes:
                    pts = fwd @ np.array([[x0, x1, x0, x1], [y0, y0, y1, y1], [1, 1, 1, 1]], np.float64)
                    nx0, ny0 = max(0.0, pts[0].min()), max(0.0, pts[1].min())
                    nx1, ny1 = min(float(S), pts[0].max()), min(float(S), pts[1].max())
                    if nx1 - nx0 >= 2 and ny1 - ny0 >= 2:
                        moved.append((k, nx0, ny0, nx1, ny1))
                    else:  # pushed out of the frame: its location is no longer known
                        heat_mask[k] = 0.0
                boxes = moved
            img = np.clip(img, 0, 1) ** float(rng.uniform(0.8, 1.25))
            mu = float(img.mean())
            img = (img - mu) * float(rng.uniform(0.85, 1.15)) + mu + float(rng.uniform(-0.05, 0.05))
            if rng.random() < 0.2:
                img = gaussian_blur(img, float(rng.uniform(0.3, 1.0)))
            if rng.random() < 0.3:
                img = img + rng.normal(0.0, float(rng.uniform(0.003, 0.012)), img.shape).astype(np.float32)
            img = np.round(np.clip(img, 0, 1) * 255.0) / 255.0  # the 8-bit input inference sees
        x = ((img.astype(np.float32) - self.mean) / self.std)[None]
        heat = gaussian_targets(boxes, K, (S, S), self.stride)
        return x, heat, heat_mask, present, pmask

    def batch(self, idx: Sequence[int], rng: np.random.Generator):
        parts = [self.sample(int(i), rng) for i in idx]
        return tuple(np.stack([p[j] for p in parts]) for j in range(5))

    def eval_inputs(self, idx: Sequence[int]) -> np.ndarray:
        """(N, 1, S, S) un-augmented normalized inputs (what the Detector feeds) of records ``idx``."""
        return ((self.cache[np.asarray(idx)].astype(np.float32) / 255.0 - self.mean) / self.std)[:, None]
