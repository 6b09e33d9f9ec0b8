"""Small numpy image operations shared by the lesion renderers (no scipy needed)."""

from __future__ import annotations

import numpy as np

__all__ = ["gaussian_blur", "smooth_noise", "blend_attenuation", "blend_toward", "box_of", "Patch"]


def _kernel(sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float array, edges replicated."""
    if sigma <= 0.05:
        return img.astype(np.float32, copy=True)
    k = _kernel(sigma)
    r = len(k) // 2
    out = np.pad(img.astype(np.float32), ((r, r), (0, 0)), mode="edge")
    out = sum(k[i] * out[i:i + img.shape[0]] for i in range(len(k)))  # (H, W)
    out = np.pad(out, ((0, 0), (r, r)), mode="edge")
    return sum(k[i] * out[:, i:i + img.shape[1]] for i in range(len(k))).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std noise low-passed at ``sigma`` pixels (coarse sampling, then upsampled)."""
    h, w = shape
    step = max(1.0, sigma / 2.0)
    gh, gw = int(np.ceil(h / step)) + 2, int(np.ceil(w / step)) + 2
    g = gaussian_blur(rng.standard_normal((gh, gw)).astype(np.float32), 2.0)
    yy = np.clip(np.arange(h) / step, 0, gh - 1.001)
    xx = np.clip(np.arange(w) / step, 0, gw - 1.001)
    y0, x0 = yy.astype(int), xx.astype(int)
    fy, fx = (yy - y0)[:, None], (xx - x0)[None, :]
    out = (g[y0][:, x0] * (1 - fy) * (1 - fx) + g[y0 + 1][:, x0] * fy * (1 - fx)
           + g[y0][:, x0 + 1] * (1 - fy) * fx + g[y0 + 1][:, x0 + 1] * fy * fx)
    out -= out.mean()
    return (out / (out.std() + 1e-6)).astype(np.float32)


class Patch:
    """A window of an image around a lesion: pixel grid coordinates in image pixels."""

    def __init__(self, img_hw: tuple[int, int], cx: float, cy: float, rx: float, ry: float) -> None:
        h, w = img_hw
        self.x0 = int(np.clip(np.floor(cx - rx), 0, w - 1))
        self.x1 = int(np.clip(np.ceil(cx + rx) + 1, self.x0 + 1, w))
        self.y0 = int(np.clip(np.floor(cy - ry), 0, h - 1))
        self.y1 = int(np.clip(np.ceil(cy + ry) + 1, self.y0 + 1, h))
        # Pixel-centre coordinates of the window.
        self.xx = (np.arange(self.x0, self.x1, dtype=np.float32) + 0.5)[None, :]
        self.yy = (np.arange(self.y0, self.y1, dtype=np.float32) + 0.5)[:, None]

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


def blend_attenuation(img: np.ndarray, patch: Patch, atten: np.ndarray) -> None:
    """Add tissue in place: ``u' = 1 - (1 - u) exp(-a)`` (a >= 0 brightens, saturating at 1; a < 0 darkens)."""
    sl = patch.slices
    u = img[sl]
    img[sl] = np.clip(1.0 - (1.0 - u) * np.exp(-atten), 0.0, 1.0)


def blend_toward(img: np.ndarray, patch: Patch, level, weight: np.ndarray) -> None:
    """Fill toward a tissue ``level`` in place: ``u' = u + (max(u, level) - u) w``; never darkens,
    and what is already as dense as the level (heart, bone) is left as it is."""
    sl = patch.slices
    u = img[sl]
    img[sl] = np.clip(u + (np.maximum(u, level) - u) * weight, 0.0, 1.0)


def box_of(patch: Patch, weight: np.ndarray, frac: float = 0.15) -> tuple[float, float, float, float] | None:
    """xyxy box (image pixels, pixel edges) of the cells where ``weight >= frac * max``."""
    m = float(np.abs(weight).max())
    if m <= 0:
        return None
    ys, xs = np.nonzero(np.abs(weight) >= frac * m)
    return (float(patch.x0 + xs.min()), float(patch.y0 + ys.min()),
            float(patch.x0 + xs.max() + 1), float(patch.y0 + ys.max() + 1))
