"""torch backend: the card's architecture from cxrkit.nets with safetensors weights.

CPU: fp32 (or bf16) eager. CUDA: fp16/bf16/fp32, channels_last, optional ``torch.compile``, and
CUDA graphs per batch-size bucket (1, 2, 4, ... max_batch): a batch of n runs in the smallest
bucket >= n, padded, so any n reuses a graph.

Capture. ``prepare(batch_sizes)`` captures the buckets those sizes need; the Detector calls it at
construction, before its prefetch thread exists, so captures never overlap other threads' GPU
work. A bucket nobody prepared is captured lazily at its first batch (logged), under
``capture_error_mode="thread_local"``: another thread's CUDA calls (the prefetch thread's DALI
decode and copies) then neither fail nor invalidate the capture, while this thread's own unsafe
calls still raise. Every capture runs inside the out-of-memory handling, so an OOM while capturing
is a cxrkit ``OutOfMemoryError`` (the Detector halves the batch) and leaves no half-made graph.

Memory. All graphs of a runner share one private memory pool (``graph_pool_handle``): a graph
captured later (another bucket, a halved batch after an OOM) reuses the memory that earlier
captures freed instead of reserving a pool of its own. That is safe because replays are
serialised and a graph's outputs are only read before the next ``infer`` call (below).

Outputs on CUDA are views of the captured graph's static buffers: they stay valid until the
next ``infer`` call on this runner (the Detector consumes them before that, under its lock).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from ..config import Device, Precision
from ..errors import BackendUnavailableError, OutOfMemoryError
from .base import Runner, as_out_of_memory, buckets

log = logging.getLogger(__name__)

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
        self._pool = None  # one graph memory pool shared by every capture (see module doc)
        self._capture_lock = threading.Lock()
        self._warned_lazy = False

    # -- CUDA graphs ----------------------------------------------------------------------------
    def bucket_for(self, n: int) -> int | None:
        """The graph bucket a batch of n runs in (None: larger than max_batch, runs eagerly)."""
        return next((b for b in buckets(self._max_batch) if b >= n), None)

    def _prepare_impl(self, batch_sizes: list[int]) -> None:
        if self.device is not Device.CUDA or not self._use_graphs:
            return
        # largest first: the smaller captures then carve their memory out of the blocks the larger
        # one freed in the shared pool, instead of adding segments
        for b in sorted({self.bucket_for(n) for n in batch_sizes} - {None}, reverse=True):
            self._capture(b, lazy=False)

    def _capture(self, bucket: int, lazy: bool):
        """Capture (once) the graph of ``bucket``; OutOfMemoryError if it does not fit."""
        torch = self._torch
        with self._capture_lock:
            g = self._graphs.get(bucket)
            if g is not None:
                return g
            if lazy and not self._warned_lazy:
                self._warned_lazy = True
                log.warning("torch runner: capturing the CUDA graph of batch bucket %d at its first batch; call "
                            "runner.prepare(batch_sizes) before other threads use the GPU to capture ahead", bucket)
            H, W = self.model.card.input_hw
            try:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                static_in = torch.randn(bucket, 1, H, W, device=self._dev, dtype=self._dtype).contiguous(
                    memory_format=torch.channels_last)
                s = torch.cuda.Stream(self._dev)
                s.wait_stream(torch.cuda.current_stream(self._dev))
                with torch.cuda.stream(s), torch.inference_mode():
                    for _ in range(3):  # warm-up (cuDNN autotune, lazy init) outside the capture
                        self._net(static_in)
                torch.cuda.current_stream(self._dev).wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                # thread_local: other threads may use the GPU meanwhile (module doc)
                with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool, stream=s,
                                                              capture_error_mode="thread_local"):
                    lg, hm = self._net(static_in)
            except Exception as e:
                oom = as_out_of_memory(e, f"torch: capturing the CUDA graph of batch bucket {bucket}")
                if oom is not None:
                    raise oom from e
                raise
            g = (graph, static_in, lg, hm)
            self._graphs[bucket] = g
            log.info("captured a CUDA graph for batch bucket %d", bucket)
            return g

    def _graph_for(self, n: int):
        bucket = self.bucket_for(n)
        if bucket is None:
            return None
        return self._graphs.get(bucket) or self._capture(bucket, lazy=True)

    def warmup(self, batch_sizes: "list[int] | None" = None) -> None:
        """Capture the CUDA graphs of the given batch sizes (all buckets by default): ``prepare``."""
        self.prepare(batch_sizes or (buckets(self._max_batch) if self.device is Device.CUDA else [1]))

    def _infer_impl(self, batch: Any) -> dict[str, Any]:
        torch = self._torch
        if self.device is Device.CPU:
            x = torch.from_numpy(np.ascontiguousarray(np.asarray(batch, np.float32))).to(self._dtype)
            try:
                with torch.inference_mode():
                    lg, hm = self._net(x)
            except Exception as e:  # the CPU allocator's ENOMEM is an out-of-memory like CUDA's
                oom = as_out_of_memory(e, f"torch CPU, batch of {int(x.shape[0])}")
                if oom is not None:
                    raise oom from e
                raise
            return {"logits": lg.float().numpy(), "heatmaps": hm.float().numpy()}
        n = int(batch.shape[0])
        try:
            x = batch if isinstance(batch, torch.Tensor) else torch.from_dlpack(batch)
            if x.device.type != "cuda":
                x = x.to(self._dev, non_blocking=True)
            g = self._graph_for(n) if self._use_graphs else None  # a lazy capture sits inside the try
            if g is None:
                with torch.inference_mode():
                    lg, hm = self._net(x.to(self._dtype).contiguous(memory_format=torch.channels_last))
                return {"logits": lg.float(), "heatmaps": hm}
            graph, static_in, lg, hm = g
            static_in[:n].copy_(x)  # casts to the graph's dtype; rows >= n keep stale data, ignored
            graph.replay()
            return {"logits": lg[:n].float(), "heatmaps": hm[:n]}
        except OutOfMemoryError:
            raise
        except Exception as e:
            oom = as_out_of_memory(e, f"torch CUDA, batch of {n}")
            if oom is not None:
                raise oom from e
            raise

    def _close_impl(self) -> None:
        self._graphs = None
        self._pool = None
        self._net = None
