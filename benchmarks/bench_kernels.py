"""GPU post-processing kernels vs the same function in torch ops, measured in one run.

    python benchmarks/bench_kernels.py [--json F]  # prints the table (well under 2 minutes)
    pytest benchmarks/bench_kernels.py --benchmark-enable   # the same cases under pytest-benchmark

Heatmaps: fp16 (B, 29, 128, 128) smooth random logits (blurred noise, never zeros), thresholds 0.5.
Timing: CUDA events, median of repeated runs after warm-up; B=1 also as a CUDA graph replay (what a
serving loop would do to hide launch overhead). Floor = heatmap bytes read once / HBM bandwidth
(4.24 TB/s H200, 3.0 TB/s H100, from the card name).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

K, H, W = 29, 128, 128


def _torch(under_pytest: bool = False):
    torch = pytest.importorskip("torch") if under_pytest else __import__("torch")
    if not torch.cuda.is_available():
        if under_pytest:
            pytest.skip("needs a CUDA GPU")
        raise SystemExit("bench_kernels: needs a CUDA GPU")
    if under_pytest:
        pytest.importorskip("cupy")
    return torch


def _bandwidth_tb_s(torch) -> tuple[str, float]:
    name = torch.cuda.get_device_name()
    return name, (4.24 if "H200" in name else 3.0 if "H100" in name else float("nan"))


def heatmaps(torch, B: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B * K, 1, H, W, device="cuda", generator=g)
    for _ in range(2):
        x = torch.nn.functional.avg_pool2d(x, 9, stride=1, padding=4, count_include_pad=False)
    x = x / x.std(dim=(2, 3), keepdim=True)
    z = -2.0 + 2.0 * x + 1e-3 * torch.rand_like(x)  # mostly background, a few blobs per map
    return z.reshape(B, K, H, W).half().contiguous()


def time_us(torch, fn, reps: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def torch_localize(torch, tv, heat, t_logit, M: int = 16, radius: int = 4, iou: float = 0.3):
    """The same job in torch ops: local max by 3x3 max-pool, top-M, a fixed-radius box, batched NMS."""
    B, K_, h, w = heat.shape
    z = heat.float()
    p = z.sigmoid()
    cand = (z >= torch.nn.functional.max_pool2d(z, 3, 1, 1)) & (z >= t_logit.view(1, K_, 1, 1))
    s, i = torch.where(cand, p, torch.full_like(p, -1)).flatten(2).topk(M, dim=2)  # (B, K, M)
    ys, xs = (i // w).float(), (i % w).float()
    boxes = torch.stack([(xs - radius).clamp(min=0), (ys - radius).clamp(min=0),
                         (xs + radius + 1).clamp(max=w), (ys + radius + 1).clamp(max=h)], -1)
    valid = s.flatten() > 0
    groups = torch.arange(B * K_, device=heat.device).repeat_interleave(M)
    return tv.ops.batched_nms(boxes.reshape(-1, 4)[valid], s.flatten()[valid], groups[valid], iou)


def random_boxes(torch, n: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    xy = torch.rand(n, 2, device="cuda", generator=g) * 1000
    wh = 8 + torch.rand(n, 2, device="cuda", generator=g) * 64
    return torch.cat([xy, xy + wh], 1), torch.rand(n, device="cuda", generator=g), \
        torch.randint(0, 8, (n,), device="cuda", generator=g)


def run() -> list[dict]:
    torch = _torch()
    import torchvision as tv

    from cxrkit.postprocess import Detections, batched_nms, detect, logit_thresholds

    card, tbs = _bandwidth_tb_s(torch)
    t = [0.5] * K
    t_dev = torch.from_numpy(logit_thresholds(t)).cuda()
    rows = []
    for B in (1, 64):
        heat = heatmaps(torch, B)
        d = detect(heat, t)  # compiles (NVRTC, cached on disk) and uploads thresholds once
        out = Detections(*(torch.empty_like(a) for a in (d.counts, d.scores, d.points, d.boxes)))
        ours = time_us(torch, lambda: detect(heat, t, out=out), reps=100)
        base = time_us(torch, lambda: torch_localize(torch, tv, heat, t_dev), reps=20)
        nbytes = heat.numel() * heat.element_size()
        rows.append(dict(case=f"localize B={B} K={K} {H}x{W} fp16", ours=ours, base=base, bytes=nbytes,
                         peaks=float(d.counts.float().mean())))
        if B == 1:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    detect(heat, t, out=out)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                detect(heat, t, out=out)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out.counts, d.counts) and torch.equal(out.boxes, d.boxes)
            rows.append(dict(case="localize B=1 CUDA graph replay", ours=time_us(torch, graph.replay, reps=200),
                             base=base, bytes=nbytes, peaks=float(d.counts.float().mean())))
    for n in (1000, 10000):
        b, s, g = random_boxes(torch, n)
        keep = batched_nms(b, s, g, 0.5)
        ref = tv.ops.batched_nms(b, s, g, 0.5)
        same = keep.shape == ref.shape and bool((s[keep] == s[ref]).all())
        rows.append(dict(case=f"batched_nms {n} boxes, 8 classes (same keep: {same})",
                         ours=time_us(torch, lambda: batched_nms(b, s, g, 0.5), reps=20),
                         base=time_us(torch, lambda: tv.ops.batched_nms(b, s, g, 0.5), reps=20), bytes=n * 28))
    print(f"\n{card}  (floor bandwidth {tbs} TB/s)  torch {torch.__version__}")
    print(f"{'case':<52} {'ours us':>9} {'torch us':>9} {'speedup':>8} {'GB/s':>7} {'floor us':>9}")
    for r in rows:
        gbs = r["bytes"] / (r["ours"] * 1e-6) / 1e9
        floor = r["bytes"] / (tbs * 1e12) * 1e6
        extra = f"  mean kept peaks/map {r['peaks']:.2f}" if "peaks" in r else ""
        print(f"{r['case']:<52} {r['ours']:>9.1f} {r['base']:>9.1f} {r['base'] / r['ours']:>7.1f}x "
              f"{gbs:>7.0f} {floor:>9.1f}{extra}")
    return rows


# ---- pytest-benchmark entry points ------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
def test_bench_localize(benchmark, B):
    torch = _torch(under_pytest=True)
    from cxrkit.postprocess import detect

    heat = heatmaps(torch, B)
    detect(heat, [0.5] * K)

    def step():
        detect(heat, [0.5] * K)
        torch.cuda.synchronize()

    benchmark(step)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1000, 10000])
def test_bench_batched_nms(benchmark, n):
    torch = _torch(under_pytest=True)
    from cxrkit.postprocess import batched_nms

    b, s, g = random_boxes(torch, n)
    batched_nms(b, s, g, 0.5)
    benchmark(lambda: batched_nms(b, s, g, 0.5))


if __name__ == "__main__":
    import argparse
    import json
    import time

    ap = argparse.ArgumentParser(description="CUDA post-processing kernels vs torch/torchvision, one run")
    ap.add_argument("--json", help="also write the rows (with card and date) to this file")
    args = ap.parse_args()
    result = run()
    if args.json:
        import torch

        Path(args.json).write_text(json.dumps({"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                                               "rows": result}, indent=2))
