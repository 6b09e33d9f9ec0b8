"""Preprocessing throughput: cxrkit's CPU paths vs a naive baseline, measured in the same run.

Workload: 2048^2 radiograph-like images (smooth random field + noise: never zeros), as 8-bit JPEG
(q90) and as 16-bit PNG, preprocessed to a 512^2 letterboxed, normalised model input.
  - baseline: Pillow decode + the numpy reference (cxrkit.preprocess.reference), one at a time,
    numpy's BLAS held to one thread (its best case: with the default BLAS threads the matmuls
    busy-wait, 4-10x the CPU time on a loaded box; set BENCH_BLAS_MT=1 to print that row too);
  - cxrkit: Preprocessor(device="cpu"), batches of 8, num_threads = all cores, backend "dali"
    and "numpy" (the reference, one image per thread);
  - the same with jpeg_dct_scaling=True (JPEG only): libjpeg 1/k decode, then the same resize
    (not the reference function; see tests/test_preprocess.py for its tolerance);
  - floor: Pillow decode alone, one image at a time, scaled to all cores (decode is the ceiling
    on a CPU: no pipeline can beat its own decoder).
Prints images/s (median wall time) and CPU ms per image (process time, all threads: the better
measure on a shared, loaded box, where the threaded paths do not get all cores), the ratios to
the baseline and the floor. Run it (not part of the test suite):
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

from cxrkit.preprocess._blas import blas_single_thread
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


def _median_s(fn: Callable[[], object]) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this process) per call."""
    fn()  # warm-up (pipeline build, caches)
    times, cpu = [], []
    for _ in range(ROUNDS):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu)


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

    def make(backend: str, dct: bool = False) -> Preprocessor:
        return Preprocessor(INPUT_HW, MEAN, STD, backend=backend, batch_size=8, num_threads=cores,
                            jpeg_dct_scaling=dct)

    pres = {"DALI cpu": make("dali"), "numpy reference, threads": make("numpy")}
    if fmt == "jpeg":
        pres["DALI cpu + jpeg_dct_scaling"] = make("dali", True)
        pres["numpy + jpeg_dct_scaling"] = make("numpy", True)

    def runner(p):
        def run() -> None:
            res = p.run(items)
            assert not res.errors and res.batch.shape == (n, 1, *INPUT_HW)
        return run

    with blas_single_thread():  # the baseline at its best: multi-threaded BLAS spins (see _blas.py)
        (t_base, c_base), (t_dec, c_dec) = _median_s(baseline), _median_s(decode_only)
    (t_base_mt, c_base_mt) = _median_s(baseline) if os.environ.get("BENCH_BLAS_MT") else (0.0, 0.0)
    rows = [(name, *_median_s(runner(p))) for name, p in pres.items()]
    benchmark.extra_info.update(baseline_img_s=n / t_base, cxrkit_img_s=n / rows[0][1])
    benchmark.pedantic(runner(pres["DALI cpu"]), rounds=1, warmup_rounds=0)
    for p in pres.values():
        p.close()

    floor = n / t_dec * cores
    lines = [f"\n[{fmt}] {n} x {SIZE}^2 ({mb:.2f} MB/file) -> {INPUT_HW}, {cores} cores, {cores} threads, batch 8",
             f"  {'':34} {'img/s':>7} {'CPU ms/img':>11} {'ratio (wall)':>13} {'ratio (CPU)':>12}",
             f"  {'baseline: Pillow + numpy ref, 1x1':34} {n / t_base:7.1f} {c_base / n * 1e3:11.1f}"]
    if t_base_mt:
        lines.append(f"  {'  (same, default BLAS threads)':34} {n / t_base_mt:7.1f} {c_base_mt / n * 1e3:11.1f}")
    for name, t, c in rows:
        lines.append(f"  {'cxrkit ' + name:34} {n / t:7.1f} {c / n * 1e3:11.1f} {t_base / t:12.2f}x {c_base / c:11.2f}x")
    lines.append(f"  floor: Pillow decode alone {n / t_dec:.1f} img/s/core ({c_dec / n * 1e3:.1f} CPU ms/img)"
                 f" x {cores} cores = {floor:.1f} img/s")
    print("\n".join(lines))
