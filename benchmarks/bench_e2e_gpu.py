"""End-to-end GPU benchmark: 2048² JPEG chest X-rays -> Detector(device="cuda") -> findings.

Workload: the DenseNet-121-class reference network at 512² (random weights: speed only), fp16,
CUDA graphs. Measured in the same run:
  - the decode-alone ceiling: DALI mixed decode (nvJPEG, hardware decoder) + resize, nothing else;
  - cxrkit end to end (bytes in, Predictions out) at batch 64..256, and batch-1 latency p50/p99;
  - baseline (a): Pillow decode on all cores + torch eager fp32;
  - baseline (b): torchvision.io.decode_jpeg(device="cuda") + torch eager fp16.
Prints a table with ratios; writes JSON to --json. Run on the GPU machine:
    python benchmarks/bench_e2e_gpu.py --json $OUT/e2e.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_jpegs(n_unique: int, size: int) -> list[bytes]:
    from PIL import Image

    from cxrkit.bench import synthetic_radiograph

    def one(i: int) -> bytes:
        b = io.BytesIO()
        Image.fromarray(synthetic_radiograph(size, 1000 + i)).save(b, format="JPEG", quality=90)
        return b.getvalue()

    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as ex:  # ~1 s each on one core: numpy frees the GIL
        return list(ex.map(one, range(n_unique)))


def densenet_package(folder: Path, input_hw=(512, 512)) -> Path:
    """A model package for the random-weight DenseNet-121 reference network (torch backend)."""
    import torch

    try:
        from safetensors.torch import save_file
    except ImportError as e:  # not on the bare GPU machine: carried in .device/extras (README)
        raise SystemExit(f"bench_e2e_gpu: {e}; carry the safetensors wheel (benchmarks/README.md)") from None

    from cxrkit.labels import FINDING_KEYS
    from cxrkit.models import sha256_file
    from cxrkit.nets import create_net

    torch.manual_seed(0)
    net = create_net("densenet121")
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "weights.safetensors"))
    stride = int(net.heatmap_stride)
    card = {
        "schema_version": 1, "name": "densenet121-random", "version": "0", "arch": "densenet121", "arch_kwargs": {},
        "labels": list(FINDING_KEYS[: getattr(net, "num_classes", 29)]), "input_size": list(input_hw),
        "normalization": {"mean": 0.5, "std": 0.25}, "heatmap_stride": stride,
        "thresholds": {k: 0.5 for k in FINDING_KEYS[: getattr(net, "num_classes", 29)]},
        "files": {"weights": "weights.safetensors"},
        "sha256": {"weights.safetensors": sha256_file(folder / "weights.safetensors")},
        "description": "random weights, benchmark workload only",
    }
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def cuda_time(fn, iters: int) -> float:
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def decode_ceiling(jpegs: list[bytes], batch: int, iters: int, device: str = "gpu", size: int = 512,
                   num_threads: int = 8) -> float:
    """DALI decode + resize to ``size`` only, nothing else (the GPU.md anchor method): images/s.

    ``device="gpu"``: the "mixed" decoder (nvJPEG, hardware engines); "cpu" runs the same graph on
    DALI's CPU operators (how the test suite checks this function without a GPU). The batches come
    from a source callback, so DALI's own prefetching (queue depth 2) overlaps the decode of the next
    batch with this one: the ceiling cxrkit is measured against is DALI at its best. (Feeding one
    batch per run with ``feed_input`` into a depth-2 queue raised on the second run in DALI 2.4.)
    """
    from nvidia.dali import fn, pipeline_def, types

    gpu = device == "gpu"
    batches = [[np.frombuffer(jpegs[(b * batch + i) % len(jpegs)], np.uint8) for i in range(batch)]
               for b in range(max(1, len(jpegs)))]
    state = {"i": 0}

    def next_batch():
        state["i"] += 1
        return batches[state["i"] % len(batches)]

    @pipeline_def(batch_size=batch, num_threads=num_threads, device_id=0 if gpu else None, prefetch_queue_depth=2)
    def pipe():
        enc = fn.external_source(source=next_batch, dtype=types.UINT8, ndim=1)
        hw = {"hw_decoder_load": 0.75} if gpu else {}
        img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.GRAY, **hw)
        return fn.resize(img, resize_longer=size)

    p = pipe()
    p.build()
    for _ in range(3):
        p.run()
    t0 = time.perf_counter()
    for _ in range(iters):
        (o,) = p.run()
    if gpu:
        o.as_tensor()  # outputs are complete when run() returns them; this touches the last one
        import torch

        torch.cuda.synchronize()
    rate = batch * iters / (time.perf_counter() - t0)
    del p
    return rate


def baseline_a(pkg: Path, jpegs: list[bytes], n: int) -> float:
    """Pillow decode on all cores + torch eager fp32 on the GPU."""
    import torch
    from PIL import Image

    from cxrkit.models import load_model_package
    from cxrkit.nets import create_net, load_weights

    m = load_model_package(pkg)
    net = create_net(m.card.arch)
    load_weights(net, m.weights_path)
    net = net.cuda().eval()

    def dec(b: bytes) -> np.ndarray:
        im = Image.open(io.BytesIO(b)).convert("L").resize((512, 512), Image.BILINEAR)
        return np.asarray(im, np.float32) / 255.0

    bs = 64
    with ThreadPoolExecutor(os.cpu_count()) as ex, torch.inference_mode():
        def run():
            for s in range(0, n, bs):
                arr = np.stack(list(ex.map(dec, [jpegs[i % len(jpegs)] for i in range(s, s + bs)])))
                x = torch.from_numpy((arr - 0.5) / 0.25)[:, None].cuda()
                lg, hm = net(x)
                torch.sigmoid(lg).cpu()
        run()
        t = cuda_time(run, 1)
    return n / t


def baseline_b(pkg: Path, jpegs: list[bytes], n: int) -> float:
    """torchvision.io.decode_jpeg(device='cuda') + torch eager fp16."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    from cxrkit.models import load_model_package
    from cxrkit.nets import create_net, load_weights

    m = load_model_package(pkg)
    net = create_net(m.card.arch)
    load_weights(net, m.weights_path)
    net = net.cuda().half().eval().to(memory_format=torch.channels_last)
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    bs = 64

    def run():
        with torch.inference_mode():
            for s in range(0, n, bs):
                imgs = decode_jpeg([datas[i % len(datas)] for i in range(s, s + bs)], mode=ImageReadMode.GRAY, device="cuda")
                x = torch.stack([F.interpolate(im[None].half(), size=(512, 512), mode="bilinear", antialias=True)[0] for im in imgs])
                x = (x / 255.0 - 0.5) / 0.25
                lg, hm = net(x.contiguous(memory_format=torch.channels_last))
                torch.sigmoid(lg.float()).cpu()

    run()
    return n / cuda_time(run, 1)


def cxrkit_e2e(pkg: Path, jpegs: list[bytes], n: int, batch: int, compile_: bool = False) -> dict:
    import torch

    from cxrkit import Detector

    torch.cuda.reset_peak_memory_stats()
    det = Detector.from_pretrained(str(pkg), device="cuda", backend="torch", precision="fp16", batch_size=batch,
                                   runner_options={"compile": compile_})
    items = [jpegs[i % len(jpegs)] for i in range(n)]
    preds = det.predict(items[: 2 * batch])  # warm-up: pipelines, graphs
    assert all(p.error is None for p in preds), [p.error for p in preds if p.error][:3]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    preds = det.predict(items)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    det.close()
    return {"batch": batch, "img_s": n / dt, "peak_gib": peak}


def latency_b1(pkg: Path, jpegs: list[bytes], reps: int) -> dict:

    from cxrkit import Detector

    det = Detector.from_pretrained(str(pkg), device="cuda", backend="torch", precision="fp16", batch_size=1)
    for i in range(10):
        det.predict([jpegs[i % len(jpegs)]])
    ts = []
    for i in range(reps):
        t0 = time.perf_counter()
        det.predict([jpegs[i % len(jpegs)]])
        ts.append((time.perf_counter() - t0) * 1e3)
    det.close()
    ts.sort()
    return {"p50_ms": statistics.median(ts), "p99_ms": ts[int(0.99 * (len(ts) - 1))]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--unique", type=int, default=48)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--json")
    ap.add_argument("--skip-baselines", action="store_true")
    a = ap.parse_args()
    import torch

    card = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    jpegs = make_jpegs(a.unique, a.size)
    print(f"made {len(jpegs)} JPEGs of {a.size}² (mean {np.mean([len(j) for j in jpegs]) / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f}s", flush=True)
    res: dict = {"card": card, "date": time.strftime("%Y-%m-%d"), "n": a.n, "size": a.size}
    with tempfile.TemporaryDirectory() as tmp:
        pkg = densenet_package(Path(tmp) / "dn121")
        for name, fn in [
            ("decode_ceiling", lambda: decode_ceiling(jpegs, 128, max(4, a.n // 128))),
        ]:
            try:
                res[name] = fn()
                print(f"{name}: {res[name]:.0f} img/s", flush=True)
            except Exception as e:
                res[name] = None
                print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
        res["cxrkit"] = []
        for b in [int(x) for x in a.batches.split(",")]:
            try:
                r = cxrkit_e2e(pkg, jpegs, a.n, b)
                res["cxrkit"].append(r)
                print(f"cxrkit batch {b}: {r['img_s']:.0f} img/s, peak {r['peak_gib']:.2f} GiB", flush=True)
            except Exception as e:
                import traceback

                traceback.print_exc()
                print(f"cxrkit batch {b}: FAILED {type(e).__name__}: {e}", flush=True)
        try:
            res["latency_b1"] = latency_b1(pkg, jpegs, 200)
            print(f"batch-1 latency: {res['latency_b1']}", flush=True)
        except Exception as e:
            print(f"latency: FAILED {type(e).__name__}: {e}", flush=True)
        if not a.skip_baselines:
            for name, fn in [("baseline_a", baseline_a), ("baseline_b", baseline_b)]:
                try:
                    res[name] = fn(pkg, jpegs, min(a.n, 512))
                    print(f"{name}: {res[name]:.0f} img/s", flush=True)
                except Exception as e:
                    res[name] = None
                    print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
    best = max((r["img_s"] for r in res["cxrkit"]), default=float("nan"))
    print(f"\n== end to end, {card}, {res['date']}: 2048² JPEG -> DenseNet-121 512² fp16 -> boxes ==")
    print(f"{'what':36} {'img/s':>9} {'cxrkit / this':>14}")
    for r in res["cxrkit"]:
        print(f"{'cxrkit batch ' + str(r['batch']):36} {r['img_s']:9.0f} {'':>14}  peak GPU {r['peak_gib']:.2f} GiB")
    for name, label in [("decode_ceiling", "decode-alone ceiling (DALI mixed)"),
                        ("baseline_a", "(a) Pillow + torch eager fp32"),
                        ("baseline_b", "(b) torchvision GPU decode + fp16")]:
        v = res.get(name)
        if v:
            print(f"{label:36} {v:9.0f} {best / v:13.2f}x")
    if "latency_b1" in res:
        print(f"batch-1 latency p50 {res['latency_b1']['p50_ms']:.2f} ms, p99 {res['latency_b1']['p99_ms']:.2f} ms")
    print("targets: >= 2800 img/s, >= 0.92 x decode ceiling, >= 5x (a), p99 <= 6 ms, <= 4 GB at batch 64")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
