"""cxrkit.quant: fp16 and int8 (Q/DQ) graphs against fp32 in ONNX Runtime, and the accuracy guard.

A small conv net (32 x 32 input, stride 4 heatmaps, 3 findings, BatchNorm, a depthwise conv and
a residual add), trained for a few seconds on synthetic blobs so its scores mean something, is exported to ONNX in a temp dir and packaged with a card, so these tests are fast and do not
depend on the bundled models.

Tolerances (measured on this net, 300 held-out images, heatmap logits std ~2.1; asserted with margin below):
  fp16 vs fp32: max |score diff| 1.6e-3, max |heatmap logit diff| 9e-3     -> assert < 5e-3, < 3e-2
  int8 vs fp32 (percentile 99.99, 7-bit weights), measured 2026-11-30: heatmap logits mean |diff|
      0.10 (0.05 std), 99th percentile 0.36 (0.17 std), correlation 0.998; scores mean |diff| 0.007,
      max 0.20; decision agreement 0.988 -> _int8_closeness: < 0.1 std, < 0.5 std, > 0.99, < 0.02,
      < 0.3, > 0.97. The same bounds reject a graph whose activation scales are 0.3x the calibrated
      ones (measured 0.25 std, 2.7 std, 0.82, 0.14, 0.99, 0.82). Per-finding AUROC drop <= 0.0015:
      the guard at its real limits with labels, agreement >= 0.97 without.
  This 16-channel net is a hard case (few channels, the signal in rare large activations);
  entropy calibration clips that tail and fails the guard here (AUROC drop up to 0.09).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from cxrkit.errors import AccuracyGuardError  # noqa: E402
from cxrkit.models import load_model_package, sha256_file  # noqa: E402

LABELS = ["nodule", "mass", "pleural_effusion"]
HW = 32


class TinyNet(nn.Module):
    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.num_classes, self.heatmap_stride = k, 4
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16))
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Conv2d(16, k, 1)

    def forward(self, image):
        x = self.down(self.stem(image))  # (B, 16, H/4, W/4)
        x = torch.relu(self.pw(torch.relu(self.dw(x))) + x)  # residual
        heat = self.head(x)  # (B, K, H/4, W/4)
        return heat.amax(dim=(2, 3)), heat


def _images_and_labels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random blobs, normalized (mean 0.5, std 0.25): (n, 1, HW, HW), and (n, 3) labels:
    a bright blob in the left half, one in the right half, a dark blob anywhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HW, 0:HW] / HW
    out = np.empty((n, 1, HW, HW), np.float32)
    lab = np.zeros((n, 3), np.float32)
    for i in range(n):
        img = np.full((HW, HW), 0.4)
        for _ in range(rng.integers(1, 4)):
            cy, cx, r, a = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.04, 0.12), rng.uniform(-0.3, 0.5)
            img += a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            if a > 0.2:
                lab[i, 0 if cx < 0.5 else 1] = 1
            elif a < -0.15:
                lab[i, 2] = 1
        img += rng.normal(0, 0.02, img.shape)
        out[i, 0] = (np.clip(img, 0, 1) - 0.5) / 0.25
    return out, lab


def _images(n: int, seed: int) -> np.ndarray:
    return _images_and_labels(n, seed)[0]


def _make_package(root: Path, seed: int = 0) -> Path:
    """Train TinyNet for a few hundred steps (~2 s) so its scores mean something, export, write a card."""
    from cxrkit.nets import export_onnx

    torch.manual_seed(seed)
    net = TinyNet(len(LABELS))
    x, y = (torch.from_numpy(a) for a in _images_and_labels(512, 99))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(120):
        idx = torch.randint(0, len(x), (32,))
        loss = nn.functional.binary_cross_entropy_with_logits(net(x[idx])[0], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    root.mkdir(parents=True, exist_ok=True)
    export_onnx(net, root / "model.onnx", (HW, HW))
    card = {
        "schema_version": 1, "name": "tiny-test", "version": "0", "labels": LABELS, "input_size": [HW, HW],
        "normalization": {"mean": 0.5, "std": 0.25}, "heatmap_stride": 4,
        "thresholds": {k: 0.5 for k in LABELS}, "files": {"onnx": "model.onnx"},
        "sha256": {"model.onnx": sha256_file(root / "model.onnx")},
    }
    (root / "card.json").write_text(json.dumps(card, indent=2))
    return root


@pytest.fixture(scope="module")
def pkg_dir(tmp_path_factory) -> Path:
    return _make_package(tmp_path_factory.mktemp("tiny") / "pkg")


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return _images(48, 1)


@pytest.fixture(scope="module")
def holdout() -> np.ndarray:
    return _images(300, 2)


def _run(path, x):
    from cxrkit.quant.guard import run_graph

    return run_graph(path, x)


def _sig(v):
    return 1 / (1 + np.exp(-v))


def test_fp16_graph_matches_fp32(pkg_dir, holdout, tmp_path):
    from cxrkit.quant import convert_fp16

    m = convert_fp16(pkg_dir / "model.onnx", tmp_path / "m16.onnx")
    types = {i.name: i.data_type for i in m.graph.initializer}
    assert all(t == onnx.TensorProto.FLOAT16 for n, t in types.items() if "weight" in n or "bias" in n)
    io = [i.type.tensor_type.elem_type for i in list(m.graph.input) + list(m.graph.output)]
    assert io == [onnx.TensorProto.FLOAT] * 3  # fp32 at the boundary
    assert sum(n.op_type == "Cast" for n in m.graph.node) >= 3
    ref, low = _run(pkg_dir / "model.onnx", holdout), _run(tmp_path / "m16.onnx", holdout)
    assert np.abs(_sig(ref[0]) - _sig(low[0])).max() < 5e-3
    assert np.abs(ref[1] - low[1]).max() < 3e-2


def test_fp16_keeps_sensitive_ops_fp32(tmp_path):
    """The smooth-max pooling of cxrnet (Exp / ReduceSum / Log) stays fp32 inside an fp16 graph."""
    from cxrkit.nets import create_net, export_onnx
    from cxrkit.quant import convert_fp16

    net = create_net("cxrnet", num_classes=2, width=0.25)
    export_onnx(net, tmp_path / "c.onnx", (64, 64))
    m = convert_fp16(tmp_path / "c.onnx")
    prod = {o: n for n in m.graph.node for o in n.output}
    exp = next(n for n in m.graph.node if n.op_type == "Exp")
    assert prod[exp.input[0]].op_type == "Cast"  # fp16 -> fp32 before Exp
    x = np.random.default_rng(0).standard_normal((2, 1, 64, 64)).astype(np.float32)
    ref, low = _run(tmp_path / "c.onnx", x), _run(m, x)
    assert np.abs(ref[0] - low[0]).max() < 1e-2


def test_int8_graph_is_per_channel_qdq_and_close(pkg_dir, calib, holdout, tmp_path):
    from onnx import numpy_helper

    from cxrkit.quant import quantize_int8

    m, plan, _ = quantize_int8(pkg_dir / "model.onnx", calib)
    onnx.save(m, tmp_path / "m8.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert len(convs) == 5 and len(plan.weighted) == 5
    for c in convs:  # every weight: int8 initializer -> per-channel DequantizeLinear, axis 0, zero point 0
        dq = prod[c.input[1]]
        assert dq.op_type == "DequantizeLinear"
        w, s, z = (inits[i] for i in dq.input)
        assert w.dtype == np.int8 and np.abs(w).max() <= 63  # 7-bit weights by default
        assert s.shape == (w.shape[0],) and z.shape == (w.shape[0],) and z.dtype == np.int8 and not z.any()
        assert next(a.i for a in dq.attribute if a.name == "axis") == 0
        assert prod[c.input[0]].op_type == "DequantizeLinear"  # activation through Q -> DQ
        assert len(c.input) < 3 or c.input[2] in inits and inits[c.input[2]].dtype == np.float32  # bias fp32
    for n in m.graph.node:  # activations: per-tensor, symmetric int8, zero point 0
        if n.op_type == "QuantizeLinear":
            s, z = inits[n.input[1]], inits[n.input[2]]
            assert s.shape == () and z.dtype == np.int8 and z == 0
    outs = {o.name: o.type.tensor_type.elem_type for o in m.graph.output}
    assert outs == {"logits": onnx.TensorProto.FLOAT, "heatmaps": onnx.TensorProto.FLOAT}
    ref, low = _run(pkg_dir / "model.onnx", holdout), _run(tmp_path / "m8.onnx", holdout)
    assert _int8_closeness(ref, low) == []


def _int8_closeness(ref, low) -> list[str]:
    """What is wrong with int8 outputs ``low`` against fp32 ``ref`` (bounds in the module docstring)."""
    std = float(ref[1].std())
    d = np.abs(ref[1] - low[1])
    ds = np.abs(_sig(ref[0]) - _sig(low[0]))
    checks = {
        "heatmap mean |diff| < 0.1 std": d.mean() < 0.1 * std,
        "heatmap p99 |diff| < 0.5 std": np.percentile(d, 99) < 0.5 * std,
        "heatmap correlation > 0.99": np.corrcoef(ref[1].ravel(), low[1].ravel())[0, 1] > 0.99,
        "score mean |diff| < 0.02": ds.mean() < 0.02,
        "score max |diff| < 0.3": ds.max() < 0.3,
        "decision agreement > 0.97": ((ref[0] >= 0) == (low[0] >= 0)).mean() > 0.97,
    }
    return [k for k, ok in checks.items() if not ok]


def test_int8_closeness_bounds_reject_a_miscalibrated_graph(pkg_dir, calib, holdout, monkeypatch):
    """The bounds above can fail: activation scales at 0.3x the calibrated ones break most of them."""
    import cxrkit.quant as q

    real = q.collect_ranges
    monkeypatch.setattr(q, "collect_ranges", lambda *a, **k: {t: v * 0.3 for t, v in real(*a, **k).items()})
    m, _, _ = q.quantize_int8(pkg_dir / "model.onnx", calib)
    failed = _int8_closeness(_run(pkg_dir / "model.onnx", holdout), _run(m, holdout))
    assert len(failed) >= 4, failed


def test_int8_calibrators_order(pkg_dir, calib, holdout):
    """minmax >= percentile >= 0 and entropy > 0 per tensor; minmax is the closest on this net."""
    from cxrkit.quant import quantize_int8

    got = {m: quantize_int8(pkg_dir / "model.onnx", calib, method=m) for m in ("minmax", "percentile", "entropy")}
    r = {m: v[2] for m, v in got.items()}
    for t in r["minmax"]:
        assert r["minmax"][t] >= r["percentile"][t] > 0 and r["entropy"][t] > 0
    ref, low = _run(pkg_dir / "model.onnx", holdout), _run(got["minmax"][0], holdout)
    assert np.abs(_sig(ref[0]) - _sig(low[0])).max() < 0.2


def test_percentile_and_entropy_thresholds():
    from cxrkit.quant.calibrate import entropy_amax, percentile_amax

    rng = np.random.default_rng(0)
    v = np.abs(np.concatenate([rng.normal(0, 1, 200_000), [50.0]]))  # one outlier
    hist, edges = np.histogram(v, bins=2048, range=(0, v.max()))
    p = percentile_amax(hist, edges, 99.99)
    e = entropy_amax(hist, edges)
    assert 3.0 < p < 5.5 and 2.0 < e < 8.0  # both clip the outlier, far below max 50


def test_keep_fp32_aliases(pkg_dir, calib):
    from cxrkit.quant import quantize_int8

    m, plan, _ = quantize_int8(pkg_dir / "model.onnx", calib, keep_fp32=[":first", ":last"])
    assert len(plan.weighted) == 3 and len(plan.kept_fp32) == 2
    first = next(n for n in m.graph.node if n.op_type == "Conv")
    inits = {i.name for i in m.graph.initializer}
    assert first.input[1] in inits  # plain fp32 weight, no DequantizeLinear


def test_quantize_writes_package_and_guard_passes(pkg_dir, calib, holdout, tmp_path):
    from cxrkit.quant import quantize

    res = quantize(pkg_dir, calib, out=tmp_path / "q", holdout=holdout, keep_fp32=[":last"], min_agreement=0.97)
    pkg = load_model_package(tmp_path / "q")
    for kind, prec in (("onnx_fp16", "fp16"), ("onnx_int8", "int8"), ("onnx_int8_cpu", "int8_cpu")):
        p = pkg.verified(kind)  # sha256 in the card matches
        side = json.loads(p.with_name(p.name + ".json").read_text())
        assert side["passed"] and side["precision"] == prec and side["sha256"] == sha256_file(p)
        assert pkg.card.raw["quantization"][kind]["report"] == p.name + ".json"
        assert res.reports[prec].passed
    side8 = json.loads((tmp_path / "q" / "model.int8.onnx.json").read_text())
    assert min(r["decision_agreement"] for r in side8["per_finding"].values()) >= 0.97
    assert side8["min_agreement"] == 0.97 and side8["settings"]["kept_fp32_layers"] == ["/head/Conv"]
    assert not (pkg_dir / "model.int8.onnx").exists()  # the source package is untouched


def test_guard_with_labels_reports_auroc(pkg_dir, calib, holdout, tmp_path):
    from cxrkit.quant import quantize

    labels = _images_and_labels(300, 2)[1]
    res = quantize(pkg_dir, calib, out=tmp_path / "q", holdout=holdout, labels=labels, precisions=("int8",))
    rep = res.reports["int8"]
    assert rep.labels_given and rep.passed
    for row in rep.per_finding.values():
        assert 0.85 < row["auroc_fp32"] <= 1.0 and row["auroc_drop"] <= 0.005
    assert rep.max_auroc_drop == 0.005


def _broken_ranges(pkg_dir, calib):
    from cxrkit.quant.calibrate import collect_ranges
    from cxrkit.quant.qdq import plan_qdq, prepared

    prep = prepared(pkg_dir / "model.onnx")
    plan = plan_qdq(prep)
    good = collect_ranges(prep, plan.calib_tensors, calib)
    return {t: v * 1e-3 for t, v in good.items()}  # scales forced tiny: everything saturates


def test_guard_refuses_broken_calibration_and_override_works(pkg_dir, calib, holdout, tmp_path, monkeypatch):
    import cxrkit.quant as q

    broken = _broken_ranges(pkg_dir, calib)
    monkeypatch.setattr(q, "collect_ranges", lambda model, tensors, *a, **k: {t: broken[t] for t in tensors})
    with pytest.raises(AccuracyGuardError) as ei:
        q.quantize(pkg_dir, calib, out=tmp_path / "bad", holdout=holdout, precisions=("int8",))
    assert any(f in str(ei.value) for f in LABELS) and "agreement" in str(ei.value) and "0.99" in str(ei.value)
    assert not ei.value.report.passed
    assert not (tmp_path / "bad" / "model.int8.onnx").exists()
    assert "onnx_int8" not in json.loads((tmp_path / "bad" / "card.json").read_text())["files"]

    res = q.quantize(pkg_dir, calib, out=tmp_path / "bad", holdout=holdout, precisions=("int8",),
                     allow_accuracy_drop=True)
    side = json.loads((tmp_path / "bad" / "model.int8.onnx.json").read_text())
    assert not side["passed"] and side["overridden"] and side["failed_findings"]
    assert res.package.card.raw["quantization"]["onnx_int8"]["overridden"] is True


def test_int8_forms_are_guarded_each_on_its_own(pkg_dir, calib, holdout, tmp_path, monkeypatch):
    """The CPU form refused, the TensorRT form passing: the TensorRT form is written, the CPU form
    is not, and the typed error says which was written."""
    import dataclasses

    import cxrkit.quant as q

    real = q.compare

    def compare(model, ref, low, precision, *a, **k):
        rep = real(model, ref, low, precision, *a, **k)
        if precision == "int8_cpu":
            return dataclasses.replace(rep, passed=False, failed_findings=[LABELS[0]])
        return rep

    monkeypatch.setattr(q, "compare", compare)
    with pytest.raises(AccuracyGuardError) as ei:
        q.quantize(pkg_dir, calib, out=tmp_path / "q", holdout=holdout, precisions=("int8",), keep_fp32=[":last"],
                   min_agreement=0.97)
    assert "int8_cpu" in str(ei.value) and "written anyway" in str(ei.value) and "onnx_int8" in str(ei.value)
    files = json.loads((tmp_path / "q" / "card.json").read_text())["files"]
    assert "onnx_int8" in files and "onnx_int8_cpu" not in files
    assert (tmp_path / "q" / "model.int8.onnx").exists() and not (tmp_path / "q" / "model.int8-cpu.onnx").exists()
    assert ei.value.result.int8_path is not None and ei.value.result.int8_cpu_path is None


def test_auroc_matches_rank_definition():
    from cxrkit.quant.guard import auroc

    s = np.array([0.1, 0.4, 0.35, 0.8, 0.8])
    y = np.array([0, 0, 1, 1, 0])
    pairs = [(a, b) for a in s[y == 1] for b in s[y == 0]]
    want = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
    assert auroc(s, y) == pytest.approx(want)
    assert auroc(s, np.zeros(5)) is None


@pytest.fixture(scope="module")
def guarded_int8(pkg_dir, calib, holdout, tmp_path_factory) -> Path:
    """An int8 package whose forms PASSED the guard (no override), as a user gets it."""
    from cxrkit.quant import quantize

    out = tmp_path_factory.mktemp("guarded") / "q"
    res = quantize(pkg_dir, calib, out=out, holdout=holdout, precisions=("int8",), keep_fp32=[":last"],
                   min_agreement=0.97)
    assert all(r.passed and not r.overridden for r in res.reports.values()), res.reports
    return out


def test_int8_runner_on_cpu(guarded_int8, holdout):
    """precision="int8" on the CPU runs exactly the package's CPU int8 graph (bit for bit what ONNX
    Runtime gives for that file), fp32 the fp32 graph, and the two stay within the int8 bounds."""
    from cxrkit.backends import create_runner

    pkg = load_model_package(guarded_int8)
    x = holdout[:64]
    with create_runner(pkg, "onnxruntime", "cpu", "int8") as r8, create_runner(pkg, "onnxruntime", "cpu", "fp32") as r32:
        a, b = r32.infer(x), r8.infer(x)
    assert pkg.file("onnx_int8_cpu") is not None and r8._graph_path() == pkg.verified("onnx_int8_cpu")
    g8, g32 = _run(pkg.verified("onnx_int8_cpu"), x), _run(pkg.verified("onnx"), x)
    np.testing.assert_array_equal(b["logits"], g8[0])
    np.testing.assert_array_equal(b["heatmaps"], g8[1])
    np.testing.assert_array_equal(a["logits"], g32[0])
    assert b["heatmaps"].dtype == np.float32 and b["heatmaps"].shape == a["heatmaps"].shape
    assert _int8_closeness((a["logits"], a["heatmaps"]), (b["logits"], b["heatmaps"])) == []


def test_detector_int8_end_to_end(guarded_int8, holdout):
    """Detector(precision="int8") on 8-bit images of the held-out set: each score is the int8 CPU
    graph's own output for the preprocessed image (so the Detector really runs int8), fp32 likewise,
    and int8 stays within the bounds of the mean score error against fp32 (continuous logits of a
    trained net, not the probe's +-8 steps)."""
    from cxrkit import Detector

    pkg = load_model_package(guarded_int8)
    imgs = [np.clip((x[0] * 0.25 + 0.5) * 255 + 0.5, 0, 255).astype(np.uint8) for x in holdout[:32]]
    x = np.stack([(im.astype(np.float32) / 255 - 0.5) / 0.25 for im in imgs])[:, None]  # the card's normalization
    with Detector(guarded_int8, precision="int8") as d8, Detector(guarded_int8) as d32:
        p8, p32 = d8.predict(imgs), d32.predict(imgs)
    assert all(p.error is None for p in p8 + p32)
    s8 = np.array([[p.findings[k].score for k in LABELS] for p in p8])
    s32 = np.array([[p.findings[k].score for k in LABELS] for p in p32])
    np.testing.assert_allclose(s8, _sig(_run(pkg.verified("onnx_int8_cpu"), x)[0]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(s32, _sig(_run(pkg.verified("onnx"), x)[0]), rtol=0, atol=1e-6)
    assert not np.array_equal(s8, s32)  # int8 really differs from fp32 ...
    assert np.abs(s8 - s32).mean() < 0.02 and np.abs(s8 - s32).max() < 0.3  # ... within the int8 bounds


def test_int8_cpu_uint8_variant_folds_relu_and_stays_close(pkg_dir, calib, holdout, tmp_path):
    """cpu_uint8: ReLU outputs are uint8 with zero point 0 (ORT folds the ReLU away), the rest
    uint8 zero point 128; same accuracy as the int8 graph; skip_depthwise leaves the dw conv fp32."""
    from onnx import numpy_helper

    from cxrkit.quant import quantize_int8
    from cxrkit.quant.calibrate import ort_session

    m, plan, _ = quantize_int8(pkg_dir / "model.onnx", calib, cpu_uint8=True)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    zps = {}
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":
            z = inits[n.input[2]]
            assert z.dtype == np.uint8 and int(z) in (0, 128)
            zps[n.input[0]] = int(z)
    from cxrkit.quant.qdq import prepared

    fp = prepared(pkg_dir / "model.onnx")
    relu_outs = {n.output[0] for n in fp.graph.node if n.op_type == "Relu"}
    relu_ranged = [t for t in zps if plan.range_of.get(t) in relu_outs]
    assert relu_ranged and all(zps[t] == 0 for t in relu_ranged)
    # quantized ReLUs are dropped (Q with zero point 0 saturates at 0): fewer Relu nodes remain
    assert sum(n.op_type == "Relu" for n in m.graph.node) < len(relu_outs)
    onnx.save(m, tmp_path / "u8.onnx")
    ref, low = _run(pkg_dir / "model.onnx", holdout), _run(tmp_path / "u8.onnx", holdout)
    assert np.abs(_sig(ref[0]) - _sig(low[0])).max() < 0.3
    assert ((ref[0] >= 0) == (low[0] >= 0)).mean() > 0.97
    ort_session(tmp_path / "u8.onnx")  # ORT accepts it
    _, plan_dw, _ = quantize_int8(pkg_dir / "model.onnx", calib, skip_depthwise=True)
    assert len(plan_dw.weighted) == len(plan.weighted) - 1 and any("dw" in k for k in plan_dw.kept_fp32)


# -- the CPU form on a pre-activation dense net (DenseNet's BN -> ReLU -> Conv on a growing concat) --

def _tiny_densenet(tmp_path):
    from cxrkit.nets import export_onnx
    from cxrkit.nets.densenet import DenseNet

    torch.manual_seed(0)
    net = DenseNet(num_classes=3, growth_rate=8, block_config=(3, 3), num_init_features=16, bn_size=2, stride=16)
    for m in net.modules():  # non-trivial BN statistics, some negative gammas
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(-0.5, 1.5)
            m.bias.data.normal_(0, 0.3)
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    return export_onnx(net, tmp_path / "dense.onnx", (64, 64))


def test_batchnorm_to_depthwise_is_exact(tmp_path):
    from cxrkit.quant.graph import batchnorm_to_depthwise, check
    from cxrkit.quant.qdq import prepared

    path = _tiny_densenet(tmp_path)
    m = prepared(path)
    n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    done = batchnorm_to_depthwise(m)
    assert n_bn >= 6 and len(done) == n_bn  # every pre-activation BN (norm1 x6, transition, norm5)
    assert not any(n.op_type == "BatchNormalization" for n in m.graph.node)
    check(m, "rewritten fp32")
    x = np.random.default_rng(0).standard_normal((4, 1, 64, 64)).astype(np.float32)
    a, b = _run(path, x), _run(m, x)
    np.testing.assert_allclose(b[0], a[0], rtol=0, atol=2e-5)
    np.testing.assert_allclose(b[1], a[1], rtol=0, atol=2e-5)


def test_cpu_form_concat_shares_one_scale_and_ort_fuses_everything(tmp_path):
    """Every Concat's inputs and output share one scale; ONNX Runtime then runs the whole dense
    net as QLinearConv / QLinearConcat (no float Conv, BatchNormalization or Concat left except
    the heatmap head, whose output leaves the graph), and the result stays close to fp32."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from cxrkit.quant import quantize_int8

    path = _tiny_densenet(tmp_path)
    rng = np.random.default_rng(1)
    calib, hold = (rng.standard_normal((n, 1, 64, 64)).astype(np.float32) for n in (16, 16))
    m, plan, _ = quantize_int8(path, calib, cpu_uint8=True)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    cons = {}
    for n in m.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    concats = [n for n in m.graph.node if n.op_type == "Concat"]
    assert len(concats) == 8  # 3 layers + the block output, in each of 2 blocks
    for c in concats:
        scales = {float(inits[prod[i].input[1]]) for i in c.input}  # each input is a DQ
        (q_after,) = [q for q in cons[c.output[0]] if q.op_type == "QuantizeLinear"]
        scales.add(float(inits[q_after.input[1]]))
        assert len(scales) == 1, c.name
    # one QuantizeLinear per quantized tensor: each producer owns its Q
    qs = [n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == len(set(qs))
    onnx.save(m, tmp_path / "u8.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "u8.opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(tmp_path / "u8.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "u8.opt.onnx")).graph.node]
    assert ops.count("QLinearConcat") == 8 and ops.count("Concat") == 0
    assert "BatchNormalization" not in ops and ops.count("Conv") <= 1  # the fp32-output head
    # stem + 6 layers x (norm1 as depthwise, conv1, conv2) + transition (norm, conv) + norm5
    assert ops.count("QLinearConv") == 1 + 6 * 3 + 2 + 1
    ref, low = _run(path, hold), _run(tmp_path / "u8.onnx", hold)
    assert np.abs(_sig(ref[0]) - _sig(low[0])).max() < 0.05
    assert np.abs(ref[1] - low[1]).max() < 0.5 * np.abs(ref[1]).max()


# -- the guard's minimum sample size; `cxrkit quantize` end to end; auto_keep_fp32 ---------------

def test_guard_cannot_pass_on_too_few_images(pkg_dir, holdout):
    """Agreement on 5 images, or AUROC with 3 positives, proves nothing: not passed, and says why."""
    from cxrkit.quant.guard import compare, enforce, min_images_for_agreement, min_pairs_for_auroc

    pkg = load_model_package(pkg_dir)
    ref = _run(pkg_dir / "model.onnx", holdout)
    assert min_images_for_agreement(0.99) == 100 and min_images_for_agreement(0.97) == 34
    assert min_pairs_for_auroc(0.005) == 1000
    small = tuple(a[:5] for a in ref)
    rep = compare(pkg, small, small, "int8")  # identical outputs: agreement 1.0 everywhere, still not judged
    assert not rep.passed and not rep.failed_findings and rep.min_images == 100
    assert set(rep.insufficient) == set(LABELS) and "5 held-out images" in rep.insufficient["mass"]
    with pytest.raises(AccuracyGuardError, match=r"cannot be judged on 5 held-out images.*needs >= 100"):
        enforce(rep)
    assert enforce(rep, allow_accuracy_drop=True).overridden
    assert compare(pkg, tuple(a[:100] for a in ref), tuple(a[:100] for a in ref), "int8").passed  # 100 suffice
    labels = np.zeros((300, 3), np.uint8)
    labels[:3, 0] = 1  # nodule: 3 positives
    labels[::2, 1] = labels[::3, 2] = 1
    rep = compare(pkg, ref, ref, "int8", labels)
    assert list(rep.insufficient) == ["nodule"] and "3 positive / 297 negative" in rep.insufficient["nodule"]
    assert rep.per_finding["mass"]["n_pos"] == 150 and not rep.passed


def _write_pngs(folder: Path, x: np.ndarray) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, a in enumerate(x):
        p = folder / f"{i:04d}.png"
        Image.fromarray(np.clip((a[0] * 0.25 + 0.5) * 255 + 0.5, 0, 255).astype(np.uint8)).save(p)
        out.append(str(p))
    return out


@pytest.fixture(scope="module")
def image_files(calib, holdout, tmp_path_factory):
    """The calibration and held-out sets as 8-bit PNG files, and the held-out labels as .npy."""
    root = tmp_path_factory.mktemp("files")
    np.save(root / "labels.npy", _images_and_labels(300, 2)[1].astype(np.uint8))
    return _write_pngs(root / "calib", calib), _write_pngs(root / "holdout", holdout), str(root / "labels.npy")


def test_quantize_cli_default_holdout_too_small_is_refused_and_said(pkg_dir, image_files, tmp_path, capsys):
    """`cxrkit quantize` on 8 images: the default holdout (every 4th) is 2 images; the guard says it
    cannot judge on so few instead of passing, nothing is written; --allow-accuracy-drop keeps it
    marked as not judged."""
    from cxrkit.cli import main

    calib_files = image_files[0][:8]
    out = tmp_path / "q"
    assert main(["quantize", str(pkg_dir), "--calib", *calib_files, "--out", str(out), "--precisions", "int8"]) == 1
    err = capsys.readouterr().err
    assert "AccuracyGuardError" in err and "cannot be judged on 2 held-out images" in err and "needs >= 100" in err
    assert "onnx_int8" not in json.loads((out / "card.json").read_text())["files"]
    assert main(["quantize", str(pkg_dir), "--calib", *calib_files, "--out", str(out), "--precisions", "int8",
                 "--allow-accuracy-drop"]) == 0
    assert "NOT JUDGED, too few held-out images" in capsys.readouterr().out
    card = json.loads((out / "card.json").read_text())
    assert card["quantization"]["onnx_int8"]["overridden"] is True and card["quantization"]["onnx_int8"]["passed"] is False
    side = json.loads((out / "model.int8.onnx.json").read_text())
    assert side["n_images"] == 2 and set(side["insufficient"]) == set(LABELS)


def test_quantize_cli_auto_keep_fp32_fixes_a_sensitive_layer(pkg_dir, image_files, tmp_path, capsys, monkeypatch):
    """The head's input range broken (x1e-3): int8 fails the labelled guard; `--auto-keep-fp32 3`
    finds the head as the most sensitive layer, keeps it in fp32, and passes (files on disk)."""
    import cxrkit.quant as q
    from cxrkit.cli import main

    real = q.collect_ranges
    monkeypatch.setattr(q, "collect_ranges", lambda *a, **k: {
        t: (v * 1e-3 if t == "/Relu_1_output_0" else v) for t, v in real(*a, **k).items()})
    calib_files, hold_files, labels = image_files
    args = ["quantize", str(pkg_dir), "--calib", *calib_files, "--holdout", *hold_files, "--labels", labels,
            "--precisions", "int8"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 1
    assert "AUROC drop > 0.005" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--auto-keep-fp32", "3"]) == 0
    assert capsys.readouterr().out.count("passed") == 2
    for name in ("model.int8.onnx.json", "model.int8-cpu.onnx.json"):
        side = json.loads((tmp_path / "b" / name).read_text())
        assert side["passed"] and not side["overridden"] and side["labels_given"] and side["n_images"] == 300
        assert side["settings"]["kept_fp32_layers"] == ["/head/Conv"]
        assert side["settings"]["sensitivity"][0][0] == "/head/Conv"
