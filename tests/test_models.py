"""Model packages: discovery, card validation with clear messages, hash verification."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import cxrkit
from cxrkit.errors import IntegrityError, ModelCardError, ModelError
from cxrkit.models import load_model_package


def _copy_probe(tmp_path: Path) -> Path:
    src = Path(cxrkit.__file__).parent / "models" / "cxr-probe"
    dst = tmp_path / "probe"
    shutil.copytree(src, dst)
    return dst


def test_bundled_models_listed():
    assert "cxr-probe" in cxrkit.list_models()


def test_load_by_name_folder_card_and_onnx(tmp_path):
    d = _copy_probe(tmp_path)
    for ref in ("cxr-probe", d, d / "card.json", d / "model.onnx"):
        m = load_model_package(ref)
        assert m.card.labels[0] == "nodule" and m.card.heatmap_hw == (32, 32)


def test_unknown_model_names_the_choices():
    with pytest.raises(ModelError, match="cxr-probe"):
        load_model_package("no-such-model")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c.pop("labels"), "'labels' is a required property"),
        # labels outside the ontology are allowed (imported models keep their own) but must be keys
        (lambda c: c.__setitem__("labels", ["nodule", "Unicorn Horn"]), "Unicorn Horn"),
        (lambda c: c["thresholds"].__setitem__("nodule", 1.5), "thresholds/nodule"),
        (lambda c: c.__setitem__("heatmap_stride", 7), "not a multiple of heatmap_stride"),
        (lambda c: c["thresholds"].pop("mass"), "thresholds missing"),
        (lambda c: c.__setitem__("schema_version", 2), "schema_version"),
    ],
)
def test_invalid_cards_are_refused_with_a_clear_message(tmp_path, mutate, match):
    d = _copy_probe(tmp_path)
    card = json.loads((d / "card.json").read_text())
    mutate(card)
    (d / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match=match):
        load_model_package(d)


def test_tampered_weights_are_refused(tmp_path):
    d = _copy_probe(tmp_path)
    data = bytearray((d / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (d / "model.onnx").write_bytes(bytes(data))
    m = load_model_package(d)
    with pytest.raises(IntegrityError, match="sha256"):
        m.verified("onnx")
    with pytest.raises(IntegrityError):
        cxrkit.Detector(m, backend="onnxruntime")


@pytest.mark.parametrize("drop", ["model.onnx", "weights.safetensors", "all"])
def test_card_without_a_hash_is_refused(tmp_path, drop):
    """A file the card names but does not hash is refused at load, and a tampered copy of it never loads."""
    d = _copy_probe(tmp_path)
    card = json.loads((d / "card.json").read_text())
    if drop == "all":
        del card["sha256"]
    else:
        del card["sha256"][drop]
        data = bytearray((d / drop).read_bytes())
        data[-1] ^= 0x01  # tampered AND unhashed: the case that used to load silently
        (d / drop).write_bytes(bytes(data))
    (d / "card.json").write_text(json.dumps(card))
    match = "'sha256' is a required property" if drop == "all" else rf"no sha256 in the card for \['{drop}'\]"
    with pytest.raises(ModelCardError, match=match):
        load_model_package(d)
    with pytest.raises(ModelCardError, match=match):
        cxrkit.Detector.from_pretrained(d, backend="onnxruntime")


def test_card_hashing_only_some_files_of_a_quantized_package_is_refused(tmp_path):
    """Every kind of file counts, not only onnx/weights (here an int8 graph the card names)."""
    d = _copy_probe(tmp_path)
    shutil.copy(d / "model.onnx", d / "model.int8.onnx")
    card = json.loads((d / "card.json").read_text())
    card["files"]["onnx_int8"] = "model.int8.onnx"
    (d / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match="model.int8.onnx"):
        load_model_package(d)


def test_hand_built_package_without_hash_is_refused_before_use(tmp_path):
    """verified() does not trust that the card went through load_model_package."""
    from cxrkit.models import ModelCard, ModelPackage

    d = _copy_probe(tmp_path)
    raw = json.loads((d / "card.json").read_text())
    del raw["sha256"]["weights.safetensors"]
    pkg = ModelPackage(d, ModelCard(raw))
    assert pkg.verified("onnx") == d / "model.onnx"
    with pytest.raises(ModelCardError, match="no sha256 for weights file 'weights.safetensors'"):
        pkg.verified("weights")


def test_not_json(tmp_path):
    d = _copy_probe(tmp_path)
    (d / "card.json").write_text("{not json")
    with pytest.raises(ModelCardError, match="cannot read"):
        load_model_package(d)


def test_card_refuses_pickle_weight_files(tmp_path):
    d = _copy_probe(tmp_path)
    card = json.loads((d / "card.json").read_text())
    card["files"]["weights"] = "weights.pt"
    (d / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match=r"files/weights.*safetensors"):
        load_model_package(d)
