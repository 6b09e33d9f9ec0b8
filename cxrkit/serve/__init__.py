"""`cxrkit serve`: an HTTP inference service (FastAPI + uvicorn) over the BatchingDetector.

``pip install 'cxrkit[serve]'``. Endpoints: ``POST /v1/predict`` (raw JPEG/PNG/DICOM bytes, or
multipart with several files), ``GET /healthz``, ``/readyz``, ``/metrics`` (Prometheus text),
``/v1/models``. ``create_app`` builds the ASGI app (for any ASGI server); ``run`` serves it under
uvicorn with a SIGTERM drain. FastAPI, uvicorn and prometheus_client are imported only when used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeConfig", "create_app", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from .cli import require_serve_deps

        require_serve_deps()
        if name == "run":
            from .runner import run

            return run
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'cxrkit.serve' has no attribute {name!r}")
