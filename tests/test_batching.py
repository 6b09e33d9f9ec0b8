"""BatchingDetector: batching, per-request results and errors, back-pressure, shutdown.

The mechanics run against a scripted fake detector (it can hold a batch open on an Event, so the
queue states are exact, not timed); ``test_batching_probe.py`` checks the answers against the
real Detector with the cxr-probe model.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from pathlib import Path

import pytest

from cxrkit.batching import BatchFailedError, BatchingDetector, DetectorClosedError, restamp
from cxrkit.errors import DecodeError, QueueFullError
from cxrkit.results import Prediction


class FakeDetector:
    """Same predict() signature as Detector. Items are strings (named by themselves) or bytes
    (named ``<bytes N B #pos>`` as Detector does); ``"bad"`` gets a per-item error and a batch
    holding ``"boom"`` raises. ``gate`` (an Event) holds each batch until it is set."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.batches: list[list] = []
        self.batch_sizes: list = []
        self.started = threading.Event()
        self.closed = False

    def predict(self, inputs, batch_size=None, return_heatmaps=False):
        self.batches.append(list(inputs))
        self.batch_sizes.append(batch_size)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if "boom" in inputs:
            raise RuntimeError("device fell over")
        out = []
        for i, x in enumerate(inputs):
            src = x if isinstance(x, str) else f"<bytes {len(x)} B #{i}>"
            if x == "bad" or x == b"bad":
                out.append(Prediction(source=src, index=i, error=DecodeError(src, "not an image")))
            else:
                out.append(Prediction(source=src, index=i, meta={"item": x}, timings_ms={"infer": 1.0}))
        return out

    def close(self):
        self.closed = True


def _threads_settle(baseline: int, timeout: float = 5.0) -> int:
    end = time.monotonic() + timeout
    while threading.active_count() > baseline and time.monotonic() < end:
        time.sleep(0.01)
    return threading.active_count()


def test_each_caller_gets_its_own_prediction_from_shared_batches():
    gate = threading.Event()
    fake = FakeDetector(gate)
    with BatchingDetector(fake, max_batch=8, max_delay_ms=50) as bd:
        first = bd.submit("warmup")  # holds the worker so the next requests queue up together
        assert fake.started.wait(5)
        futs = {f"img{i}": bd.submit(f"img{i}") for i in range(20)}
        gate.set()
        assert first.result(5).source == "warmup"
        for name, fut in futs.items():
            p = fut.result(5)
            assert p.source == name and p.index == 0 and p.meta["item"] == name
            assert p.timings_ms["infer"] == 1.0 and p.timings_ms["queue"] >= 0.0
    sizes = [len(b) for b in fake.batches]
    assert sizes == [1, 8, 8, 4]
    assert sum(sizes) == 21


def test_batch_goes_when_full_without_waiting_for_the_delay():
    fake = FakeDetector()
    with BatchingDetector(fake, max_batch=4, max_delay_ms=30_000) as bd:
        t0 = time.monotonic()
        futs = [bd.submit(f"x{i}") for i in range(4)]
        for f in futs:
            f.result(10)
        assert time.monotonic() - t0 < 5.0
    assert [len(b) for b in fake.batches] == [4]


def test_lone_request_waits_at_most_max_delay():
    fake = FakeDetector()
    with BatchingDetector(fake, max_batch=64, max_delay_ms=100) as bd:
        t0 = time.monotonic()
        bd.predict("alone", timeout=10)
        waited = time.monotonic() - t0
    assert 0.09 <= waited < 5.0


def test_concurrent_threads_results_in_order_and_batched():
    fake = FakeDetector()
    with BatchingDetector(fake, max_batch=16, max_delay_ms=20) as bd:
        with ThreadPoolExecutor(32) as pool:
            names = [f"p{i}" for i in range(256)]
            preds = list(pool.map(bd.predict, names))
        stats = bd.stats()
    assert [p.source for p in preds] == names
    assert all(p.index == 0 for p in preds)
    assert stats["requests"] == 256 and stats["max_batch_size"] <= 16
    assert stats["batches"] < 256  # some batching happened


def test_bad_item_errors_alone_and_unnamed_sources_are_renumbered():
    gate = threading.Event()
    fake = FakeDetector(gate)
    with BatchingDetector(fake, max_batch=8, max_delay_ms=50) as bd:
        hold = bd.submit("hold")
        assert fake.started.wait(5)
        good = bd.submit(b"\x89PNG-ish")
        bad = bd.submit(b"bad")
        ok = bd.submit("fine.png")
        gate.set()
        hold.result(5)
        pg, pb, po = good.result(5), bad.result(5), ok.result(5)
    assert fake.batches[1] == [b"\x89PNG-ish", b"bad", "fine.png"]
    assert pg.ok and pg.source == "<bytes 8 B #0>"
    assert not pb.ok and isinstance(pb.error, DecodeError)
    assert pb.source == "<bytes 3 B #0>" and pb.error.source == "<bytes 3 B #0>"  # was #1 in the batch
    assert "#0" in str(pb.error)
    assert po.ok and po.source == "fine.png"


def test_detector_exception_fails_only_its_batch_with_a_typed_error():
    gate = threading.Event()
    fake = FakeDetector(gate)
    with BatchingDetector(fake, max_batch=4, max_delay_ms=50) as bd:
        hold = bd.submit("hold")
        assert fake.started.wait(5)
        doomed = [bd.submit(x) for x in ("a", "boom", "c")]
        gate.set()
        hold.result(5)
        errs = []
        for f in doomed:
            with pytest.raises(BatchFailedError, match="batch of 3.*device fell over") as ei:
                f.result(5)
            assert isinstance(ei.value.__cause__, RuntimeError)
            errs.append(ei.value)
        assert len({id(e) for e in errs}) == 3  # one exception object per caller
        assert bd.predict("after", timeout=5).source == "after"  # the worker lives on


def test_queue_full_raises_typed_error_or_blocks_with_timeout():
    gate = threading.Event()
    fake = FakeDetector(gate)
    bd = BatchingDetector(fake, max_batch=1, max_delay_ms=0, max_queue=2)
    try:
        running = bd.submit("running")
        assert fake.started.wait(5)
        queued = [bd.submit("q1"), bd.submit("q2")]
        assert bd.queue_depth() == 2
        with pytest.raises(QueueFullError, match="max_queue=2"):
            bd.submit("q3")
        t0 = time.monotonic()
        with pytest.raises(QueueFullError, match="timeout of 0.2 s"):
            bd.submit("q3", block=True, timeout=0.2)
        assert time.monotonic() - t0 >= 0.19
        # a blocked submitter gets in once the worker takes a request
        threading.Timer(0.1, gate.set).start()
        late = bd.submit("q3", block=True, timeout=10)
        assert [f.result(5).source for f in [running, *queued, late]] == ["running", "q1", "q2", "q3"]
    finally:
        gate.set()
        bd.close()


def test_close_drains_pending_work():
    gate = threading.Event()
    fake = FakeDetector(gate)
    bd = BatchingDetector(fake, max_batch=2, max_delay_ms=0)
    futs = [bd.submit(f"d{i}") for i in range(7)]
    assert fake.started.wait(5)
    threading.Timer(0.1, gate.set).start()
    bd.close(drain=True)
    assert [f.result(0).source for f in futs] == [f"d{i}" for i in range(7)]
    assert not fake.closed  # a detector we were given stays the caller's
    with pytest.raises(DetectorClosedError):
        bd.submit("late")
    bd.close()  # idempotent


def test_close_without_drain_fails_pending_with_clear_error():
    gate = threading.Event()
    fake = FakeDetector(gate)
    bd = BatchingDetector(fake, max_batch=1, max_delay_ms=0)
    running = bd.submit("running")
    assert fake.started.wait(5)
    pending = [bd.submit(f"p{i}") for i in range(3)]
    threading.Timer(0.1, gate.set).start()
    bd.close(drain=False)
    assert running.result(0).source == "running"  # the batch already running finishes
    for f in pending:
        with pytest.raises(DetectorClosedError, match="drain=False"):
            f.result(0)
    assert [b for b in fake.batches] == [["running"]]


def test_cancelled_request_is_not_run():
    gate = threading.Event()
    fake = FakeDetector(gate)
    with BatchingDetector(fake, max_batch=4, max_delay_ms=0) as bd:
        hold = bd.submit("hold")
        assert fake.started.wait(5)
        gone, kept = bd.submit("gone"), bd.submit("kept")
        assert gone.cancel()
        gate.set()
        hold.result(5)
        assert kept.result(5).source == "kept"
        with pytest.raises(CancelledError):
            gone.result(0)
    assert ["gone" in b for b in fake.batches] == [False, False]


def test_apredict_does_not_block_the_event_loop():
    gate = threading.Event()
    fake = FakeDetector(gate)

    async def main(bd):
        ticks = 0

        async def ticker():
            nonlocal ticks
            while not gate.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        async def release():
            await asyncio.sleep(0.2)
            gate.set()

        results = await asyncio.gather(*(bd.apredict(f"a{i}") for i in range(16)), ticker(), release())
        return results[:16], ticks

    with BatchingDetector(fake, max_batch=8, max_delay_ms=5) as bd:
        preds, ticks = asyncio.run(main(bd))
    assert [p.source for p in preds] == [f"a{i}" for i in range(16)]
    assert ticks >= 5  # the loop kept running while the batches were held


def test_apredict_cancellation_drops_the_request():
    gate = threading.Event()
    fake = FakeDetector(gate)

    async def main(bd):
        hold = asyncio.ensure_future(bd.apredict("hold"))
        await asyncio.sleep(0.05)
        task = asyncio.ensure_future(bd.apredict("dropped"))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        return await hold

    with BatchingDetector(fake, max_batch=4, max_delay_ms=0) as bd:
        assert asyncio.run(main(bd)).source == "hold"
        bd.predict("after", timeout=5)
    assert all("dropped" not in b for b in fake.batches)


def test_no_thread_leaks_after_close_or_garbage_collection():
    baseline = threading.active_count()
    for _ in range(5):
        with BatchingDetector(FakeDetector(), max_batch=4, max_delay_ms=1) as bd:
            bd.predict("x", timeout=5)
    assert _threads_settle(baseline) == baseline
    bd = BatchingDetector(FakeDetector(), max_batch=4, max_delay_ms=1)
    bd.predict("x", timeout=5)
    assert threading.active_count() == baseline + 1
    del bd
    gc.collect()
    assert _threads_settle(baseline) == baseline


def test_interpreter_exit_with_open_batching_detector_is_clean(tmp_path):
    script = tmp_path / "exit_open.py"
    here = Path(__file__).resolve().parent
    script.write_text(
        f"import sys; sys.path[:0] = [{str(here)!r}, {str(here.parent)!r}]\n"
        "from test_batching import FakeDetector\n"
        "from cxrkit.batching import BatchingDetector\n"
        "bd = BatchingDetector(FakeDetector(), max_batch=4, max_delay_ms=1)\n"
        "futs = [bd.submit(f'e{i}') for i in range(50)]\n"
        "print(bd.predict('last', timeout=5).source)\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "last"


def test_owned_detector_is_built_from_a_name_and_closed(monkeypatch):
    import cxrkit.api

    made = {}

    def fake_from_pretrained(name, **kw):
        made.update(name=name, **kw)
        made["det"] = FakeDetector()
        return made["det"]

    monkeypatch.setattr(cxrkit.api.Detector, "from_pretrained", staticmethod(fake_from_pretrained))
    with BatchingDetector("some-model", max_batch=12, device="cpu") as bd:
        assert bd.predict("y", timeout=5).source == "y"
    assert made["name"] == "some-model" and made["batch_size"] == 12 and made["device"] == "cpu"
    assert made["det"].closed


def test_argument_errors():
    fake = FakeDetector()
    with pytest.raises(TypeError, match="already built"):
        BatchingDetector(fake, device="cuda")
    with pytest.raises(TypeError, match="needs a Detector"):
        BatchingDetector(42)
    for bad in ({"max_batch": 0}, {"max_delay_ms": -1}, {"max_queue": 0}):
        with pytest.raises(ValueError):
            BatchingDetector(fake, **bad)
    with BatchingDetector(fake) as bd:
        with pytest.raises(TypeError, match="one input"):
            bd.submit(["a.png", "b.png"])


def test_restamp_keeps_named_sources_and_renames_unnamed_ones():
    p = Prediction(source="<ndarray uint8 (4, 4) #3>", index=3)
    q = restamp(p, 3)
    assert q.source == "<ndarray uint8 (4, 4) #0>" and q.index == 0
    assert restamp(Prediction(source="a #3>", index=3), 3).source == "a #3>"  # a path stays a path
    assert restamp(Prediction(source="x.png", index=0), 0) is not None


def test_gathered_batch_runs_in_the_detectors_own_batch_size():
    gate = threading.Event()
    fake = FakeDetector(gate)
    fake.batch_size = 4
    with pytest.warns(UserWarning, match="batch_size=4"):
        bd = BatchingDetector(fake, max_batch=8, max_delay_ms=50)
    with bd:
        hold = bd.submit("hold")
        assert fake.started.wait(5)
        futs = [bd.submit(f"c{i}") for i in range(6)]
        gate.set()
        hold.result(5)
        assert [f.result(5).source for f in futs] == [f"c{i}" for i in range(6)]
    assert [len(b) for b in fake.batches] == [1, 6] and fake.batch_sizes == [1, 4]
