"""Many concurrent single-image clients: BatchingDetector vs a shared Detector, same run.

Workload: N client threads (1, 8, 64), each sending single encoded images (synthetic radiograph-
like JPEGs with probe squares, q90) one after another, R requests in all, against
  - direct:   one shared Detector, each client calls ``det.predict([img])`` (batches of one,
              serialized on the Detector's lock);
  - batching: ``BatchingDetector(det, max_batch, max_delay_ms)`` over the SAME Detector, each
              client calls ``bd.predict(img)``.
Prints throughput (images/s), p50 / p99 latency (ms, per request, in the client) and the ratios
batching / direct. The floor it chases: the Detector's own rate on full batches of ``max_batch``
from one thread (no queueing, no client threads); batching can approach it, not beat it.

    python -m pytest benchmarks/bench_batching.py --benchmark-enable -s -q
    python benchmarks/bench_batching.py --model cxr-probe --clients 1 8 64 --requests 512 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

try:
    import cxrkit
except ImportError:  # run as a script from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import cxrkit

from cxrkit.batching import BatchingDetector

CLIENTS = (1, 8, 64)


def make_images(n: int, size: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEG (q90) images, ``size``^2: a smooth dark-to-mid field with two flat probe squares."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        u = 0.05 + 0.1 * np.sin(3 * x + i) * np.cos(2 * y) + 0.01 * rng.standard_normal((size, size), np.float32)
        side = size // 6
        for j, level in enumerate((0.25 + 0.1 * (i % 6), 0.25 + 0.1 * ((i + 3) % 6))):
            y0, x0 = int(rng.integers(0, size - side)), j * (size - side)
            u[y0:y0 + side, x0:x0 + side] = level
        buf = io.BytesIO()
        Image.fromarray(np.round(np.clip(u, 0, 1) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@dataclass
class Result:
    mode: str
    clients: int
    requests: int
    wall_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float = 1.0
    errors: int = 0


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q))


def run_clients(call: Callable[[bytes], Any], images: Sequence[bytes], clients: int,
                requests: int) -> tuple[float, list[float], int]:
    """``clients`` threads share ``requests`` calls; returns wall seconds, per-call latencies (ms), errors."""
    per = [requests // clients + (1 if c < requests % clients else 0) for c in range(clients)]
    lat: list[list[float]] = [[] for _ in range(clients)]
    errs = [0] * clients
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        start.wait()
        for k in range(per[c]):
            img = images[(c * 7919 + k) % len(images)]
            t0 = time.perf_counter()
            p = call(img)
            lat[c].append((time.perf_counter() - t0) * 1e3)
            errs[c] += p.error is not None

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, [v for lst in lat for v in lst], sum(errs)


def bench_mode(mode: str, det: Any, images: Sequence[bytes], clients: int, requests: int,
               max_batch: int, max_delay_ms: float) -> Result:
    if mode == "direct":
        def call(img: bytes) -> Any:
            return det.predict([img], batch_size=1)[0]

        run_clients(call, images, clients, min(requests, 4 * clients))  # warm-up
        wall, lat, errs = run_clients(call, images, clients, requests)
        mean_batch = 1.0
    else:
        with BatchingDetector(det, max_batch=max_batch, max_delay_ms=max_delay_ms,
                              max_queue=max(1024, 2 * clients)) as bd:
            run_clients(bd.predict, images, clients, min(requests, 4 * clients))  # warm-up
            before = bd.stats()
            wall, lat, errs = run_clients(bd.predict, images, clients, requests)
            after = bd.stats()
        nb = after["batches"] - before["batches"]
        mean_batch = (after["requests"] - before["requests"]) / nb if nb else 0.0
    return Result(mode, clients, requests, wall, requests / wall, _percentile(lat, 50), _percentile(lat, 99),
                  mean_batch, errs)


def floor_rate(det: Any, images: Sequence[bytes], max_batch: int, rounds: int = 3) -> float:
    """Images/s of full batches from one thread: the ceiling for the batching path."""
    batch = [images[i % len(images)] for i in range(max_batch)]
    det.predict(batch, batch_size=max_batch)  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        det.predict(batch, batch_size=max_batch)
        times.append(time.perf_counter() - t0)
    return max_batch / statistics.median(times)


def format_pair(direct: Result, batched: Result) -> str:
    return (
        f"  clients={direct.clients:<3d} direct   {direct.images_per_s:8.1f} img/s  p50 {direct.p50_ms:8.1f} ms"
        f"  p99 {direct.p99_ms:8.1f} ms\n"
        f"  {'':11s} batching {batched.images_per_s:8.1f} img/s  p50 {batched.p50_ms:8.1f} ms"
        f"  p99 {batched.p99_ms:8.1f} ms  (mean batch {batched.mean_batch:.1f})\n"
        f"  {'':11s} ratio    throughput x{batched.images_per_s / direct.images_per_s:.2f}"
        f"  p50 x{batched.p50_ms / direct.p50_ms:.2f}  p99 x{batched.p99_ms / direct.p99_ms:.2f}"
        f"  (batching / direct; >1 is better for throughput, <1 for latency)"
    )


def _median_result(rs: Sequence[Result]) -> Result:
    def med(name: str) -> float:
        return statistics.median(getattr(r, name) for r in rs)

    return Result(rs[0].mode, rs[0].clients, rs[0].requests, med("wall_s"), med("images_per_s"), med("p50_ms"),
                  med("p99_ms"), med("mean_batch"), sum(r.errors for r in rs))


def run(model: str = "cxr-probe", clients: Sequence[int] = CLIENTS, requests: int = 256, size: int = 1024,
        n_images: int = 16, max_batch: int = 32, max_delay_ms: float = 5.0, device: str = "cpu",
        backend: str = "auto", repeats: int = 3, preprocess: str = "auto",
        out: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs direct and batching alternately (ABBA...) ``repeats`` times per client count; reports medians."""
    images = make_images(n_images, size)
    det = cxrkit.Detector.from_pretrained(model, device=device, backend=backend, batch_size=max_batch,
                                          preprocess=preprocess)
    load_before = os.getloadavg()
    try:
        floor = floor_rate(det, images, max_batch)
        head = (f"bench_batching: model={model} backend={det.backend_name} device={device} preprocess={preprocess} "
                f"images={size}^2 JPEG q90 ({sum(map(len, images)) / len(images) / 1e3:.0f} kB) "
                f"requests={requests} x {repeats} repeats (medians) max_batch={max_batch} "
                f"max_delay_ms={max_delay_ms:g} cpus={os.cpu_count()} ({platform.processor() or platform.machine()}) "
                f"loadavg(1m) at start {load_before[0]:.2f}")
        out(head)
        out(f"  floor: full batches of {max_batch} from one thread = {floor:.1f} img/s")
        results = []
        for c in clients:
            runs: dict[str, list[Result]] = {"direct": [], "batching": []}
            for r in range(repeats):
                order = ("direct", "batching") if r % 2 == 0 else ("batching", "direct")
                for mode in order:
                    runs[mode].append(bench_mode(mode, det, images, c, requests, max_batch, max_delay_ms))
            d, b = _median_result(runs["direct"]), _median_result(runs["batching"])
            out(format_pair(d, b) + f"  [{100 * b.images_per_s / floor:.0f}% of floor]")
            results += [d, b]
        floor_end = floor_rate(det, images, max_batch)
    finally:
        det.close()
    out(f"  floor again at the end: {floor_end:.1f} img/s (a large change means the machine was busy)")
    load_after = os.getloadavg()
    out(f"  loadavg(1m) at end {load_after[0]:.2f} (other work on this machine skews both modes alike only "
        "because they alternate)")
    return {"model": model, "device": device, "size": size, "floor_img_s": [floor, floor_end], "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "loadavg_1m": [load_before[0], load_after[0]],
            "results": [asdict(r) for r in results]}


# -- pytest-benchmark ------------------------------------------------------------------------------
def test_bench_batching(benchmark):
    import pytest

    model = os.environ.get("CXRKIT_BENCH_MODEL", "cxr-probe")
    if model not in cxrkit.list_models():
        pytest.skip(f"model {model!r} not bundled")
    lines: list[str] = []
    report = run(model=model, requests=int(os.environ.get("CXRKIT_BENCH_REQUESTS", "256")), repeats=1,
                 out=lines.append)
    print("\n" + "\n".join(lines))
    for r in report["results"]:
        benchmark.extra_info[f"{r['mode']}_{r['clients']}_img_s"] = r["images_per_s"]
        benchmark.extra_info[f"{r['mode']}_{r['clients']}_p99_ms"] = r["p99_ms"]
    images = make_images(8, 512)
    with cxrkit.Detector.from_pretrained(model, batch_size=32) as det, BatchingDetector(det) as bd:
        benchmark.pedantic(lambda: run_clients(bd.predict, images, 8, 64), rounds=3, warmup_rounds=1)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cxr-probe")
    ap.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    ap.add_argument("--requests", type=int, default=256, help="requests per (mode, clients) run")
    ap.add_argument("--size", type=int, default=1024, help="image side, pixels")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-delay-ms", type=float, default=5.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--preprocess", default="auto", help="Detector preprocess backend: auto | dali | numpy")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per mode; medians are reported")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ap.add_argument("--report", metavar="NAME", help="also write benchmarks/reports/NAME.json (date, machine, code)")
    a = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run_report import now_utc, write_report

    started = now_utc()
    report = run(a.model, a.clients, a.requests, a.size, 16, a.max_batch, a.max_delay_ms, a.device, a.backend,
                 a.repeats, a.preprocess)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    if a.report:
        ratios = {}
        for c in sorted({r["clients"] for r in report["results"]}):
            d = next(r for r in report["results"] if r["clients"] == c and r["mode"] == "direct")
            b = next(r for r in report["results"] if r["clients"] == c and r["mode"] == "batching")
            ratios[str(c)] = round(b["images_per_s"] / d["images_per_s"], 3)
        print(f"report: {write_report(a.report, {'throughput_ratio_batching_over_direct_by_clients': ratios, **report}, started)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
