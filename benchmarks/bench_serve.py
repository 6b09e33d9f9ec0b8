"""`cxrkit serve` under a real load generator (locust, headless) vs BatchingDetector in-process, same run.

Workload: 1024² synthetic radiograph-like JPEGs (q90, ~110 kB) with 1% corrupt inputs mixed in
(a truncated JPEG, a JPEG whose frame header says 0x0 pixels, a PNG with a broken IHDR, plain text), posted
back to back (closed loop) by 1, 8, 32 and 128 concurrent clients, R requests per level:
  - in-process: ``BatchingDetector(Detector)`` called from C client threads (``bd.predict(bytes)``),
    the ceiling the service chases (same model, max_batch, max_delay_ms, threads);
  - service:    ``cxrkit serve`` in its own process on 127.0.0.1, driven by locust (FastHttpUser,
    gevent) in another process with C users; both share this machine's cores.
Every answer is checked after the timed run: each good request's JSON equals
``Detector.predict([same bytes])[0].to_dict()`` (timings aside), each corrupt one got the 4xx of its
typed error. Throughput is measured over the steady part of each run (completions between the 10th
and 90th percentile of finish times), the same way for both modes; latency percentiles over the
requests that started and ended inside that window. The server's own /metrics (stage histograms,
batch sizes) and the CPU seconds of the server and of locust per request say where time goes.

    python benchmarks/bench_serve.py --clients 1 8 32 128 --requests 300 800 1600 2000 --markdown
    (needs cxrkit[serve] and locust: pip install 'cxrkit[serve,loadtest]'; localhost only; bounded
    by --requests per level and --max-seconds per locust run)
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import pickle
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import cxrkit
except ImportError:  # run as a script from a source checkout
    sys.path.insert(0, str(HERE.parent))
    import cxrkit

from bench_batching import make_images  # noqa: E402

from cxrkit.batching import BatchingDetector  # noqa: E402
from cxrkit.serve.http import status_for  # noqa: E402

CORRUPT_EVERY = 100  # 1% corrupt


@dataclass
class Run:
    mode: str
    clients: int
    requests: int
    img_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    statuses: dict[str, int]
    mismatched: int
    lost: int
    wrong_status: int
    cpu_ms_per_req: dict[str, float] = field(default_factory=dict)
    mean_batch: float = 0.0
    stages_ms: dict[str, float] = field(default_factory=dict)


def make_corrupt(good: bytes) -> list[bytes]:
    """Four broken inputs, each an InputError of its own kind for Detector."""
    from PIL import Image

    trunc = good[: len(good) // 3]  # a JPEG cut short
    sof = good.find(b"\xff\xc0")
    zero_size = good[: sof + 5] + b"\x00\x00\x00\x00" + good[sof + 9:]  # SOF0 height and width 0
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = b"\x00" * 8  # IHDR width/height 0
    text = b"name,age\nnot an image,42\n" * 20
    return [trunc, zero_size, bytes(png), text]


def expected(det: Any, payloads: Sequence[bytes]) -> tuple[list[dict], list[int]]:
    dicts, statuses = [], []
    for p in payloads:
        pred = det.predict([p])[0]
        d = pred.to_dict()
        d.pop("timings_ms", None)
        dicts.append(d)
        statuses.append(200 if pred.error is None else status_for(pred.error))
    return dicts, statuses


def schedule(n_good: int, n_corrupt: int, length: int) -> list[int]:
    out, g, c = [], itertools.cycle(range(n_good)), itertools.cycle(range(n_good, n_good + n_corrupt))
    for k in range(length):
        out.append(next(c) if k % CORRUPT_EVERY == CORRUPT_EVERY // 2 else next(g))
    return out


def steady(records: Sequence[tuple], requests: int) -> tuple[float, np.ndarray]:
    """Throughput over completions between the 10th and 90th percentile finish times; latencies (ms)
    of the requests inside that window."""
    ends = np.sort(np.array([r[4] for r in records]))
    if len(ends) < 10:
        lat = np.array([(r[4] - r[3]) * 1e3 for r in records])
        return (len(ends) / (ends[-1] - min(r[3] for r in records))) if len(ends) else 0.0, lat
    a, b = ends[int(0.1 * len(ends))], ends[int(0.9 * len(ends)) - 1]
    rate = (int(0.9 * len(ends)) - 1 - int(0.1 * len(ends))) / max(1e-9, b - a)
    lat = np.array([(r[4] - r[3]) * 1e3 for r in records if r[3] >= a and r[4] <= b])
    if len(lat) < 10:
        lat = np.array([(r[4] - r[3]) * 1e3 for r in records])
    return rate, lat


def summarize(mode: str, clients: int, requests: int, records: Sequence[tuple], exp_dicts: Sequence[dict],
              exp_status: Sequence[int]) -> Run:
    """records: (k, payload, status, t_start, t_end, body bytes or dict)."""
    rate, lat = steady(records, requests)
    statuses: dict[str, int] = {}
    mismatched = wrong = 0
    for _, i, st, _, _, body in records:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
        if st != exp_status[i]:
            wrong += 1
            continue
        if st == 503:
            continue
        d = json.loads(body) if isinstance(body, (bytes, bytearray)) else body
        d.pop("timings_ms", None)
        if d != exp_dicts[i]:
            mismatched += 1
    lost = requests - len(records) + statuses.get("0", 0)
    pct = np.percentile(lat, [50, 95, 99]) if len(lat) else [float("nan")] * 3
    return Run(mode, clients, requests, rate, float(pct[0]), float(pct[1]), float(pct[2]),
               dict(sorted(statuses.items())),
               mismatched, lost, wrong)


def _stage_means(dicts: Sequence[dict]) -> dict[str, float]:
    """Mean ms per image of each stage in Prediction.timings_ms (successful predictions)."""
    acc: dict[str, list[float]] = {}
    for d in dicts:
        if d.get("error") is None:
            for k, v in d.get("timings_ms", {}).items():
                acc.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def run_inprocess(bd: BatchingDetector, payloads: Sequence[bytes], sched: Sequence[int], clients: int,
                  requests: int) -> list[tuple]:
    records: list[tuple] = []
    lock = threading.Lock()
    counter = itertools.count()
    go = threading.Barrier(clients + 1)

    def client() -> None:
        go.wait()
        while True:
            with lock:
                k = next(counter)
            if k >= requests:
                return
            i = sched[k % len(sched)]
            t0 = time.time()
            pred = bd.predict(payloads[i], timeout=120)
            t1 = time.time()
            st = 200 if pred.error is None else status_for(pred.error)
            records.append((k, i, st, t0, t1, pred.to_dict()))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    go.wait()
    for t in threads:
        t.join()
    return records


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'(cxrkit_stage_seconds_(?:sum|count))\{stage="(\w+)"\} (\S+)', line)
        if m:
            out[f"{m[1]}:{m[2]}"] = float(m[3])
        m = re.match(r"(cxrkit_batch_size_(?:sum|count)) (\S+)", line)
        if m:
            out[m[1]] = float(m[2])
    return out


def run_locust(port: int, spec_path: str, clients: int, requests: int, max_seconds: int, server_pid: int,
               workdir: str) -> tuple[list[tuple], dict[str, float], float, float]:
    out = os.path.join(workdir, f"records_{clients}.pkl")
    env = dict(os.environ, CXRKIT_LOCUST_PAYLOADS=spec_path, CXRKIT_LOCUST_REQUESTS=str(requests),
               CXRKIT_LOCUST_OUT=out)
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locust_serve.py"), "--headless", "-u", str(clients),
           "-r", str(max(clients, 1)), "-t", f"{max_seconds}s", "--host", f"http://127.0.0.1:{port}",
           "--only-summary", "--stop-timeout", "30", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
    before = _metrics(port)
    srv0 = _cpu_s(server_pid)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max_seconds + 90)
    srv_cpu = _cpu_s(server_pid) - srv0
    after = _metrics(port)
    if p.returncode != 0:
        raise RuntimeError(f"locust exited {p.returncode}:\n{p.stderr[-3000:]}")
    with open(out, "rb") as f:
        got = pickle.load(f)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return got["records"], delta, srv_cpu, got["cpu_s"]


def run_inprocess_level(det: Any, a: argparse.Namespace, payloads: Sequence[bytes], sched: Sequence[int], c: int,
                        n: int, exp_dicts: Sequence[dict], exp_status: Sequence[int]) -> Run:
    with BatchingDetector(det, max_batch=a.max_batch, max_delay_ms=a.max_delay_ms, max_queue=a.max_queue) as bd:
        run_inprocess(bd, payloads, sched, c, min(n, 4 * c))  # warm-up
        s0, cpu0 = bd.stats(), time.process_time()
        rec = run_inprocess(bd, payloads, sched, c, n)
        cpu = time.process_time() - cpu0
        s1 = bd.stats()
    stages = _stage_means([x[5] for x in rec])
    r = summarize("in-process", c, n, rec, exp_dicts, exp_status)
    r.stages_ms = stages
    r.mean_batch = (s1["requests"] - s0["requests"]) / max(1, s1["batches"] - s0["batches"])
    r.cpu_ms_per_req = {"process": 1e3 * cpu / n}
    return r


def run_service_level(port: int, spec: str, a: argparse.Namespace, c: int, n: int, server_pid: int, work: str,
                      exp_dicts: Sequence[dict], exp_status: Sequence[int]) -> Run:
    rec, delta, srv_cpu, gen_cpu = run_locust(port, spec, c, n, a.max_seconds, server_pid, work)
    r = summarize("service", c, n, rec, exp_dicts, exp_status)
    r.mean_batch = delta.get("cxrkit_batch_size_sum", 0.0) / max(1.0, delta.get("cxrkit_batch_size_count", 0.0))
    r.stages_ms = {k.split(":")[1]: 1e3 * v / max(1.0, delta.get(k.replace("_sum", "_count"), 0.0))
                   for k, v in delta.items() if k.startswith("cxrkit_stage_seconds_sum")}
    r.cpu_ms_per_req = {"server": 1e3 * srv_cpu / n, "locust": 1e3 * gen_cpu / n}
    return r


def summarize_level(runs: Sequence[Run]) -> dict[str, Any]:
    """Medians over the repeats of one client level; ratios pair the k-th service run with the k-th in-process run."""
    ins = [r for r in runs if r.mode == "in-process"]
    svc = [r for r in runs if r.mode == "service"]
    ratios = [s.img_per_s / i.img_per_s for s, i in zip(svc, ins)]
    statuses: dict[str, int] = {}
    for r in svc:
        for k, v in r.statuses.items():
            statuses[k] = statuses.get(k, 0) + v

    def med(xs: Sequence[float]) -> float:
        return float(np.median(xs))

    return {"clients": runs[0].clients, "inproc": med([r.img_per_s for r in ins]),
            "service": med([r.img_per_s for r in svc]), "ratio": med(ratios), "ratios": ratios,
            "p50": med([r.p50_ms for r in svc]), "p95": med([r.p95_ms for r in svc]),
            "p99": med([r.p99_ms for r in svc]),
            "p99_over_p50": med([r.p99_ms / r.p50_ms for r in svc]), "statuses": dict(sorted(statuses.items())),
            "lost": sum(r.lost for r in runs), "mismatched": sum(r.mismatched for r in runs),
            "wrong": sum(r.wrong_status for r in runs)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch: int, max_delay_ms: float, max_queue: int,
                 log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cxrkit.cli", "serve", "--model", model, "--port", str(port), "--max-batch",
           str(max_batch), "--max-delay-ms", str(max_delay_ms), "--max-queue", str(max_queue)]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cxrkit serve exited {proc.returncode}; see {log_path}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("cxrkit serve did not become ready in 120 s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return -9


def fmt_row(r: Run) -> str:
    st = ", ".join(f"{k}: {v}" for k, v in r.statuses.items())
    cpu = " / ".join(f"{k} {v:.1f}" for k, v in r.cpu_ms_per_req.items())
    return (f"| {r.mode} | {r.clients} | {r.requests} | {r.img_per_s:.1f} | {r.p50_ms:.0f} | {r.p95_ms:.0f} | "
            f"{r.p99_ms:.0f} | {st} | {r.lost} / {r.mismatched} / {r.wrong_status} | {r.mean_batch:.1f} | {cpu} |")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cxr29-demo")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--requests", type=int, nargs="+", default=[300, 800, 1600, 2000],
                    help="requests per client level (one value, or one per --clients)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--images", type=int, default=24, help="distinct good JPEGs")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-delay-ms", type=float, default=5.0)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--max-seconds", type=int, default=120, help="locust -t bound per run")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each mode per client level, alternating which goes first; medians reported")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    a = ap.parse_args(argv)
    reqs = a.requests if len(a.requests) == len(a.clients) else [a.requests[0]] * len(a.clients)

    good = make_images(a.images, a.size)
    corrupt = make_corrupt(good[0])
    payloads = good + corrupt
    det = cxrkit.Detector.from_pretrained(a.model, batch_size=a.max_batch)
    exp_dicts, exp_status = expected(det, payloads)
    bad = [s for s in exp_status[len(good):] if not 400 <= s < 500]
    if bad or any(s != 200 for s in exp_status[: len(good)]):
        raise SystemExit(f"workload broken: corrupt statuses {exp_status[len(good):]}, "
                         f"good {set(exp_status[:len(good)])}")
    sched = schedule(len(good), len(corrupt), max(reqs))
    load0 = os.getloadavg()[0]
    t_start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(f"bench_serve: {t_start}, model={a.model} backend={det.backend_name} images={a.size}^2 JPEG q90 "
          f"({sum(map(len, good)) / len(good) / 1e3:.0f} kB), corrupt 1% ({len(corrupt)} kinds, expected statuses "
          f"{exp_status[len(good):]}), max_batch={a.max_batch} max_delay_ms={a.max_delay_ms:g} "
          f"max_queue={a.max_queue}, cpus={os.cpu_count()} ({platform.processor() or platform.machine()}), "
          f"loadavg(1m) {load0:.2f}", flush=True)

    work = tempfile.mkdtemp(prefix="bench_serve_")
    spec = os.path.join(work, "spec.pkl")
    with open(spec, "wb") as f:
        pickle.dump({"payloads": payloads, "expect_status": exp_status, "schedule": sched}, f)
    port = free_port()
    server = start_server(a.model, port, a.max_batch, a.max_delay_ms, a.max_queue, os.path.join(work, "server.log"))
    runs: list[Run] = []
    levels: list[dict[str, Any]] = []
    try:
        for j, (c, n) in enumerate(zip(a.clients, reqs)):
            for rep in range(a.repeats):
                order = ("in-process", "service") if (j + rep) % 2 == 0 else ("service", "in-process")
                for mode in order:
                    r = (run_inprocess_level(det, a, payloads, sched, c, n, exp_dicts, exp_status)
                         if mode == "in-process"
                         else run_service_level(port, spec, a, c, n, server.pid, work, exp_dicts, exp_status))
                    runs.append(r)
                    print(fmt_row(r), flush=True)
            level = summarize_level([x for x in runs if x.clients == c])
            levels.append(level)
            svc = [x for x in runs if x.mode == "service" and x.clients == c]
            print(f"  clients={c}: service/in-process throughput {level['ratio']:.2f}x (median of "
                  f"{', '.join(f'{x:.2f}' for x in level['ratios'])}); service p99/p50 {level['p99_over_p50']:.2f}; "
                  "server stages ms/image " + ", ".join(f"{k} {v:.2f}" for k, v in svc[-1].stages_ms.items()),
                  flush=True)
    finally:
        rc = stop_server(server)
        det.close()
    print(f"  server exit code after SIGTERM: {rc}; loadavg(1m) at end {os.getloadavg()[0]:.2f}; "
          f"finished {time.strftime('%H:%M:%S UTC', time.gmtime())}")
    if a.markdown:
        print("\n| clients | in-process img/s | service img/s | service / in-process | service p50 / p95 / p99 ms | "
              "p99 / p50 | service statuses (all runs) | lost / mismatched / wrong status |")
        print("|---|---|---|---|---|---|---|---|")
        for lv in levels:
            st = ", ".join(f"{k}: {v}" for k, v in lv["statuses"].items())
            print(f"| {lv['clients']} | {lv['inproc']:.1f} | {lv['service']:.1f} | {lv['ratio']:.2f} "
                  f"({', '.join(f'{x:.2f}' for x in lv['ratios'])}) | "
                  f"{lv['p50']:.0f} / {lv['p95']:.0f} / {lv['p99']:.0f} | "
                  f"{lv['p99_over_p50']:.2f} | {st} | {lv['lost']} / {lv['mismatched']} / {lv['wrong']} |")
        print("\n| mode | clients | requests | img/s (steady) | p50 ms | p95 ms | p99 ms | statuses | lost / "
              "mismatched / wrong status | mean batch | CPU ms per request |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in runs:
            print(fmt_row(r))
    if a.json:
        Path(a.json).write_text(json.dumps({"date": t_start, "loadavg_start": load0, "levels": levels,
                                            "runs": [asdict(r) for r in runs]}, indent=1))
    failed = sum(r.lost + r.mismatched + r.wrong_status for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
