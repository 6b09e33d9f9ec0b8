"""CUDA kernels against the reference / C++ (bit for bit), in-place device input, NaN policy, bf16, out= checks. Needs a GPU and CuPy."""

from __future__ import annotations

import numpy as np
import pytest

from cxrkit.config import LocalizeConfig
from cxrkit.postprocess import batched_nms, detect

from test_postprocess_cases import (CONFIGS, assert_detections_equal, assert_keep_equal, brute_force_nms, case_maps,
                                random_boxes, smooth_logits, thresholds)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("cupy", reason="the CUDA kernels need CuPy (pip install cupy-cuda13x)")
    return torch


def _cuda(torch, a):
    return torch.from_numpy(np.ascontiguousarray(a)).cuda()


SHAPES = [(1, 1, 1, 1), (1, 2, 2, 3), (2, 3, 7, 5), (2, 2, 33, 70), (1, 3, 40, 29), (1, 2, 128, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cuda_matches_reference(torch, shape, dtype):
    rng = np.random.default_rng(abs(hash((shape, np.dtype(dtype).name))) % 2**32)
    for i, (name, z) in enumerate(case_maps(rng, shape, dtype)):
        for cfg in (CONFIGS[i % len(CONFIGS)], CONFIGS[(i + 3) % len(CONFIGS)]):
            t = thresholds(rng, shape[1])
            ref = detect(z, t, cfg, impl="reference") if shape[2] * shape[3] <= 2048 else detect(z, t, cfg, impl="cpu")
            gpu = detect(_cuda(torch, z), t, cfg)
            assert gpu.counts.device.type == "cuda"
            assert_detections_equal(ref, gpu.numpy(), f"{name} {shape} {np.dtype(dtype).name} {cfg}")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_cuda_large_batch_matches_cpu(torch, dtype):
    rng = np.random.default_rng(64)
    z = smooth_logits(rng, (64, 29, 128, 128), radius=4, dtype=dtype)
    t = rng.uniform(0.2, 0.8, 29).astype(np.float32)
    for cfg in (LocalizeConfig(), LocalizeConfig(max_peaks=64, max_extent=64, region_fraction=0.2)):
        cpu = detect(z, t, cfg, impl="cpu")
        gpu = detect(_cuda(torch, z), t, cfg)
        assert_detections_equal(cpu, gpu.numpy(), f"B=64 {np.dtype(dtype).name} {cfg}")
    sub = z[:2, :3]  # and a slice against the reference itself
    assert_detections_equal(detect(sub, t[:3], impl="reference"), detect(_cuda(torch, sub), t[:3]).numpy())


def test_cuda_candidate_overflow(torch):
    """> 1024 candidates per map (the shared list's capacity): the key-floor rescan must stay exact."""
    rng = np.random.default_rng(5)
    z = np.full((2, 3, 128, 128), 0.5, np.float32)  # 16384 tied candidates
    z[1, 0] = np.round(rng.standard_normal((128, 128)))  # thousands of plateau candidates
    z[1, 1] = rng.standard_normal((128, 128))  # ~1800 noise candidates
    z[1, 2, ::2, ::2] = rng.integers(0, 3, (64, 64))  # 4096 isolated peaks, heavy ties
    t = np.full(3, 0.1, np.float32)
    for cfg in (LocalizeConfig(max_peaks=64, max_extent=3), LocalizeConfig(max_peaks=1), LocalizeConfig()):
        assert_detections_equal(detect(z, t, cfg, impl="cpu"), detect(_cuda(torch, z), t, cfg).numpy(), str(cfg))


def test_cuda_reads_input_in_place_and_stays_on_device(torch, monkeypatch):
    """What "zero-copy" means here, checked: a contiguous CUDA input (torch, CuPy, or any __dlpack__
    CUDA array) is read in place (the kernel gets the input's own pointer); the outputs are created
    on the input's device by its library and the kernel runs on the caller's current stream; with
    preallocated outputs the whole call can be captured in a CUDA graph, which proves it makes no
    host transfer, host synchronisation or allocation. A non-contiguous input IS copied (.contiguous()).
    The Detector still copies the results to the host, once per batch (postprocess.to_host)."""
    from cxrkit.kernels import _cuda

    rng = np.random.default_rng(3)
    z = _cuda(torch, smooth_logits(rng, (2, 4, 32, 32), dtype=np.float16))
    launched = []
    real_launch = _cuda._launch

    def spy(fn, like, grid, block, args, shared_mem=0):
        launched.append((int(args[0]), like.stream_ptr))
        return real_launch(fn, like, grid, block, args, shared_mem)

    monkeypatch.setattr(_cuda, "_launch", spy)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        d = detect(z, [0.5] * 4)
    s.synchronize()
    assert launched == [(z.data_ptr(), s.cuda_stream)]  # the input's own memory, on the caller's stream
    for a in (d.counts, d.scores, d.points, d.boxes):
        assert isinstance(a, torch.Tensor) and a.device == z.device
    assert d.counts.dtype == torch.int32 and d.scores.dtype == torch.float32 and d.boxes.shape == (2, 4, 16, 4)
    assert_detections_equal(detect(z.cpu().numpy(), [0.5] * 4, impl="reference"), d.numpy())

    import cupy as cp

    zc = cp.asarray(z)  # shares z's memory
    launched.clear()
    dc = detect(zc, [0.5] * 4)
    assert launched[0][0] == zc.data.ptr == z.data_ptr() and isinstance(dc.counts, cp.ndarray)
    assert_detections_equal(d.numpy(), dc.numpy())

    class DLPackOnly:  # a foreign array that only speaks DLPack
        def __init__(self, t):
            self.t = t

        def __dlpack__(self, **kw):
            return self.t.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()

    launched.clear()
    dd = detect(DLPackOnly(z), [0.5] * 4)
    assert launched[0][0] == z.data_ptr()
    assert_detections_equal(d.numpy(), dd.numpy())

    wide = torch.zeros((2, 4, 32, 64), dtype=z.dtype, device=z.device)
    wide[..., ::2] = z
    launched.clear()
    assert_detections_equal(d.numpy(), detect(wide[..., ::2], [0.5] * 4).numpy())
    assert launched[0][0] != wide.data_ptr()  # strided: a contiguous copy was read

    # preallocated outputs, written in place, capturable in a CUDA graph
    out = type(d)(*(torch.empty_like(a) for a in (d.counts, d.scores, d.points, d.boxes)))
    d2 = detect(z, [0.5] * 4, out=out)
    assert all(x.data_ptr() == y.data_ptr() for x, y in zip((d2.counts, d2.scores, d2.points, d2.boxes),
                                                            (out.counts, out.scores, out.points, out.boxes)))
    assert_detections_equal(d.numpy(), d2.numpy())
    for a in (out.counts, out.scores, out.points, out.boxes):
        a.fill_(7)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        detect(z, [0.5] * 4, out=out)
    g.replay()
    torch.cuda.synchronize()
    assert_detections_equal(d.numpy(), out.numpy())


def test_cuda_out_buffers_are_validated(torch):
    from cxrkit.postprocess import Detections

    z = _cuda(torch, np.zeros((2, 3, 8, 8), np.float32))
    d = detect(z, [0.5] * 3)

    def outs(**change):
        arrs = {k: torch.empty_like(getattr(d, k)) for k in ("counts", "scores", "points", "boxes")}
        arrs.update(change)
        return Detections(**arrs)

    detect(z, [0.5] * 3, out=outs())  # the right buffers are accepted
    bad = [
        (TypeError, outs(counts=torch.empty((2, 3), dtype=torch.int64, device="cuda"))),
        (TypeError, outs(scores=torch.empty((2, 3, 16), dtype=torch.float16, device="cuda"))),
        (ValueError, outs(points=torch.empty((2, 3, 15, 2), dtype=torch.int32, device="cuda"))),
        (ValueError, outs(boxes=torch.empty((2, 3, 4, 16), dtype=torch.float32, device="cuda").transpose(2, 3))),
        (ValueError, outs(scores=torch.empty((2, 3, 16), dtype=torch.float32))),  # host tensor
    ]
    import cupy as cp

    bad.append((ValueError, outs(counts=cp.empty((2, 3), dtype=cp.int32))))  # other library
    for exc, o in bad:
        with pytest.raises(exc):
            detect(z, [0.5] * 3, out=o)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cuda_nan_policy_matches_reference(torch, dtype):
    from test_postprocess_cases import nan_maps, nan_scores

    rng = np.random.default_rng(21)
    for name, z in nan_maps(rng, (2, 3, 24, 31), dtype):
        for cfg in (CONFIGS[0], CONFIGS[3], CONFIGS[4]):
            t = thresholds(rng, 3)
            assert_detections_equal(detect(z, t, cfg, impl="reference"), detect(_cuda(torch, z), t, cfg).numpy(), name)
    for n in (7, 64, 700):
        boxes, _, idxs = random_boxes(rng, n, n_groups=3, integer=True)
        scores = nan_scores(rng, n)
        for thr in (0.0, 0.5, 1.0):
            ref = batched_nms(boxes, scores, idxs, thr, impl="cpu")
            got = batched_nms(_cuda(torch, boxes), _cuda(torch, scores), _cuda(torch, idxs), thr)
            np.testing.assert_array_equal(ref, got.cpu().numpy())


def test_cuda_bf16_heatmaps(torch):
    """precision="bf16" on CUDA: bf16 heatmaps go to the bf16 kernel (no TypeError), the function of their
    exact float32 widening."""
    rng = np.random.default_rng(8)
    z = _cuda(torch, smooth_logits(rng, (3, 5, 40, 29), radius=2)).to(torch.bfloat16)
    t = thresholds(rng, 5)
    for cfg in (CONFIGS[0], CONFIGS[3]):
        want = detect(z.float().cpu().numpy(), t, cfg, impl="cpu")
        assert_detections_equal(want, detect(z, t, cfg).numpy(), str(cfg))
        assert_detections_equal(want, detect(z.cpu(), t, cfg).numpy(), "bf16 host tensor")


def test_cuda_empty_and_host_rules(torch):
    d = detect(torch.zeros((0, 3, 8, 8), device="cuda"), [0.5] * 3)
    assert d.counts.shape == (0, 3)
    d = detect(torch.full((1, 2, 8, 8), -30.0, device="cuda"), [0.5] * 2)
    assert d.counts.cpu().tolist() == [[0, 0]] and (d.scores == -1).all()
    with pytest.raises(ValueError):
        detect(torch.zeros((1, 1, 4, 4), device="cuda"), [0.5], impl="cpu")


@pytest.mark.parametrize("n", [0, 1, 65, 1000, 5000])
@pytest.mark.parametrize("variant", ["float", "integer", "ties"])
def test_cuda_batched_nms(torch, n, variant):
    rng = np.random.default_rng(n + len(variant))
    boxes, scores, idxs = random_boxes(rng, n, n_groups=4, integer=variant != "float", tie_scores=variant == "ties")
    for thr in (0.0, 0.3, 0.7):
        ref = batched_nms(boxes, scores, idxs, thr, impl="cpu")
        if n <= 1000:
            np.testing.assert_array_equal(ref, batched_nms(boxes, scores, idxs, thr, impl="reference"))
        gpu = batched_nms(_cuda(torch, boxes), _cuda(torch, scores), _cuda(torch, idxs), thr)
        assert gpu.device.type == "cuda" and gpu.dtype == torch.int64
        np.testing.assert_array_equal(ref, gpu.cpu().numpy())
        if n <= 300:
            assert_keep_equal(brute_force_nms(boxes, scores, idxs, thr), gpu.cpu().numpy(), scores)


def test_cuda_batched_nms_against_torchvision(torch):
    tv = pytest.importorskip("torchvision")
    rng = np.random.default_rng(11)
    boxes, scores, idxs = random_boxes(rng, 2000, n_groups=5, integer=True)  # offsets stay exact
    b, s, g = _cuda(torch, boxes), _cuda(torch, scores), _cuda(torch, idxs)
    for thr in (0.3, 0.5):
        assert_keep_equal(tv.ops.batched_nms(b, s, g, thr).cpu().numpy(), batched_nms(b, s, g, thr).cpu().numpy(),
                          scores)
