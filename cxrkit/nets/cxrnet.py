"""``cxrnet``: the compact default detector (a few hundred k parameters; trains on a laptop CPU).

Depthwise-separable stages down to stride 32 for context, a small top-down FPN back to the
heatmap stride (8 by default, 16 allowed), a 1x1 heatmap head, and image logits by smooth-max
(log-sum-exp) pooling of the heatmap logits, so image scores and localization agree.

At 256 x 256 input and width 1.0: about 0.3 M parameters, 0.2 GFLOP per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register_net
from .common import HeatmapHead

__all__ = ["CxrNet"]


def _cbr(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DSBlock(nn.Module):
    """Depthwise k x k (stride s) then pointwise 1x1; residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int = 1, k: int = 3) -> None:
        super().__init__()
        self.dw = _cbr(cin, cin, k, stride, groups=cin)
        self.pw = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw(self.dw(x))
        return F.relu(y + x if self.residual else y)


def _stage(cin: int, cout: int, depth: int, k: int) -> nn.Sequential:
    return nn.Sequential(DSBlock(cin, cout, 2, k), *[DSBlock(cout, cout, 1, k) for _ in range(depth - 1)])


@register_net("cxrnet")
class CxrNet(nn.Module):
    def __init__(self, num_classes: int = 29, width: float = 1.0, stride: int = 8, fpn_ch: int = 64,
                 lse_r: float = 4.0) -> None:
        super().__init__()
        if stride not in (8, 16):
            raise ValueError(f"cxrnet supports heatmap stride 8 or 16, got {stride}")
        c = [max(8, int(round(v * width / 8)) * 8) for v in (24, 32, 64, 128, 192)]
        self.num_classes = int(num_classes)
        self.heatmap_stride = int(stride)
        self.stem = _cbr(1, c[0], 3, 2)  # s2
        self.stage1 = _stage(c[0], c[1], 2, 3)  # s4
        self.stage2 = _stage(c[1], c[2], 3, 3)  # s8
        self.stage3 = _stage(c[2], c[3], 4, 5)  # s16
        self.stage4 = _stage(c[3], c[4], 3, 5)  # s32
        self.lat2 = nn.Conv2d(c[2], fpn_ch, 1)
        self.lat3 = nn.Conv2d(c[3], fpn_ch, 1)
        self.lat4 = nn.Conv2d(c[4], fpn_ch, 1)
        self.fuse = nn.Sequential(DSBlock(fpn_ch, fpn_ch, 1, 3), DSBlock(fpn_ch, fpn_ch, 1, 3))
        self.head = HeatmapHead(fpn_ch, num_classes, lse_r=lse_r)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.head.conv:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1 = self.stage1(self.stem(image))  # (B, c1, H/4, W/4)
        x2 = self.stage2(x1)  # (B, c2, H/8, W/8)
        x3 = self.stage3(x2)  # (B, c3, H/16, W/16)
        x4 = self.stage4(x3)  # (B, c4, H/32, W/32)
        p = self.lat3(x3) + F.interpolate(self.lat4(x4), scale_factor=2.0, mode="nearest")  # (B, F, H/16, W/16)
        if self.heatmap_stride == 8:
            p = self.lat2(x2) + F.interpolate(p, scale_factor=2.0, mode="nearest")  # (B, F, H/8, W/8)
        return self.head(self.fuse(p))  # (B, K), (B, K, H/s, W/s)
