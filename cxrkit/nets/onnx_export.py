"""Export a net to the ONNX contract: input ``image`` (B, 1, H, W) float32, outputs ``logits``
(B, K) and ``heatmaps`` (B, K, H/s, W/s), dynamic batch; checked with ``onnx.checker``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["export_onnx"]

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "heatmaps")


def export_onnx(net: "torch.nn.Module", path: "str | Path", input_hw: "tuple[int, int]", opset: int = 17) -> Path:
    """Write ``net`` (eval mode, fp32) to ``path`` and validate the graph; returns the path.

    The TorchScript exporter is used (``dynamo=False``): it needs no onnxscript and gives a plain
    graph (Conv, MaxPool, Reduce*, Resize, ...) that ONNX Runtime and TensorRT both read.
    """
    import onnx
    import torch

    h, w = (int(v) for v in input_hw)
    stride = int(getattr(net, "heatmap_stride", 0)) or None
    if stride is not None and (h % stride or w % stride):
        raise ModelError(f"input_hw {(h, w)} is not a multiple of the net's heatmap_stride {stride}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    was_training = net.training
    net.eval()
    dummy = torch.zeros(2, 1, h, w, dtype=torch.float32)  # batch 2 so no op specializes on batch 1
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The legacy exporter announces its own deprecation; that is not news to a caller.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                net, (dummy,), str(p), dynamo=False, opset_version=int(opset),
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}},
                do_constant_folding=True, external_data=False,
            )
    finally:
        net.train(was_training)
    model = onnx.load(str(p))
    onnx.checker.check_model(model)
    ins = [i.name for i in model.graph.input]
    outs = [o.name for o in model.graph.output]
    if ins != [INPUT_NAME] or outs != list(OUTPUT_NAMES):
        raise ModelError(f"{str(p)!r}: exported graph has inputs {ins} and outputs {outs}, "
                         f"expected [{INPUT_NAME!r}] and {list(OUTPUT_NAMES)}")
    return p
