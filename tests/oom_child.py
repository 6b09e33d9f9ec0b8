"""Run by tests/test_oom_real_backend.py in a child process: a real backend runs out of memory.

The runner's ``infer`` is wrapped so that only inference runs under an address-space limit
(RLIMIT_AS = the process's size now + ``margin`` MiB), set just before and lifted just after each
call; so ONNX Runtime's CPU arena (or torch's CPU allocator) fails for real on a batch that needs
more, raises its own error, and the runner must turn that into cxrkit's OutOfMemoryError. Prints
one JSON line: the batch sizes tried, the error types the runner raised, the per-item outcomes,
whether the results equal those of an unlimited Detector run in batches of the slice size the
retry settled on (ONNX Runtime's last bits depend on the batch size), and that slice size.
"""

from __future__ import annotations

import json
import resource
import sys

import numpy as np

import cxrkit


def vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def main(model: str, backend: str, margin_mib: float, n: int) -> None:
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 256, (256, 256), dtype=np.uint8) for _ in range(n)]
    kw = dict(num_threads=1, backend=backend)
    det = cxrkit.Detector.from_pretrained(model, batch_size=n, **kw)
    det.predict(items[:1])  # the arena holds what batch 1 needs; batch n needs more
    tried, raised = [], []
    real = det.runner.infer
    unlimited = resource.getrlimit(resource.RLIMIT_AS)

    def limited_infer(batch):
        tried.append(int(batch.shape[0]))
        resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + int(margin_mib * 2**20), unlimited[1]))
        try:
            return real(batch)
        except Exception as e:
            raised.append(type(e).__name__)
            raise
        finally:
            resource.setrlimit(resource.RLIMIT_AS, unlimited)

    det.runner.infer = limited_infer
    preds = det.predict(items)
    step = det._inference.step
    det.close()
    with cxrkit.Detector.from_pretrained(model, batch_size=step or n, **kw) as clean_det:
        clean = [json.dumps(p.to_dict()["findings"]) for p in clean_det.predict(items)]
    print(json.dumps({
        "tried": tried, "raised": raised,
        "errors": [None if p.error is None else type(p.error).__name__ for p in preds],
        "same": [json.dumps(p.to_dict()["findings"]) == c for p, c in zip(preds, clean)],
        "step": step,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
