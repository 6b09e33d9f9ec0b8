"""Writing an imported model as a cxrkit package: card.json, model.onnx, weights.safetensors.

Every file the card names carries its sha256 (the card schema requires it). The folder is
written in a temporary sibling and renamed into place, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ModelError
from ..labels import FINDINGS
from ..models import ModelPackage, load_model_package, sha256_file

__all__ = ["InputConvention", "NORMALIZATIONS", "input_convention", "build_card", "write_package",
           "DEFAULT_THRESHOLD", "probe_inputs"]

log = logging.getLogger(__name__)

#: the operating threshold of a label whose source gives none (a probability)
DEFAULT_THRESHOLD = 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("imagenet", "xrv", "none")


@dataclass(frozen=True)
class InputConvention:
    """How the source model wants its input, split into what cxrkit's preprocessing does (scalar
    ``mean`` / ``std`` on the unit range, ``fit``) and what the graph does (``channels``,
    ``channel_mean`` / ``channel_std``)."""

    name: str  # imagenet / xrv / none
    mean: float
    std: float
    fit: str
    channels: int
    channel_mean: tuple[float, ...] | None = None
    channel_std: tuple[float, ...] | None = None
    description: str = ""

    def arch_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"in_channels": self.channels}
        if self.channel_mean is not None:
            kw["channel_mean"] = list(self.channel_mean)
            kw["channel_std"] = list(self.channel_std or ())
        return kw

    def card_entry(self) -> dict[str, Any]:
        d: dict[str, Any] = {"fit": self.fit, "channels": self.channels, "convention": self.name}
        if self.channel_mean is not None:
            d["channel_mean"] = list(self.channel_mean)
            d["channel_std"] = list(self.channel_std or ())
        if self.description:
            d["source_preprocessing"] = self.description
        return d


def input_convention(normalize: str, channels: int, fit: str) -> InputConvention:
    """The convention ``normalize`` (imagenet / xrv / none) for a net with ``channels`` inputs."""
    if normalize == "imagenet":
        if channels != 3:
            raise ModelError(f"--normalize imagenet needs a 3-channel network (ImageNet mean/std per RGB channel); "
                             f"this one takes {channels} channel(s): use --normalize xrv or none")
        return InputConvention("imagenet", 0.0, 1.0, fit, 3, IMAGENET_MEAN, IMAGENET_STD,
                               "8-bit gray replicated to RGB, unit range, ImageNet mean/std per channel "
                               "(torchvision ToTensor + Normalize)")
    if normalize == "xrv":
        from .xrv import XRV_MEAN, XRV_STD

        return InputConvention("xrv", XRV_MEAN, XRV_STD, fit, channels, None, None,
                               "gray scaled to [-1024, 1024] (torchxrayvision normalize), centre crop, resize"
                               + (f", replicated to {channels} channels" if channels > 1 else ""))
    if normalize == "none":
        return InputConvention("none", 0.0, 1.0, fit, channels, None, None,
                               "gray in the unit range [0, 1]" + (f", replicated to {channels} channels" if channels > 1 else ""))
    raise ModelError(f"--normalize must be one of {NORMALIZATIONS}, got {normalize!r}")


def _prob(v: Any, what: str) -> float:
    f = float(v)
    if not (0.0 < f < 1.0) or math.isnan(f):
        raise ModelError(f"{what}: a threshold is a probability in (0, 1), got {v!r}")
    return f


def build_card(*, name: str, labels: Sequence[str], label_names: Mapping[str, str], input_hw: tuple[int, int],
               conv: InputConvention, heatmap_stride: int, arch: str | None, arch_kwargs: Mapping[str, Any] | None,
               thresholds: Mapping[str, float], heatmap_thresholds: Mapping[str, float] | None,
               enabled: Mapping[str, bool], source: Mapping[str, Any], heatmap: Mapping[str, Any],
               description: str) -> dict[str, Any]:
    ths = {k: _prob(thresholds.get(k, DEFAULT_THRESHOLD), f"threshold of {k!r}") for k in labels}
    hth = {k: _prob((heatmap_thresholds or {}).get(k, ths[k]), f"heatmap threshold of {k!r}") for k in labels}
    card: dict[str, Any] = {
        "schema_version": 1,
        "name": name,
        "version": "imported",
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "labels": list(labels),
        "label_names": {k: str(label_names.get(k, k)) for k in labels},
        "input_size": [int(input_hw[0]), int(input_hw[1])],
        "normalization": {"mean": conv.mean, "std": conv.std},
        "input": conv.card_entry(),
        "heatmap_stride": int(heatmap_stride),
        "heatmap": dict(heatmap),
        "thresholds": ths,
        "heatmap_thresholds": hth,
        "enabled": {k: bool(enabled.get(k, True)) for k in labels},
        "files": {},
        "sha256": {},
        "source": dict(source),
        "description": description,
        "intended_use": "an imported third-party model run by cxrkit; its clinical validity is the source's, "
                        "not established by cxrkit. Not a medical device.",
    }
    if arch is None:
        card.pop("arch_kwargs")
    outside = [k for k in labels if k not in FINDINGS]
    if outside:
        card["source"]["labels_outside_ontology"] = outside
    return card


def probe_inputs(input_hw: tuple[int, int], n: int = 2, seed: int = 0) -> np.ndarray:
    """(n, 1, H, W) float32 unit-range test images (smooth structure + noise) for conversion checks."""
    H, W = input_hw
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    out = np.empty((n, 1, H, W), np.float32)
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * (H, W)
        blob = np.exp(-(((yy - cy) / (0.2 * H)) ** 2 + ((xx - cx) / (0.15 * W)) ** 2))
        out[i, 0] = np.clip(0.3 + 0.5 * blob + 0.1 * np.sin(xx / (5 + i)) + rng.normal(0, 0.05, (H, W)), 0, 1)
    return out


def write_package(out: "str | Path", card: dict[str, Any], files: Mapping[str, "str | Path"], *,
                  overwrite: bool = False, extra: Mapping[str, Any] | None = None) -> ModelPackage:
    """Move ``files`` ({kind: temp path}) into ``out`` with the card (sha256 for each), atomically.

    ``extra``: {relative name: JSON object} written beside the card (e.g. a conversion report)."""
    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        if not overwrite:
            raise ModelError(f"{str(dest)!r} exists and is not empty; choose another --out or pass --force")
        if not (dest / "card.json").is_file():  # --force replaces a model package, never any folder
            raise ModelError(f"{str(dest)!r} is not empty and holds no card.json: not replacing it even with --force")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        for kind, src in files.items():
            rel = {"onnx": "model.onnx", "weights": "weights.safetensors"}.get(kind, Path(src).name)
            shutil.copyfile(src, tmp / rel)
            os.chmod(tmp / rel, 0o644)
            card["files"][kind] = rel
            card["sha256"][rel] = sha256_file(tmp / rel)
        for rel, obj in (extra or {}).items():
            (tmp / rel).write_text(json.dumps(obj, indent=2) + "\n")
        (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        load_model_package(tmp)  # the card validates before it is put in place
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_model_package(dest)
