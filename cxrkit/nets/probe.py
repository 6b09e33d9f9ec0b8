"""The geometry probe: a deterministic net with no learned weights, for tests of the whole path.

Finding ``k`` has an intensity level ``levels[k]`` in unit intensity ``[0, 1]`` (default
``0.25 + 0.1 k``). Heatmap cell (i, j) of finding k is ``hi`` (+8) when *every* pixel of that
``stride x stride`` cell lies within ``+-tol`` of ``levels[k]`` (cell max and cell min both in the
band, by max-pooling ``u`` and ``-u``), and ``lo`` (-8) otherwise, so a cell only partly covered
by a square, or holding one of its edges, stays dark. ``logits[b, k]`` is the global max of
heatmap k. Spacing 0.1 with ``tol`` 0.03 leaves 0.04 between bands: JPEG (quality 95) noise and the
one-pixel antialiased rim of a resized square stay out of the wrong band.

Unit intensity is recovered from the normalized input with the card's ``mean`` and ``std``:
``u = image * std + mean``.

Regenerate the bundled package (card.json, weights.safetensors, model.onnx)::

    python -m cxrkit.nets.probe --write cxrkit/models/cxr-probe
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import register_net

__all__ = ["ProbeNet", "PROBE_LABELS", "default_levels", "write_package"]

PROBE_LABELS = ("nodule", "mass", "consolidation", "pleural_effusion", "pneumothorax", "cardiomegaly")


def default_levels(num_classes: int) -> list[float]:
    return [round(0.25 + 0.1 * k, 6) for k in range(num_classes)]


@register_net("probe")
class ProbeNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 6,
        levels: Sequence[float] | None = None,
        tol: float = 0.03,
        mean: float = 0.5,
        std: float = 0.25,
        stride: int = 8,
        hi: float = 8.0,
        lo: float = -8.0,
    ) -> None:
        super().__init__()
        levels = list(default_levels(num_classes) if levels is None else levels)
        if len(levels) != num_classes:
            raise ValueError(f"levels has {len(levels)} entries, num_classes is {num_classes}")
        if std <= 0 or tol <= 0 or stride < 1:
            raise ValueError(f"need std > 0, tol > 0, stride >= 1; got std={std}, tol={tol}, stride={stride}")
        self.num_classes = int(num_classes)
        self.heatmap_stride = int(stride)
        self.tol, self.mean, self.std, self.hi, self.lo = float(tol), float(mean), float(std), float(hi), float(lo)
        # The only state: one level per finding, saved to weights.safetensors as "levels".
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.heatmap_stride
        u = image * self.std + self.mean  # (B, 1, H, W) unit intensity
        cell_max = F.max_pool2d(u, s, s)  # (B, 1, h, w)
        cell_min = -F.max_pool2d(-u, s, s)  # (B, 1, h, w)
        # Largest deviation of any pixel of the cell from each level.
        dev = torch.maximum(cell_max - self.levels, self.levels - cell_min)  # (B, K, h, w)
        heat = torch.where(dev <= self.tol, torch.full_like(dev, self.hi), torch.full_like(dev, self.lo))
        logits = heat.amax(dim=(2, 3))  # (B, K)
        return logits, heat


def write_package(out_dir: "str | Path", input_hw: tuple[int, int] = (256, 256)) -> Path:
    """Write card.json, weights.safetensors and model.onnx of the cxr-probe package (deterministic)."""
    from ..models import sha256_file
    from . import export_onnx, save_weights

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = {"num_classes": len(PROBE_LABELS), "levels": default_levels(len(PROBE_LABELS)), "tol": 0.03,
          "mean": 0.5, "std": 0.25, "stride": 8, "hi": 8.0, "lo": -8.0}
    net = ProbeNet(**kw)
    save_weights(net, out / "weights.safetensors", metadata={"arch": "probe"})
    export_onnx(net, out / "model.onnx", input_hw)
    card = {
        "schema_version": 1,
        "name": "cxr-probe",
        "version": "1.0.0",
        "arch": "probe",
        "arch_kwargs": kw,
        "labels": list(PROBE_LABELS),
        "input_size": list(input_hw),
        "normalization": {"mean": kw["mean"], "std": kw["std"]},
        "heatmap_stride": kw["stride"],
        "thresholds": {k: 0.5 for k in PROBE_LABELS},
        "files": {"onnx": "model.onnx", "weights": "weights.safetensors"},
        "sha256": {n: sha256_file(out / n) for n in ("model.onnx", "weights.safetensors")},
        "description": (
            "Geometry probe for tests, NOT a medical model: no learned weights. Finding k fires on every "
            "8x8 heatmap cell whose pixels all lie within +-0.03 of unit intensity 0.25 + 0.1*k "
            + ", ".join(f"{lab}={lv:.2f}" for lab, lv in zip(PROBE_LABELS, kw["levels"]))
            + " (unit intensity = normalized input * std + mean, i.e. pixel / 255 for 8-bit images), "
            "with heatmap logit +8 there and -8 elsewhere; the image logit is the heatmap maximum. "
            "Draw flat squares of those intensities (at least 3 cells wide after letterboxing) to test "
            "decode, letterbox, backends, localization and the mapping of boxes back to the source."
        ),
        "intended_use": "software tests only; NOT for clinical use",
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrkit.nets.probe", description=__doc__.split("\n")[0])
    ap.add_argument("--write", metavar="DIR", required=True, help="package folder to (re)write")
    ap.add_argument("--input-size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    args = ap.parse_args(argv)
    out = write_package(args.write, tuple(args.input_size))
    print(f"wrote {out}/card.json, weights.safetensors, model.onnx")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from cxrkit.nets.probe import _main as _registered_main  # run the importable module's copy

    raise SystemExit(_registered_main())
