"""Trust: weights load only from safetensors or ONNX, never from a pickle; files match their hashes.

A canary pickle (its ``__reduce__`` would create a file when unpickled) is put where weights are
expected in several disguises; each must be refused with a clear error and the canary must never
fire. A source scan checks that no module of cxrkit calls a pickle loader at all.
"""

from __future__ import annotations

import ast
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest

import cxrkit
from cxrkit.errors import BackendError, IntegrityError, ModelError
from cxrkit.models import load_model_package

PROBE = Path(cxrkit.__file__).parent / "models" / "cxr-probe"
CANARY = "cxrkit-canary-fired"


class _Canary:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _package(tmp_path: Path, *, weights: str | None = None, onnx: str | None = None, payload: bytes | None = None) -> Path:
    d = tmp_path / "pkg"
    shutil.copytree(PROBE, d)
    card = json.loads((d / "card.json").read_text())
    blob = payload if payload is not None else pickle.dumps({"state_dict": _Canary(str(tmp_path / CANARY))})
    for kind, name in (("weights", weights), ("onnx", onnx)):
        if name is None:
            continue
        (d / name).write_bytes(blob)
        card["files"][kind] = name
        # the card's author is the attacker here: the hash matches, so the loader itself must refuse
        card["sha256"][name] = hashlib.sha256(blob).hexdigest()
    (d / "card.json").write_text(json.dumps(card))
    return d


@pytest.mark.parametrize("name", ["weights.pt", "weights.pth", "weights.pkl", "weights.bin", "weights.ckpt"])
def test_pickled_weights_refused_by_name(tmp_path, name):
    pytest.importorskip("torch")
    d = _package(tmp_path, weights=name)
    with pytest.raises(ModelError, match=r"must be a \.safetensors file \(pickled checkpoints are not loaded\)"):
        cxrkit.Detector.from_pretrained(d, backend="torch")
    assert not (tmp_path / CANARY).exists()


def test_pickle_disguised_as_safetensors_refused(tmp_path):
    pytest.importorskip("torch")
    d = _package(tmp_path, weights="weights.safetensors")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        cxrkit.Detector.from_pretrained(d, backend="torch")
    assert not (tmp_path / CANARY).exists()


def test_pickle_disguised_as_onnx_refused(tmp_path):
    pytest.importorskip("onnxruntime")
    d = _package(tmp_path, onnx="model.onnx")
    with pytest.raises(BackendError, match="could not load"):
        cxrkit.Detector.from_pretrained(d, backend="onnxruntime")
    assert not (tmp_path / CANARY).exists()


def test_pickle_paths_are_not_model_paths(tmp_path):
    p = tmp_path / "model.pt"
    p.write_bytes(pickle.dumps(_Canary(str(tmp_path / CANARY))))
    with pytest.raises(ModelError, match="no model"):
        load_model_package(p)
    assert not (tmp_path / CANARY).exists()


def test_tampered_safetensors_refused_before_loading(tmp_path):
    pytest.importorskip("torch")
    d = _package(tmp_path)
    w = d / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        cxrkit.Detector.from_pretrained(d, backend="torch")


_PICKLE_LOADERS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("dill", "load"),
                   ("joblib", "load"), ("cloudpickle", "load"), ("torch.jit", "load"), ("pd", "read_pickle"),
                   ("pandas", "read_pickle")}


def test_no_module_calls_a_pickle_loader():
    """numpy.load counts only with allow_pickle=True (its default has been False since numpy 1.16.3)."""
    root = Path(cxrkit.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                call = (ast.unparse(node.func.value), node.func.attr)
                numpy_pickle = call in (("np", "load"), ("numpy", "load")) and any(
                    k.arg == "allow_pickle" and ast.unparse(k.value) != "False" for k in node.keywords
                )
                # torch.load counts unless it passes weights_only=True literally (the restricted unpickler)
                torch_safe = call == ("torch", "load") and any(
                    k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in node.keywords
                )
                if (call in _PICKLE_LOADERS and not torch_safe) or numpy_pickle:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node.func)}")
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "cloudpickle", "joblib"):
                # exception classes only (to catch what torch.load(weights_only=True) raises)
                if all(a.name.endswith("Error") for a in node.names):
                    continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n in ("pickle", "dill", "cloudpickle", "joblib") for n in names if n):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: imports {names}")
    assert not found, found
