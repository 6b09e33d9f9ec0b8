"""Build TensorRT engines from cxrkit's ONNX graphs: strongly typed, one dynamic-batch profile.

Precision lives in the graph (DESIGN, TensorRT contract): fp32 from ``files.onnx``, fp16 from
``files.onnx_fp16`` and int8 from the Q/DQ graph ``files.onnx_int8`` that ``cxrkit quantize``
writes. The network is created strongly typed, so TensorRT runs every layer in the type the
graph gives it; no FP16/INT8 builder flags are set (TensorRT 11 has none; on 10.x strongly typed
networks reject them). Works with TensorRT >= 10.12 and 11.x.

    engine_bytes = build_serialized(Path("model.int8.onnx"), (512, 512), BatchProfile(1, 32, 64))

``get_engine`` puts this behind the engine cache (:mod:`.cache`); ``main`` is ``cxrkit build-engine``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ...config import Device, Precision, device_index
from ...errors import BackendError, BackendUnavailableError, ModelError
from ...models import ModelPackage, load_model_package, sha256_file
from .cache import EngineCache, EngineKey

__all__ = ["BatchProfile", "LoadedEngine", "import_tensorrt", "graph_for", "build_serialized", "engine_key", "get_engine",
           "MIN_TRT_VERSION", "main"]

log = logging.getLogger(__name__)

MIN_TRT_VERSION = (10, 12)
INSTALL_HINT = "pip install 'cxrkit[trt]' (TensorRT >= 10.12, e.g. pip install 'tensorrt>=10.12')"
_GRAPH_KIND = {Precision.FP32: "onnx", Precision.FP16: "onnx_fp16", Precision.INT8: "onnx_int8"}


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes of the engine's optimization profile: kernels are tuned for ``opt``."""

    min: int = 1
    opt: int = 32
    max: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.min, self.opt, self.max)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def import_tensorrt() -> Any:
    """``import tensorrt``, checked against the minimum version; BackendUnavailableError otherwise."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailableError(f"TensorRT is not installed: {INSTALL_HINT}") from e
    if _version_tuple(trt.__version__)[:2] < MIN_TRT_VERSION:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old for cxrkit: {INSTALL_HINT}")
    return trt


def graph_for(model: ModelPackage, precision: "str | Precision") -> Path:
    """The verified ONNX graph an engine of ``precision`` is built from."""
    p = Precision.parse(precision)
    kind = _GRAPH_KIND.get(p)
    if kind is None:
        raise BackendUnavailableError(f"cxrkit builds TensorRT engines in fp32, fp16 or int8, not {p.value}")
    if model.file(kind) is None:
        raise BackendUnavailableError(
            f"model {model.name!r} has no {p.value} graph ({kind!r} in card.json): write it with "
            f"`cxrkit quantize {model.root} --calib IMAGES...` (cxrkit.quant), then build the engine")
    return model.verified(kind)


class _Logger:
    """A TensorRT logger that forwards to ``logging`` (built lazily: needs the trt module)."""

    @staticmethod
    def create(trt: Any) -> Any:
        sev = trt.ILogger.Severity
        levels = {sev.INTERNAL_ERROR: logging.CRITICAL, sev.ERROR: logging.ERROR, sev.WARNING: logging.WARNING,
                  sev.INFO: logging.DEBUG, sev.VERBOSE: logging.DEBUG}

        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                log.log(levels.get(severity, logging.INFO), "tensorrt: %s", msg)

        return Logger()


def build_serialized(onnx_path: Path, input_hw: tuple[int, int], profile: BatchProfile, *,
                     workspace_bytes: int | None = None, trt: Any = None, logger: Any = None) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build a serialized engine."""
    trt = trt or import_tensorrt()
    logger = logger or _Logger.create(trt)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = (1 << int(flag)) if flag is not None else 0  # 11.x: always strongly typed, flag kept for compat
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path.name}: {errs}")
    if network.num_inputs != 1:
        raise ModelError(f"{onnx_path.name}: the contract has one input, the network has {network.num_inputs}")
    inp = network.get_input(0)
    H, W = input_hw
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(inp.name, (profile.min, 1, H, W), (profile.opt, 1, H, W), (profile.max, 1, H, W))
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {onnx_path.name} (see the tensorrt log above)")
    return bytes(serialized)


def _gpu(index: int) -> tuple[str, str]:
    """(name, "major.minor") of CUDA device ``index``, through torch."""
    try:
        import torch
    except ImportError as e:
        raise BackendUnavailableError("the TensorRT backend needs torch with CUDA: pip install 'cxrkit[gpu]'") from e
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs a CUDA device; torch sees none")
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def engine_key(model: ModelPackage, precision: "str | Precision", profile: BatchProfile, trt_version: str,
               gpu_name: str, compute_capability: str) -> EngineKey:
    p = Precision.parse(precision)
    graph = graph_for(model, p)
    return EngineKey(model_name=model.name, model_hash=model.content_hash, graph_sha256=sha256_file(graph),
                     precision=p.value, input_hw=model.card.input_hw, profile=profile.as_tuple(),
                     trt_version=trt_version, gpu_name=gpu_name, compute_capability=compute_capability)


class LoadedEngine(NamedTuple):
    engine: Any  # tensorrt.ICudaEngine
    runtime: Any  # tensorrt.Runtime: must outlive the engine
    key: EngineKey
    built: bool


def get_engine(model: ModelPackage, precision: "str | Precision", profile: BatchProfile, *, device: str = "cuda",
               cache: EngineCache | None = None, rebuild: bool = False,
               workspace_bytes: int | None = None) -> LoadedEngine:
    """The engine from the cache, building (and caching) it when needed."""
    trt = import_tensorrt()
    idx = max(0, device_index(device))
    gpu_name, cc = _gpu(idx)
    key = engine_key(model, precision, profile, trt.__version__, gpu_name, cc)
    logger = _Logger.create(trt)
    runtime = trt.Runtime(logger)
    graph = graph_for(model, precision)

    def build() -> bytes:
        return build_serialized(graph, model.card.input_hw, profile, workspace_bytes=workspace_bytes,
                                trt=trt, logger=logger)

    engine, built = (cache or EngineCache()).get_or_build(key, build, runtime.deserialize_cuda_engine, rebuild=rebuild)
    return LoadedEngine(engine, runtime, key, built)


def main(args: argparse.Namespace) -> int:
    """`cxrkit build-engine --model M --precision P --min-batch/--opt-batch/--max-batch [--rebuild]`."""
    model = load_model_package(args.model)
    device = args.device if Device.parse(args.device) is Device.CUDA else "cuda"
    profile = BatchProfile(args.min_batch, args.opt_batch, args.max_batch)
    cache = EngineCache(getattr(args, "cache_dir", None) or None)
    workspace = int(getattr(args, "workspace_gib", 0) * (1 << 30)) or None
    _, _, key, built = get_engine(model, args.precision, profile, device=device, cache=cache,
                               rebuild=getattr(args, "rebuild", False), workspace_bytes=workspace)
    path = cache.paths(key)[0]
    print(f"{'built' if built else 'cached'} {path} (TensorRT {key.trt_version}, {key.gpu_name}, "
          f"sm {key.compute_capability}, {key.precision}, batch {key.profile})")
    return 0
