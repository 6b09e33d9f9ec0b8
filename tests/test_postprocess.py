"""Post-processing on the CPU: the numpy reference by hand, and the C++ kernels against it, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from cxrkit import kernels
from cxrkit.config import LocalizeConfig
from cxrkit.errors import BackendUnavailableError
from cxrkit.postprocess import Detections, batched_nms, detect, logit_thresholds
from cxrkit.postprocess._reference import iou_f32, sigmoid_f32

from test_postprocess_cases import (CONFIGS, assert_detections_equal, assert_keep_equal, brute_force_nms, case_maps,
                                random_boxes, thresholds)

C = pytest.importorskip("cxrkit._C", reason="cxrkit._C not built (pip install --no-build-isolation -e .)")


# ---- the reference by hand -------------------------------------------------------------------

def _blob_7x7() -> np.ndarray:
    z = np.full((1, 1, 7, 7), -10.0, np.float32)
    z[0, 0, 3, 3] = 4.0  # peak
    z[0, 0, 2, 3] = z[0, 0, 4, 3] = z[0, 0, 3, 2] = z[0, 0, 3, 4] = 3.0
    z[0, 0, 3, 5] = 2.0  # joined to the blob through (x=4, y=3)
    z[0, 0, 1, 1] = 3.0  # a second, isolated peak
    return z


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_known_blob(impl):
    d = detect(_blob_7x7(), [0.5], LocalizeConfig(), impl=impl)
    assert d.counts.tolist() == [[2]]
    np.testing.assert_array_equal(d.points[0, 0, :3], [[3, 3], [1, 1], [-1, -1]])
    np.testing.assert_array_equal(d.boxes[0, 0, :3], [[2, 2, 6, 5], [1, 1, 2, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(d.scores[0, 0, :3], [sigmoid_f32(np.float32(4)), sigmoid_f32(np.float32(3)), -1])
    assert d.scores.shape == (1, 1, 16) and d.points.dtype == np.int32 and d.boxes.dtype == np.float32


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_known_blob_window_and_fraction(impl):
    z = _blob_7x7()
    d = detect(z, [0.5], LocalizeConfig(max_extent=1), impl=impl)
    np.testing.assert_array_equal(d.boxes[0, 0, 0], [2, 2, 5, 5])  # (x=5, y=3) is outside the window
    d = detect(z, [0.5], LocalizeConfig(region_fraction=1.0), impl=impl)
    np.testing.assert_array_equal(d.boxes[0, 0, 0], [3, 3, 4, 4])
    d = detect(z, [0.99], LocalizeConfig(), impl=impl)  # logit(0.99) = 4.595 > 4: nothing
    assert d.counts.tolist() == [[0]] and (d.scores == -1).all() and (d.points == -1).all() and (d.boxes == 0).all()
    d = detect(z, [0.5], LocalizeConfig(max_peaks=1), impl=impl)
    assert d.counts.tolist() == [[1]] and d.points[0, 0, 0].tolist() == [3, 3]


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_plateau_ties_and_iou_threshold(impl):
    # peaks at x=2 (z=2.7, region {2}) and x=0 (z=2.6, region {0, 1, 2}): boxes [2,0,3,1] and [0,0,3,1]
    z = np.array([[[[2.6, 2.5, 2.7]]]], np.float32)
    d = detect(z, [0.5], LocalizeConfig(region_fraction=0.99, iou_threshold=1 / 3), impl=impl)
    assert d.counts.tolist() == [[2]]  # IoU exactly 1/3 is not > 1/3: kept
    np.testing.assert_array_equal(d.boxes[0, 0, :2], [[2, 0, 3, 1], [0, 0, 3, 1]])
    np.testing.assert_array_equal(d.points[0, 0, :2], [[2, 0], [0, 0]])
    d = detect(z, [0.5], LocalizeConfig(region_fraction=0.99, iou_threshold=0.3), impl=impl)
    assert d.counts.tolist() == [[1]] and d.points[0, 0, 0].tolist() == [2, 0]
    flat = np.full((1, 1, 2, 3), 1.0, np.float32)  # every cell is a candidate, same box: one survives
    d = detect(flat, [0.5], LocalizeConfig(), impl=impl)
    assert d.counts.tolist() == [[1]] and d.points[0, 0, 0].tolist() == [0, 0]
    np.testing.assert_array_equal(d.boxes[0, 0, 0], [0, 0, 3, 2])


def test_logit_thresholds_and_iou():
    t = logit_thresholds([0.0, 0.5, 1.0, 0.25])
    assert t.dtype == np.float32 and t[0] == -np.inf and t[1] == 0 and t[2] == np.inf
    assert t[3] == np.float32(np.log(0.25 / 0.75))
    with pytest.raises(ValueError):
        logit_thresholds([np.nan])
    assert iou_f32([0, 0, 2, 1], [1, 0, 3, 1]) == np.float32(1) / np.float32(3)
    assert iou_f32([0, 0, 1, 1], [2, 2, 3, 3]) == 0


# ---- scalar definitions: C++ == numpy -----------------------------------------------------------

def test_scalar_definitions_match():
    h = np.arange(65536, dtype=np.uint16)  # every half, exhaustively
    np.testing.assert_array_equal(C._half_to_float(h).view(np.uint32), h.view(np.float16).astype(np.float32).view(np.uint32))
    rng = np.random.default_rng(1)
    z = np.concatenate([rng.standard_normal(200_000) * s for s in (0.5, 5, 40)] + [[0, -0.0, 88.7, -88.7, -104, 104]])
    z = np.concatenate([z, [np.inf, -np.inf]]).astype(np.float32)
    np.testing.assert_array_equal(C._sigmoid(z).view(np.uint32), sigmoid_f32(z).view(np.uint32))
    # logit_floor brackets its answer around float(logit(t)) before bisecting: t near 0 and 1, subnormal
    # t, and t that are sigmoid outputs themselves (the answer is the first z of a plateau of equal
    # sigmoids, far from the logit where sigmoid saturates) must still give the smallest such z
    t = np.concatenate([rng.random(2000), rng.random(200) * 1e-30, 1 - rng.random(200) * 1e-6,
                        sigmoid_f32(rng.uniform(-110, 30, 2000).astype(np.float32)),
                        [0, 1, 1e-30, 0.5, 1e-45, 1.2e-38, np.nextafter(np.float32(1), np.float32(0)),
                         np.nextafter(np.float32(0), np.float32(1))]]).astype(np.float32)
    zt = C._logit_floor(t)
    assert (sigmoid_f32(zt) >= t).all()
    below = np.nextafter(zt, np.float32(-np.inf))
    assert ((sigmoid_f32(below) < t) | (zt == -np.inf)).all()


# ---- C++ == reference on random inputs ------------------------------------------------------------

SHAPES = [(1, 1, 1, 1), (1, 2, 2, 3), (2, 3, 7, 5), (1, 3, 16, 16), (2, 2, 33, 70), (1, 3, 40, 29)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cpu_matches_reference(shape, dtype):
    rng = np.random.default_rng(abs(hash((shape, np.dtype(dtype).name))) % 2**32)
    for i, (name, z) in enumerate(case_maps(rng, shape, dtype)):
        cfg = CONFIGS[i % len(CONFIGS)]
        t = thresholds(rng, shape[1])
        ref = detect(z, t, cfg, impl="reference")
        cpu = detect(z, t, cfg, impl="cpu", num_threads=2)
        assert_detections_equal(ref, cpu, f"{name} {shape} {np.dtype(dtype).name} {cfg}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"M{c.max_peaks}E{c.max_extent}")
def test_cpu_matches_reference_all_configs(cfg):
    rng = np.random.default_rng(cfg.max_peaks * 100 + cfg.max_extent)
    for name, z in case_maps(rng, (1, 3, 24, 41), np.float16):
        t = thresholds(rng, 3)
        assert_detections_equal(detect(z, t, cfg, impl="reference"), detect(z, t, cfg, impl="cpu"), f"{name} {cfg}")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cpu_block_skip_finds_every_candidate(dtype):
    """The C++ scan skips blocks of 16 cells below the threshold: one peak at every position of a block,
    in the tail after the last whole block, at map edges; disabled maps (threshold 1.0: logit +inf) with
    and without a +inf cell; maps of 1-16 cells (no whole block)."""
    for h, w in [(7, 9), (4, 4), (1, 16), (3, 5), (1, 1), (9, 17)]:
        n = h * w
        z = np.full((1, n, h, w), -9.0, np.float32)  # map i: one peak at raster index i
        z.reshape(1, n, n)[0, np.arange(n), np.arange(n)] = 2.0
        t = np.full(n, 0.5, np.float32)
        ref = detect(z.astype(dtype), t, LocalizeConfig(), impl="reference")
        assert ref.counts.tolist() == [[1] * n]
        assert_detections_equal(ref, detect(z.astype(dtype), t, LocalizeConfig(), impl="cpu"), f"{h}x{w}")
        dead = z.copy()
        dead[0, ::2] = np.where(dead[0, ::2] > 0, np.inf, dead[0, ::2])  # +inf peaks in the even maps
        t1 = np.ones(n, np.float32)
        ref = detect(dead.astype(dtype), t1, LocalizeConfig(), impl="reference")
        assert ref.counts.tolist() == [[1 - i % 2 for i in range(n)]]
        assert_detections_equal(ref, detect(dead.astype(dtype), t1, LocalizeConfig(), impl="cpu"), f"dead {h}x{w}")


def test_cpu_overflow_many_candidates():
    rng = np.random.default_rng(7)
    z = np.full((1, 2, 64, 64), 0.25, np.float32)  # 4096 candidates per map, all tied
    z[0, 1] = np.round(rng.standard_normal((64, 64)))  # heavy plateaus
    cfg = LocalizeConfig(max_peaks=64, max_extent=5)
    assert_detections_equal(detect(z, [0.1, 0.1], cfg, impl="reference"), detect(z, [0.1, 0.1], cfg, impl="cpu"))


def test_outputs_follow_input_library():
    torch = pytest.importorskip("torch")
    z = torch.randn(1, 2, 9, 9)
    d = detect(z, [0.5, 0.5])
    assert all(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in (d.counts, d.scores, d.points, d.boxes))
    assert_detections_equal(d.numpy(), detect(z.numpy(), [0.5, 0.5], impl="reference"))


def test_bad_inputs():
    with pytest.raises(TypeError):
        detect(np.zeros((1, 1, 3, 3), np.float64), [0.5])
    with pytest.raises(ValueError):
        detect(np.zeros((1, 3, 3), np.float32), [0.5])
    with pytest.raises(ValueError):
        detect(np.zeros((1, 2, 3, 3), np.float32), [0.5])
    with pytest.raises(ValueError):
        detect(np.zeros((1, 1, 3, 3), np.float32), [0.5], impl="gpu")
    with pytest.raises(ValueError):
        detect(np.zeros((1, 1, 3, 3), np.float32), [0.5], impl="cuda")
    d = detect(np.zeros((2, 1, 0, 4), np.float32), [0.5])
    assert d.counts.tolist() == [[0], [0]] and (d.scores == -1).all()


# ---- dispatch -------------------------------------------------------------------------------

def test_dispatch_rule(monkeypatch):
    assert kernels.resolve_impl(np.zeros(3)) == "cpu"
    assert kernels.resolve_impl([1.0, 2.0], "reference") == "reference"

    def missing():
        raise BackendUnavailableError("cxrkit._C is not built: run `pip install .`")

    monkeypatch.setattr(kernels, "cpu_module", missing)
    with pytest.raises(BackendUnavailableError, match="pip install"):
        detect(np.zeros((1, 1, 3, 3), np.float32), [0.5])
    with pytest.raises(BackendUnavailableError):
        batched_nms(np.zeros((1, 4), np.float32), np.zeros(1, np.float32), np.zeros(1, np.int64), 0.5)
    assert isinstance(detect(np.zeros((1, 1, 3, 3), np.float32), [0.5], impl="reference"), Detections)


def test_missing_extension_message(monkeypatch):
    real_import = __import__

    def fake_import(name, *args, **kwargs):
        if name == "cxrkit._C":
            raise ImportError("no _C")
        return real_import(name, *args, **kwargs)

    import importlib

    monkeypatch.setattr(importlib, "import_module", lambda name, *a: fake_import(name))
    with pytest.raises(BackendUnavailableError, match="pip install ."):
        kernels.cpu_module()


# ---- batched NMS ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 17, 300])
@pytest.mark.parametrize("variant", ["float", "integer", "ties"])
def test_batched_nms_cpu_matches_reference(n, variant):
    rng = np.random.default_rng(n * 3 + len(variant))
    boxes, scores, idxs = random_boxes(rng, n, integer=variant != "float", tie_scores=variant == "ties")
    for thr in (0.0, 0.3, 0.5, 1.0):
        ref = batched_nms(boxes, scores, idxs, thr, impl="reference")
        cpu = batched_nms(boxes, scores, idxs, thr, impl="cpu")
        assert ref.dtype == np.int64 and cpu.dtype == np.int64
        np.testing.assert_array_equal(ref, cpu)
        assert_keep_equal(brute_force_nms(boxes, scores, idxs, thr), ref, scores)


def test_batched_nms_edge_cases():
    boxes = np.array([[0, 0, 2, 1], [1, 0, 3, 1], [1, 0, 3, 1]], np.float32)  # IoU(0, 1) = 1/3 exactly
    scores = np.array([0.9, 0.8, 0.8], np.float32)
    for impl in ("reference", "cpu"):
        assert batched_nms(boxes, scores, np.zeros(3, np.int64), 1 / 3, impl=impl).tolist() == [0, 1]
        assert batched_nms(boxes, scores, np.zeros(3, np.int64), 0.33, impl=impl).tolist() == [0]
        assert batched_nms(boxes, scores, np.array([0, 1, 2]), 0.0, impl=impl).tolist() == [0, 1, 2]
        # all-equal scores: index order decides
        assert batched_nms(boxes, np.ones(3, np.float32), np.zeros(3, np.int64), 0.5, impl=impl).tolist() == [0, 1]
        assert batched_nms(boxes[:1], scores[:1], np.zeros(1, np.int64), 0.5, impl=impl).tolist() == [0]
        assert batched_nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), 0.5,
                           impl=impl).shape == (0,)


# ---- NaN policy, bf16, to_host ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nan_heatmaps_cpu_matches_reference(dtype):
    """One NaN policy (``_reference``): NaN cells are never peaks nor in regions, a NaN neighbour blocks a
    peak; the C++ kernel agrees bit for bit (the CUDA test uses the same maps)."""
    from test_postprocess_cases import nan_maps

    rng = np.random.default_rng(9)
    for name, z in nan_maps(rng, (2, 3, 24, 31), dtype):
        for cfg in (CONFIGS[0], CONFIGS[3], CONFIGS[4]):
            t = thresholds(rng, 3)
            ref = detect(z, t, cfg, impl="reference")
            assert_detections_equal(ref, detect(z, t, cfg, impl="cpu"), f"{name} {cfg}")
            ref_scores = ref.scores[ref.scores >= 0]
            assert np.isfinite(ref_scores).all(), name
            for b, k, j in zip(*np.nonzero(np.arange(cfg.max_peaks)[None, None] < ref.counts[..., None])):
                x, y = ref.points[b, k, j]
                win = z[b, k, max(0, y - 1):y + 2, max(0, x - 1):x + 2]
                assert not np.isnan(win.astype(np.float32)).any(), (name, b, k, x, y)  # no NaN around a peak
    z = np.full((1, 2, 5, 5), np.nan, np.float32)
    d = detect(z, [0.0, 0.5], impl="cpu")
    assert d.counts.tolist() == [[0, 0]]


def test_nan_scores_nms_order_cpu_matches_reference():
    """NaN scores (either sign) rank after every number, -inf included, index ascending among them;
    the C++ sort (a strict weak order now: no undefined behaviour) equals the numpy reference."""
    from test_postprocess_cases import nan_scores

    rng = np.random.default_rng(4)
    for n in (1, 7, 64, 500):
        boxes, _, idxs = random_boxes(rng, n, n_groups=3, integer=True)
        scores = nan_scores(rng, n)
        for thr in (0.0, 0.5, 1.0):
            ref = batched_nms(boxes, scores, idxs, thr, impl="reference")
            np.testing.assert_array_equal(ref, batched_nms(boxes, scores, idxs, thr, impl="cpu"))
        # no suppression: the order itself is visible
        keep = batched_nms(boxes, scores, np.arange(n), 1.0, impl="cpu")
        is_nan = np.isnan(scores[keep])
        assert keep.shape == (n,)
        assert not is_nan[: n - int(is_nan.sum())].any(), "a NaN score ranked before a number"
        nan_part = keep[is_nan]
        np.testing.assert_array_equal(nan_part, np.sort(nan_part))
        finite = scores[keep[~is_nan]]
        assert (finite[:-1] >= finite[1:]).all()  # descending, infinities included


def test_bf16_heatmaps_cpu():
    """bfloat16 heatmaps (torch, precision="bf16") are the function of their exact float32 widening."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    z = torch.from_numpy(np.asarray(smooth_logits_like(rng))).to(torch.bfloat16)
    want = detect(z.float().numpy(), [0.4] * 3, impl="reference")
    for impl in ("auto", "cpu", "reference"):
        got = detect(z, [0.4] * 3, impl=impl)
        assert isinstance(got.scores, torch.Tensor)
        assert_detections_equal(want, Detections(*(a.numpy() for a in (got.counts, got.scores, got.points,
                                                                          got.boxes))), impl)


def smooth_logits_like(rng):
    from test_postprocess_cases import smooth_logits

    return smooth_logits(rng, (2, 3, 20, 17), radius=2)


def test_to_host_cpu_returns_views():
    from cxrkit.postprocess import to_host

    rng = np.random.default_rng(1)
    z = smooth_logits_like(rng)
    d = detect(z, [0.4] * 3)
    lg = rng.standard_normal((2, 3)).astype(np.float32)
    lg_h, d_h = to_host(lg, d)
    assert np.shares_memory(lg_h, lg)
    for name in ("counts", "scores", "points", "boxes"):
        assert np.shares_memory(getattr(d_h, name), getattr(d, name)), name
    torch = pytest.importorskip("torch")
    dt = detect(torch.from_numpy(z), [0.4] * 3)
    lg_t = torch.from_numpy(lg).to(torch.bfloat16)
    lg_h, d_h = to_host(lg_t, dt)
    assert lg_h.dtype == np.float32 and isinstance(d_h.scores, np.ndarray)
    np.testing.assert_array_equal(lg_h, lg_t.float().numpy())
    assert np.shares_memory(d_h.boxes, dt.boxes.numpy())
    assert_detections_equal(d, d_h)
