"""A `cxrkit serve` process whose batches wait on a gate file, for the service's stress tests.

It serves through the same ``cxrkit.serve.run`` as ``cxrkit serve`` (real uvicorn, real SIGTERM
handling) with the real Detector and the cxr-probe model; the only addition is that each batch's
``predict`` (and, with ``--hold-load``, the model load) waits until ``<gate-dir>/open`` exists, so a
test can hold a batch running and make the queue states it wants exactly, not by timing. Every
batch that passes the gate appends its size to ``<gate-dir>/ran`` (the work really done).

    python tests/serve_gated.py --port 8123 --gate-dir /tmp/g --max-batch 1 --max-queue 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


class GatedDetector:
    """A Detector whose ``predict`` waits for the gate file (and records what it ran)."""

    def __init__(self, det: Any, gate_dir: Path) -> None:
        self.det = det
        self.gate_dir = gate_dir
        self.batch_size = det.batch_size
        self.model = det.model
        self.backend_name = det.backend_name
        self.device_str = det.device_str
        self.precision = det.precision

    def predict(self, items: Any, **kw: Any) -> Any:
        with open(self.gate_dir / "entered", "a") as f:
            f.write(f"{len(items)}\n")
        wait_for_gate(self.gate_dir)
        out = self.det.predict(items, **kw)
        with open(self.gate_dir / "ran", "a") as f:
            f.write(f"{len(items)}\n")
        return out

    def close(self) -> None:
        self.det.close()


def wait_for_gate(gate_dir: Path, timeout_s: float = 120.0) -> None:
    end = time.monotonic() + timeout_s
    while not (gate_dir / "open").exists():
        if time.monotonic() > end:
            raise TimeoutError(f"gate {gate_dir} never opened")
        time.sleep(0.005)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--gate-dir", required=True)
    ap.add_argument("--model", default="cxr-probe")
    ap.add_argument("--max-batch", type=int, default=1)
    ap.add_argument("--max-queue", type=int, default=2)
    ap.add_argument("--max-delay-ms", type=float, default=0.0)
    ap.add_argument("--drain-timeout", type=float, default=20.0)
    ap.add_argument("--hold-load", action="store_true", help="the model load waits for the gate too")
    a = ap.parse_args()
    gate_dir = Path(a.gate_dir)

    import logging

    import cxrkit
    from cxrkit.serve import ServeConfig, run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def factory() -> GatedDetector:
        if a.hold_load:
            wait_for_gate(gate_dir)
        det = cxrkit.Detector.from_pretrained(a.model, batch_size=a.max_batch)
        return GatedDetector(det, gate_dir)

    cfg = ServeConfig(max_batch=a.max_batch, max_delay_ms=a.max_delay_ms, max_queue=a.max_queue,
                      drain_timeout_s=a.drain_timeout, max_body_bytes=1 << 20)
    return run(factory, cfg, host="127.0.0.1", port=a.port, log_level="info")


if __name__ == "__main__":
    sys.exit(main())
