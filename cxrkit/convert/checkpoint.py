"""Reading a source checkpoint's tensors without running code from the file.

Every pickled checkpoint is read with ``torch.load(weights_only=True)``: torch's restricted
unpickler, which calls nothing but tensor rebuilders and a few containers. Checkpoints that pickle
whole modules (torchxrayvision's DenseNet weight files, reproduce-chexnet's ``{"model": model}``)
name classes such as ``torchxrayvision.models.DenseNet`` or ``torch.nn.modules.conv.Conv2d``;
weights_only refuses them. For those, each class the file names is allowed under its name *as
an inert stand-in* (:class:`_Inert`: stores what it is given, runs nothing), never as the real
class, through ``torch.serialization.safe_globals([(stand_in, "module.Class")])``. The parameter
and buffer tensors are then collected from the stand-ins' ``_parameters`` / ``_buffers`` /
``_modules`` dicts. Nothing the file names is imported or called, so a malicious file gets a
tree of stand-ins, not code execution.

Then :func:`canonical_state` brings the usual variations to torchvision's key layout:
``module.`` (DataParallel) and ``densenet121.`` / ``model.`` wrappers, ``{"state_dict": ...}``
wrappers, pre-0.4 DenseNet keys (``norm.1`` -> ``norm1``), and a ``Sequential(Linear, Sigmoid)``
classifier (``classifier.0.weight`` -> ``classifier.weight``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from pickle import UnpicklingError  # the exception torch.load raises; nothing here unpickles
from typing import Any

from ..errors import ModelError

__all__ = ["CheckpointInfo", "read_checkpoint", "find_state_dict", "canonical_state", "ArchSpec", "detect_arch"]

log = logging.getLogger(__name__)

_MAX_STAND_INS = 256
_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
# containers that hold the state dict in training checkpoints, tried in this order
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "weights", "params")
# pre-0.4 torchvision DenseNet keys: denselayerN.norm.1.weight -> denselayerN.norm1.weight
_OLD_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
_HOW_TO_EXPORT = ("export a plain state_dict where the model's code is installed: "
                  "`torch.save(model.state_dict(), 'weights.pth')` (or safetensors.torch.save_file)")


class _Inert:
    """Stand-in for a class a checkpoint names: keeps its constructor arguments and state, runs nothing."""

    _cxrkit_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_cxrkit_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_cxrkit_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in for {self._cxrkit_name}>"


@dataclass
class CheckpointInfo:
    path: str
    format: str  # "safetensors" | "torch-zip" | "torch-legacy" | "object"
    stand_ins: list[str] = field(default_factory=list)  # classes the file names, read as inert stand-ins
    where: str = ""  # where in the loaded object the state dict was found


def _stand_in(name: str) -> type:
    return type(f"Inert_{name.rsplit('.', 1)[-1]}", (_Inert,), {"_cxrkit_name": name})


def read_checkpoint(path: "str | Path", export_hint: str | None = None) -> tuple[Any, CheckpointInfo]:
    """Load ``path`` (safetensors, or a torch checkpoint through ``weights_only=True``) -> (object, info).

    ``export_hint``: what to tell the user to run when the file cannot be read safely (default: the
    generic ``torch.save(model.state_dict(), ...)``)."""
    how = export_hint or _HOW_TO_EXPORT
    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{str(p)!r}: checkpoint file does not exist")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu"), CheckpointInfo(str(p), "safetensors")
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"{str(p)!r}: not a readable safetensors file: {e}") from e
    import zipfile

    info = CheckpointInfo(str(p), "torch-zip" if zipfile.is_zipfile(p) else "torch-legacy")
    allowed: list[tuple[type, str]] = []
    while True:
        try:
            with torch.serialization.safe_globals(allowed):
                obj = torch.load(str(p), map_location="cpu", weights_only=True)
            break
        except UnpicklingError as e:
            m = _UNSAFE_GLOBAL.search(str(e))
            if m is None and allowed and info.format == "torch-legacy":
                # a module pickled in the pre-1.6 format carries its class's source code as a
                # persistent id, which weights_only (rightly) refuses
                raise ModelError(f"{str(p)!r} pickles a whole {allowed[0][1]} in torch's legacy (pre-1.6) format, "
                                 "which torch.load(weights_only=True) cannot read and cxrkit will not unpickle; "
                                 f"{how}") from e
            if m is None or len(allowed) >= _MAX_STAND_INS:
                reason = next((ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln),
                              str(e).splitlines()[0] if str(e) else "")
                raise ModelError(f"{str(p)!r}: torch.load(weights_only=True) refused the file ({reason[:300]}); "
                                 f"cxrkit never unpickles arbitrary objects; {how}") from e
            name = m.group(1)
            if any(n == name for _, n in allowed):  # allowed and still refused: give up
                raise ModelError(f"{str(p)!r}: cannot read {name} safely; {how}") from e
            allowed.append((_stand_in(name), name))
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise ModelError(f"{str(p)!r}: not a readable torch checkpoint ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300] if str(e) else ''})") from e
    info.stand_ins = [n for _, n in allowed]
    if info.stand_ins:
        log.warning("%s pickles objects (%s%s); their tensors were read through torch.load(weights_only=True) "
                    "with inert stand-ins, no code from the file ran", p.name, ", ".join(info.stand_ins[:4]),
                    " ..." if len(info.stand_ins) > 4 else "")
    return obj, info


def _is_tensor(v: Any) -> bool:
    import torch

    return isinstance(v, torch.Tensor)


def _module_tensors(obj: Any, prefix: str, out: dict[str, Any], depth: int = 0) -> None:
    """Parameters and persistent buffers of a pickled nn.Module (real or stand-in), state_dict keys."""
    if depth > 64:
        raise ModelError("module tree deeper than 64 levels: not a network checkpoint")
    d = getattr(obj, "__dict__", {})
    nonpersistent = d.get("_non_persistent_buffers_set")
    nonpersistent = nonpersistent if isinstance(nonpersistent, (set, frozenset)) else set()
    for k, v in (d.get("_parameters") or {}).items():
        if _is_tensor(v):
            out[prefix + k] = v
    for k, v in (d.get("_buffers") or {}).items():
        if _is_tensor(v) and k not in nonpersistent:
            out[prefix + k] = v
    for k, m in (d.get("_modules") or {}).items():
        if m is not None:
            _module_tensors(m, f"{prefix}{k}.", out, depth + 1)


def _looks_like_module(obj: Any) -> bool:
    d = getattr(obj, "__dict__", None)
    return isinstance(d, dict) and isinstance(d.get("_modules"), Mapping) and isinstance(d.get("_parameters"), Mapping)


def find_state_dict(obj: Any, where: str = "") -> tuple[dict[str, Any], str]:
    """The ``{key: tensor}`` state dict inside a loaded checkpoint object -> (state, where it was)."""
    if _looks_like_module(obj):
        out: dict[str, Any] = {}
        _module_tensors(obj, "", out)
        if out:
            return out, where or "a pickled module"
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and _is_tensor(v)}
        if tensors and len(tensors) >= 0.5 * len(obj):
            return tensors, where or "the top level"
        for key in _WRAPPER_KEYS:
            if key in obj:
                try:
                    return find_state_dict(obj[key], f"{where}[{key!r}]")
                except ModelError:
                    continue
        keys = ", ".join(repr(k) for k in list(obj)[:12])
        raise ModelError(f"no state dict found in the checkpoint{' at ' + where if where else ''}: a dict with keys "
                         f"{keys}; expected {{name: tensor}} or a wrapper such as {{'state_dict': ...}}")
    raise ModelError(f"no state dict found in the checkpoint{' at ' + where if where else ''}: got "
                     f"{type(obj).__name__}; {_HOW_TO_EXPORT}")


# -- key layout -------------------------------------------------------------------------------

# anchors: a key that ends with one of these names the architecture; what precedes it is a prefix
_ANCHORS = {"densenet": "features.conv0.weight", "resnet": "layer1.0.conv1.weight"}


def canonical_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], str, list[str]]:
    """(torchvision-layout state, family "densenet" | "resnet", notes on what was changed)."""
    notes: list[str] = []
    family = prefix = None
    for fam, anchor in _ANCHORS.items():
        hits = sorted((k for k in state if k == anchor or k.endswith("." + anchor)), key=len)
        if hits:
            family, prefix = fam, hits[0][: -len(anchor)]
            break
    if family is None:
        sample = ", ".join(sorted(state)[:6])
        raise ModelError(f"not a torchvision DenseNet or ResNet state dict: no key ends with "
                         f"{' or '.join(_ANCHORS.values())} (keys start: {sample} ...); "
                         "for other networks export ONNX and use `cxrkit import-model model.onnx`")
    out: dict[str, Any] = {}
    dropped = []
    for k, v in state.items():
        if not k.startswith(prefix):
            dropped.append(k)
            continue
        out[k[len(prefix):]] = v
    if prefix:
        notes.append(f"stripped the key prefix {prefix!r}")
    if dropped:
        notes.append(f"ignored {len(dropped)} tensors outside {prefix!r}: {', '.join(sorted(dropped)[:4])}")
    renamed = 0
    for k in list(out):
        m = _OLD_DENSENET.match(k)
        if m:
            out[m.group(1) + m.group(2)] = out.pop(k)
            renamed += 1
    if renamed:
        notes.append(f"renamed {renamed} pre-0.4 DenseNet keys (norm.1 -> norm1)")
    head = "classifier" if family == "densenet" else "fc"
    if f"{head}.weight" not in out:
        seq = sorted({k.split(".")[1] for k in out if k.startswith(head + ".") and k.endswith(".weight")})
        if len(seq) == 1 and seq[0].isdigit():
            i = seq[0]
            for part in ("weight", "bias"):
                if f"{head}.{i}.{part}" in out:
                    out[f"{head}.{part}"] = out.pop(f"{head}.{i}.{part}")
            notes.append(f"classifier {head}.{i} of a Sequential (e.g. Linear + Sigmoid) used as {head}")
        else:
            raise ModelError(f"no classifier: expected {head}.weight (or one Linear inside a Sequential {head}), "
                             f"found {sorted(k for k in out if k.startswith(head + '.'))[:6]}")
    return out, family, notes


@dataclass(frozen=True)
class ArchSpec:
    name: str  # densenet121 / densenet169 / densenet201 / resnet50 / resnet101, or a generic description
    net: str  # the cxrkit.nets name: densenet_cam / resnet_cam
    kwargs: dict[str, Any]  # arch_kwargs without num_classes / channels / normalization
    in_channels: int
    num_classes: int
    num_features: int


def detect_arch(state: Mapping[str, Any], family: str) -> ArchSpec:
    """The architecture a canonical state dict belongs to, read from its keys and shapes."""
    from ..nets.cam import DENSENET_CONFIGS, RESNET_CONFIGS

    if family == "densenet":
        blocks = []
        i = 1
        while any(k.startswith(f"features.denseblock{i}.") for k in state):
            n = 0
            while f"features.denseblock{i}.denselayer{n + 1}.conv1.weight" in state:
                n += 1
            blocks.append(n)
            i += 1
        conv0 = state["features.conv0.weight"]
        growth = int(state["features.denseblock1.denselayer1.conv2.weight"].shape[0])
        bn_size = int(state["features.denseblock1.denselayer1.conv1.weight"].shape[0]) // growth
        kw = dict(growth_rate=growth, block_config=blocks, num_init_features=int(conv0.shape[0]), bn_size=bn_size)
        name = next((n for n, c in DENSENET_CONFIGS.items()
                     if c["block_config"] == tuple(blocks) and c["growth_rate"] == growth
                     and c["num_init_features"] == kw["num_init_features"] and bn_size == 4),
                    f"densenet(growth {growth}, blocks {tuple(blocks)})")
        fc = state["classifier.weight"]
        return ArchSpec(name, "densenet_cam", kw, int(conv0.shape[1]), int(fc.shape[0]), int(fc.shape[1]))
    layers = []
    for i in range(1, 5):
        n = 0
        while f"layer{i}.{n}.conv1.weight" in state:
            n += 1
        layers.append(n)
    if "layer1.0.conv3.weight" not in state:
        raise ModelError("a ResNet with basic blocks (ResNet-18/34): only Bottleneck ResNets (50/101) are supported; "
                         "export ONNX and use `cxrkit import-model model.onnx`")
    if int(state["layer1.0.conv1.weight"].shape[0]) != 64 or int(state["layer1.0.conv2.weight"].shape[1]) != 64:
        raise ModelError("a wide ResNet or ResNeXt (layer1.0 is not 64 channels wide): not supported; "
                         "export ONNX and use `cxrkit import-model model.onnx`")
    name = next((n for n, c in RESNET_CONFIGS.items() if c["layers"] == tuple(layers)), f"resnet(layers {tuple(layers)})")
    fc = state["fc.weight"]
    return ArchSpec(name, "resnet_cam", dict(layers=layers), int(state["conv1.weight"].shape[1]),
                    int(fc.shape[0]), int(fc.shape[1]))
