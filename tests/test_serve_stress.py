"""`cxrkit serve` under stress, against real uvicorn processes: a full queue (503 + Retry-After),
readiness while loading and saturated, a client that disconnects (its queued image never runs),
SIGTERM draining in-flight work, the drain deadline (queued images get 503), a failed model load.

The server is tests/serve_gated.py: the real runner, Detector and cxr-probe model, with each batch
(max_batch=1) held at a gate file until the test opens it, so queue states are exact, not timed.
"""

from __future__ import annotations

import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from probe_images import png_bytes, probe_image, strip_timings  # noqa: E402
from serve_util import start, wait_until  # noqa: E402


def _png(seed: int) -> bytes:
    return png_bytes(probe_image(200, 240, [64, 115], seed=seed))


def _gated(tmp_path, *extra: str, wait: str = "/readyz"):
    gate = tmp_path / "gate"
    gate.mkdir()
    srv = start(["tests/serve_gated.py", "--gate-dir", str(gate), *extra], tmp_path / "server.log", wait=wait)
    return srv, gate


def _entered(gate) -> int:
    p = gate / "entered"
    return len(p.read_text().split()) if p.exists() else 0


def _ran(gate) -> list[int]:
    p = gate / "ran"
    return [int(x) for x in p.read_text().split()] if p.exists() else []


def _metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``, read from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _refused(url: str) -> bool:
    """True once a new connection is refused. A probe that connected an instant before the listener
    closed is reset by the kernel (it sat in the listen backlog; no response is served): not yet
    an answer, so the caller polls again."""
    try:
        httpx.get(url + "/healthz", timeout=5)
    except httpx.ConnectError:
        return True
    except (httpx.ReadError, httpx.RemoteProtocolError):
        return False
    return False


def _post(url: str, data: bytes, timeout: float = 60.0) -> httpx.Response:
    return httpx.post(url + "/v1/predict", content=data, timeout=timeout)


def _queue_depth(url: str) -> int:
    return httpx.get(url + "/readyz", timeout=10).json()["queue_depth"]


def test_queue_full_gets_503_with_retry_after_and_readyz_says_saturated(tmp_path):
    srv, gate = _gated(tmp_path, "--max-queue", "2")
    pool = ThreadPoolExecutor(4)
    try:
        first = pool.submit(_post, srv.url, _png(0))
        wait_until(lambda: _entered(gate) == 1, what="the first batch to start")
        queued = [pool.submit(_post, srv.url, _png(i)) for i in (1, 2)]
        wait_until(lambda: _queue_depth(srv.url) == 2, what="two queued requests")
        r = httpx.get(srv.url + "/readyz", timeout=10)
        assert r.status_code == 503 and "queue saturated" in r.json()["reason"]
        assert httpx.get(srv.url + "/healthz", timeout=10).status_code == 200  # alive, just busy
        r = _post(srv.url, _png(3))
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "QueueFullError" and "queue is full" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
        (gate / "open").touch()
        for f in [first, *queued]:
            assert f.result(60).status_code == 200
        assert _ran(gate) == [1, 1, 1]  # the refused request never ran
        assert httpx.get(srv.url + "/readyz", timeout=10).status_code == 200
        assert _metric(srv.url, "cxrkit_serve_errors_total", type="QueueFullError") == 1
    finally:
        (gate / "open").touch()
        pool.shutdown(wait=True)
        assert srv.stop() == 0, srv.output()[-2000:]


def test_readyz_and_predict_while_the_model_loads(tmp_path):
    srv, gate = _gated(tmp_path, "--hold-load", wait="/healthz")
    try:
        r = httpx.get(srv.url + "/readyz", timeout=10)
        assert r.status_code == 503 and r.json()["reason"] == "loading the model"
        r = _post(srv.url, _png(0))
        assert r.status_code == 503 and r.json()["error"]["type"] == "ModelLoading" and "retry-after" in r.headers
        assert httpx.get(srv.url + "/v1/models", timeout=10).json()["models"][0]["loaded"] is False
        (gate / "open").touch()
        wait_until(lambda: httpx.get(srv.url + "/readyz", timeout=10).status_code == 200, what="ready")
        assert _post(srv.url, _png(0)).status_code == 200
    finally:
        (gate / "open").touch()
        assert srv.stop() == 0, srv.output()[-2000:]


def test_client_disconnect_cancels_its_queued_image(tmp_path):
    """A client that hangs up while its image waits in the queue: the image is never run, the drop
    is counted, and the server goes on serving."""
    srv, gate = _gated(tmp_path, "--max-queue", "4")
    pool = ThreadPoolExecutor(2)
    try:
        first = pool.submit(_post, srv.url, _png(0))
        wait_until(lambda: _entered(gate) == 1, what="the first batch to start")
        data = _png(1)
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        wait_until(lambda: _queue_depth(srv.url) == 1, what="the second request to queue")
        s.close()  # the client goes away
        wait_until(lambda: _metric(srv.url, "cxrkit_serve_dropped_total", reason="disconnect_queued") == 1,
                   what="the server to notice the disconnect")
        assert _queue_depth(srv.url) == 0
        (gate / "open").touch()
        assert first.result(60).status_code == 200
        assert _post(srv.url, _png(2)).status_code == 200
        assert _ran(gate) == [1, 1]  # the first and the last: the abandoned image never reached the model
        assert _metric(srv.url, "cxrkit_serve_errors_total", type="ClientDisconnected") == 1
        # a client that goes away halfway through sending its body: nothing is queued, the drop is counted
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(data) + data[:100])
        wait_until(lambda: _metric(srv.url, "cxrkit_serve_in_flight") >= 2, what="the upload to start")
        s.close()
        wait_until(lambda: _metric(srv.url, "cxrkit_serve_errors_total", type="ClientDisconnected") == 2,
                   what="the server to notice the half-sent body")
        assert _ran(gate) == [1, 1] and _queue_depth(srv.url) == 0
    finally:
        (gate / "open").touch()
        pool.shutdown(wait=True)
        srv.stop()


def test_sigterm_drains_in_flight_requests(tmp_path):
    """SIGTERM with one batch running and two requests queued: all three get their results, then the
    process exits 0, well within the drain deadline."""
    srv, gate = _gated(tmp_path, "--max-queue", "4", "--drain-timeout", "30")
    pool = ThreadPoolExecutor(3)
    try:
        imgs = [_png(i) for i in range(3)]
        futs = [pool.submit(_post, srv.url, imgs[0])]
        wait_until(lambda: _entered(gate) == 1, what="the first batch to start")
        futs += [pool.submit(_post, srv.url, im) for im in imgs[1:]]
        wait_until(lambda: _queue_depth(srv.url) == 2, what="two queued requests")
        t0 = time.monotonic()
        srv.proc.send_signal(15)
        wait_until(lambda: "draining" in srv.output(), what="the drain to start")
        wait_until(lambda: _refused(srv.url), what="the listener to close (no new connections while draining)")
        (gate / "open").touch()
        res = [f.result(60) for f in futs]
        assert [r.status_code for r in res] == [200, 200, 200]
        assert [r.json()["source"] for r in res] == [f"<bytes {len(im)} B #0>" for im in imgs]
        assert srv.proc.wait(30) == 0
        assert time.monotonic() - t0 < 30
        assert _ran(gate) == [1, 1, 1]
    finally:
        (gate / "open").touch()
        pool.shutdown(wait=True)
        srv.stop()


def test_drain_deadline_gives_queued_requests_503_and_finishes_the_running_batch(tmp_path):
    srv, gate = _gated(tmp_path, "--max-queue", "4", "--drain-timeout", "1")
    pool = ThreadPoolExecutor(2)
    try:
        running = pool.submit(_post, srv.url, _png(0))
        wait_until(lambda: _entered(gate) == 1, what="the first batch to start")
        queued = pool.submit(_post, srv.url, _png(1))
        wait_until(lambda: _queue_depth(srv.url) == 1, what="a queued request")
        srv.proc.send_signal(15)
        r = queued.result(30)  # answered at the deadline, while the running batch still waits at the gate
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "DetectorClosedError" and "retry-after" in r.headers
        assert not running.done()
        (gate / "open").touch()
        assert running.result(30).status_code == 200
        assert srv.proc.wait(30) == 0
        assert _ran(gate) == [1]
        assert "drain deadline (1.0 s) passed: 1 queued image(s) get 503" in srv.output()
    finally:
        (gate / "open").touch()
        pool.shutdown(wait=True)
        srv.stop()


def test_results_under_concurrency_equal_detector_predict(tmp_path):
    """16 concurrent clients through batches of up to 4: every answer is its own image's Prediction."""
    import cxrkit

    srv, gate = _gated(tmp_path, "--max-queue", "64", "--max-batch", "4", "--max-delay-ms", "20")
    (gate / "open").touch()
    imgs = [png_bytes(probe_image(180 + 8 * i, 220, [64 + 25 * (i % 6)], seed=i)) for i in range(16)]
    try:
        with cxrkit.Detector.from_pretrained("cxr-probe") as det:
            expected = [strip_timings(det.predict([im])[0].to_dict()) for im in imgs]
        with ThreadPoolExecutor(16) as pool:
            res = list(pool.map(lambda im: _post(srv.url, im), imgs * 2))
        for r, exp in zip(res, expected * 2):
            assert r.status_code == 200
            assert strip_timings(r.json()) == exp
        assert max(_ran(gate)) > 1  # batches really formed
    finally:
        assert srv.stop() == 0, srv.output()[-2000:]


def test_a_model_that_fails_to_load_ends_the_process_with_exit_1(tmp_path):
    import subprocess

    from serve_util import REPO, free_port

    p = subprocess.run([sys.executable, "-m", "cxrkit.cli", "serve", "--model", "cxr-probe", "--backend", "nosuch",
                        "--port", str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "the model failed to load" in p.stderr and "nosuch" in p.stderr
    p = subprocess.run([sys.executable, "-m", "cxrkit.cli", "serve", "--model", "no-such-model",
                        "--port", str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "no model 'no-such-model'" in p.stderr


def test_batch_observer_sees_every_batch():
    """BatchingDetector.add_batch_observer (the hook the service's metrics use), in process."""
    import threading

    from cxrkit.batching import BatchingDetector
    from cxrkit.results import Prediction

    class Fake:
        def predict(self, items, batch_size=None, return_heatmaps=False):
            if "boom" in items:
                raise RuntimeError("device fell over")
            return [Prediction(source=str(x), index=i) for i, x in enumerate(items)]

    seen: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def obs(n: int, seconds: float, failed: bool) -> None:
        assert seconds >= 0
        with lock:
            seen.append((n, failed))

    def broken(n: int, seconds: float, failed: bool) -> None:
        raise ValueError("a metrics bug")

    with BatchingDetector(Fake(), max_batch=4, max_delay_ms=0) as bd:
        bd.add_batch_observer(broken)  # its exception is logged, the worker goes on
        bd.add_batch_observer(obs)
        assert bd.predict("a").source == "a"
        with pytest.raises(Exception, match="device fell over"):
            bd.predict("boom")
        assert bd.predict("b").source == "b"
    assert seen == [(1, False), (1, True), (1, False)]
    assert np.sum([n for n, _ in seen]) == 3


def test_a_cancelled_request_frees_its_queue_slot_at_once():
    """What the service relies on when a client disconnects (BatchingDetector, in process)."""
    import threading

    from cxrkit.batching import BatchingDetector
    from cxrkit.errors import QueueFullError
    from cxrkit.results import Prediction

    gate = threading.Event()
    ran: list[list] = []

    class Held:
        def predict(self, items, batch_size=None, return_heatmaps=False):
            ran.append(list(items))
            assert gate.wait(10)
            return [Prediction(source=str(x), index=i) for i, x in enumerate(items)]

    with BatchingDetector(Held(), max_batch=1, max_delay_ms=0, max_queue=1) as bd:
        hold = bd.submit("hold")
        wait_until(lambda: ran == [["hold"]], what="the first batch")
        gone = bd.submit("gone")
        with pytest.raises(QueueFullError):
            bd.submit("refused")
        assert gone.cancel() and bd.queue_depth() == 0
        kept = bd.submit("kept")  # the slot is free again
        gate.set()
        assert hold.result(10).source == "hold" and kept.result(10).source == "kept"
    assert ran == [["hold"], ["kept"]]
