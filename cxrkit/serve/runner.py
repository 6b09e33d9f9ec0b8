"""Run the app under uvicorn, with a SIGTERM drain that ends within a deadline.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for the requests in flight;
the Service stops taking work (/readyz 503) and lets the queue run for ``drain_timeout_s``. At the
deadline the images that have not started get 503 (their clients can retry elsewhere) and the batch
running finishes; uvicorn's own backstop (``drain_timeout_s + grace_s``) then cancels whatever is
left, and each cancelled image is counted (``cxrkit_serve_dropped_total{reason="shutdown_*"}``) and
logged, never lost silently. The process exits 0 after a drain, 1 if the model failed to load.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from typing import Any, Callable

from .app import ServeConfig, create_app

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(detector_factory: Callable[[], Any], config: ServeConfig | None = None, *, model: Any = None,
        host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", access_log: bool = False,
        grace_s: float = 10.0, sock: socket.socket | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code. Blocks (run it in the main thread)."""
    import uvicorn

    cfg = config or ServeConfig()
    app = create_app(detector_factory, cfg, model=model)
    svc = app.state.service

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first:
                log.info("signal %d: graceful shutdown (drain deadline %.1f s)", sig, cfg.drain_timeout_s)
                svc.request_drain()

    ucfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                          timeout_graceful_shutdown=int(cfg.drain_timeout_s + grace_s), lifespan="on",
                          timeout_keep_alive=5, backlog=2048)
    server = _Server(ucfg)

    def fatal() -> None:
        server.should_exit = True

    svc.on_fatal = fatal
    main = threading.current_thread() is threading.main_thread()
    if main:
        # uvicorn re-raises the signal it handled once it has shut down; a handled SIGTERM then ends
        # the process as "killed" after a clean drain. Exit 0 instead: the drain is the handling.
        previous = signal.signal(signal.SIGTERM, _handled)
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    return 1 if svc.load_error is not None else 0


def _handled(sig: int, frame: Any) -> None:
    log.debug("signal %d already handled by the graceful shutdown", sig)
