"""Letterbox geometry: fit an image into the model input keeping its aspect ratio.

Conventions (written once, used by preprocessing and by the mapping of results back):
- Continuous pixel coordinates: pixel (i, j) covers [j, j+1) x [i, i+1); its centre is (j+0.5, i+0.5).
- scale = min(H / h, W / w); the resized image is (nh, nw) = (max(1, round(h*scale)), max(1, round(w*scale))).
- It is placed at offset (top, left) = ((H - nh) // 2, (W - nw) // 2); the rest is padding.
- The exact per-axis scales are sy = nh / h and sx = nw / w, so the resized image edges map
  exactly onto the source image edges: x_src = (x_dst - left) / sx.

Other fits (a model card's ``input.fit``, for imported models whose own preprocessing is not a
letterbox), with the same transform and the same mapping back:
- "center_crop": scale = max(H / h, W / w) (the shorter side fills the input), the resized image
  is centred and what overflows is cut: torchvision's Resize(S) + CenterCrop(S), torchxrayvision's
  XRayCenterCrop + XRayResizer. The offset is negative: (top, left) = -round((nh - H) / 2), ...
- "stretch": each axis scaled to fill the input, aspect ratio not kept (Resize((H, W))).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["LetterboxTransform", "letterbox_geometry", "FITS"]

FITS = ("letterbox", "center_crop", "stretch")


@dataclass(frozen=True)
class LetterboxTransform:
    src_hw: tuple[int, int]
    dst_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    offset_yx: tuple[int, int]

    @property
    def scale_y(self) -> float:
        return self.resized_hw[0] / self.src_hw[0]

    @property
    def scale_x(self) -> float:
        return self.resized_hw[1] / self.src_hw[1]

    def points_to_source(self, points_xy: np.ndarray) -> np.ndarray:
        """(N, 2) model-input x, y -> source-image x, y (float32), clipped to the image."""
        p = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        out = np.empty_like(p)
        out[:, 0] = (p[:, 0] - self.offset_yx[1]) / self.scale_x
        out[:, 1] = (p[:, 1] - self.offset_yx[0]) / self.scale_y
        np.clip(out[:, 0], 0.0, self.src_hw[1], out=out[:, 0])
        np.clip(out[:, 1], 0.0, self.src_hw[0], out=out[:, 1])
        return out.astype(np.float32)

    def boxes_to_source(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """(N, 4) model-input x0, y0, x1, y1 -> source-image boxes (float32), clipped to the image."""
        b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        pts = self.points_to_source(b.reshape(-1, 2))
        return pts.reshape(-1, 4)

    def to_dict(self) -> dict:
        return {
            "src_hw": list(self.src_hw),
            "dst_hw": list(self.dst_hw),
            "resized_hw": list(self.resized_hw),
            "offset_yx": list(self.offset_yx),
        }


def letterbox_geometry(src_hw: tuple[int, int], dst_hw: tuple[int, int], fit: str = "letterbox") -> LetterboxTransform:
    # a transform is immutable, and a batch's images mostly share a few sizes: one object per
    # geometry (the frozen dataclass' __init__ was ~2 µs of every image's preprocessing)
    return _geometry(int(src_hw[0]), int(src_hw[1]), int(dst_hw[0]), int(dst_hw[1]), fit)


@functools.lru_cache(maxsize=4096)
def _geometry(h: int, w: int, H: int, W: int, fit: str) -> LetterboxTransform:
    if h <= 0 or w <= 0:
        raise ValueError(f"source size must be positive, got {(h, w)}")
    if fit == "stretch":
        return LetterboxTransform((h, w), (H, W), (H, W), (0, 0))
    if fit == "center_crop":
        scale = max(H / h, W / w)
        nh, nw = max(H, int(round(h * scale))), max(W, int(round(w * scale)))
        # torchvision's CenterCrop: crop_top = int(round((nh - H) / 2.0))
        return LetterboxTransform((h, w), (H, W), (nh, nw), (-int(round((nh - H) / 2.0)), -int(round((nw - W) / 2.0))))
    if fit != "letterbox":
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    scale = min(H / h, W / w)
    nh = min(H, max(1, int(round(h * scale))))
    nw = min(W, max(1, int(round(w * scale))))
    return LetterboxTransform((h, w), (H, W), (nh, nw), ((H - nh) // 2, (W - nw) // 2))
