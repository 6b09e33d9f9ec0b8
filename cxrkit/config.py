"""Frozen configuration: devices, precisions and the detector's tunables."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["Device", "Precision", "DetectorConfig", "LocalizeConfig", "Limits"]


class Device(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"

    @classmethod
    def parse(cls, value: "str | Device") -> "Device":
        if isinstance(value, Device):
            return value
        v = str(value).lower()
        if v.startswith("cuda"):
            return cls.CUDA
        if v == "cpu":
            return cls.CPU
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {value!r}")


def device_index(value: str) -> int:
    """'cuda:1' -> 1, 'cuda' -> 0, 'cpu' -> -1."""
    v = str(value).lower()
    if v == "cpu":
        return -1
    if ":" in v:
        return int(v.split(":", 1)[1])
    return 0


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"

    @classmethod
    def parse(cls, value: "str | Precision") -> "Precision":
        if isinstance(value, Precision):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(
                f"precision must be one of {[p.value for p in cls]}, got {value!r}"
            ) from None


@dataclass(frozen=True)
class LocalizeConfig:
    """How heatmaps become boxes. Units: heatmap cells unless named otherwise.

    max_peaks: at most this many peaks per (image, finding), kept by score.
    region_fraction: a peak's region is the 4-connected set of cells whose probability
        is >= region_fraction * peak probability.
    max_extent: the region is searched within +-max_extent cells of the peak.
    iou_threshold: per-finding NMS suppresses a box whose IoU with a kept box is > this.
    """

    max_peaks: int = 16
    region_fraction: float = 0.5
    max_extent: int = 32
    iou_threshold: float = 0.3

    def __post_init__(self) -> None:
        if not 1 <= self.max_peaks <= 64:
            raise ValueError(f"max_peaks must be in [1, 64], got {self.max_peaks}")
        if not 0.0 < self.region_fraction <= 1.0:
            raise ValueError(f"region_fraction must be in (0, 1], got {self.region_fraction}")
        if not 0 <= self.max_extent <= 64:
            raise ValueError(f"max_extent must be in [0, 64], got {self.max_extent}")
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {self.iou_threshold}")


@dataclass(frozen=True)
class Limits:
    """Resource limits applied to every input item (decompression-bomb guards)."""

    max_pixels: int = 100_000_000
    max_file_bytes: int = 512 * 1024 * 1024
    decode_timeout_s: float = 60.0


@dataclass(frozen=True)
class DetectorConfig:
    device: Device = Device.CPU
    precision: Precision = Precision.FP32
    backend: str = "auto"
    batch_size: int = 8
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)
    limits: Limits = field(default_factory=Limits)
    voi_window_index: int = 0
    return_heatmaps: bool = False
    preprocess_backend: str = "auto"  # "dali" | "numpy" | "auto"
    num_threads: int = 2
