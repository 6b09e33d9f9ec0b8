"""cxrkit import-model: checkpoint variations, safety, errors, ONNX heads, input fits, and labels
outside the ontology through every writer. Small networks (a tiny DenseNet at 64 x 64) keep it fast;
parity with the real source libraries is tests/test_convert.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from cxrkit.convert import import_model  # noqa: E402
from cxrkit.convert.checkpoint import canonical_state, find_state_dict, read_checkpoint  # noqa: E402
from cxrkit.errors import ModelError  # noqa: E402

FIX = Path(__file__).resolve().parent / "fixtures" / "convert"
TINY = dict(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2)
LABELS = ["Nodule", "Lung Lesion", "Effusion", "Fracture"]


def _gen():
    spec = importlib.util.spec_from_file_location("cxrkit_test_weights_gen", FIX / "weights_gen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_state(in_channels: int = 3, k: int = len(LABELS), seed: int = 0) -> dict:
    """A torchvision-layout DenseNet state dict (tiny config), well-scaled random weights."""
    from cxrkit.nets import create_net

    sd = create_net("densenet_cam", num_classes=k, in_channels=in_channels, **TINY).state_dict()
    vals = _gen().fill_state({n: list(v.shape) for n, v in sd.items()}, seed)
    return {n: torch.from_numpy(v).reshape(sd[n].shape) for n, v in vals.items()}


def probe(n=2, hw=64, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, 1, hw, hw)).astype(np.float32)


def ort(pkg, x):
    import onnxruntime as rt

    s = rt.InferenceSession(str(pkg.verified("onnx")), providers=["CPUExecutionProvider"])
    return s.run(["logits", "heatmaps"], {"image": x})


# -- key layout variations (no export needed: canonical_state is the whole mapping) ------------

def _old_names(sd):
    out = {}
    for k, v in sd.items():
        out[re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k)] = v
    return out


VARIANTS = {
    "plain": lambda sd: sd,
    "DataParallel module.": lambda sd: {"module." + k: v for k, v in sd.items()},
    "CheXNet module.densenet121. + Sequential(Linear, Sigmoid)": lambda sd: {
        "module.densenet121." + k.replace("classifier.", "classifier.0."): v for k, v in sd.items()},
    "torch < 0.4 DenseNet keys (norm.1)": _old_names,
    "no num_batches_tracked (torch < 0.4.1)": lambda sd: {k: v for k, v in sd.items() if "num_batches" not in k},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_key_variants_map_to_torchvision_layout(variant):
    sd = tiny_state()
    got, family, notes = canonical_state(VARIANTS[variant](sd))
    assert family == "densenet"
    want = {k: v for k, v in sd.items() if variant.startswith("no num_batches") is False or "num_batches" not in k}
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert bool(notes) == (variant != "plain" and not variant.startswith("no num_batches"))


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3, "best_loss": 0.2},
    lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []}},
    lambda sd: {"model": {"module." + k: v for k, v in sd.items()}},
])
def test_wrapped_checkpoints_are_found(tmp_path, wrap):
    sd = tiny_state()
    torch.save(wrap(sd), tmp_path / "c.pth")
    obj, info = read_checkpoint(tmp_path / "c.pth")
    assert info.format == "torch-zip" and info.stand_ins == []
    state, where = find_state_dict(obj)
    got, _, _ = canonical_state(state)
    assert set(got) == set(sd)


def test_every_variant_converts_to_the_same_model(tmp_path):
    """Full imports of three layouts (plain .pth, CheXNet wrapper with old keys, .safetensors) give
    the same logits and heatmaps."""
    from safetensors.torch import save_file

    sd = tiny_state()
    torch.save(sd, tmp_path / "plain.pth")
    torch.save({"state_dict": _old_names(VARIANTS["CheXNet module.densenet121. + Sequential(Linear, Sigmoid)"](sd))},
               tmp_path / "chexnet.pth.tar")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    x = probe()
    outs = []
    for i, src in enumerate(["plain.pth", "chexnet.pth.tar", "w.safetensors"]):
        pkg = import_model(tmp_path / src, tmp_path / f"pkg{i}", labels=LABELS, input_size=64).package
        outs.append(ort(pkg, x))
    _assert_head_names(pkg)
    for lg, hm in outs[1:]:
        np.testing.assert_array_equal(lg, outs[0][0])
        np.testing.assert_array_equal(hm, outs[0][1])


def _assert_head_names(pkg):
    """The classifier and CAM nodes carry cxrkit.convert.HEAD_NODES (what --keep-fp32 names)."""
    import onnx

    from cxrkit.convert import HEAD_NODES

    names = {n.name: n for n in onnx.load(str(pkg.verified("onnx"))).graph.node}
    assert names[HEAD_NODES[1]].op_type == "Conv" and names[HEAD_NODES[1]].output[0] == "heatmaps"
    assert names[HEAD_NODES[0]].op_type in ("Gemm", "MatMul")


# -- safety --------------------------------------------------------------------------------

class _Evil:
    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def test_a_malicious_checkpoint_runs_nothing(tmp_path):
    """Pickles whose unpickling would call code: torch refuses os.system / exec outright (ModelError);
    any other callable (shutil.rmtree here) becomes an inert stand-in, and the tensors are still found."""
    import shutil

    marker = tmp_path / "pwned"
    for evil in (_Evil(os.system, f"touch {marker}"), _Evil(exec, f"open({str(marker)!r}, 'w').close()")):
        torch.save({"state_dict": tiny_state(), "x": evil}, tmp_path / "evil.pth")
        with pytest.raises(ModelError, match="evil.pth"):
            read_checkpoint(tmp_path / "evil.pth")
        assert not marker.exists()
    victim = tmp_path / "victim"
    victim.mkdir()
    torch.save({"state_dict": tiny_state(), "x": _Evil(shutil.rmtree, str(victim))}, tmp_path / "evil.pth")
    obj, info = read_checkpoint(tmp_path / "evil.pth")
    assert victim.is_dir() and info.stand_ins == ["shutil.rmtree"]
    state, _ = find_state_dict(obj)
    assert "features.conv0.weight" in state


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pth").write_bytes(os.urandom(4096))
    with pytest.raises(ModelError, match="junk.pth"):
        import_model(tmp_path / "junk.pth", tmp_path / "pkg", labels=LABELS)
    with pytest.raises(ModelError, match="does not exist"):
        import_model(tmp_path / "missing.pth", tmp_path / "pkg", labels=LABELS)


# -- errors ----------------------------------------------------------------------------------

@pytest.fixture()
def tiny_ckpt(tmp_path):
    torch.save(tiny_state(), tmp_path / "tiny.pth")
    return tmp_path / "tiny.pth"


@pytest.mark.parametrize("kw, match", [
    (dict(labels=["a", "b"]), "2 labels for a classifier with 4 outputs"),
    (dict(), "--labels is needed: the checkpoint has 4 outputs"),
    (dict(labels=LABELS, arch="resnet50"), "--arch resnet50, but the checkpoint is a densenet"),
    (dict(labels=["Effusion", "pleural effusion", "a", "b"]), "map to the same key"),
    (dict(labels=LABELS, input_size=100), "multiple of the heatmap stride 32"),
    (dict(labels=LABELS, normalize="imagenet", thresholds="nodule=1.5"), "probability in"),
    (dict(labels=LABELS, thresholds="unicorn=0.3"), "not a label of the model"),
    (dict(labels=LABELS, normalize="zscore"), "--normalize must be one of"),
])
def test_bad_requests_are_refused_clearly(tiny_ckpt, tmp_path, kw, match):
    with pytest.raises(ModelError, match=match):
        import_model(tiny_ckpt, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_one_channel_net_needs_a_normalization(tmp_path):
    torch.save(tiny_state(in_channels=1), tmp_path / "g.pth")
    with pytest.raises(ModelError, match="--normalize is needed for a 1-channel network"):
        import_model(tmp_path / "g.pth", tmp_path / "o", labels=LABELS)
    with pytest.raises(ModelError, match="needs a 3-channel network"):
        import_model(tmp_path / "g.pth", tmp_path / "o", labels=LABELS, normalize="imagenet")


def test_shape_and_key_mismatches_name_the_tensors(tmp_path):
    sd = tiny_state()
    del sd["features.denseblock2.denselayer1.norm1.running_var"]
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(ModelError, match="missing features.denseblock2.denselayer1.norm1.running_var"):
        import_model(tmp_path / "m.pth", tmp_path / "o", labels=LABELS)


def test_basic_block_resnets_are_refused(tmp_path):
    sd = {"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3),
          "layer1.0.conv2.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(2, 512)}
    torch.save(sd, tmp_path / "r18.pth")
    with pytest.raises(ModelError, match="basic blocks"):
        import_model(tmp_path / "r18.pth", tmp_path / "o", labels="a,b")


def test_out_folder_rules(tiny_ckpt, tmp_path):
    out = tmp_path / "pkg"
    import_model(tiny_ckpt, out, labels=LABELS, input_size=64)
    with pytest.raises(ModelError, match="not empty"):
        import_model(tiny_ckpt, out, labels=LABELS, input_size=64)
    import_model(tiny_ckpt, out, labels=LABELS, input_size=64, overwrite=True)
    other = tmp_path / "home"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ModelError, match="holds no card.json"):
        import_model(tiny_ckpt, other, labels=LABELS, input_size=64, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"


def test_cli_import_model(tiny_ckpt, tmp_path, capsys):
    from cxrkit.cli import main

    out = tmp_path / "cli-pkg"
    rc = main(["import-model", str(tiny_ckpt), "--arch", "auto", "--labels", ",".join(LABELS), "--input-size", "64",
               "--normalize", "imagenet", "--out", str(out), "--thresholds", "Nodule=0.3,lung_lesion=0.2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "lung_lesion, fracture" in text
    card = json.loads((out / "card.json").read_text())
    assert card["thresholds"]["nodule"] == 0.3 and card["thresholds"]["lung_lesion"] == 0.2
    assert card["heatmap_thresholds"]["nodule"] == 0.3 and card["thresholds"]["fracture"] == 0.5
    rc = main(["import-model", str(tiny_ckpt), "--labels", "a,b", "--out", str(tmp_path / "x")])
    assert rc == 1 and "ModelError: 2 labels for a classifier with 4 outputs" in capsys.readouterr().err


# -- ONNX sources built here ---------------------------------------------------------------

class _Backbone(torch.nn.Module):
    def __init__(self, cin=3):
        super().__init__()
        self.c1 = torch.nn.Conv2d(cin, 8, 3, 2, 1)
        self.c2 = torch.nn.Conv2d(8, 16, 3, 2, 1)

    def forward(self, x):
        return torch.relu(self.c2(torch.relu(self.c1(x))))  # (B, 16, H/4, W/4)


class _MeanGemmSoftmax(torch.nn.Module):  # ReduceMean + Gemm + Softmax
    def __init__(self):
        super().__init__()
        self.b, self.fc = _Backbone(), torch.nn.Linear(16, 3)

    def forward(self, x):
        return torch.softmax(self.fc(self.b(x).mean((2, 3))), 1)


class _PoolMatMulAdd(torch.nn.Module):  # GlobalAveragePool + Flatten + MatMul + Add, 1 channel
    def __init__(self):
        super().__init__()
        self.b = _Backbone(1)
        self.w = torch.nn.Parameter(torch.randn(16, 3) * 0.3)
        self.bias = torch.nn.Parameter(torch.randn(3) * 0.1)

    def forward(self, x):
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.b(x), 1), 1) @ self.w + self.bias


class _LocalPool(torch.nn.Module):  # an AveragePool that is not global: no CAM identity
    def __init__(self):
        super().__init__()
        self.b, self.fc = _Backbone(), torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.nn.functional.avg_pool2d(self.b(x), 4), 1)[:, :16])


class _MlpHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.b, self.h1, self.h2 = _Backbone(), torch.nn.Linear(16, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.h2(torch.relu(self.h1(self.b(x).mean((2, 3)))))


def _export(model, path, cin, dynamic=True, hw=32):
    torch.manual_seed(0)
    model.eval()
    kw = dict(dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}) if dynamic else {}
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.rand(1, cin, hw, hw),), str(path), input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False, **kw)
    return model


@pytest.mark.parametrize("cls, cin, dynamic, normalize, pool, dropped", [
    (_MeanGemmSoftmax, 3, False, "imagenet", "ReduceMean", ["Softmax"]),
    (_PoolMatMulAdd, 1, True, "none", "GlobalAveragePool", []),
])
def test_onnx_heads(tmp_path, cls, cin, dynamic, normalize, pool, dropped):
    torch.manual_seed(0)
    model = _export(cls(), tmp_path / "m.onnx", cin, dynamic)
    res = import_model(tmp_path / "m.onnx", tmp_path / "pkg", labels="a,b,c", normalize=normalize)
    pkg = res.package
    assert pkg.card.raw["source"]["pool"] == pool and pkg.card.raw["source"]["dropped_after_linear"] == dropped
    assert pkg.card.input_hw == (32, 32) and pkg.card.heatmap_stride == 4 and pkg.card.fit == "letterbox"
    _assert_head_names(pkg)
    x = probe(3, 32)
    lg, hm = ort(pkg, x)  # batch 3 through a source exported at a fixed batch of 1
    xs = torch.from_numpy(np.repeat(x, cin, 1))
    if normalize == "imagenet":
        xs = (xs - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = model.b(xs)
        want = model.fc(feats.mean((2, 3))) if cls is _MeanGemmSoftmax else feats.mean((2, 3)) @ model.w + model.bias
    np.testing.assert_allclose(lg, want.numpy(), atol=1e-5)
    w = model.fc.weight if cls is _MeanGemmSoftmax else model.w.T
    b = model.fc.bias if cls is _MeanGemmSoftmax else model.bias
    from cxrkit.convert.reference import cam_reference

    np.testing.assert_allclose(hm, cam_reference(feats.numpy(), w.detach().numpy(), b.detach().numpy()), atol=1e-5)


@pytest.mark.parametrize("cls, match", [
    (_LocalPool, "not a global average|pool"),
    (_MlpHead, "fed by Relu, not a global average pool"),
])
def test_onnx_without_a_global_pool_and_linear_head_is_refused(tmp_path, cls, match):
    _export(cls(), tmp_path / "m.onnx", 3)
    with pytest.raises(ModelError, match=match):
        import_model(tmp_path / "m.onnx", tmp_path / "pkg", labels="a,b,c", normalize="imagenet")


def test_onnx_needs_labels_and_normalization(tmp_path):
    _export(_MeanGemmSoftmax(), tmp_path / "m.onnx", 3)
    with pytest.raises(ModelError, match="classifier has 3 outputs"):
        import_model(tmp_path / "m.onnx", tmp_path / "pkg", labels="a,b", normalize="imagenet")
    with pytest.raises(ModelError, match="--normalize is needed"):
        import_model(tmp_path / "m.onnx", tmp_path / "pkg", labels="a,b,c")


# -- input fits ------------------------------------------------------------------------------

def test_fit_geometry():
    from cxrkit.preprocess.letterbox import letterbox_geometry

    t = letterbox_geometry((790, 1024), (224, 224), "center_crop")
    assert t.resized_hw == (224, 290) and t.offset_yx == (0, -33)  # torchvision: round((290 - 224) / 2) = 33
    c = t.points_to_source(np.array([[112.0, 112.0]]))[0]
    np.testing.assert_allclose(c, (1024 / 2 + 0.5 * 1024 / 290 * 0, 790 / 2), atol=1024 / 290)
    t = letterbox_geometry((790, 1024), (224, 224), "stretch")
    assert t.resized_hw == (224, 224) and t.offset_yx == (0, 0)
    np.testing.assert_allclose(t.boxes_to_source(np.array([[0, 0, 224, 224]]))[0], [0, 0, 1024, 790])
    for fit in ("letterbox", "center_crop", "stretch"):  # a square image: every fit is the same
        assert letterbox_geometry((1000, 1000), (224, 224), fit) == letterbox_geometry((1000, 1000), (224, 224))
    with pytest.raises(ValueError, match="fit must be one of"):
        letterbox_geometry((10, 10), (4, 4), "zoom")


@pytest.mark.parametrize("fit", ["center_crop", "stretch"])
def test_fit_paths_agree_with_the_reference(fit):
    from cxrkit.io import load_item
    from cxrkit.preprocess import Preprocessor, preprocess_reference, resize_linear_aa
    from cxrkit.preprocess.letterbox import letterbox_geometry

    rng = np.random.default_rng(3)
    img = (rng.uniform(0, 255, (300, 421)) * np.linspace(0.2, 1, 421)[None]).astype(np.uint8)
    ref, t = preprocess_reference(img, (0, 255), (96, 96), 0.5, 0.25, fit=fit)
    # by construction: the full resize, cut at the transform's offset
    full = resize_linear_aa(img, t.resized_hw)
    top, left = t.offset_yx
    want = ((full[-top: -top + 96, -left: -left + 96] / 255.0) - 0.5) / 0.25
    np.testing.assert_allclose(ref[0], want, atol=2e-5)
    assert t == letterbox_geometry(img.shape, (96, 96), fit)
    for backend in ("numpy", "native"):
        pre = Preprocessor((96, 96), 0.5, 0.25, fit=fit, backend=backend)
        out = pre.run([load_item(img, 0)])
        assert out.transforms[0] == t
        np.testing.assert_allclose(out.batch[0], ref, atol=1e-4)


@pytest.mark.dali
def test_fit_dali_cpu_agrees_with_the_reference():
    from cxrkit.io import load_item
    from cxrkit.preprocess import Preprocessor, preprocess_reference

    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (300, 421), dtype=np.uint8)
    for fit in ("center_crop", "stretch", "letterbox"):
        ref, _ = preprocess_reference(img, (0, 255), (96, 96), 0.5, 0.25, fit=fit)
        out = Preprocessor((96, 96), 0.5, 0.25, fit=fit, backend="dali").run([load_item(img, 0)])
        np.testing.assert_allclose(out.batch[0], ref, atol=1e-3)


# -- labels outside the ontology through every writer ---------------------------------------

@pytest.fixture(scope="module")
def outside_pkg(tmp_path_factory):
    d = tmp_path_factory.mktemp("outside")
    torch.save(tiny_state(), d / "t.pth")
    th = {n: 0.01 for n in LABELS}  # everything positive: boxes, overlays and writers all have work
    return import_model(d / "t.pth", d / "pkg", labels=LABELS, input_size=64, thresholds=th).package


def test_predictions_and_writers_carry_labels_outside_the_ontology(outside_pkg, shared_data, tmp_path):
    import cxrkit
    from cxrkit.overlay import render_overlay

    img = str(shared_data / "nih14" / "images" / "00000032_037.jpg")
    assert outside_pkg.card.labels == ("nodule", "lung_lesion", "pleural_effusion", "fracture")
    with cxrkit.Detector(outside_pkg) as det:
        p = det.predict([img], return_heatmaps=True)[0]
    assert p.ok and p.findings["lung_lesion"].positive and len(p.findings["lung_lesion"].boxes_xyxy) >= 1
    assert p.heatmaps.shape == (4, 2, 2)
    d = json.loads(json.dumps(p.to_dict()))
    assert set(d["findings"]) == {"nodule", "lung_lesion", "pleural_effusion", "fracture"}
    assert json.loads(p.to_json())["findings"]["fracture"]["positive"] is True
    png = render_overlay(img, p, tmp_path / "o.png")
    assert png.stat().st_size > 1000

    from cxrkit.cli import main

    rc = main(["predict", img, "--model", str(outside_pkg.root), "--out", str(tmp_path / "p.jsonl"),
               "--overlay", str(tmp_path / "ov")])
    assert rc == 0
    rec = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert rec["findings"]["lung_lesion"]["positive"] is True and list((tmp_path / "ov").glob("*.png"))


def test_ray_writer_carries_labels_outside_the_ontology(outside_pkg, shared_data):
    pa = pytest.importorskip("pyarrow")
    from cxrkit.ray import DetectorActor

    img = str(shared_data / "nih14" / "images" / "00000032_037.jpg")
    actor = DetectorActor(str(outside_pkg.root), "path", None, 2, "cpu", {})
    out = actor(pa.table({"path": [img, "/no/such.png"]}))
    docs = out.column("prediction").to_pylist()
    assert out.column("ok").to_pylist() == [True, False]
    assert json.loads(docs[0])["findings"]["lung_lesion"]["positive"] is True
