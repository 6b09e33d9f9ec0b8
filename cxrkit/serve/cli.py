"""`cxrkit serve --model cxr29-demo --device cpu|cuda --port 8000`: the subcommand's arguments and logic."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os

from ..errors import BackendUnavailableError

__all__ = ["add_parser", "cmd_serve", "require_serve_deps"]

_DEPS = (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("prometheus_client", "prometheus-client"),
         ("python_multipart", "python-multipart"))


def require_serve_deps() -> None:
    """Raise BackendUnavailableError naming the install command if a serving dependency is missing."""
    missing = [pip for mod, pip in _DEPS if importlib.util.find_spec(mod) is None]
    if missing:
        raise BackendUnavailableError(f"cxrkit serve needs {', '.join(missing)}: pip install 'cxrkit[serve]'")


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="HTTP inference service (FastAPI + uvicorn): /v1/predict, /healthz, /readyz, "
                       "/metrics, /v1/models")
    p.add_argument("--model", default=os.environ.get("CXRKIT_MODEL", "cxr29-demo"),
                   help="bundled model name or a model folder/card (default: %(default)s)")
    p.add_argument("--device", default=os.environ.get("CXRKIT_DEVICE", "cpu"), help="cpu or cuda[:N]")
    p.add_argument("--backend", default="auto", help="auto, onnxruntime, torch, tensorrt")
    p.add_argument("--precision", default="fp32", help="fp32, fp16, bf16, int8")
    p.add_argument("--host", default=os.environ.get("CXRKIT_HOST", "127.0.0.1"),
                   help="address to listen on (0.0.0.0 in a container; default: %(default)s)")
    p.add_argument("--port", type=int, default=int(os.environ.get("CXRKIT_PORT", "8000")))
    p.add_argument("--max-batch", type=int, default=32, help="most images per detector batch")
    p.add_argument("--max-delay-ms", type=float, default=5.0,
                   help="longest a batch waits for more requests after its first (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="images waiting for a batch before new requests get 503 (default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body, MiB (413 past it)")
    p.add_argument("--max-parts", type=int, default=64, help="most files in one multipart request")
    p.add_argument("--drain-timeout", type=float, default=20.0,
                   help="seconds queued requests may still run after SIGTERM (default: %(default)s)")
    p.add_argument("--num-threads", type=int, default=None, help="CPU threads for decoding and inference")
    p.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")
    p.set_defaults(fn=cmd_serve)
    return p


def cmd_serve(a: argparse.Namespace) -> int:
    require_serve_deps()
    from ..api import Detector
    from ..models import load_model_package
    from .app import ServeConfig
    from .runner import run

    pkg = load_model_package(a.model)  # a wrong name fails here, before the server starts
    cfg = ServeConfig(max_batch=a.max_batch, max_delay_ms=a.max_delay_ms, max_queue=a.max_queue,
                      max_body_bytes=int(a.max_body_mb * 1024 * 1024), max_parts=a.max_parts,
                      drain_timeout_s=a.drain_timeout)

    def factory() -> Detector:
        return Detector(pkg, device=a.device, backend=a.backend, precision=a.precision, batch_size=a.max_batch,
                        num_threads=a.num_threads)

    level = logging.DEBUG if a.verbose > 1 else logging.INFO
    logging.getLogger("cxrkit.serve").setLevel(level)
    return run(factory, cfg, model=pkg, host=a.host, port=a.port, access_log=a.access_log,
               log_level="debug" if a.verbose > 1 else "info")
