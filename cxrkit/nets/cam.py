"""Imported classifiers with class activation maps: torchvision's DenseNet and ResNet layouts.

``densenet_cam`` and ``resnet_cam`` are torchvision's ``DenseNet`` / ``ResNet`` (Bottleneck)
written again in plain torch with the *same module names*, so a torchvision, CheXNet-style or
torchxrayvision state_dict loads into them key for key (``features.denseblock1.denselayer1.conv1``,
``layer1.0.downsample.0``, ``classifier`` / ``fc``). Forward meets the cxrkit contract:

    image (B, 1, H, W) in the card's normalized space
      -> input adapter: replicate to ``in_channels``, per-channel (x - mean_c) / std_c   (optional)
      -> backbone -> feature map F (B, C, H/32, W/32)  (DenseNet: relu(norm5); ResNet: layer4)
      -> logits   = Linear(GlobalAvgPool(F))             exactly the source classifier
      -> heatmaps = Conv1x1(F) with the Linear's weight and bias   (class activation maps)

Because the classifier is linear after a global average, ``logits == heatmaps.mean((2, 3))``
up to float rounding: an image score is the mean of its CAM, so localization and scores agree.
The CAM is part of the graph (a 1x1 Conv in ONNX), so every backend computes it.

The adapter's constants come from ``arch_kwargs`` (non-persistent buffers), not from the weights
file: the safetensors file holds only the source model's own tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import register_net
from .densenet import _DenseBlock, _Transition

__all__ = ["InputAdapter", "CamDenseNet", "CamResNet", "DENSENET_CONFIGS", "RESNET_CONFIGS"]

DENSENET_CONFIGS = {
    "densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
    "densenet169": dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64),
    "densenet201": dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64),
}
RESNET_CONFIGS = {
    "resnet50": dict(layers=(3, 4, 6, 3)),
    "resnet101": dict(layers=(3, 4, 23, 3)),
}


class InputAdapter(nn.Module):
    """(B, 1, H, W) -> (B, C, H, W): gray replicated to C channels, then ``(x - mean_c) / std_c``.

    Written as Expand, Sub, Div (the ops of torchvision's ``Normalize`` on a replicated gray
    image), so the converted graph sees the same numbers as the source model."""

    def __init__(self, in_channels: int = 1, channel_mean: Sequence[float] | None = None,
                 channel_std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        if (channel_mean is None) != (channel_std is None):
            raise ValueError("channel_mean and channel_std go together")
        self.normalize = channel_mean is not None
        if self.normalize:
            if len(channel_mean) != self.in_channels or len(channel_std) != self.in_channels:
                raise ValueError(f"channel_mean / channel_std need {self.in_channels} values, got "
                                 f"{len(channel_mean)} / {len(channel_std)}")
            if any(float(s) <= 0 for s in channel_std):
                raise ValueError(f"channel_std must be > 0, got {list(channel_std)}")
            self.register_buffer("mean", torch.tensor([float(v) for v in channel_mean]).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor([float(v) for v in channel_std]).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels != 1:
            x = x.expand(-1, self.in_channels, -1, -1)  # (B, C, H, W)
        if self.normalize:
            x = (x - self.mean) / self.std  # (B, C, H, W)
        return x


def _cam(feats: torch.Tensor, fc: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    pooled = F.adaptive_avg_pool2d(feats, (1, 1)).flatten(1)  # (B, C)
    logits = fc(pooled)  # (B, K)
    heat = F.conv2d(feats, fc.weight[:, :, None, None], fc.bias)  # (B, K, h, w)
    return logits, heat


@register_net("densenet_cam")
class CamDenseNet(nn.Module):
    """torchvision ``DenseNet`` (121 by default; 169 / 201 by ``block_config``) with a CAM head."""

    heatmap_stride = 32

    def __init__(self, num_classes: int, in_channels: int = 3, channel_mean: Sequence[float] | None = None,
                 channel_std: Sequence[float] | None = None, growth_rate: int = 32,
                 block_config: Sequence[int] = (6, 12, 24, 16), num_init_features: int = 64, bn_size: int = 4) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.adapter = InputAdapter(in_channels, channel_mean, channel_std)
        layers: "OrderedDict[str, nn.Module]" = OrderedDict(
            conv0=nn.Conv2d(in_channels, num_init_features, 7, 2, 3, bias=False),
            norm0=nn.BatchNorm2d(num_init_features),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(3, 2, 1),
        )
        ch = num_init_features
        for i, n in enumerate(block_config):
            layers[f"denseblock{i + 1}"] = _DenseBlock(int(n), ch, growth_rate, bn_size)
            ch += int(n) * growth_rate
            if i != len(block_config) - 1:
                layers[f"transition{i + 1}"] = _Transition(ch, ch // 2, pool=True)
                ch //= 2
        layers["norm5"] = nn.BatchNorm2d(ch)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(ch, num_classes)
        self.num_features = ch

    def feature_map(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> the map the classifier pools, (B, C, H/32, W/32)."""
        return F.relu(self.features(self.adapter(image)))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _cam(self.feature_map(image), self.classifier)  # (B, K), (B, K, H/32, W/32)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # torchvision v1.5: stride here
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


@register_net("resnet_cam")
class CamResNet(nn.Module):
    """torchvision ``ResNet`` with Bottleneck blocks (50 by default; 101 by ``layers``) with a CAM head."""

    heatmap_stride = 32

    def __init__(self, num_classes: int, in_channels: int = 3, channel_mean: Sequence[float] | None = None,
                 channel_std: Sequence[float] | None = None, layers: Sequence[int] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.adapter = InputAdapter(in_channels, channel_mean, channel_std)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for j in range(int(n)):
                blocks.append(_Bottleneck(cin, planes, 2 if (j == 0 and i > 0) else 1))
                cin = planes * _Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin

    def feature_map(self, image: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.adapter(image)))))  # (B, 64, H/4, W/4)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, H/32, W/32)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _cam(self.feature_map(image), self.fc)  # (B, K), (B, K, H/32, W/32)
