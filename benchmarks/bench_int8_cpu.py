"""ONNX Runtime int8 (Q/DQ) vs fp32 images/s on the CPU, same run, with the accuracy guard.

    python benchmarks/bench_int8_cpu.py [--size 256] [--batch 8] [--threads N] [--repeat 5]
    pytest benchmarks/bench_int8_cpu.py --benchmark-enable

Models: the default model (``cxr29-demo`` when bundled, else the compact ``cxrnet`` with 29
findings) and the DenseNet-121-class ``densenet121`` net, both at ``--size``² (default 256²).
The trained default model is calibrated and guarded on real chest X-rays through the real
preprocessing (``../shared/data/lungbox`` and ``samples/``; procedural chests where those are
absent): 3 of 4 images calibrate, the 4th are held out. Random-init nets are fine for speed and
are calibrated and guarded on noise (decision agreement).

Variants: ``int8`` is the CPU int8 backend's graph (``quantize_int8(cpu_uint8=True)``: uint8
activations, ReLUs folded, pre-activation BNs as int8 depthwise convs); ``--trt-form`` also
times the TensorRT-form Q/DQ graph (symmetric int8) in ONNX Runtime.

Floor to chase: int8 GEMMs move a quarter of fp32's weight bytes and, with VNNI, do 4x the MACs
per instruction; on AVX2 without VNNI (u8 x s8 -> s16 pairs) about 2x. The printed ratio is
int8 images/s over fp32 images/s measured interleaved (best of ``--repeat`` per precision);
target >= 1.7x.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _isa() -> str:
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    return ",".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags)


def prepare(arch: str, size: int, workdir: Path, calib_n: int = 16, **qopts):
    """Export ``arch`` (or use the bundled cxr29-demo), write fp32 + int8 graphs; returns (fp32, int8, report)."""
    from cxrkit.models import list_models, load_model_package
    from cxrkit.quant import compare, quantize_int8
    from cxrkit.quant.guard import run_graph

    if arch == "default" and "cxr29-demo" in list_models():
        pkg = load_model_package("cxr29-demo")
        fp32 = pkg.verified("onnx")
        H, W = pkg.card.input_hw
        name = "cxr29-demo"
    else:
        import json

        from cxrkit.labels import FINDINGS
        from cxrkit.models import sha256_file
        from cxrkit.nets import create_net, export_onnx

        name = "cxrnet" if arch == "default" else arch
        net = create_net(name, num_classes=29)
        root = workdir / name
        root.mkdir(parents=True, exist_ok=True)
        fp32 = export_onnx(net, root / "model.onnx", (size, size))
        labels = list(FINDINGS)[:29]
        card = {"schema_version": 1, "name": name, "version": "bench", "labels": labels, "input_size": [size, size],
                "normalization": {"mean": 0.5, "std": 0.25}, "heatmap_stride": int(net.heatmap_stride),
                "thresholds": {k: 0.5 for k in labels}, "files": {"onnx": "model.onnx"},
                "sha256": {"model.onnx": sha256_file(fp32)}}
        (root / "card.json").write_text(json.dumps(card))
        pkg = load_model_package(root)
        H, W = size, size
    x = _real_inputs(pkg) if name == "cxr29-demo" else None
    if x is not None:
        idx = np.arange(len(x))
        calib, hold = x[idx % 4 != 3], x[idx % 4 == 3]
    else:
        rng = np.random.default_rng(0)
        x = (rng.uniform(0, 1, (calib_n + 8, 1, H, W)).astype(np.float32) - 0.5) / 0.25
        calib, hold = x[:calib_n], x[calib_n:]
    g8, plan, _ = quantize_int8(fp32, calib, **qopts)
    int8 = Path(workdir) / f"{name}.{'int8cpu' if qopts.get('cpu_uint8') else 'int8'}.onnx"
    import onnx

    onnx.save(g8, int8)
    rep = compare(pkg, run_graph(fp32, hold), run_graph(int8, hold), "int8")
    return name, (H, W), fp32, int8, rep


def _real_inputs(pkg) -> np.ndarray:
    """Chest X-rays through the real preprocessing: ../shared/data/lungbox and samples/, else
    48 procedural chests (cxrkit.synth)."""
    from cxrkit.quant.calibrate import load_calibration

    root = Path(__file__).resolve().parents[1]
    items = []
    for d in (root.parent / "shared" / "data" / "lungbox" / "images", root / "samples"):
        if d.is_dir():
            items += sorted(str(p) for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
    if len(items) < 16:
        from cxrkit.synth.backgrounds import procedural_chest

        rng = np.random.default_rng(0)
        items = [(np.clip(procedural_chest(rng, (512, 512)).image, 0, 1) * 255).astype(np.uint8) for _ in range(48)]
    return load_calibration(pkg, items)


def _timed_runs(sess, x: np.ndarray, repeat: int) -> list[tuple[float, float]]:
    """(wall s, process CPU s) of ``repeat`` runs."""
    name = sess.get_inputs()[0].name
    out = []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        sess.run(None, {name: x})
        out.append((time.perf_counter() - t, time.process_time() - c))
    return out


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # no spin-waiting, so process CPU time is work done (comparable on a shared machine)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def measure(fp32: Path, int8: Path, hw, batch: int, threads: int, repeat: int, rounds: int = 3):
    """(fp32 img/s, int8 img/s, fp32 CPU ms/img, int8 CPU ms/img): best wall time and median CPU
    time over ``rounds`` interleaved rounds of ``repeat`` runs each."""
    s32, s8 = _session(fp32, threads), _session(int8, threads)
    x = np.random.default_rng(1).standard_normal((batch, 1, *hw)).astype(np.float32)
    for s in (s32, s8):
        _timed_runs(s, x, 1)  # warm-up
    r32, r8 = [], []
    for _ in range(rounds):  # interleave so background load hits both alike
        r32 += _timed_runs(s32, x, repeat)
        r8 += _timed_runs(s8, x, repeat)
    a32, a8 = np.array(r32), np.array(r8)
    return (batch / a32[:, 0].min(), batch / a8[:, 0].min(),
            1e3 * np.median(a32[:, 1]) / batch, 1e3 * np.median(a8[:, 1]) / batch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--models", default="default,densenet121")
    ap.add_argument("--trt-form", action="store_true",
                    help="also time the TensorRT-form Q/DQ graph (symmetric int8) in ONNX Runtime")
    ap.add_argument("--skip-depthwise", action="store_true", help="leave depthwise convs and the stem fp32")
    a = ap.parse_args(argv)
    import onnxruntime as ort

    print(f"CPU: {_cpu_name()} ({os.cpu_count()} logical cores, {_isa()}), onnxruntime {ort.__version__}, "
          f"{a.threads} threads, batch {a.batch}, {a.size}x{a.size}")
    with tempfile.TemporaryDirectory() as d:
        sel = {"skip_depthwise": True, "min_reduction": 16} if a.skip_depthwise else {}
        variants = [("int8", {"cpu_uint8": True, **sel})] + ([("int8-trt", sel)] if a.trt_form else [])
        for arch in a.models.split(","):
            for label, qopts in variants:
                name, hw, fp32, int8, rep = prepare(arch, a.size, Path(d), **qopts)
                f, i, cf, ci = measure(fp32, int8, hw, a.batch, a.threads, a.repeat)
                print(f"{name:12s} {hw[0]}x{hw[1]}  fp32 {f:8.1f} img/s ({cf:7.2f} CPU ms/img)  {label} {i:8.1f} img/s "
                      f"({ci:7.2f} CPU ms/img)  ratio {i / f:5.2f}x (target 1.70x)  guard "
                      f"{'passed' if rep.passed else 'FAILED'} (max |score diff| {rep.max_abs_score_diff:.3g})")
    return 0


# -- pytest-benchmark ---------------------------------------------------------------------------------

def _bench(benchmark, arch: str, precision: str, tmp_path) -> None:
    from cxrkit.quant.calibrate import ort_session

    name, hw, fp32, int8, rep = prepare(arch, 256, tmp_path, cpu_uint8=True)
    sess = ort_session(fp32 if precision == "fp32" else int8)
    x = np.random.default_rng(1).standard_normal((8, 1, *hw)).astype(np.float32)
    benchmark.extra_info.update(model=name, precision=precision, guard_passed=rep.passed, images=8)
    benchmark(sess.run, None, {sess.get_inputs()[0].name: x})


def test_bench_default_fp32(benchmark, tmp_path):
    _bench(benchmark, "default", "fp32", tmp_path)


def test_bench_default_int8(benchmark, tmp_path):
    _bench(benchmark, "default", "int8", tmp_path)


def test_bench_densenet_fp32(benchmark, tmp_path):
    _bench(benchmark, "densenet121", "fp32", tmp_path)


def test_bench_densenet_int8(benchmark, tmp_path):
    _bench(benchmark, "densenet121", "int8", tmp_path)


if __name__ == "__main__":
    raise SystemExit(main())
