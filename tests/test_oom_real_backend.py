"""Out of memory raised by a real backend, not simulated: the runner turns the library's own
allocation failure into cxrkit's OutOfMemoryError and the Detector's retry takes it from there.

Each case runs tests/oom_child.py in a child process: inference (only) runs under an address-space
limit a few MiB above the process's size, so ONNX Runtime's CPU arena ("Failed to allocate memory
for requested buffer ...") or torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory")
fails for real on a batch of 8 of the cxr29-demo network at 256².
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SNAPSHOT = HERE / "fixtures" / "host_path" / "cxr29-demo-58145cf"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status")


def _child(model: str, backend: str, margin_mib: float) -> dict:
    res = subprocess.run([sys.executable, str(HERE / "oom_child.py"), model, backend, str(margin_mib), "8"],
                         capture_output=True, text=True, timeout=300, cwd=HERE)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("margin_mib, final", [(4, 2), (8, 4)])
def test_onnxruntime_arena_failure_is_retried_with_smaller_batches(margin_mib, final):
    out = _child(str(SNAPSHOT), "onnxruntime", margin_mib)
    assert out["raised"][0] == "OutOfMemoryError", out  # ORT's own error, converted by the runner
    assert out["tried"][:2] == [8, 4], out  # halved and retried
    assert all(e == "OutOfMemoryError" for e in out["raised"]), out
    assert out["errors"] == [None] * 8, out
    assert out["step"] == final and out["tried"][-1] == final, out
    assert all(out["same"]), out  # equal to an unlimited run in batches of the slice that fit


def test_torch_cpu_allocator_failure_is_an_out_of_memory_error():
    pytest.importorskip("torch")
    out = _child("cxr29-demo", "torch", 8)
    assert out["raised"][0] == "OutOfMemoryError", out
    assert out["tried"][:2] == [8, 4], out
