"""Host memory over a long ``predict_iter`` stream: does RSS stay flat?

Workload: ``Detector.predict_iter`` over a generator of N tiny inputs (64x64 uint8 arrays, made
one at a time, never held by the caller; every 50th item a truncated JPEG so the error path is in
the loop too), batch size B, prefetch on. Each Prediction is dropped as soon as it is checked.
RSS is sampled from /proc/self/statm (no psutil needed) every ``every`` items.

Reports: RSS after warm-up (the first ``warmup`` items: pipelines built, allocator pools
grown), RSS at the end, growth = end - after warm-up, the growth between the medians of the first
and last quarter of the post-warm-up samples (robust to the +-50 MB wander of the allocator), the
least-squares slope in kB per 1,000 items over the post-warm-up samples, the Theil-Sen slope (the
median of the pairwise slopes: robust to the allocator's steps, used by the CI-sized check), and the
peak. ``trim=True`` (``--trim``) runs a full ``gc.collect()`` and glibc's ``malloc_trim(0)`` before
each sample, so RSS follows live memory rather than garbage in reference cycles awaiting the cyclic
collector (a +-15 MB sawtooth over a few thousand items) or what the allocator keeps cached. The floor to compare with: predict_iter keeps at
most two batches alive, about 2 x B x (64x64 input + 256x256 float32 model input) = 2 x B x 0.27 MB;
anything that grows with N is a leak.

    python benchmarks/bench_stream_rss.py --n 100000 --batch 32
    python benchmarks/bench_stream_rss.py --n 20000 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np

try:
    import cxrkit
except ImportError:  # run as a script from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import cxrkit

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """Resident set size of this process in MiB, from /proc/self/statm (field 2, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def _bad_jpeg() -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(np.full((64, 64), 77, np.uint8)).save(b, format="JPEG")
    return b.getvalue()[:200]


def stream(n: int, bad_every: int = 50) -> Iterator[Any]:
    bad = _bad_jpeg()
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            yield bad
            continue
        a = np.full((64, 64), i % 251, np.uint8)
        a[16:48, 16:48] = 89  # a probe square: the "mass" finding fires, so boxes are produced
        yield a


def _malloc_trim() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: sample as is
        pass


def theil_sen_slope(xs: np.ndarray, ys: np.ndarray) -> float:
    """The median of the slopes between every pair of samples (robust to a few steps of the allocator)."""
    if len(xs) < 2:
        return float("nan")
    i, j = np.triu_indices(len(xs), 1)
    return float(np.median((ys[j] - ys[i]) / (xs[j] - xs[i])))


def run(n: int = 100_000, batch: int = 32, warmup: int = 2_000, every: int = 1_000,
        model: str = "cxr-probe", bad_every: int = 50, trim: bool = False) -> dict:
    sample = (lambda: (gc.collect(), _malloc_trim(), rss_mb())[2]) if trim else rss_mb
    with cxrkit.Detector.from_pretrained(model, batch_size=batch) as det:
        samples: list[tuple[int, float]] = []
        errors = ok = 0
        t0 = time.perf_counter()
        gc.collect()
        start_mb = rss_mb()
        for i, p in enumerate(det.predict_iter(stream(n, bad_every), batch_size=batch), 1):
            if p.error is None:
                ok += 1
            else:
                errors += 1
            del p
            if i % every == 0:
                samples.append((i, sample()))
        wall = time.perf_counter() - t0
    post = [(i, m) for i, m in samples if i >= warmup]
    xs = np.array([i for i, _ in post], float)
    ys = np.array([m for _, m in post], float)
    slope_kb_per_1k = float(np.polyfit(xs, ys, 1)[0] * 1000 * 1024) if len(post) >= 2 else float("nan")
    warm_mb = post[0][1] if post else float("nan")
    end_mb = samples[-1][1] if samples else float("nan")
    floor_mb = 2 * batch * (64 * 64 + 256 * 256 * 4) / 2**20
    q = max(1, len(ys) // 4)  # RSS wanders by tens of MB (allocator, pipelines): compare quartile medians
    median_growth = float(np.median(ys[-q:]) - np.median(ys[:q])) if len(ys) else float("nan")
    return {
        "items": n, "batch": batch, "bad_every": bad_every, "ok": ok, "errors": errors, "wall_s": round(wall, 1),
        "items_per_s": round(n / wall, 1),
        "rss_start_mb": round(start_mb, 1), "rss_after_warmup_mb": round(warm_mb, 1),
        "rss_end_mb": round(end_mb, 1), "rss_peak_mb": round(max(m for _, m in samples), 1),
        "growth_after_warmup_mb": round(end_mb - warm_mb, 2),
        "median_growth_first_to_last_quarter_mb": round(median_growth, 2),
        "slope_kb_per_1k_items": round(slope_kb_per_1k, 2),
        "theil_sen_slope_kb_per_1k_items": round(theil_sen_slope(xs, ys) * 1000 * 1024, 2),
        "malloc_trim_before_samples": trim, "warmup": warmup, "every": every,
        "two_batch_floor_mb": round(floor_mb, 1),
        "samples": [(i, round(m, 2)) for i, m in samples],
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=2_000)
    ap.add_argument("--every", type=int, default=1_000)
    ap.add_argument("--model", default="cxr-probe")
    ap.add_argument("--bad-every", type=int, default=50, help="every k-th item a truncated JPEG (0: none)")
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) before each RSS sample")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--report", metavar="NAME", help="also write benchmarks/reports/NAME.json (date, machine, code)")
    a = ap.parse_args(argv)
    started = None
    if a.report:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from run_report import now_utc

        started = now_utc()
    r = run(a.n, a.batch, a.warmup, a.every, a.model, a.bad_every, a.trim)
    short = {k: v for k, v in r.items() if k != "samples"}
    print(json.dumps(short, indent=2))
    print(f"RSS growth after warm-up: {r['growth_after_warmup_mb']:+.2f} MB over {a.n - a.warmup} items "
          f"(quartile medians {r['median_growth_first_to_last_quarter_mb']:+.2f} MB; slope "
          f"{r['slope_kb_per_1k_items']:+.2f} kB per 1,000 items); two-batch floor {r['two_batch_floor_mb']} MB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    if a.report:
        from run_report import write_report

        print(f"report: {write_report(a.report, {'result': r}, started)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
