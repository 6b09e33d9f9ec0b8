"""Torch architectures of the detector network, by name, and their ONNX export.

Every net here meets the model-package contract (DESIGN.md): ``forward(image)`` takes
``(B, 1, H, W)`` float32 in the card's *normalized* space and returns ``(logits, heatmaps)``,
``logits`` ``(B, K)`` and ``heatmaps`` ``(B, K, H/s, W/s)``, both pre-sigmoid. Each net carries
``num_classes`` and ``heatmap_stride`` attributes.

    net = create_net("cxrnet", num_classes=29)
    load_weights(net, "weights.safetensors")
    export_onnx(net, "model.onnx", input_hw=(256, 256))

torch is imported lazily: ``import cxrkit`` does not need it, ``create_net`` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["register_net", "create_net", "list_nets", "export_onnx", "load_weights", "save_weights"]

_F = TypeVar("_F", bound=Callable[..., Any])
_REGISTRY: dict[str, Callable[..., Any]] = {}
# Modules whose import registers the built-in nets (imported on first use, not at import time).
_BUILTIN_MODULES = ("probe", "cxrnet", "densenet", "cam")
_builtins_loaded = False


def register_net(name: str) -> Callable[[_F], _F]:
    """Decorator: register a constructor (class or function) under ``name``."""

    def deco(fn: _F) -> _F:
        if getattr(fn, "__module__", "") == "__main__":
            return fn  # ``python -m cxrkit.nets.x``: the importable module registers it instead
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"a net named {name!r} is already registered ({_REGISTRY[name]!r})")
        _REGISTRY[name] = fn
        return fn

    return deco


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        for mod in _BUILTIN_MODULES:
            importlib.import_module(f"{__name__}.{mod}")
        _builtins_loaded = True


def list_nets() -> list[str]:
    """Names of every registered net (built-ins included)."""
    _load_builtins()
    return sorted(_REGISTRY)


def create_net(name: str, **kwargs: Any) -> "torch.nn.Module":
    """Build the net registered as ``name`` with ``kwargs`` (a card's ``arch_kwargs``), in eval mode."""
    _load_builtins()
    try:
        ctor = _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown net {name!r}; registered nets: {', '.join(sorted(_REGISTRY))}") from None
    try:
        net = ctor(**kwargs)
    except TypeError as e:
        raise ModelError(f"net {name!r} rejected arch_kwargs {sorted(kwargs)}: {e}") from e
    return net.eval()


from .weights import load_weights, save_weights  # noqa: E402
from .onnx_export import export_onnx  # noqa: E402
