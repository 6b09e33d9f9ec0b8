"""torch backend: the card's architecture from cxrkit.nets with safetensors weights.

CPU: fp32 (or bf16) eager. CUDA: fp16/bf16/fp32, channels_last, optional ``torch.compile``, and
CUDA graphs captured per batch-size bucket (1, 2, 4, ... max_batch): a batch of n runs in the
smallest bucket >= n, padded, so any n reuses a graph.

Outputs on CUDA are views of the captured graph's static buffers: they stay valid until the
next ``infer`` call on this runner (the Detector consumes them before that, under its lock).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..config import Device, Precision
from ..errors import BackendUnavailableError, OutOfMemoryError
from .base import Runner

log = logging.getLogger(__name__)


def _buckets(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


class TorchRunner(Runner):
    name = "torch"
    devices = (Device.CPU, Device.CUDA)
    precisions = (Precision.FP32, Precision.FP16, Precision.BF16)

    def _load_impl(self) -> None:
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailableError("torch is not installed: pip install 'cxrkit[torch]'") from e
        from ..nets import create_net, load_weights

        card = self.model.card
        if card.arch is None:
            raise BackendUnavailableError(f"model {self.model.name!r}: the card names no torch arch; use onnxruntime")
        net = create_net(card.arch, **card.arch_kwargs)
        load_weights(net, self.model.verified("weights"))
        net.eval()
        self._torch = torch
        if self.device is Device.CPU:
            if self.options.get("num_threads"):
                torch.set_num_threads(int(self.options["num_threads"]))
            self._dtype = torch.bfloat16 if self.precision is Precision.BF16 else torch.float32
            self._net = net.to(self._dtype)
            self._graphs = None
            return
        dev = torch.device(self.device_str if ":" in self.device_str else "cuda")
        self._dev = dev
        self._dtype = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}.get(self.precision, torch.float32)
        net = net.to(dev, self._dtype).to(memory_format=torch.channels_last)
        if self.options.get("compile"):
            net = torch.compile(net, mode=self.options.get("compile_mode", "max-autotune-no-cudagraphs"))
        self._net = net
        self._max_batch = int(self.options.get("max_batch", 64))
        self._use_graphs = bool(self.options.get("cuda_graphs", True))
        self._graphs: dict[int, tuple[Any, Any, Any, Any]] | None = {}
        self._stream = torch.cuda.Stream(dev)

    # -- CUDA graphs ----------------------------------------------------------------------------
    def _graph_for(self, n: int):
        torch = self._torch
        bucket = next((b for b in _buckets(self._max_batch) if b >= n), None)
        if bucket is None:
            return None
        g = self._graphs.get(bucket)
        if g is not None:
            return g
        H, W = self.model.card.input_hw
        static_in = torch.randn(bucket, 1, H, W, device=self._dev, dtype=self._dtype).contiguous(
            memory_format=torch.channels_last)
        s = torch.cuda.Stream(self._dev)
        s.wait_stream(torch.cuda.current_stream(self._dev))
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(3):  # warm-up (cuDNN autotune, lazy init) outside the capture
                self._net(static_in)
        torch.cuda.current_stream(self._dev).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, stream=s):
            lg, hm = self._net(static_in)
        g = (graph, static_in, lg, hm)
        self._graphs[bucket] = g
        log.info("captured a CUDA graph for batch bucket %d", bucket)
        return g

    def warmup(self, batch_sizes: "list[int] | None" = None) -> None:
        """Capture the CUDA graphs of the given batch sizes (all buckets by default) ahead of time."""
        self.load()
        if self.device is Device.CUDA and self._use_graphs:
            for b in batch_sizes or _buckets(self._max_batch):
                self._graph_for(b)

    def _infer_impl(self, batch: Any) -> dict[str, Any]:
        torch = self._torch
        if self.device is Device.CPU:
            x = torch.from_numpy(np.ascontiguousarray(np.asarray(batch, np.float32))).to(self._dtype)
            with torch.inference_mode():
                lg, hm = self._net(x)
            return {"logits": lg.float().numpy(), "heatmaps": hm.float().numpy()}
        x = batch if isinstance(batch, torch.Tensor) else torch.from_dlpack(batch)
        if x.device.type != "cuda":
            x = x.to(self._dev, non_blocking=True)
        n = int(x.shape[0])
        g = self._graph_for(n) if self._use_graphs else None
        try:
            if g is None:
                with torch.inference_mode():
                    lg, hm = self._net(x.to(self._dtype).contiguous(memory_format=torch.channels_last))
                return {"logits": lg.float(), "heatmaps": hm}
            graph, static_in, lg, hm = g
            static_in[:n].copy_(x)  # casts to the graph's dtype; rows >= n keep stale data, ignored
            graph.replay()
            return {"logits": lg[:n].float(), "heatmaps": hm[:n]}
        except torch.cuda.OutOfMemoryError as e:
            raise OutOfMemoryError(f"torch CUDA out of memory at batch {n}: {e}") from e

    def _close_impl(self) -> None:
        self._graphs = None
        self._net = None
