"""Lower precisions written into the ONNX graph: fp16 (Casts at the boundary) and int8 (Q/DQ).

    from cxrkit.quant import quantize
    res = quantize("cxr-probe", calib_images, out="pkg-q")      # or an (N, 1, H, W) array
    res.int8_path, res.reports["int8"].per_finding

Both graphs are what a strongly typed TensorRT network is built from (DESIGN: TensorRT 11 has no
precision flags), and both run in ONNX Runtime on the CPU, where they are checked against fp32
by the accuracy guard (:mod:`cxrkit.quant.guard`) before they are added to the model card as
``files.onnx_fp16`` / ``files.onnx_int8`` (with sha256 and a JSON report beside each graph).
int8 comes in two forms from one calibration: ``onnx_int8``, the TensorRT form (symmetric int8,
zero point 0), and ``onnx_int8_cpu``, the CPU form that the ONNX Runtime int8 backend runs
(``Detector(..., precision="int8")`` on the CPU; uint8 activations, see :func:`quantize_int8`).

Modules: :mod:`.calibrate` (inputs and activation ranges), :mod:`.qdq` (Q/DQ placement),
:mod:`.fp16` (fp16 rewrite), :mod:`.guard` (comparison and refusal), :mod:`.graph` (helpers).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import AccuracyGuardError, ModelError
from ..models import ModelPackage, load_model_package, sha256_file
from .calibrate import METHODS, collect_ranges, load_calibration
from .fp16 import convert_fp16
from .graph import batchnorm_to_depthwise
from .guard import MAX_AUROC_DROP, MIN_AGREEMENT, GuardReport, compare, enforce, run_graph
from .qdq import apply_qdq, plan_qdq, prepared

__all__ = ["quantize", "QuantizeResult", "convert_fp16", "quantize_int8", "layer_sensitivity", "main", "METHODS"]

log = logging.getLogger(__name__)

_INT8_REPORT = {"tensorrt": "int8", "cpu": "int8_cpu"}  # form -> report / precision name


@dataclass
class QuantizeResult:
    package: ModelPackage
    fp16_path: Path | None = None
    int8_path: Path | None = None  # TensorRT form (symmetric int8)
    int8_cpu_path: Path | None = None  # CPU form (ONNX Runtime: uint8, ReLUs folded)
    reports: dict[str, GuardReport] = field(default_factory=dict)


def _copy_package(pkg: ModelPackage, out: Path) -> ModelPackage:
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != pkg.root.resolve():
        for rel in pkg.card.raw["files"].values():
            src = pkg.root / rel
            if src.is_file():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out / rel)
        shutil.copy2(pkg.root / "card.json", out / "card.json")
    return load_model_package(out)


def _write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _install(pkg_root: Path, kind: str, graph, report: GuardReport, settings: dict[str, Any], fp32_name: str) -> Path:
    """Write graph + sidecar into the package and add them to card.json (atomically, file by file)."""
    import onnx

    stem = Path(fp32_name).stem
    name = f"{stem}.{kind[len('onnx_'):].replace('_', '-')}.onnx"  # model.fp16.onnx, model.int8-cpu.onnx
    path = pkg_root / name
    fd, tmp = tempfile.mkstemp(dir=pkg_root, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    onnx.save(graph, tmp)
    os.replace(tmp, path)
    sidecar = path.with_name(path.name + ".json")
    digest = sha256_file(path)
    doc = {"graph": name, "sha256": digest, "fp32_graph": fp32_name, "settings": settings, **report.to_dict()}
    _write_json_atomic(sidecar, doc)
    card_path = pkg_root / "card.json"
    card = json.loads(card_path.read_text())
    card["files"][kind] = name
    card.setdefault("sha256", {})[name] = digest
    card.setdefault("quantization", {})[kind] = {
        "report": sidecar.name, "passed": report.passed, "overridden": report.overridden,
        "max_abs_score_diff": report.max_abs_score_diff, **{k: settings[k] for k in ("method",) if k in settings},
    }
    _write_json_atomic(card_path, card)
    return path


def layer_sensitivity(fp32_graph, x: np.ndarray, ranges_for, keep_fp32: Iterable[str] = (),
                      batch_size: int = 8, weight_bits: int = 7) -> list[tuple[str, float]]:
    """Weighted ops ranked by the mean |score diff| + mean |heatmap prob diff| each causes alone."""
    prep = prepared(fp32_graph)
    ref = run_graph(prep, x, batch_size)
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    out = []
    for name in plan_qdq(prep, keep_fp32).weighted:
        plan = plan_qdq(prep, keep_fp32, only=[name])
        low = run_graph(apply_qdq(prep, plan, ranges_for(plan), weight_bits=weight_bits), x, batch_size)
        err = float(np.abs(sig(ref[0]) - sig(low[0])).mean() + np.abs(sig(ref[1]) - sig(low[1])).mean())
        out.append((name, err))
    return sorted(out, key=lambda t: -t[1])


def quantize_int8(fp32_graph, calib: np.ndarray, *, method: str = "percentile", percentile: float = 99.99,
                  keep_fp32: Iterable[str] = (), ranges: dict[str, float] | None = None, weight_bits: int = 7,
                  batch_size: int = 8, num_threads: int | None = None, cpu_uint8: bool = False,
                  skip_depthwise: bool = False, min_reduction: int = 0):
    """The Q/DQ graph (ModelProto) of ``fp32_graph`` calibrated on ``calib`` (N, 1, H, W).

    ``ranges`` (tensor -> amax) replaces calibration for the tensors it names. ``weight_bits``: 7
    (weights in [-63, 63]) by default, because ONNX Runtime's int8 kernels on x86 CPUs without
    VNNI add pairs of u8 x s8 products in int16 and saturate with full 8-bit weights (measured
    here: fused and unfused results differ by up to 4 heatmap logits); 8 for TensorRT-only graphs.

    ``cpu_uint8``: write the ONNX Runtime CPU-only variant (uint8 activations, ReLUs folded into
    the quantizers, see :func:`apply_qdq`; BatchNormalizations that no conv absorbed become int8
    depthwise convs, see :func:`.graph.batchnorm_to_depthwise`) instead of the
    TensorRT-consumable int8 graph.
    ``skip_depthwise`` / ``min_reduction``: leave depthwise convs / convs reducing over fewer
    than ``min_reduction`` values (a 1-channel stem) in fp32 (:func:`.qdq.slow_int8_convs`).
    """
    prep = prepared(fp32_graph)
    if cpu_uint8:
        batchnorm_to_depthwise(prep)
    plan = plan_qdq(prep, keep_fp32, skip_depthwise=skip_depthwise, min_reduction=min_reduction)
    have = dict(ranges or {})
    need = [t for t in plan.calib_tensors if t not in have]
    if need:
        have.update(collect_ranges(prep, need, calib, method, percentile=percentile,
                                   batch_size=batch_size, num_threads=num_threads))
    return apply_qdq(prep, plan, have, weight_bits=weight_bits, uint8_activations=cpu_uint8), plan, have


def quantize(model: "ModelPackage | str | Path", calib: Any, *, out: "str | Path | None" = None,
             precisions: Sequence[str] = ("fp16", "int8"), method: str = "percentile", percentile: float = 99.99,
             keep_fp32: Sequence[str] = (), auto_keep_fp32: int = 0, holdout: Any = None,
             labels: np.ndarray | None = None, allow_accuracy_drop: bool = False, max_calib: int = 512,
             weight_bits: int = 7, max_auroc_drop: float = MAX_AUROC_DROP, min_agreement: float = MIN_AGREEMENT,
             batch_size: int = 8, num_threads: int | None = None) -> QuantizeResult:
    """Write fp16 and/or int8 graphs for ``model``, guarded against fp32, into its package.

    ``calib``: calibration images (paths, folders, arrays, bytes) or a preprocessed (N, 1, H, W)
    float32 array. ``holdout`` (same forms) is the guard's held-out set; without it every fourth
    calibration input is held out (and not used to calibrate). ``labels`` (N_holdout, K) 0/1
    switches the guard from decision agreement to per-finding AUROC.
    ``out``: a folder to write a copy of the package to (default: the package folder itself).
    ``keep_fp32``: node names / globs / op types / ``:first`` / ``:last`` left in fp32 (int8 and
    fp16). ``auto_keep_fp32``: if the int8 graph fails the guard, leave up to this many of the
    most sensitive weighted layers in fp32, one at a time, until it passes.
    ``weight_bits``: see :func:`quantize_int8`. ``max_auroc_drop`` / ``min_agreement``: the guard's
    limits (defaults 0.005 and 0.99).
    Raises AccuracyGuardError unless ``allow_accuracy_drop``: a refused graph is not written; for
    int8 each form is guarded on its own, the one that passes is written first, and the error then
    says so (``err.result`` holds what was written).
    """
    bad = set(precisions) - {"fp16", "int8"}
    if bad:
        raise ValueError(f"precisions must be among ('fp16', 'int8'), got {sorted(bad)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    pkg = model if isinstance(model, ModelPackage) else load_model_package(model)
    fp32_path = pkg.verified("onnx")
    x = load_calibration(pkg, calib, limit=max_calib)
    if holdout is None:
        if len(x) < 2:
            raise ModelError("need at least 2 calibration inputs (one is held out for the accuracy guard)")
        idx = np.arange(len(x))
        hold, x = x[idx % 4 == 3] if len(x) >= 4 else x[-1:], x[idx % 4 != 3] if len(x) >= 4 else x[:-1]
    else:
        hold = load_calibration(pkg, holdout)
    if labels is not None and len(labels) != len(hold):
        raise ValueError(f"labels have {len(labels)} rows; the held-out set has {len(hold)} images")
    dest = _copy_package(pkg, Path(out)) if out is not None else pkg
    fp32_name = dest.card.raw["files"]["onnx"]
    ref = run_graph(fp32_path, hold, batch_size, num_threads)
    result = QuantizeResult(package=dest)
    limits = {"max_auroc_drop": max_auroc_drop, "min_agreement": min_agreement}
    common = {"n_calibration": int(len(x)), "n_holdout": int(len(hold)), "keep_fp32": list(keep_fp32)}

    if "fp16" in precisions:
        g16 = convert_fp16(fp32_path, keep_fp32=[k for k in keep_fp32 if not k.startswith(":")])
        rep = compare(dest, ref, run_graph(g16, hold, batch_size, num_threads), "fp16", labels, **limits)
        enforce(rep, allow_accuracy_drop)
        result.fp16_path = _install(dest.root, "onnx_fp16", g16, rep, dict(common), fp32_name)
        result.reports["fp16"] = rep

    if "int8" in precisions:
        prep = prepared(fp32_path)
        cache: dict[str, float] = {}

        def ranges_for(plan) -> dict[str, float]:
            need = [t for t in plan.calib_tensors if t not in cache]
            if need:
                cache.update(collect_ranges(prep, need, x, method, percentile=percentile,
                                            batch_size=batch_size, num_threads=num_threads))
            return cache

        # two forms from one calibration: TensorRT's (symmetric int8) and the CPU form ORT runs
        # fastest (uint8, ReLUs folded into the quantizers, pre-activation BNs as int8 depthwise
        # convs); each is guarded, and sensitive layers are kept in fp32, on its own
        prep_cpu = prepared(fp32_path)
        batchnorm_to_depthwise(prep_cpu)
        sensitivity: list[tuple[str, float]] = []

        def build(form: str, keep: list[str]):
            p = prep if form == "tensorrt" else prep_cpu
            plan = plan_qdq(p, keep)
            g = apply_qdq(p, plan, ranges_for(plan), weight_bits=weight_bits, uint8_activations=form == "cpu")
            rep = compare(dest, ref, run_graph(g, hold, batch_size, num_threads), _INT8_REPORT[form], labels, **limits)
            return g, plan, rep

        built = {}
        for form in ("tensorrt", "cpu"):
            keep = list(keep_fp32)
            g8, plan, rep = build(form, keep)
            if not rep.passed and rep.failed_findings and auto_keep_fp32 > 0:  # fp32 layers cannot fix a small holdout
                if not sensitivity:
                    sensitivity = layer_sensitivity(prep, x[:16], ranges_for, keep_fp32, batch_size, weight_bits)
                for name, err in sensitivity[:auto_keep_fp32]:
                    keep.append(name)
                    log.info("int8 (%s form) guard failed (%s); leaving %s (sensitivity %.2g) in fp32",
                             form, rep.failed_findings, name, err)
                    g8, plan, rep = build(form, keep)
                    if rep.passed:
                        break
            settings = {**common, "form": form, "method": method, "keep_fp32": keep, "kept_fp32_layers": plan.kept_fp32,
                        "weighted_int8": len(plan.weighted), "pass_through_int8": len(plan.pass_through),
                        "activation_tensors_int8": len(plan.tensors),
                        "weights": f"int8 symmetric per-channel (axis 0), {weight_bits}-bit range", "weight_bits": weight_bits,
                        "activations": "int8 symmetric per-tensor, zero point 0" if form == "tensorrt" else
                        "uint8 per-tensor: zero point 0 for tensors >= 0 (ReLU folded), 128 otherwise",
                        "sensitivity": [[n, e] for n, e in sensitivity[:32]]}
            if method == "percentile":
                settings["percentile"] = percentile
            rep.extra["settings"] = {k: settings[k] for k in ("form", "method", "kept_fp32_layers")}
            built[form] = (g8, rep, settings)
        # each form stands on its own: one that passes (or is overridden) is written even when the
        # other is refused, so a TensorRT user is not blocked by the CPU form and vice versa; the
        # refusal is raised after the writes, naming the form
        refused: AccuracyGuardError | None = None
        for form, kind, attr in (("tensorrt", "onnx_int8", "int8_path"), ("cpu", "onnx_int8_cpu", "int8_cpu_path")):
            g8, rep, settings = built[form]
            result.reports[_INT8_REPORT[form]] = rep
            try:
                enforce(rep, allow_accuracy_drop)
            except AccuracyGuardError as e:
                refused = refused or e
                continue
            setattr(result, attr, _install(dest.root, kind, g8, rep, settings, fp32_name))
        if refused is not None:
            written = [k for k, p in (("onnx_int8", result.int8_path), ("onnx_int8_cpu", result.int8_cpu_path)) if p]
            refused.result = result  # type: ignore[attr-defined]
            if written:
                refused.args = (f"{refused.args[0]} (written anyway, having passed on its own: {', '.join(written)})",)
            raise refused
    result.package = load_model_package(dest.root)
    return result


def main(args: argparse.Namespace) -> int:
    """`cxrkit quantize MODEL --calib IMAGES... [--out DIR] [--method M] [--allow-accuracy-drop]`."""
    labels = None
    if getattr(args, "labels", None):
        labels = np.load(args.labels)
    res = quantize(
        args.model, list(args.calib), out=args.out, method=args.method,
        percentile=getattr(args, "percentile", 99.99), keep_fp32=list(getattr(args, "keep_fp32", None) or []),
        auto_keep_fp32=getattr(args, "auto_keep_fp32", 0), holdout=getattr(args, "holdout", None) or None,
        labels=labels, allow_accuracy_drop=args.allow_accuracy_drop,
        precisions=tuple(getattr(args, "precisions", "fp16,int8").split(",")),
        weight_bits=getattr(args, "weight_bits", 7),
    )
    for prec, rep in res.reports.items():
        status = ("passed" if rep.passed else
                  f"NOT JUDGED, too few held-out images for {len(rep.insufficient)} finding(s) (kept: --allow-accuracy-drop)"
                  if rep.insufficient and not rep.failed_findings else "FAILED (kept: --allow-accuracy-drop)")
        print(f"{prec}: {status}; max |score diff| {rep.max_abs_score_diff:.4g} on {rep.n_images} held-out images")
    for p in (res.fp16_path, res.int8_path, res.int8_cpu_path):
        if p is not None:
            print(f"wrote {p}")
    return 0
