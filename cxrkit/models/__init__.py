"""Model packages: a card.json beside an ONNX graph and/or safetensors weights.

Bundled packages live in folders next to this file (``cxrkit/models/<name>/``); a user brings
their own by pointing ``Detector.from_pretrained`` at a folder, a card.json or an .onnx file with
a card.json beside it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import IntegrityError, ModelCardError, ModelError
from ..labels import FINDINGS

__all__ = ["ModelCard", "ModelPackage", "list_models", "load_model_package", "CARD_SCHEMA", "sha256_file"]

_HERE = Path(__file__).resolve().parent

CARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["schema_version", "name", "version", "labels", "input_size", "normalization",
                 "heatmap_stride", "thresholds", "files", "sha256"],
    "properties": {
        "schema_version": {"const": 1},
        "name": {"type": "string", "minLength": 1},
        "version": {"type": "string"},
        "arch": {"type": ["string", "null"]},
        "arch_kwargs": {"type": "object"},
        # ontology keys (cxrkit.labels) or, for imported models, the source's own labels as snake_case keys
        "labels": {"type": "array", "items": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
                   "minItems": 1, "uniqueItems": True},
        "label_names": {"type": "object", "additionalProperties": {"type": "string"}},  # key -> display name
        "input_size": {"type": "array", "items": {"type": "integer", "minimum": 16, "maximum": 4096},
                       "minItems": 2, "maxItems": 2},
        "normalization": {
            "type": "object", "required": ["mean", "std"],
            "properties": {"mean": {"type": "number"}, "std": {"type": "number", "exclusiveMinimum": 0}},
        },
        "heatmap_stride": {"type": "integer", "minimum": 1, "maximum": 64},
        # the source model's input convention (imported models); absent: letterbox, 1 channel
        "input": {
            "type": "object",
            "properties": {
                "fit": {"enum": ["letterbox", "center_crop", "stretch"]},
                "channels": {"type": "integer", "minimum": 1},  # gray replicated inside the graph
                "channel_mean": {"type": "array", "items": {"type": "number"}},  # inside the graph
                "channel_std": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}},
                "convention": {"type": "string"},
            },
        },
        "heatmap": {"type": "object"},  # how heatmaps are made (e.g. {"kind": "cam", ...})
        "source": {"type": "object"},  # what an imported model was converted from
        "thresholds": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1}},
        "heatmap_thresholds": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1}},
        "enabled": {"type": "object", "additionalProperties": {"type": "boolean"}},
        "files": {
            "type": "object",
            "properties": {
                "weights": {"type": "string", "pattern": "\\.safetensors$"},
                "onnx": {"type": "string", "pattern": "\\.onnx$"},
                "onnx_fp16": {"type": "string", "pattern": "\\.onnx$"},
                "onnx_int8": {"type": "string", "pattern": "\\.onnx$"},
                "onnx_int8_cpu": {"type": "string", "pattern": "\\.onnx$"},
            },
            "minProperties": 1,
        },
        # one entry per file named in "files", keyed by that file's path as written there (checked in _validate)
        "sha256": {"type": "object", "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
        "localize": {"type": "object"},
        "description": {"type": "string"},
        "intended_use": {"type": "string"},
        "training": {},
        "metrics": {},
    },
}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _validate(card: Mapping[str, Any], where: str) -> None:
    import jsonschema

    files = card.get("files") if isinstance(card, Mapping) else None
    if isinstance(files, Mapping):
        w = files.get("weights")
        if isinstance(w, str) and not w.endswith(".safetensors"):
            raise ModelCardError(f"{where}: files/weights {w!r} must be a .safetensors file "
                                 "(pickled checkpoints are not loaded)")
    v = jsonschema.Draft202012Validator(CARD_SCHEMA)
    errs = sorted(v.iter_errors(card), key=lambda e: list(e.path))
    if errs:
        lines = [f"{'/'.join(map(str, e.path)) or '(top)'}: {e.message}" for e in errs[:8]]
        raise ModelCardError(f"{where}: card.json is invalid:\n  " + "\n  ".join(lines))
    unhashed = [rel for rel in card["files"].values() if rel not in card["sha256"]]
    if unhashed:
        raise ModelCardError(
            f"{where}: no sha256 in the card for {unhashed}; every file a card names must carry its sha256, "
            f"checked before the file is used. Add \"sha256\": {{\"{unhashed[0]}\": \"<the 64 hex digits "
            f"`sha256sum {unhashed[0]}` prints>\", ...}} (cxrkit quantize and cxrkit import-model write them)"
        )
    labels = card["labels"]  # keys outside cxrkit.labels are allowed (imported models keep their own)
    for field in ("thresholds", "heatmap_thresholds", "enabled", "label_names"):
        extra = set(card.get(field, {})) - set(labels)
        if extra:
            raise ModelCardError(f"{where}: {field} names findings not in labels: {sorted(extra)}")
    missing = [k for k in labels if k not in card["thresholds"]]
    if missing:
        raise ModelCardError(f"{where}: thresholds missing for {missing}")
    h, w = card["input_size"]
    s = card["heatmap_stride"]
    if h % s or w % s:
        raise ModelCardError(f"{where}: input_size {card['input_size']} is not a multiple of heatmap_stride {s}")


@dataclass(frozen=True)
class ModelCard:
    raw: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def version(self) -> str:
        return self.raw["version"]

    @property
    def arch(self) -> str | None:
        return self.raw.get("arch")

    @property
    def arch_kwargs(self) -> dict[str, Any]:
        return dict(self.raw.get("arch_kwargs", {}))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.raw["labels"])

    @property
    def num_classes(self) -> int:
        return len(self.raw["labels"])

    @property
    def input_hw(self) -> tuple[int, int]:
        h, w = self.raw["input_size"]
        return int(h), int(w)

    @property
    def heatmap_stride(self) -> int:
        return int(self.raw["heatmap_stride"])

    @property
    def heatmap_hw(self) -> tuple[int, int]:
        h, w = self.input_hw
        return h // self.heatmap_stride, w // self.heatmap_stride

    @property
    def fit(self) -> str:
        """How an image is fitted to the input: "letterbox" (default), "center_crop" or "stretch"."""
        return str(self.raw.get("input", {}).get("fit", "letterbox"))

    def display_name(self, key: str) -> str:
        """The card's name for label ``key``, else the ontology's display name, else the key."""
        names = self.raw.get("label_names", {})
        if key in names:
            return str(names[key])
        return FINDINGS[key].display_name if key in FINDINGS else key

    @property
    def mean(self) -> float:
        return float(self.raw["normalization"]["mean"])

    @property
    def std(self) -> float:
        return float(self.raw["normalization"]["std"])

    @property
    def enabled(self) -> np.ndarray:
        en = self.raw.get("enabled", {})
        return np.array([bool(en.get(k, True)) for k in self.labels])

    @property
    def thresholds(self) -> np.ndarray:
        """(K,) float32 image-level operating thresholds, in label order."""
        t = self.raw["thresholds"]
        return np.array([t[k] for k in self.labels], np.float32)

    @property
    def heatmap_thresholds(self) -> np.ndarray:
        """(K,) float32 peak thresholds; a disabled finding gets 1.0 plus (never fires)."""
        t = self.raw.get("heatmap_thresholds", {})
        base = self.raw["thresholds"]
        out = np.array([t.get(k, base[k]) for k in self.labels], np.float32)
        out[~self.enabled] = np.float32(2.0)
        return out


@dataclass(frozen=True)
class ModelPackage:
    root: Path
    card: ModelCard

    @property
    def name(self) -> str:
        return self.card.name

    def file(self, kind: str) -> Path | None:
        rel = self.card.raw["files"].get(kind)
        return None if rel is None else self.root / rel

    @property
    def onnx_path(self) -> Path | None:
        return self.file("onnx")

    @property
    def weights_path(self) -> Path | None:
        return self.file("weights")

    def verified(self, kind: str) -> Path:
        """The path of file ``kind`` after checking it exists and matches the card's sha256."""
        p = self.file(kind)
        if p is None:
            raise ModelError(f"model {self.name!r}: the card names no {kind!r} file")
        if not p.is_file():
            raise ModelError(f"model {self.name!r}: {kind} file {str(p)!r} does not exist")
        rel = self.card.raw["files"][kind]
        want = self.card.raw.get("sha256", {}).get(rel)
        if want is None:  # load_model_package refuses such cards; a ModelPackage built by hand too
            raise ModelCardError(f"model {self.name!r}: the card has no sha256 for {kind} file {rel!r}; "
                                 "every file a card names must carry its sha256, checked before use")
        got = self._hash(p)
        if got != want:
            raise IntegrityError(
                f"model {self.name!r}: {rel} has sha256 {got[:16]}…, the card says {want[:16]}…; "
                "the file was changed or corrupted: reinstall or re-export it"
            )
        return p

    @cached_property
    def content_hash(self) -> str:
        """A hash of the card and every model file (used to key engine caches)."""
        h = hashlib.sha256(json.dumps(self.card.raw, sort_keys=True).encode())
        for kind in ("onnx", "weights"):
            p = self.file(kind)
            if p is not None and p.is_file():
                h.update(self._hash(p).encode())
        return h.hexdigest()

    @staticmethod
    def _hash(p: Path) -> str:
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        hit = _HASH_CACHE.get(key)
        if hit is None:
            hit = _HASH_CACHE[key] = sha256_file(p)
        return hit


_HASH_CACHE: dict[tuple, str] = {}


def list_models() -> list[str]:
    """Names of the model packages bundled with cxrkit."""
    return sorted(p.parent.name for p in _HERE.glob("*/card.json"))


def load_model_package(name_or_path: "str | Path") -> ModelPackage:
    """Resolve a bundled model name, a folder, a card.json, or an .onnx file with a card.json beside it."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    if (_HERE / s / "card.json").is_file() and "/" not in s:
        card_path = _HERE / s / "card.json"
    elif p.is_dir():
        card_path = p / "card.json"
    elif p.is_file() and p.name.endswith(".json"):
        card_path = p
    elif p.is_file() and p.suffix in (".onnx", ".safetensors"):
        card_path = p.parent / "card.json"
    else:
        raise ModelError(
            f"no model {s!r}: not a bundled model ({', '.join(list_models()) or 'none installed'}) "
            "and not a folder or file holding a card.json"
        )
    if not card_path.is_file():
        raise ModelError(f"model {s!r}: {str(card_path)!r} does not exist; every model needs a card.json")
    try:
        raw = json.loads(card_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelCardError(f"{card_path}: cannot read card.json: {e}") from e
    _validate(raw, str(card_path))
    return ModelPackage(card_path.parent, ModelCard(raw))
