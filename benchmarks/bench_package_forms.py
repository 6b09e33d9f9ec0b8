"""Every ONNX form a model package ships (fp32, int8 CPU form, fp16), timed in ONNX Runtime on the CPU.

    /work/bin/quiet-run python benchmarks/bench_package_forms.py [--model cxr29-demo] [--batch 8] [--threads 2]

Network only (no decode, no post-processing), one session per form with the Detector's settings
(intra-op threads = cores, no spin-waiting), random input of the card's size, a warm-up of 3 batches
then the median of --repeat batches. The baseline is the package's own fp32 graph, in the same run;
the ratio is form / fp32. The floor printed is fp32's, since the other forms exist to beat it.
Each file is loaded through the package (so its sha256 is checked).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def _session(path, threads: int):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def main() -> int:
    from cxrkit.models import load_model_package

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cxr29-demo")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=9)
    a = ap.parse_args()
    pkg = load_model_package(a.model)
    H, W = pkg.card.input_hw
    x = np.random.default_rng(0).standard_normal((a.batch, 1, H, W)).astype(np.float32)
    print(f"{pkg.name} {pkg.card.raw.get('version', '')}: {H}x{W}, batch {a.batch}, {a.threads} threads, "
          f"median of {a.repeat} batches")
    rates: dict[str, float] = {}
    for kind in ("onnx", "onnx_int8_cpu", "onnx_fp16", "onnx_int8"):
        if pkg.file(kind) is None:
            continue
        s = _session(pkg.verified(kind), a.threads)
        for _ in range(3):
            s.run(None, {"image": x})
        ts = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            s.run(None, {"image": x})
            ts.append(time.perf_counter() - t0)
        rates[kind] = a.batch / float(np.median(ts))
        ratio = rates[kind] / rates["onnx"]
        note = " (the TensorRT form: run in ORT only for reference)" if kind == "onnx_int8" else ""
        print(f"  {kind:14s} {rates[kind]:8.1f} img/s  {ratio:5.2f}x fp32{note}")
    for kind, rec in (pkg.card.raw.get("quantization") or {}).items():
        if isinstance(rec, dict) and "passed" in rec:
            print(f"  guard ({kind}): passed={rec['passed']} overridden={rec.get('overridden')} "
                  f"max |score diff| {rec.get('max_abs_score_diff', float('nan')):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
