"""Training samples: augmented backgrounds + synthetic lesions -> (model input, heatmap targets, labels).

The model input is made by the same function inference uses (``preprocess_reference``: 8-bit
quantization, antialiased letterbox, normalization), so training sees what the Detector feeds.
Heatmap targets are CenterNet-style: a Gaussian per lesion whose peak cell (the cell holding the
box centre) is exactly 1, with spreads proportional to the box (``SIGMA_FRACTION``).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from ..preprocess.reference import preprocess_reference
from ..synth import Background, insert_lesion, procedural_chest
from ..synth.coco import choose_labels

__all__ = ["augment_background", "build_bank", "make_sample", "SampleStream", "SIGMA_FRACTION"]

SIGMA_FRACTION = 0.2  # target Gaussian sigma = this x box size (cells), at least 0.6 cell


def _resize_f(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((hw[1], hw[0]), Image.BILINEAR),
                      np.float32)


def augment_background(bg: Background, rng: np.random.Generator, max_side: int = 512) -> Background:
    """Random crop (both lungs kept), horizontal flip, rescale, gamma/contrast/brightness, blur."""
    from ..synth._ops import gaussian_blur

    img, lungs = bg.image, bg.lungs_xyxy.astype(np.float32).copy()
    h, w = img.shape
    ux0, uy0 = float(lungs[:, 0].min()), float(lungs[:, 1].min())
    ux1, uy1 = float(lungs[:, 2].max()), float(lungs[:, 3].max())
    x0 = int(rng.uniform(0, max(0.0, min(ux0, 0.15 * w))))
    y0 = int(rng.uniform(0, max(0.0, min(uy0, 0.15 * h))))
    x1 = w - int(rng.uniform(0, max(0.0, min(w - ux1, 0.15 * w))))
    y1 = h - int(rng.uniform(0, max(0.0, min(h - uy1, 0.15 * h))))
    img = img[y0:y1, x0:x1]
    lungs -= np.array([x0, y0, x0, y0], np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1]
        W = img.shape[1]
        lungs = np.stack([W - lungs[:, 2], lungs[:, 1], W - lungs[:, 0], lungs[:, 3]], 1)[::-1].copy()
    side = max_side * rng.uniform(0.75, 1.0)
    s = min(1.0, side / max(img.shape))
    # Sizes on a 16 px grid: few distinct sizes keep the resize-weight cache of preprocessing warm.
    nh, nw = max(64, 16 * round(img.shape[0] * s / 16)), max(64, 16 * round(img.shape[1] * s / 16))
    sy, sx = nh / img.shape[0], nw / img.shape[1]
    img = _resize_f(np.ascontiguousarray(img), (nh, nw))
    lungs = lungs * np.array([sx, sy, sx, sy], np.float32)
    img = np.clip(img, 0, 1) ** rng.uniform(0.7, 1.4)
    m = float(img.mean())
    img = (img - m) * rng.uniform(0.8, 1.2) + m + rng.uniform(-0.06, 0.06)
    if rng.random() < 0.3:
        img = gaussian_blur(img, rng.uniform(0.4, 1.2))
    spacing = bg.spacing_mm / float(np.sqrt(sx * sy))
    return Background(np.clip(img, 0, 1).astype(np.float32), lungs.astype(np.float32), spacing,
                      bg.source, bg.patient, dict(bg.meta))


def build_bank(real: Sequence[Background], rng: np.random.Generator, n_aug: int = 8, n_procedural: int = 120,
               max_side: int = 512) -> list[Background]:
    """The cached background pool: ``n_aug`` augmentations of each real image + procedural chests."""
    bank = [augment_background(bg, rng, max_side) for bg in real for _ in range(n_aug)]
    for _ in range(n_procedural):
        h = int(rng.integers(int(0.8 * max_side), max_side + 1))
        w = int(rng.integers(int(0.8 * max_side), max_side + 1))
        bank.append(augment_background(procedural_chest(rng, (h, w)), rng, max_side))
    return bank


def _forward_box(box, tf) -> tuple[float, float, float, float]:
    (top, left) = tf.offset_yx
    x0, y0, x1, y1 = box
    return (x0 * tf.scale_x + left, y0 * tf.scale_y + top, x1 * tf.scale_x + left, y1 * tf.scale_y + top)


def make_sample(bank: Sequence[Background], rng: np.random.Generator, labels: Sequence[str],
                trained: Sequence[str], input_hw: tuple[int, int], mean: float, std: float, stride: int,
                p_normal: float = 0.25, max_lesions: int = 3, label_weights: "dict[str, float] | None" = None):
    """One sample: x (1, H, W) float32, heat (K, h, w) float32 targets, present (K,) float32,
    and the lesion boxes in model-input pixels ``[(k, x0, y0, x1, y1), ...]``."""
    bg = bank[int(rng.integers(0, len(bank)))]
    weights = None if not label_weights else [label_weights.get(k, 1.0) for k in trained]
    labs = choose_labels(rng, list(trained), p_normal, max_lesions, weights)
    img = bg.image.astype(np.float32, copy=True)
    lesions = [insert_lesion(img, bg.lungs_xyxy, bg.spacing_mm, lab, rng) for lab in labs]
    if rng.random() < 0.5:
        img += rng.normal(0.0, rng.uniform(0.002, 0.012), img.shape).astype(np.float32)
    q = np.round(np.clip(img, 0, 1) * 255.0).astype(np.uint8)
    x, tf = preprocess_reference(q, (0.0, 255.0), input_hw, mean, std)  # (1, H, W)
    K = len(labels)
    h, w = input_hw[0] // stride, input_hw[1] // stride
    heat = np.zeros((K, h, w), np.float32)
    present = np.zeros((K,), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    boxes = []
    index = {k: i for i, k in enumerate(labels)}
    for les in lesions:
        k = index[les.label]
        bx0, by0, bx1, by1 = _forward_box(les.box_xyxy, tf)
        boxes.append((k, bx0, by0, bx1, by1))
        cx, cy = (bx0 + bx1) / 2 / stride, (by0 + by1) / 2 / stride  # cell units
        ci, cj = min(h - 1, max(0, int(cy))), min(w - 1, max(0, int(cx)))
        sx = max(0.6, SIGMA_FRACTION * (bx1 - bx0) / stride)
        sy = max(0.6, SIGMA_FRACTION * (by1 - by0) / stride)
        g = np.exp(-0.5 * (((xx - cj) / sx) ** 2 + ((yy - ci) / sy) ** 2))
        heat[k] = np.maximum(heat[k], g)
        present[k] = 1.0
    return x, heat, present, boxes


class SampleStream:
    """An endless, seeded stream of samples (a torch IterableDataset is built on it in the loop).

    Each freshly made sample is followed by ``replay`` samples drawn from a reservoir of recent ones
    (mirrored left-right half of the time): making a sample costs about as much CPU as a training
    step on it, so reuse buys more steps per minute on a small machine.
    """

    def __init__(self, bank, labels, trained, input_hw, mean, std, stride, seed: int, replay: int = 1,
                 reservoir: int = 768, label_weights: "dict[str, float] | None" = None) -> None:
        self.label_weights = dict(label_weights or {})
        self.bank, self.labels, self.trained = bank, list(labels), list(trained)
        self.input_hw, self.mean, self.std, self.stride, self.seed = tuple(input_hw), mean, std, stride, seed
        self.replay, self.reservoir = int(replay), int(reservoir)

    def iterate(self, worker: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        rng = np.random.default_rng([self.seed, worker])
        pool: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        while True:
            x, heat, present, _ = make_sample(self.bank, rng, self.labels, self.trained, self.input_hw,
                                              self.mean, self.std, self.stride, label_weights=self.label_weights)
            yield x, heat, present
            if len(pool) < self.reservoir:
                pool.append((x, heat, present))
            else:
                pool[int(rng.integers(0, self.reservoir))] = (x, heat, present)
            for _ in range(self.replay):
                px, ph, pp = pool[int(rng.integers(0, len(pool)))]
                if rng.random() < 0.5:
                    px, ph = np.ascontiguousarray(px[..., ::-1]), np.ascontiguousarray(ph[..., ::-1])
                yield px, ph, pp
