"""TensorRTRunner: a cached engine, device buffers owned by torch, CUDA graphs per batch bucket.

One static input buffer and one output buffer per output, sized for ``max_batch`` and allocated
through torch at load. A call copies the batch into the input buffer and runs on the runner's
own torch CUDA stream. With ``cuda_graphs=True`` (the default) a batch of n runs in the smallest
bucket >= n of 1, 2, 4, ... max_batch (padded rows are ignored), and each bucket has its **own
execution context** whose input shape is set once, before its graph is captured: a captured
graph stays valid only while its context keeps the shape and addresses it was captured with, so
contexts are never shared between buckets. All contexts share one scratch ("device memory")
allocation of the engine's size (``USER_MANAGED``; executions are serialised on one stream), so
a bucket costs a graph, not another copy of the activations. Without graphs, one context whose
shape is set per call. ``prepare(batch_sizes)`` captures ahead (the Detector does, at
construction); a bucket captured lazily at its first batch is captured in ``thread_local`` mode
so that other threads' GPU work cannot break it (see torch_runner.py).

Outputs are returned as torch CUDA tensors (cloned, so a later call cannot overwrite them);
heatmaps keep the engine's output type (fp16 for fp16 graphs).

Options (``runner_options``): ``max_batch`` (default 32), ``min_batch`` (1), ``opt_batch``
(``max_batch``), ``cuda_graphs`` (True), ``rebuild`` (False), ``cache_dir``, ``workspace_gib``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ...config import Device, Precision
from ...errors import BackendError, OutOfMemoryError
from ..base import Runner, as_out_of_memory, buckets
from .build import BatchProfile, get_engine, import_tensorrt
from .cache import EngineCache

__all__ = ["TensorRTRunner"]

log = logging.getLogger(__name__)


def _torch_dtype(trt: Any, dt: Any) -> Any:
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dt not in table:
        raise BackendError(f"TensorRT tensor type {dt} has no torch equivalent here")
    return table[dt]


class TensorRTRunner(Runner):
    name = "tensorrt"
    devices = (Device.CUDA,)
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8)

    def _load_impl(self) -> None:
        import torch

        trt = import_tensorrt()
        self._trt = trt
        o = self.options
        max_batch = int(o.get("max_batch") or 32)
        profile = BatchProfile(int(o.get("min_batch") or 1), int(o.get("opt_batch") or max_batch), max_batch)
        self._profile = profile
        self._device = torch.device(self.device_str if ":" in self.device_str else "cuda:0")
        workspace = int(float(o.get("workspace_gib") or 0) * (1 << 30)) or None
        self._scratch = None
        with torch.cuda.device(self._device):
            loaded = get_engine(self.model, self.precision, profile, device=str(self._device),
                                cache=EngineCache(o.get("cache_dir")), rebuild=bool(o.get("rebuild")),
                                workspace_bytes=workspace)
            self._runtime, self._engine, self._key = loaded.runtime, loaded.engine, loaded.key
            self.engine_built = bool(loaded.built)  # False: the engine came from the cache
            H, W = self.model.card.input_hw
            K = self.model.card.num_classes
            h, w = self.model.card.heatmap_hw
            shapes = {"image": (max_batch, 1, H, W), "logits": (max_batch, K), "heatmaps": (max_batch, K, h, w)}
            self._buffers: dict[str, torch.Tensor] = {}
            try:
                for i in range(self._engine.num_io_tensors):
                    name = self._engine.get_tensor_name(i)
                    if name not in shapes:
                        raise BackendError(f"engine tensor {name!r} is not in the model contract {sorted(shapes)}")
                    dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(name))
                    # zeros: a bucket's padding rows are computed too, keep them finite
                    self._buffers[name] = torch.zeros(shapes[name], dtype=dtype, device=self._device)
                missing = set(shapes) - set(self._buffers)
                if missing:
                    raise BackendError(f"engine {self._key.stem} lacks tensors {sorted(missing)}")
                self._stream = torch.cuda.Stream(self._device)
                self._context = self._new_context()  # the eager context (shape set per call)
            except Exception as e:
                oom = as_out_of_memory(e, f"tensorrt: loading {self._key.stem}")
                if oom is not None:
                    raise oom from e
                raise
        self._max_batch = max_batch
        self._use_graphs = bool(o.get("cuda_graphs", True))
        self._graphs: dict[int, tuple[Any, Any]] = {}  # bucket -> (CUDAGraph, its execution context)
        self._pool = None
        self._capture_lock = threading.Lock()
        self._warned_lazy = False
        log.info("tensorrt %s: %s (%s, batch %s)", "built" if loaded.built else "loaded", self._key.stem,
                 self.precision.value, profile.as_tuple())

    # -- execution contexts -----------------------------------------------------------------------
    def _new_context(self) -> Any:
        """An execution context on the shared scratch memory (USER_MANAGED) when this TensorRT has the
        API (10.1+), else one with its own memory. Its tensor addresses are the static buffers."""
        import torch

        trt, eng = self._trt, self._engine
        ctx = None
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        size = getattr(eng, "device_memory_size_v2", None)
        if size is None:
            size = getattr(eng, "device_memory_size", None)
        if strategy is not None and size is not None:
            try:
                ctx = eng.create_execution_context(strategy)
            except TypeError:  # an API without the strategy argument
                ctx = None
            if ctx is not None:
                if self._scratch is None or self._scratch.numel() < int(size):
                    self._scratch = torch.empty(max(int(size), 1), dtype=torch.uint8, device=self._device)
                if hasattr(ctx, "set_device_memory"):
                    ctx.set_device_memory(self._scratch.data_ptr(), int(self._scratch.numel()))
                else:
                    ctx.device_memory = self._scratch.data_ptr()
        if ctx is None:
            ctx = eng.create_execution_context()
        if ctx is None:
            raise OutOfMemoryError(f"TensorRT could not create an execution context for {self._key.stem}")
        for name, buf in self._buffers.items():
            ctx.set_tensor_address(name, buf.data_ptr())
        return ctx

    def _graph_buckets(self) -> list[int]:
        lo = self._profile.min
        out = [b for b in buckets(self._max_batch) if b >= lo]
        return sorted(set(out) | {lo})

    def bucket_for(self, n: int) -> int:
        return next(b for b in self._graph_buckets() if b >= n)

    def _enqueue(self, ctx: Any, n: int) -> None:
        if not self._execute(ctx, n):
            raise BackendError(f"TensorRT execute_async_v3 failed for a batch of {n}")

    def _execute(self, ctx: Any, n: int) -> bool:
        shape = tuple(self._buffers["image"][:n].shape)
        if not ctx.set_input_shape("image", shape):
            raise BackendError(f"TensorRT rejected input shape {shape} (profile {self._profile.as_tuple()})")
        return bool(ctx.execute_async_v3(self._stream.cuda_stream))

    def _prepare_impl(self, batch_sizes: list[int]) -> None:
        if not self._use_graphs:
            return
        for b in sorted({self.bucket_for(min(n, self._max_batch)) for n in batch_sizes}):
            self._capture(b, lazy=False)

    def _capture(self, bucket: int, lazy: bool):
        import torch

        with self._capture_lock:
            g = self._graphs.get(bucket)
            if g is not None:
                return g
            if lazy and not self._warned_lazy:
                self._warned_lazy = True
                log.warning("tensorrt: capturing the CUDA graph of batch bucket %d at its first batch; call "
                            "runner.prepare(batch_sizes) before other threads use the GPU", bucket)
            try:
                with torch.cuda.device(self._device):
                    ctx = self._new_context()
                    # warm-up: TensorRT allocates and picks kernels for this shape outside the capture
                    self._enqueue(ctx, bucket)
                    self._stream.synchronize()
                    if self._pool is None:
                        self._pool = torch.cuda.graph_pool_handle()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._pool, stream=self._stream,
                                          capture_error_mode="thread_local"):
                        ctx.execute_async_v3(self._stream.cuda_stream)  # shape and addresses as set above
            except Exception as e:
                oom = as_out_of_memory(e, f"tensorrt: capturing batch bucket {bucket}")
                if oom is not None:
                    raise oom from e
                raise
            self._graphs[bucket] = (graph, ctx)
            log.info("tensorrt: captured a CUDA graph for batch bucket %d", bucket)
            return graph, ctx

    def _run(self, n: int) -> int:
        """Run the first n rows of the input buffer; returns the rows computed (the bucket, or n)."""
        if not self._use_graphs:
            self._enqueue(self._context, n)
            return n
        bucket = self.bucket_for(n)
        g = self._graphs.get(bucket) or self._capture(bucket, lazy=True)
        g[0].replay()
        return bucket

    def _infer_impl(self, batch: Any) -> dict[str, Any]:
        import torch

        x = torch.as_tensor(batch) if not isinstance(batch, torch.Tensor) else batch  # (B, 1, H, W)
        B = int(x.shape[0])
        logits, heatmaps = [], []
        cur = torch.cuda.current_stream(self._device)
        for s in range(0, B, self._max_batch):
            xs = x[s:s + self._max_batch]
            n = int(xs.shape[0])
            inp = self._buffers["image"]
            try:
                inp[:n].copy_(xs.to(self._device, non_blocking=True), non_blocking=True)  # on the current stream
                self._stream.wait_stream(cur)
                with torch.cuda.stream(self._stream):
                    self._run(n)
                    lg = self._buffers["logits"][:n].float().clone()  # (n, K)
                    hm = self._buffers["heatmaps"][:n].clone()  # (n, K, h, w)
                cur.wait_stream(self._stream)
                lg.record_stream(cur)  # allocated on the runner's stream, read on the caller's
                hm.record_stream(cur)
            except OutOfMemoryError:
                raise
            except Exception as e:
                oom = as_out_of_memory(e, f"tensorrt: a batch of {n}")
                if oom is not None:
                    raise oom from e
                raise
            logits.append(lg)
            heatmaps.append(hm)
        if len(logits) == 1:
            return {"logits": logits[0], "heatmaps": heatmaps[0]}
        return {"logits": torch.cat(logits), "heatmaps": torch.cat(heatmaps)}

    def _close_impl(self) -> None:
        if getattr(self, "_stream", None) is not None:
            self._stream.synchronize()
        self._graphs = {}
        self._context = None
        self._buffers = {}
        self._scratch = None
        self._pool = None
        self._engine = None
        self._runtime = None
