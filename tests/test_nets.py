"""cxrkit.nets: registry, strict safetensors loading, ONNX export parity, and the geometry probe."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from cxrkit.errors import ModelError  # noqa: E402
from cxrkit.nets import create_net, export_onnx, list_nets, load_weights, register_net, save_weights  # noqa: E402
from cxrkit.nets.probe import PROBE_LABELS, ProbeNet, default_levels, write_package  # noqa: E402


def _ort_run(path, x: np.ndarray):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["logits", "heatmaps"]
    return sess.run(["logits", "heatmaps"], {"image": x})


def _torch_run(net, x: np.ndarray):
    with torch.no_grad():
        logits, heat = net(torch.from_numpy(x))
    return logits.numpy(), heat.numpy()


# --- registry -------------------------------------------------------------------------------

def test_builtin_nets_registered():
    assert {"probe", "cxrnet", "densenet121"} <= set(list_nets())


def test_unknown_net_lists_valid_names():
    with pytest.raises(ModelError, match="registered nets: .*cxrnet.*densenet121.*probe"):
        create_net("resnet9000")


def test_bad_kwargs_name_the_net():
    with pytest.raises(ModelError, match="'cxrnet' rejected arch_kwargs"):
        create_net("cxrnet", no_such_arg=1)


def test_register_twice_refused():
    @register_net("_test_dup")
    class A(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_net("_test_dup")(type("B", (torch.nn.Module,), {}))


def test_create_net_is_eval_mode():
    assert not create_net("cxrnet", num_classes=3).training


# --- weights --------------------------------------------------------------------------------

def test_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    a = create_net("cxrnet", num_classes=4)
    save_weights(a, tmp_path / "w.safetensors")
    b = load_weights(create_net("cxrnet", num_classes=4), tmp_path / "w.safetensors")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_weights_key_mismatch_is_clear(tmp_path):
    save_weights(create_net("cxrnet", num_classes=4), tmp_path / "w.safetensors")
    with pytest.raises(ModelError, match="missing from the file: .*not in the net"):
        load_weights(create_net("probe"), tmp_path / "w.safetensors")


def test_weights_shape_mismatch_is_clear(tmp_path):
    save_weights(create_net("cxrnet", num_classes=4), tmp_path / "w.safetensors")
    with pytest.raises(ModelError, match="shapes differ.*head.conv"):
        load_weights(create_net("cxrnet", num_classes=5), tmp_path / "w.safetensors")


def test_weights_refuse_pickles_and_garbage(tmp_path):
    with pytest.raises(ModelError, match="must be a .safetensors file"):
        load_weights(create_net("probe"), tmp_path / "w.pt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_weights(create_net("probe"), bad)
    with pytest.raises(ModelError, match="does not exist"):
        load_weights(create_net("probe"), tmp_path / "none.safetensors")


# --- ONNX export parity (fp32, dynamic batch) ------------------------------------------------

@pytest.mark.parametrize(
    "name, kw, hw, stride",
    [
        ("cxrnet", {"num_classes": 29}, (128, 96), 8),
        ("cxrnet", {"num_classes": 7, "stride": 16, "width": 0.5}, (64, 64), 16),
        ("densenet121", {"num_classes": 29}, (128, 128), 16),
        ("probe", {}, (64, 80), 8),
    ],
)
def test_onnx_matches_torch(tmp_path, name, kw, hw, stride):
    torch.manual_seed(0)
    net = create_net(name, **kw)
    if name != "probe":  # non-trivial BatchNorm statistics, so folding them is exercised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = export_onnx(net, tmp_path / "m.onnx", hw)
    k = net.num_classes
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        x = rng.normal(size=(batch, 1, *hw)).astype(np.float32)
        lt, ht = _torch_run(net, x)
        lo, ho = _ort_run(path, x)
        assert lo.shape == (batch, k) and ho.shape == (batch, k, hw[0] // stride, hw[1] // stride)
        scale = max(1.0, float(np.abs(ht).max()))
        np.testing.assert_allclose(lo, lt, rtol=1e-4, atol=1e-4 * scale)
        np.testing.assert_allclose(ho, ht, rtol=1e-4, atol=1e-4 * scale)


def test_export_rejects_size_off_stride(tmp_path):
    with pytest.raises(ModelError, match="multiple of the net's heatmap_stride 8"):
        export_onnx(create_net("probe"), tmp_path / "m.onnx", (100, 64))


def test_logits_are_smooth_max_of_heatmaps():
    torch.manual_seed(0)
    net = create_net("cxrnet", num_classes=5)
    with torch.no_grad():
        logits, heat = net(torch.randn(2, 1, 64, 64))
    hmax = heat.amax(dim=(2, 3))
    assert torch.all(logits >= hmax - 1e-5)
    assert torch.all(logits <= hmax + np.log(8 * 8) / 4.0 + 1e-5)


# --- the geometry probe ---------------------------------------------------------------------

def _probe_scene(seed: int = 0):
    """A 512 x 640 dark image with one flat square per level at unaligned spots, JPEG q95, then
    antialiased resize to 256 x 320: the route the probe must survive."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.full((512, 640), 13, np.uint8)  # unit 0.05: in no band
    squares = []
    for k, level in enumerate(default_levels(6)):
        r, c = divmod(k, 3)
        y0 = 20 + 250 * r + int(rng.integers(0, 40))
        x0 = 15 + 205 * c + int(rng.integers(0, 40))
        side = 100 + int(rng.integers(0, 50))
        img[y0:y0 + side, x0:x0 + side] = int(round(255 * level))
        squares.append((k, y0 / 2, x0 / 2, (y0 + side) / 2, (x0 + side) / 2))  # in 256 x 320 pixels
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    dec = Image.open(io.BytesIO(buf.getvalue())).convert("L").resize((320, 256), Image.BILINEAR)
    unit = np.asarray(dec, np.float32) / 255.0
    return ((unit - 0.5) / 0.25)[None, None], squares


def test_probe_lights_whole_cells_of_the_right_level_only():
    x, squares = _probe_scene()
    net = ProbeNet()
    logits, heat = _torch_run(net, x)
    assert heat.shape == (1, 6, 32, 40)
    lit = heat[0] > 0
    s = 8
    for k, y0, x0, y1, x1 in squares:
        # Cells at least 1 px inside the square (clear of the antialiased rim) must be lit ...
        ii, jj = np.mgrid[0:32, 0:40]
        inner = (ii * s >= y0 + 1) & ((ii + 1) * s <= y1 - 1) & (jj * s >= x0 + 1) & ((jj + 1) * s <= x1 - 1)
        assert inner.sum() >= 9
        assert lit[k][inner].all(), f"finding {k}: interior cells not lit"
        # ... and nothing of finding k outside the square's cells.
        touching = ((ii + 1) * s > y0) & (ii * s < y1) & ((jj + 1) * s > x0) & (jj * s < x1)
        assert not lit[k][~touching].any(), f"finding {k}: lit outside its square"
        # No other finding fires on this square.
        for other in range(6):
            if other != k:
                assert not lit[other][touching].any(), f"finding {other} fires on square {k}"
    np.testing.assert_array_equal(logits[0], np.full(6, 8.0, np.float32))


def test_probe_cell_straddling_an_edge_is_dark():
    u = np.full((1, 1, 32, 32), 0.05, np.float32)
    u[..., 4:28, 4:28] = 0.45  # square edges in the middle of cells (cells are 8 px)
    heat = _torch_run(ProbeNet(), (u - 0.5) / 0.25)[1][0, 2]
    expected = np.full((4, 4), -8.0, np.float32)
    expected[1:3, 1:3] = 8.0
    np.testing.assert_array_equal(heat, expected)


def test_probe_blank_image_is_negative():
    logits, _ = _torch_run(ProbeNet(), np.full((2, 1, 64, 64), -2.0, np.float32))
    np.testing.assert_array_equal(logits, np.full((2, 6), -8.0, np.float32))


def test_probe_onnx_agrees_on_a_scene(tmp_path):
    x, _ = _probe_scene(seed=3)
    net = ProbeNet()
    path = export_onnx(net, tmp_path / "p.onnx", x.shape[-2:])
    lt, ht = _torch_run(net, x)
    lo, ho = _ort_run(path, x)
    np.testing.assert_array_equal(lo, lt)
    np.testing.assert_array_equal(ho, ht)


def test_probe_package_round_trip_and_determinism(tmp_path):
    from cxrkit.models import load_model_package, sha256_file

    pkg = load_model_package("cxr-probe")
    card = pkg.card
    assert card.arch == "probe" and list(card.labels) == list(PROBE_LABELS)
    assert card.input_hw == (256, 256) and card.heatmap_stride == 8
    net = load_weights(create_net(card.arch, **card.arch_kwargs), pkg.verified("weights"))
    x, _ = _probe_scene(seed=1)
    x = x[..., :256, :256].copy()
    lt, ht = _torch_run(net, x)
    lo, ho = _ort_run(pkg.verified("onnx"), x)
    np.testing.assert_array_equal(ho, ht)
    np.testing.assert_array_equal(lo, lt)
    # Regeneration gives the bundled files byte for byte.
    out = write_package(tmp_path / "probe")
    for name in ("model.onnx", "weights.safetensors"):
        assert sha256_file(out / name) == card.raw["sha256"][name], f"{name} is not reproducible"
    assert json.loads((out / "card.json").read_text()) == dict(card.raw)


def test_cxr29_demo_package_is_consistent():
    from pathlib import Path

    from cxrkit.labels import FINDING_KEYS
    from cxrkit.models import list_models, load_model_package
    from cxrkit.tune import BAR

    if "cxr29-demo" not in list_models():
        pytest.skip("cxr29-demo is not built (python -m cxrkit.train --out cxrkit/models/cxr29-demo)")
    pkg = load_model_package("cxr29-demo")
    card = pkg.card
    assert list(card.labels) == list(FINDING_KEYS)
    trained = set(card.raw["training"]["trained_findings"])
    en = card.raw["enabled"]
    assert not any(en[k] for k in FINDING_KEYS if k not in trained), "an untrained finding is enabled"
    assert "NOT for clinical use" in card.raw["intended_use"]
    # every enabled finding cleared the stated bar on the val patients, by the card's own figures
    tuned = card.raw["tuning"]["per_label"]
    for k in FINDING_KEYS:
        if en[k]:
            assert tuned[k]["auroc"] >= BAR["min_auroc"] and tuned[k]["n_pos"] >= BAR["min_pos"], k
            assert tuned[k]["loc_sensitivity_at_1fp"] is None or tuned[k]["loc_sensitivity_at_1fp"] >= BAR["min_loc_sens"], k
            assert card.raw["thresholds"][k] == pytest.approx(tuned[k]["threshold"], abs=1e-4)
    # the split is by patient: the manifest the card names has no patient in two parts
    split = card.raw["training"]["split"]
    assert split["by"] == "patient"
    manifest = json.loads((Path(__file__).resolve().parents[1] / split["manifest"]).read_text())
    assert not set(manifest["train"]["patients"]) & set(manifest["val"]["patients"])
    assert split["val"]["images"] == len(manifest["val"]["images"])
    # every file the card names has its sha256, and verifies; the package stays small
    for kind, rel in card.raw["files"].items():
        assert rel in card.raw["sha256"], rel
        assert pkg.verified(kind).stat().st_size < 4 * 1024 * 1024
    assert {"onnx_int8", "onnx_int8_cpu"} <= set(card.raw["files"])
    for kind in ("onnx_int8", "onnx_int8_cpu"):
        assert card.raw["quantization"][kind]["passed"], kind
        assert card.raw["quantization"][kind]["report"] in card.raw["sha256"]
    net = load_weights(create_net(card.arch, **card.arch_kwargs), pkg.verified("weights"))
    x = np.random.default_rng(0).normal(size=(2, 1, *card.input_hw)).astype(np.float32)
    lt, ht = _torch_run(net, x)
    lo, ho = _ort_run(pkg.verified("onnx"), x)
    assert ho.shape == (2, 29, *card.heatmap_hw)
    np.testing.assert_allclose(lo, lt, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ho, ht, rtol=1e-4, atol=1e-3)
