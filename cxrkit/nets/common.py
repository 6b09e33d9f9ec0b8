"""Pieces shared by the trainable nets: the heatmap head and its smooth-max image pooling."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["HeatmapHead", "smooth_max_pool"]


def smooth_max_pool(heat: torch.Tensor, r: float) -> torch.Tensor:
    """Log-sum-exp pooling of (B, K, h, w) logits to (B, K): ``max + log(sum exp(r (x - max))) / r``.

    Always >= the heatmap max and <= max + log(h w) / r, so an image score never contradicts its
    heatmap peaks. Written with ReduceMax / Exp / ReduceSum / Log (no ReduceLogSumExp) so every
    ONNX consumer reads it, and stable in fp16.
    """
    m = heat.amax(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    s = torch.exp((heat - m) * r).sum(dim=(2, 3), keepdim=True)  # (B, K, 1, 1), >= 1
    return (m + torch.log(s) / r).flatten(1)  # (B, K)


class HeatmapHead(nn.Module):
    """1x1 conv to K heatmap logits, bias set to a prior probability (focal-loss style init)."""

    def __init__(self, in_ch: int, num_classes: int, prior: float = 0.01, lse_r: float = 4.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, num_classes, 1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.constant_(self.conv.bias, -math.log((1 - prior) / prior))
        self.lse_r = float(lse_r)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heat = self.conv(feats)  # (B, K, h, w)
        return smooth_max_pool(heat, self.lse_r), heat
