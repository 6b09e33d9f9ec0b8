"""ONNX Runtime int8 (Q/DQ) vs fp32 images/s on the CPU, same run, with the accuracy guard.

    python benchmarks/bench_int8_cpu.py [--size 256] [--batch 8] [--threads N] [--repeat 5]
    pytest benchmarks/bench_int8_cpu.py --benchmark-enable

Models: the default model (``cxr29-demo`` when bundled, else the compact ``cxrnet`` with 29
findings) and the DenseNet-121-class ``densenet121`` net, both at ``--size``² (default 256²).
The trained default model is calibrated on synthetic lesions (``cxrkit.synth``) on the lungbox
training radiographs and guarded on labeled ones on the test radiographs, through the real
preprocessing: per-finding AUROC drop <= 0.005, the issue's criterion (without
``../shared/data/lungbox``: real images of ``samples/`` or procedural chests, decision agreement). Random-init nets are fine for speed and
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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from run_report import cpu_model  # benchmarks/ is this script's folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))




def _isa() -> str:
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    return ",".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags)


def prepare(arch: str, size: int, workdir: Path, calib_n: int = 16, auto_keep_fp32: int = 8):
    """Export ``arch`` (or use the bundled cxr29-demo) and run ``cxrkit.quant.quantize`` on it, the
    path ``cxrkit quantize`` takes (both int8 forms, each guarded, up to ``auto_keep_fp32``
    sensitive layers left in fp32; kept even when the guard fails, so it can be timed and shown).
    Returns (name, (H, W), fp32 graph, {"int8": CPU form, "int8-trt": TensorRT form}, reports)."""
    from cxrkit.models import list_models, load_model_package
    from cxrkit.quant import quantize

    if arch == "default" and "cxr29-demo" in list_models():
        pkg = load_model_package("cxr29-demo")
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
        names = list(FINDINGS)[:29]
        card = {"schema_version": 1, "name": name, "version": "bench", "labels": names, "input_size": [size, size],
                "normalization": {"mean": 0.5, "std": 0.25}, "heatmap_stride": int(net.heatmap_stride),
                "thresholds": {k: 0.5 for k in names}, "files": {"onnx": "model.onnx"},
                "sha256": {"model.onnx": sha256_file(fp32)}}
        (root / "card.json").write_text(json.dumps(card))
        pkg = load_model_package(root)
        H, W = size, size
    labels = None
    if name == "cxr29-demo":
        labeled = _labeled_inputs(pkg)
        if labeled is not None:
            calib, hold, labels = labeled
        else:
            x = _real_inputs(pkg)
            idx = np.arange(len(x))
            calib, hold = x[idx % 4 != 3], x[idx % 4 == 3]
    else:
        rng = np.random.default_rng(0)
        x = (rng.uniform(0, 1, (calib_n + 8, 1, H, W)).astype(np.float32) - 0.5) / 0.25
        calib, hold = x[:calib_n], x[calib_n:]
    res = quantize(pkg, calib, out=Path(workdir) / f"{name}-q", precisions=("int8",), holdout=hold, labels=labels,
                   auto_keep_fp32=auto_keep_fp32, allow_accuracy_drop=True)
    graphs = {"int8": res.int8_cpu_path, "int8-trt": res.int8_path}
    reports = {"int8": res.reports["int8_cpu"], "int8-trt": res.reports["int8"]}
    return name, (H, W), res.package.verified("onnx"), graphs, reports


def _labeled_inputs(pkg, per_train: int = 4, per_test: int = 48):
    """(calibration, held-out, held-out labels) from cxrkit.synth lesions on the lungbox
    radiographs, split by patient as in the demo model's training: calibration images on
    training backgrounds, the guard's held-out images on test backgrounds (AUROC per finding,
    the issue's criterion); None without ../shared/data/lungbox."""
    from cxrkit.quant.calibrate import load_calibration
    from cxrkit.synth import SYNTH_LABELS, insert_lesion, load_lungbox, split_by_patient
    from cxrkit.synth.coco import choose_labels

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "lungbox"
    if not (root / "annotations.json").is_file():
        return None
    parts = split_by_patient(load_lungbox(root, max_side=512))
    names = list(pkg.card.labels)
    trained = [k for k in SYNTH_LABELS if k in names]

    def make(bgs, per, seed):
        imgs, labs = [], []
        for bi, bg in enumerate(bgs):
            for v in range(per):
                rng = np.random.default_rng([seed, bi, v])
                found = choose_labels(rng, trained, 0.25, 2)
                img = bg.image.astype(np.float32, copy=True)
                for k in found:
                    insert_lesion(img, bg.lungs_xyxy, bg.spacing_mm, k, rng)
                imgs.append(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))
                labs.append([k in found for k in names])
        return load_calibration(pkg, imgs), np.array(labs, np.float32)

    calib, _ = make(parts["train"], per_train, 1)
    hold, labels = make(parts["test"], per_test, 2)
    return calib, hold, labels


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


def _conv_kinds(path: Path) -> dict[str, str]:
    """Conv node name and output name -> ' dw' (depthwise), ' 1ch' (one input channel) or ''."""
    import onnx

    g = onnx.load(str(path)).graph
    dims = {i.name: list(i.dims) for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    out = {}
    for n in g.node:
        if n.op_type != "Conv" or len(n.input) < 2:
            continue
        w = n.input[1]
        if w not in dims and w in prod and prod[w].op_type == "DequantizeLinear":  # Q/DQ weight
            w = prod[w].input[0]
        wd = dims.get(w, [])
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        kind = " 1ch" if len(wd) == 4 and wd[1] == 1 and group == 1 else " dw" if group > 1 and len(wd) == 4 and wd[1] == 1 else ""
        out[n.name] = out[n.output[0]] = kind
        for c in g.node:  # ORT's NCHWc conv + ReLU fusion is named after the ReLU output
            if c.op_type == "Relu" and c.input[0] == n.output[0]:
                out[c.output[0]] = kind
    return out


def op_profile(path: Path, hw, batch: int, threads: int, runs: int = 3, top: int = 8) -> list[tuple[str, float]]:
    """ms per batch spent in each ONNX Runtime kernel type (convs split into 'Conv dw' for
    depthwise, 'Conv 1ch' for one-input-channel stems), from ORT's profiler, largest first."""
    import json
    from collections import Counter

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "cxrkit_int8_prof")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((batch, 1, *hw)).astype(np.float32)
    s.run(None, {s.get_inputs()[0].name: x})  # warm-up, counted out below
    for _ in range(runs):
        s.run(None, {s.get_inputs()[0].name: x})
    prof = Path(s.end_profiling())
    events = [e for e in json.loads(prof.read_text()) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    prof.unlink()
    kinds = _conv_kinds(path)
    n_nodes = len({e["name"] for e in events})
    agg: Counter = Counter()
    for e in events[n_nodes:]:  # drop the warm-up run
        op = e["args"].get("op_name", "?")
        if op in ("Conv", "QLinearConv"):
            base = e["name"][: -len("_kernel_time")]
            key = max((k for k in kinds if base.startswith(k)), key=len, default=None)
            op += kinds.get(key, "")
        agg[op] += e["dur"] / 1e3 / runs
    return agg.most_common(top)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--models", default="default,densenet121")
    ap.add_argument("--trt-form", action="store_true",
                    help="also time the TensorRT-form Q/DQ graph (symmetric int8) in ONNX Runtime")
    ap.add_argument("--profile", action="store_true", help="print ms per batch by ONNX Runtime kernel type")
    ap.add_argument("--auto-keep-fp32", type=int, default=8,
                    help="leave up to N of the most sensitive layers in fp32 until the guard passes (quantize's auto_keep_fp32)")
    a = ap.parse_args(argv)
    import onnxruntime as ort

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores, {_isa()}), onnxruntime {ort.__version__}, "
          f"{a.threads} threads, batch {a.batch}, {a.size}x{a.size}")
    with tempfile.TemporaryDirectory() as d:
        for arch in a.models.split(","):
            name, hw, fp32, graphs, reports = prepare(arch, a.size, Path(d), auto_keep_fp32=a.auto_keep_fp32)
            for label in ("int8", "int8-trt") if a.trt_form else ("int8",):
                int8, rep = graphs[label], reports[label]
                f, i, cf, ci = measure(fp32, int8, hw, a.batch, a.threads, a.repeat)
                why = ", ".join(f"{k} AUROC drop {rep.per_finding[k]['auroc_drop']:.4f}" if rep.labels_given else
                                f"{k} agreement {rep.per_finding[k]['decision_agreement']:.3f}" for k in rep.failed_findings)
                worst = max((r["auroc_drop"] for r in rep.per_finding.values() if r.get("auroc_drop") is not None), default=None)
                crit = f"AUROC drop max {worst:.4f}" if worst is not None else "decision agreement"
                kept = rep.extra.get("settings", {}).get("kept_fp32_layers", [])
                print(f"{name:12s} {hw[0]}x{hw[1]}  fp32 {f:8.1f} img/s ({cf:7.2f} CPU ms/img)  {label} {i:8.1f} img/s "
                      f"({ci:7.2f} CPU ms/img)  ratio {i / f:5.2f}x (target 1.70x)  guard "
                      f"{'passed' if rep.passed else 'FAILED: ' + why} on {rep.n_images} held-out images "
                      f"({crit}; max |score diff| {rep.max_abs_score_diff:.3g}, mean {rep.mean_abs_score_diff:.2g}); "
                      f"{len(kept)} layers kept fp32 {kept if kept else ''}")
                if a.profile:
                    for lab, path in (("fp32", fp32), (label, int8)):
                        print(f"    {lab:8s} " + ", ".join(f"{op} {ms:.2f}" for op, ms in op_profile(path, hw, a.batch, a.threads)))
    return 0


# -- pytest-benchmark ---------------------------------------------------------------------------------

def _bench(benchmark, arch: str, precision: str, tmp_path) -> None:
    from cxrkit.quant.calibrate import ort_session

    name, hw, fp32, graphs, reports = prepare(arch, 256, tmp_path)
    sess = ort_session(fp32 if precision == "fp32" else graphs["int8"])
    x = np.random.default_rng(1).standard_normal((8, 1, *hw)).astype(np.float32)
    benchmark.extra_info.update(model=name, precision=precision, guard_passed=reports["int8"].passed, images=8)
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
