"""Preprocessing throughput: DALI CPU pipeline vs a naive baseline, measured in the same run.

Workload: 2048^2 radiograph-like images (smooth random field + noise: never zeros), as 8-bit JPEG
(q90) and as 16-bit PNG, preprocessed to a 512^2 letterboxed, normalised model input.
  - baseline: Pillow decode + the numpy reference (cxrkit.preprocess.reference), one at a time;
  - cxrkit: Preprocessor(backend="dali", device="cpu"), batches of 8, num_threads = all cores;
  - floor: Pillow decode alone, one image at a time, scaled to all cores (decode is the ceiling
    on a CPU: no pipeline can beat its own decoder).
Prints images/s, the ratio cxrkit / baseline and the floor. Run it (not part of the test suite):
    python -m pytest benchmarks/bench_preprocess.py --benchmark-enable -s -q
"""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from cxrkit.preprocess.reference import preprocess_reference

SIZE = 2048
N_IMAGES = 8
INPUT_HW = (512, 512)
MEAN, STD = 0.5, 0.25
ROUNDS = 3
pytestmark = pytest.mark.dali


def radiograph_like(size: int, seed: int, bits: int) -> np.ndarray:
    """(size, size) uint8/uint16: smooth random field (bilinear-upsampled 8x8) + 2% noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.random((8, 8)).astype(np.float32), mode="F")
    smooth = np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.float32)
    u = np.clip(0.15 + 0.7 * smooth + 0.02 * rng.standard_normal((size, size), np.float32), 0, 1)
    peak = (1 << bits) - 1
    return np.round(u * peak).astype(np.uint8 if bits == 8 else np.uint16)


def _files(fmt: str) -> list:
    """LoadedImages (still encoded) of N_IMAGES distinct files, read by cxrkit.io as in use."""
    from cxrkit.io import load_item

    items = []
    for i in range(N_IMAGES):
        buf = io.BytesIO()
        img = Image.fromarray(radiograph_like(SIZE, 100 + i, 8 if fmt == "jpeg" else 16))
        if fmt == "jpeg":
            img.save(buf, format="JPEG", quality=90)
        else:
            img.save(buf, format="PNG", compress_level=1)
        items.append(load_item(buf.getvalue(), i))
    return items


def _pillow_decode(item) -> np.ndarray:
    im = Image.open(io.BytesIO(item.encoded))
    return np.asarray(im) if im.mode.startswith("I") else np.asarray(im.convert("L"))  # (h, w)


def _median_s(fn: Callable[[], object]) -> float:
    fn()  # warm-up (pipeline build, caches)
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.mark.parametrize("fmt", ["jpeg", "png16"])
def test_bench_preprocess(benchmark, fmt):
    pytest.importorskip("nvidia.dali")
    from cxrkit.preprocess.pipeline import Preprocessor

    items = _files("jpeg" if fmt == "jpeg" else "png")
    n = len(items)
    mb = sum(len(it.encoded) for it in items) / n / 1e6
    cores = os.cpu_count() or 1

    def baseline() -> None:
        for it in items:
            preprocess_reference(_pillow_decode(it), it.value_range, INPUT_HW, MEAN, STD)

    def decode_only() -> None:
        for it in items:
            _pillow_decode(it)

    pre = Preprocessor(INPUT_HW, MEAN, STD, backend="dali", batch_size=8, num_threads=cores)

    def cxrkit_run() -> None:
        res = pre.run(items)
        assert not res.errors and res.batch.shape == (n, 1, *INPUT_HW)

    t_base, t_dec, t_cx = _median_s(baseline), _median_s(decode_only), _median_s(cxrkit_run)
    benchmark.extra_info.update(baseline_img_s=n / t_base, cxrkit_img_s=n / t_cx)
    benchmark.pedantic(cxrkit_run, rounds=ROUNDS, warmup_rounds=0)
    pre.close()

    floor = n / t_dec * cores
    print(
        f"\n[{fmt}] {n} x {SIZE}^2 ({mb:.2f} MB/file) -> {INPUT_HW}, {cores} cores\n"
        f"  baseline (Pillow + numpy reference, 1 at a time): {n / t_base:7.1f} img/s\n"
        f"  cxrkit DALI cpu, batch 8, {cores} threads:           {n / t_cx:7.1f} img/s"
        f"   ratio {t_base / t_cx:.2f}x\n"
        f"  floor: Pillow decode alone {n / t_dec:.1f} img/s/core x {cores} cores = {floor:.1f} img/s"
        f" (cxrkit at {100 * (n / t_cx) / floor:.0f}% of it)"
    )
