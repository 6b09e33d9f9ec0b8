"""``densenet121``: a DenseNet-121-class reference net at 512 x 512, one input channel.

The layout follows torchvision's DenseNet (``features.conv0 / norm0 / pool0 / denseblockN /
transitionN / norm5``; growth 32, blocks (6, 12, 24, 16), bottleneck 4x, 64 initial features),
written in plain torch. For dense prediction the last transition keeps stride 16 (no pooling), so
block 4 and the 1x1 heatmap head run at stride 16 (512 -> 32 x 32 heatmaps). Random init is fine:
it is the GPU benchmark workload, not a trained model.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from . import register_net
from .common import HeatmapHead

__all__ = ["DenseNet"]


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(feats, 1)  # (B, cin, h, w)
        x = self.conv1(self.relu1(self.norm1(x)))  # (B, 4g, h, w)
        return self.conv2(self.relu2(self.norm2(x)))  # (B, g, h, w)


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.values():
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class _Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int, pool: bool) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(cin))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(cin, cout, 1, bias=False))
        if pool:
            self.add_module("pool", nn.AvgPool2d(2, 2))


@register_net("densenet121")
class DenseNet(nn.Module):
    def __init__(self, num_classes: int = 29, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, stride: int = 16, lse_r: float = 4.0) -> None:
        super().__init__()
        if stride not in (16, 32):
            raise ValueError(f"densenet121 supports heatmap stride 16 or 32, got {stride}")
        self.num_classes = int(num_classes)
        self.heatmap_stride = int(stride)
        layers: "OrderedDict[str, nn.Module]" = OrderedDict(
            conv0=nn.Conv2d(1, num_init_features, 7, 2, 3, bias=False),
            norm0=nn.BatchNorm2d(num_init_features),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(3, 2, 1),
        )
        ch = num_init_features
        n_blocks = len(block_config)
        for i, n in enumerate(block_config):
            layers[f"denseblock{i + 1}"] = _DenseBlock(n, ch, growth_rate, bn_size)
            ch += n * growth_rate
            if i != n_blocks - 1:
                # Blocks run at strides 4, 8, 16, 32; with stride 16 the last transition does not pool.
                pool = not (stride == 16 and i == n_blocks - 2)
                layers[f"transition{i + 1}"] = _Transition(ch, ch // 2, pool)
                ch //= 2
        layers["norm5"] = nn.BatchNorm2d(ch)
        self.features = nn.Sequential(layers)
        self.head = HeatmapHead(ch, num_classes, lse_r=lse_r)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.head.conv:
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.features(image))  # (B, 1024, H/s, W/s)
        return self.head(x)  # (B, K), (B, K, H/s, W/s)
