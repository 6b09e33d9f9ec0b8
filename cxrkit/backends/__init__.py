"""Backends: each registers here by name with a lazy factory and an availability check."""

from __future__ import annotations

import importlib.util

from ..config import Device, Precision
from .base import AUTO_ORDER, BACKENDS, Runner, available_backends, create_runner, register_backend

__all__ = ["Runner", "register_backend", "create_runner", "available_backends", "BACKENDS", "AUTO_ORDER"]


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def _cuda_ok() -> str | None:
    if not _has("torch"):
        return "torch is not installed (pip install 'cxrkit[gpu]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def _ort_available(d: Device, p: Precision) -> str | None:
    if not _has("onnxruntime"):
        return "onnxruntime is not installed (pip install onnxruntime)"
    if d is Device.CUDA:
        return "cxrkit runs ONNX Runtime on the CPU only (use tensorrt or torch on CUDA)"
    if p not in (Precision.FP32, Precision.INT8):
        return f"ONNX Runtime on the CPU runs fp32 or int8, not {p.value}"
    return None


def _torch_available(d: Device, p: Precision) -> str | None:
    if not _has("torch"):
        return "torch is not installed (pip install 'cxrkit[torch]')"
    if d is Device.CUDA:
        why = _cuda_ok()
        if why:
            return why
        if p is Precision.INT8:
            return "the torch backend has no int8 path (use tensorrt)"
        return None
    if p not in (Precision.FP32, Precision.BF16):
        return f"the torch backend on the CPU runs fp32 or bf16, not {p.value}"
    return None


def _trt_available(d: Device, p: Precision) -> str | None:
    if d is not Device.CUDA:
        return "TensorRT needs a CUDA device"
    if not _has("tensorrt"):
        return "tensorrt is not installed (pip install 'cxrkit[trt]', TensorRT >= 10.12)"
    if p is Precision.BF16:
        return "cxrkit builds TensorRT engines from fp32, fp16 or int8 (Q/DQ) graphs"
    return _cuda_ok()


def _ort_factory() -> type[Runner]:
    from .onnxruntime_runner import OnnxRuntimeRunner

    return OnnxRuntimeRunner


def _torch_factory() -> type[Runner]:
    from .torch_runner import TorchRunner

    return TorchRunner


def _trt_factory() -> type[Runner]:
    from .tensorrt.runner import TensorRTRunner

    return TensorRTRunner


register_backend("onnxruntime", _ort_factory, _ort_available)
register_backend("torch", _torch_factory, _torch_available)
register_backend("tensorrt", _trt_factory, _trt_available)
