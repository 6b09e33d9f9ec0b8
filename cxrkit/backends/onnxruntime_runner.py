"""ONNX Runtime on the CPU: fp32 from the card's ONNX graph, int8 from its CPU-form Q/DQ graph."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from ..config import Device, Precision
from ..errors import BackendError, BackendUnavailableError
from .base import Runner, as_out_of_memory

log = logging.getLogger(__name__)


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"
    devices = (Device.CPU,)
    precisions = (Precision.FP32, Precision.INT8)

    def _graph_path(self):
        if self.precision is Precision.INT8:
            # the CPU form (uint8, ReLUs folded, fused by ORT into one NHWC int8 chain) when the
            # package has it; the TensorRT-form Q/DQ graph runs too, slower
            for kind in ("onnx_int8_cpu", "onnx_int8"):
                if self.model.file(kind) is not None:
                    return self.model.verified(kind)
            raise BackendUnavailableError(
                f"model {self.model.name!r} has no int8 graph: create one with "
                f"`cxrkit quantize {self.model.root}` (cxrkit.quant), which writes files.onnx_int8 and "
                "files.onnx_int8_cpu into its card"
            )
        return self.model.verified("onnx")

    def _load_impl(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from e
        path = self._graph_path()
        so = ort.SessionOptions()
        threads = self.options.get("num_threads") or int(os.environ.get("CXRKIT_NUM_THREADS", "0"))
        if threads:
            so.intra_op_num_threads = int(threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no spin-waiting: the Detector decodes the next batch on the same cores while this one
        # runs, and spinning intra-op threads would steal that time (opt back in with spin=True)
        if not self.options.get("spin", False):
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise BackendError(f"onnxruntime could not load {str(path)!r}: {e}") from e
        names = [o.name for o in self._sess.get_outputs()]
        if "logits" not in names or "heatmaps" not in names:
            raise BackendError(f"{path}: ONNX outputs are {names}; the contract needs 'logits' and 'heatmaps'")
        self._input = self._sess.get_inputs()[0].name
        log.info("onnxruntime loaded %s (%s)", path.name, self.precision.value)

    def _infer_impl(self, batch: Any) -> dict[str, Any]:
        x = np.ascontiguousarray(np.asarray(batch, dtype=np.float32))  # (B, 1, H, W)
        try:
            logits, heatmaps = self._sess.run(["logits", "heatmaps"], {self._input: x})
        except Exception as e:  # an allocation failure (the CPU arena's "Failed to allocate memory") is OOM
            oom = as_out_of_memory(e, f"onnxruntime, batch of {x.shape[0]}")
            if oom is not None:
                raise oom from e
            raise BackendError(f"onnxruntime failed on a batch of shape {x.shape}: {e}") from e
        return {"logits": logits.astype(np.float32, copy=False), "heatmaps": heatmaps}

    def _close_impl(self) -> None:
        self._sess = None
