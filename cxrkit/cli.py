"""`cxrkit predict | info | bench | eval | export | quantize | build-engine | serve | dicom-node`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["main"]


class _Progress:
    """A one-line progress bar on stderr (only when it is a terminal, or when forced)."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.total, self.n, self.enabled, self.t0 = total, 0, enabled, time.perf_counter()

    def update(self, k: int = 1) -> None:
        self.n += k
        if not self.enabled:
            return
        rate = self.n / max(1e-9, time.perf_counter() - self.t0)
        if self.total:
            frac = self.n / self.total
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r[{bar:<30}] {self.n}/{self.total} {rate:.1f} img/s")
        else:
            sys.stderr.write(f"\r{self.n} images {rate:.1f} img/s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("CXRKIT_MODEL", "cxr29-demo"),
                   help="bundled model name or a model folder/card (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--backend", default="auto", help="auto, onnxruntime, torch, tensorrt")
    p.add_argument("--precision", default="fp32", help="fp32, fp16, bf16, int8")
    p.add_argument("--batch-size", type=int, default=8)


def _detector(a: argparse.Namespace, **kw):
    from .api import Detector

    return Detector.from_pretrained(a.model, device=a.device, backend=a.backend, precision=a.precision,
                                    batch_size=a.batch_size, **kw)


def cmd_predict(a: argparse.Namespace) -> int:
    from .io import iter_sources
    from .overlay import render_overlay
    from .results import write_jsonl

    sources = list(iter_sources(a.inputs))
    if not sources:
        print(f"cxrkit predict: no image files found in {a.inputs}", file=sys.stderr)
        return 2
    det = _detector(a, boxes=a.boxes)
    dicom_out = None
    if a.dicom_out:  # `--dicom-out`: logic in cxrkit/dicom/cli.py
        from .dicom.cli import DicomOutWriter

        dicom_out = DicomOutWriter(a, det)
    out = open(a.out, "w") if a.out else sys.stdout
    prog = _Progress(len(sources), enabled=(sys.stderr.isatty() or a.progress) and len(sources) > 1)
    n_err = 0
    try:
        for pred in det.predict_iter(sources):
            write_jsonl((pred,), out)  # from the result columns (orjson when installed): json.dumps(pred.to_dict())
            if pred.error is not None:
                n_err += 1
            elif a.overlay:
                stem = Path(pred.source).stem
                render_overlay(pred.source, pred, Path(a.overlay) / f"{pred.index:05d}_{stem}.png")
            if dicom_out is not None and pred.error is None:
                dicom_out.write(pred, sources[pred.index])
            prog.update()
    finally:
        prog.close()
        if out is not sys.stdout:
            out.close()
        det.close()
    print(f"cxrkit predict: {len(sources)} images, {n_err} with errors, model {det.model.name} "
          f"({det.backend_name}, {det.device.value}); not for clinical use", file=sys.stderr)
    if dicom_out is not None:
        print(f"cxrkit predict: {dicom_out.n_written} DICOM objects written to {a.dicom_out}"
              f"{f', {dicom_out.n_failed} images without outputs' if dicom_out.n_failed else ''}", file=sys.stderr)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    import platform

    from . import __version__
    from .backends import available_backends
    from .models import list_models

    info: dict = {"cxrkit": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for mod in ("numpy", "torch", "onnxruntime", "onnx", "pydicom", "nvidia.dali", "cupy", "tensorrt", "PIL"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            info[mod] = getattr(m, "__version__", "installed")
        except Exception:
            info[mod] = None
    try:
        from . import _C  # noqa: F401

        info["cpu_kernels"] = "cxrkit._C built"
    except ImportError:
        info["cpu_kernels"] = "missing (pip install .)"
    devices = ["cpu"]
    try:
        import torch

        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    info["devices"] = devices
    info["backends"] = {d: available_backends(d) for d in ("cpu", "cuda")}
    info["models"] = list_models()
    print(json.dumps(info, indent=2))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import cmd_eval as eval_main

    return eval_main(a)


def cmd_export(a: argparse.Namespace) -> int:
    from .nets import create_net, export_onnx

    kw = json.loads(a.arch_kwargs) if a.arch_kwargs else {}
    net = create_net(a.arch, **kw)
    h, w = a.input_size
    export_onnx(net, a.out, (h, w))
    print(f"wrote {a.out}")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(a)


def cmd_quantize(a: argparse.Namespace) -> int:
    from .quant import main as quant_main

    return quant_main(a)


def cmd_build_engine(a: argparse.Namespace) -> int:
    from .backends.tensorrt.build import main as build_main

    return build_main(a)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cxrkit", description="Fast chest X-ray detection (demonstration; not for clinical use).")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("predict", help="predict findings for images, folders, DICOMs")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    _add_model_args(p)
    p.add_argument("--out", help="write JSON lines here (default: stdout)")
    p.add_argument("--overlay", help="folder for overlay PNGs of positive findings")
    p.add_argument("--boxes", default="positive", choices=["positive", "all"])
    p.add_argument("--progress", action="store_true", help="show progress even when stderr is not a terminal")
    from .dicom.cli import add_dicom_out_args  # `--dicom-out`: logic in cxrkit/dicom/cli.py

    add_dicom_out_args(p)
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("info", help="versions, backends, devices, models")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("eval", help="AUROC, CheXNet-paired AUROC, FROC on nih14 labels.json or COCO boxes; --tune-thresholds")
    p.add_argument("images")
    p.add_argument("annotations", help="nih14 labels.json or COCO annotations.json")
    p.add_argument("--out", help="write the metrics as JSON here")
    _add_model_args(p)
    from .evaluate import add_eval_args

    add_eval_args(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("export", help="export a registered network to ONNX")
    p.add_argument("arch")
    p.add_argument("out")
    p.add_argument("--input-size", type=int, nargs=2, default=[512, 512])
    p.add_argument("--arch-kwargs", default="", help="JSON dict")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("bench", help="images/s and per-stage ms against a naive baseline, same run")
    _add_model_args(p)
    p.add_argument("--images", type=int, default=32, help="synthetic ~2048² radiograph-like images per format")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--formats", default="jpeg,png16", help="comma-separated: jpeg, png16, dicom, dicom-j2k")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="write results here")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("quantize", help="write fp16 and int8 (Q/DQ) ONNX graphs with an accuracy guard")
    p.add_argument("model")
    p.add_argument("--out", help="output folder (default: beside the model)")
    p.add_argument("--calib", nargs="*", default=[], help="calibration images or folders")
    p.add_argument("--method", default="percentile", choices=["percentile", "entropy", "minmax"])
    p.add_argument("--percentile", type=float, default=99.99, help="for --method percentile")
    p.add_argument("--holdout", nargs="*", default=[], help="held-out images for the accuracy guard "
                   "(default: every 4th calibration image); it cannot pass on too few: >= 100 without --labels, "
                   "else >= 10 positives and negatives per enabled finding")
    p.add_argument("--labels", help="(N_holdout, K) 0/1 .npy: guard on per-finding AUROC instead of agreement")
    p.add_argument("--keep-fp32", nargs="*", default=[], help="node names, globs, op types, :first, :last")
    p.add_argument("--auto-keep-fp32", type=int, default=0, metavar="N",
                   help="if int8 fails the guard, leave up to N most sensitive layers in fp32")
    p.add_argument("--precisions", default="fp16,int8")
    p.add_argument("--weight-bits", type=int, default=7, choices=[7, 8],
                   help="7 (default) avoids int16 saturation in ONNX Runtime on x86 CPUs without VNNI")
    p.add_argument("--allow-accuracy-drop", action="store_true")
    p.set_defaults(fn=cmd_quantize)

    p = sub.add_parser("build-engine", help="build and cache a TensorRT engine")
    _add_model_args(p)
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--rebuild", action="store_true", help="build even if a valid cached engine exists")
    p.add_argument("--cache-dir", help="engine cache folder (default: $CXRKIT_CACHE_DIR/engines or ~/.cache/cxrkit/engines)")
    p.add_argument("--workspace-gib", type=float, default=0.0, help="builder workspace limit (0: TensorRT's default)")
    p.set_defaults(fn=cmd_build_engine)

    from .serve.cli import add_parser as add_serve_parser  # `cxrkit serve`: logic in cxrkit/serve/cli.py

    add_serve_parser(sub)

    from .convert import add_parser as add_import_parser  # `cxrkit import-model`: logic in cxrkit/convert

    add_import_parser(sub)

    from .dicom.cli import add_node_parser  # `cxrkit dicom-node`: logic in cxrkit/dicom/cli.py

    add_node_parser(sub, _add_model_args)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(2, a.verbose), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(a.fn(a) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the command itself failed: say why, exit non-zero
        from .errors import CxrkitError

        if isinstance(e, CxrkitError) and not a.verbose:
            print(f"cxrkit {a.cmd}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
