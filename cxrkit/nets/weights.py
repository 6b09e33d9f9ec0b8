"""Net weights as safetensors only (never pickles): strict load with errors that name the keys."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ..errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["load_weights", "save_weights"]


def _few(keys: "list[str]", n: int = 8) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_weights(net: "torch.nn.Module", path: "str | Path") -> "torch.nn.Module":
    """Load a ``.safetensors`` file into ``net`` with a strict key and shape match; returns ``net``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if p.suffix != ".safetensors":
        raise ModelError(f"{str(p)!r}: weights must be a .safetensors file (pickled checkpoints are not loaded)")
    if not p.is_file():
        raise ModelError(f"{str(p)!r}: weights file does not exist")
    try:
        state = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{str(p)!r}: not a readable safetensors file: {e}") from e
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the file: {_few(missing)}")
        if unexpected:
            parts.append(f"not in the net: {_few(unexpected)}")
        raise ModelError(
            f"{str(p)!r} does not match {type(net).__name__} ({len(own)} tensors): " + "; ".join(parts)
            + ". Check the card's arch and arch_kwargs."
        )
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        raise ModelError(f"{str(p)!r}: tensor shapes differ from the net (file vs net): {_few(bad, 4)}")
    net.load_state_dict(state, strict=True)
    return net


def save_weights(net: "torch.nn.Module", path: "str | Path", metadata: "Mapping[str, str] | None" = None) -> Path:
    """Write ``net.state_dict()`` (parameters and persistent buffers) to ``path`` as safetensors."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(p), metadata=dict(metadata or {}))
    p.chmod(0o644)  # safetensors creates files owner-only; a packaged model is world-readable
    return p
