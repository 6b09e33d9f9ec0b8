"""Letterbox geometry: fit an image into the model input keeping its aspect ratio.

Conventions (written once, used by preprocessing and by the mapping of results back):
- Continuous pixel coordinates: pixel (i, j) covers [j, j+1) x [i, i+1); its centre is (j+0.5, i+0.5).
- scale = min(H / h, W / w); the resized image is (nh, nw) = (max(1, round(h*scale)), max(1, round(w*scale))).
- It is placed at offset (top, left) = ((H - nh) // 2, (W - nw) // 2); the rest is padding.
- The exact per-axis scales are sy = nh / h and sx = nw / w, so the resized image edges map
  exactly onto the source image edges: x_src = (x_dst - left) / sx.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LetterboxTransform", "letterbox_geometry"]


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


def letterbox_geometry(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> LetterboxTransform:
    h, w = int(src_hw[0]), int(src_hw[1])
    H, W = int(dst_hw[0]), int(dst_hw[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"source size must be positive, got {src_hw}")
    scale = min(H / h, W / w)
    nh = min(H, max(1, int(round(h * scale))))
    nw = min(W, max(1, int(round(w * scale))))
    return LetterboxTransform((h, w), (H, W), (nh, nw), ((H - nh) // 2, (W - nw) // 2))
