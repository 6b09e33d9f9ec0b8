"""Starting and stopping real `cxrkit serve` processes on a free localhost port, for the serve tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start(args: list[str], log: Path, wait: str = "/readyz", timeout: float = 60.0) -> Server:
    """Run ``python <args> --port P`` and wait until GET ``wait`` answers 200 (or, with wait="", until
    the port accepts connections). Retries once on a port taken between choosing and binding it."""
    for attempt in range(2):
        port = free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, *args, "--port", str(port)], stdout=f, stderr=subprocess.STDOUT,
                                    cwd=REPO, env=env)
        srv = Server(proc, port, log)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                break
            try:
                if not wait:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return srv
                if httpx.get(srv.url + wait, timeout=2).status_code == 200:
                    return srv
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.05)
        srv.stop(5)
        if attempt == 0 and "address already in use" in srv.output().lower():
            continue
        raise RuntimeError(f"server {args} did not start (exit {proc.returncode}):\n{srv.output()[-3000:]}")
    raise AssertionError("unreachable")


def wait_until(pred, timeout: float = 20.0, what: str = "condition") -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
