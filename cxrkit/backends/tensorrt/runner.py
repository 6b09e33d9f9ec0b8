"""TensorRTRunner: a cached engine, device buffers owned by torch, optional CUDA graphs.

One execution context, one static input buffer and one output buffer per output, all sized
for ``max_batch`` and allocated through torch at load. A call copies the batch into the input
buffer, sets the input shape (``set_input_shape``), and runs ``execute_async_v3`` on the
runner's own torch CUDA stream, or replays the CUDA graph captured for that batch size
(``cuda_graphs=True``, the default). Outputs are returned as torch CUDA tensors (cloned, so a
later call cannot overwrite them); heatmaps keep the engine's output type (fp16 for fp16 graphs).

Options (``runner_options``): ``max_batch`` (default 32), ``min_batch`` (1), ``opt_batch``
(``max_batch``), ``cuda_graphs`` (True), ``rebuild`` (False), ``cache_dir``, ``workspace_gib``.
"""

from __future__ import annotations

import logging
from typing import Any

from ...config import Device, Precision
from ...errors import BackendError, OutOfMemoryError
from ..base import Runner
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
        o = self.options
        max_batch = int(o.get("max_batch") or 32)
        profile = BatchProfile(int(o.get("min_batch") or 1), int(o.get("opt_batch") or max_batch), max_batch)
        self._device = torch.device(self.device_str if ":" in self.device_str else "cuda:0")
        workspace = int(float(o.get("workspace_gib") or 0) * (1 << 30)) or None
        with torch.cuda.device(self._device):
            loaded = get_engine(self.model, self.precision, profile, device=str(self._device),
                                cache=EngineCache(o.get("cache_dir")), rebuild=bool(o.get("rebuild")),
                                workspace_bytes=workspace)
            self._runtime, self._engine, self._key = loaded.runtime, loaded.engine, loaded.key
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise OutOfMemoryError(f"TensorRT could not create an execution context for {self._key.stem}")
            H, W = self.model.card.input_hw
            K = self.model.card.num_classes
            h, w = self.model.card.heatmap_hw
            shapes = {"image": (max_batch, 1, H, W), "logits": (max_batch, K), "heatmaps": (max_batch, K, h, w)}
            self._buffers: dict[str, torch.Tensor] = {}
            for i in range(self._engine.num_io_tensors):
                name = self._engine.get_tensor_name(i)
                if name not in shapes:
                    raise BackendError(f"engine tensor {name!r} is not in the model contract {sorted(shapes)}")
                dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(name))
                self._buffers[name] = torch.empty(shapes[name], dtype=dtype, device=self._device)
                self._context.set_tensor_address(name, self._buffers[name].data_ptr())
            missing = set(shapes) - set(self._buffers)
            if missing:
                raise BackendError(f"engine {self._key.stem} lacks tensors {sorted(missing)}")
            self._stream = torch.cuda.Stream(self._device)
        self._max_batch = max_batch
        self._use_graphs = bool(o.get("cuda_graphs", True))
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        log.info("tensorrt %s: %s (%s, batch %s)", "built" if loaded.built else "loaded", self._key.stem,
                 self.precision.value, profile.as_tuple())

    def _enqueue(self, n: int) -> None:
        if not self._context.set_input_shape("image", tuple(self._buffers["image"][:n].shape)):
            raise BackendError(f"TensorRT rejected input shape {tuple(self._buffers['image'][:n].shape)}")
        for name, buf in self._buffers.items():  # addresses are static; set per call as the API asks
            self._context.set_tensor_address(name, buf.data_ptr())
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise BackendError(f"TensorRT execute_async_v3 failed for a batch of {n}")

    def _run(self, n: int) -> None:
        import torch

        if not self._use_graphs:
            self._enqueue(n)
            return
        g = self._graphs.get(n)
        if g is None:
            self._enqueue(n)  # warm-up: TensorRT allocates and picks kernels for this shape outside capture
            self._stream.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=self._stream):
                self._enqueue(n)
            self._graphs[n] = g
        g.replay()

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
            except torch.cuda.OutOfMemoryError as e:
                raise OutOfMemoryError(f"tensorrt: out of GPU memory on a batch of {n}: {e}") from e
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
        self._engine = None
        self._runtime = None
