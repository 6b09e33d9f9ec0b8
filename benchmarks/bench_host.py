"""Host work per image, with the network made free: this tree against a baseline tree, same run.

The network is replaced by a Runner registered in this script (not in the library) that replays
the outputs the cxr29-demo snapshot (tests/fixtures/host_path) gave for one batch of 64 real
radiographs, so what is timed is everything cxrkit's host does around the network: reading,
sniffing, preprocessing model-size inputs, the prefetch hand-off, localization (C++), mapping
back, assembling Predictions, and writing results. Rows (microseconds per image):

- predict u8 B=n:   ``Detector.predict`` on 256² uint8 arrays (model size: the resize is an
                    identity), batches of 1 / 8 / 64, 2,048 images (B=1: 256), wall time / image;
                    ``cpu``: the process's CPU time (all threads) / image, which other processes on
                    a shared machine disturb much less than the wall time;
- to_dict:          ``Prediction.to_dict()`` over those predictions;
- jsonl:            writing them as JSON lines to a file (old: ``json.dumps(p.to_dict())``; this
                    tree: ``cxrkit.results.write_jsonl``);
- read jpeg path:   ``load_item(path, keep_j2k_frame=True)`` of a 2048² JPEG file (page cache),
                    one call per image, as the issue measured it; and the Detector's read stage
                    over 64 such paths at once (``bulk``, this tree only);
- read small jpeg path: the same for the 256² JPEG files (~20 KB: the per-file cost without the copy);
- floor: copy:      copying a 2048² JPEG's bytes once (64 different buffers): the memory-bandwidth
                    floor of any read from the page cache;
- sniff jpeg/png:   ``load_item(bytes)`` of in-memory 2048² JPEG / PNG (sniff + header + guards);
- predict jpeg/png/path B=64: model-size JPEG / PNG bytes and JPEG files: includes the CPU
                    decode and the (identity) resize, so mostly decoder time on a CPU box.

- stage ...:        this tree only: CPU µs per image of each Detector stage run alone in one
                    thread (num_threads=1), batch 64 of the uint8 arrays: where the microseconds go.

Rows that run in one thread (to_dict, jsonl, read ... path, floor, sniff, stage) are that thread's
CPU time (``time.thread_time``, kernel time included); the others are wall time.

The baseline is the code before the change: a git worktree of that commit with a cxrkit._C built
or copied into it (``--baseline DIR``), run in a child process of its own; so is this tree; the
ratio is baseline / this tree. Floors: the copy row for reading a file (memory bandwidth); for
predict, the stage rows' numeric kernels (float32 normalisation of 65,536 pixels, the C++
localization of 29 heatmaps), which no change to the Python around them removes.

    python benchmarks/bench_host.py --baseline /work/baseline-13h --json host.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SNAPSHOT = REPO / "tests" / "fixtures" / "host_path" / "cxr29-demo-58145cf"
SHARED = Path(os.environ.get("CXRKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
BATCHES = (1, 8, 64)


# -- inputs ------------------------------------------------------------------------------------

def radiographs(n: int, size: int) -> list[np.ndarray]:
    """n gray uint8 size² radiographs: real NIH ChestX-ray14 images when ../shared/data is there,
    else cxrkit.synth backgrounds."""
    from PIL import Image

    files = sorted((SHARED / "nih14" / "images").glob("*.jpg"))[:n]
    if len(files) == n:
        return [np.asarray(Image.open(f).convert("L").resize((size, size), Image.BILINEAR)) for f in files]
    from cxrkit.synth.backgrounds import synthetic_background  # pragma: no cover - without shared data

    rng = np.random.default_rng(0)
    return [np.round(np.clip(synthetic_background(rng, (size, size)), 0, 1) * 255).astype(np.uint8) for _ in range(n)]


def encode(arr: np.ndarray, fmt: str) -> bytes:
    import io

    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="JPEG", quality=90) if fmt == "jpeg" else Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


# -- the child: one tree -----------------------------------------------------------------------

def _import_tree(tree: str | None):
    if tree:
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
        sys.path.insert(0, tree)
    import cxrkit

    return cxrkit


def _replay_backend(cxrkit, images: list[np.ndarray]) -> None:
    """Register backend "replay": the snapshot model's outputs for these 64 images, replayed."""
    from cxrkit.backends import register_backend
    from cxrkit.backends.base import Runner
    from cxrkit.io import load_item

    with cxrkit.Detector.from_pretrained(str(SNAPSHOT), batch_size=len(images), backend="onnxruntime") as det:
        pre = det.preprocessor.run([load_item(a, i) for i, a in enumerate(images)])
        rec = det.runner.infer(pre.batch)
    logits, heat = np.asarray(rec["logits"]), np.asarray(rec["heatmaps"])

    class Replay(Runner):
        name = "replay"

        def _load_impl(self) -> None:
            self._next = 0

        def _infer_impl(self, batch):
            n = int(batch.shape[0])
            s = self._next % (len(logits) - n + 1)
            self._next += n
            return {"logits": logits[s:s + n], "heatmaps": heat[s:s + n]}  # views: a device buffer's stand-in

    register_backend("replay", lambda: Replay, lambda d, p: None)


STAT = statistics.median  # or min (--best): the least disturbed repeat on a shared machine
CPU = time.thread_time  # single-threaded rows: this thread's CPU time, not disturbed by other processes


def _per_image(fn, n_images: int, repeats: int, clock=time.perf_counter) -> float:
    """STAT over repeats of the time of fn() per image, in microseconds."""
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    return STAT(ts) / n_images * 1e6


def _stages(cxrkit, images: list[np.ndarray], repeats: int) -> dict:
    """CPU µs per image of each stage of this tree's Detector, all in the calling thread
    (num_threads=1: no pools), batch 64 of model-size uint8 arrays: where the microseconds go."""
    from cxrkit._stages.assemble import assemble

    out = {}
    clk = CPU
    with cxrkit.Detector.from_pretrained(str(SNAPSHOT), backend="replay", batch_size=64, num_threads=1) as det:
        chunk = list(enumerate(images))
        read = det._reader.read(chunk)
        out["stage read (load_item)"] = _per_image(lambda: det._reader.read(chunk), 64, repeats, clk)
        out["stage preprocess"] = _per_image(lambda: det.preprocessor.run(read.loaded), 64, repeats, clk)
        prep = det._prepare(chunk)
        out["stage infer (replay)"] = _per_image(lambda: det.runner.infer(prep.batch), 64, repeats, clk)
        raw = det.runner.infer(prep.batch)
        out["stage localize"] = _per_image(lambda: det._inference.localize(raw, prep.transforms, False), 64,
                                           repeats, clk)
        inf = det._inference.run(prep.batch, prep.transforms, False)
        out["stage assemble"] = _per_image(lambda: assemble(prep, inf, "m"), 64, repeats, clk)
    return out


def child(tree: str | None, repeats: int) -> dict:
    cxrkit = _import_tree(tree)
    from cxrkit.backends import register_backend  # noqa: F401  (fails early on a broken tree)
    from cxrkit.io import load_item

    out: dict = {"cxrkit": str(Path(cxrkit.__file__).parent)}
    images = radiographs(64, 256)
    _replay_backend(cxrkit, images)
    big = radiographs(8, 2048)
    tmp = Path(tempfile.mkdtemp(prefix="bench_host_"))
    jpeg_paths = []
    for i in range(64):
        p = tmp / f"big{i:03d}.jpg"
        p.write_bytes(encode(big[i % len(big)], "jpeg"))
        jpeg_paths.append(str(p))
    small_paths = []
    for i, a in enumerate(images):
        p = tmp / f"small{i:03d}.jpg"
        p.write_bytes(encode(a, "jpeg"))
        small_paths.append(str(p))

    arrays = images * 32  # 2,048
    for b in BATCHES:
        items = arrays if b > 1 else arrays[:256]
        with cxrkit.Detector.from_pretrained(str(SNAPSHOT), backend="replay", batch_size=b) as det:
            out[f"predict u8 B={b}"] = _per_image(lambda: det.predict(items), len(items), repeats)
            out[f"predict u8 B={b} cpu"] = _per_image(lambda: det.predict(items), len(items), repeats, time.process_time)
            if b == 1:
                one = [images[0]]
                lat = sorted(_per_image(lambda: det.predict(one), 1, 1) for _ in range(200))
                out["predict u8 B=1 latency p50"] = lat[100]
            if b == 64:
                preds = det.predict(items)
                def to_dicts():  # each dict dropped after use, as a writer does (a list of 60k dicts
                    for p in preds:  # kept alive would time the garbage collector's passes over it)
                        p.to_dict()

                out["to_dict"] = _per_image(to_dicts, len(preds), repeats, CPU)
                write = _jsonl_writer(cxrkit)
                path = tmp / "out.jsonl"

                def jl():
                    with open(path, "w") as f:
                        write(preds, f)

                out["jsonl"] = _per_image(jl, len(preds), repeats, CPU)
                encoded = {"jpeg": [encode(a, "jpeg") for a in images] * 4, "png": [encode(a, "png") for a in images] * 4}
                for fmt, data in encoded.items():
                    out[f"predict {fmt} B=64"] = _per_image(lambda: det.predict(data), len(data), max(1, repeats // 2))
                paths = small_paths * 4
                out["predict path B=64"] = _per_image(lambda: det.predict(paths), len(paths), max(1, repeats // 2))
                reader = getattr(det, "_reader", None)
                if reader is not None:
                    chunk = list(enumerate(jpeg_paths))
                    out["read jpeg path bulk"] = _per_image(lambda: reader.read(chunk), len(chunk), repeats)
    out["read jpeg path"] = _per_image(
        lambda: [load_item(p, i, keep_j2k_frame=True) for i, p in enumerate(jpeg_paths)], len(jpeg_paths), repeats,
        CPU)
    out["read small jpeg path"] = _per_image(
        lambda: [load_item(p, i, keep_j2k_frame=True) for i, p in enumerate(small_paths)], len(small_paths), repeats,
        CPU)
    # the floor of reading a file that is in the page cache: copying its bytes once (memory bandwidth)
    size = int(np.mean([os.path.getsize(p) for p in jpeg_paths]))
    src = [np.frombuffer(os.urandom(size), np.uint8) for _ in range(64)]
    dst = [np.empty(size, np.uint8) for _ in range(64)]
    out["floor: copy one 2048² jpeg"] = _per_image(lambda: [np.copyto(d, x) for d, x in zip(dst, src)], 64, repeats,
                                                   CPU)
    out["floor: file bytes (KiB)"] = size / 1024
    for fmt in ("jpeg", "png"):
        data = [encode(a, fmt) for a in big]
        out[f"sniff {fmt} bytes"] = _per_image(lambda: [load_item(d, i) for i, d in enumerate(data)], len(data),
                                               repeats * 20, CPU)
    if hasattr(cxrkit, "_stages") or Path(cxrkit.__file__).with_name("_stages").is_dir():
        out.update(_stages(cxrkit, images, repeats))
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return out


def _jsonl_writer(cxrkit):
    try:
        from cxrkit.results import write_jsonl

        return write_jsonl
    except ImportError:  # the baseline: what `cxrkit predict` did
        def write(preds, f):
            for p in preds:
                f.write(json.dumps(p.to_dict()) + "\n")

        return write


# -- the parent: both trees, the table ---------------------------------------------------------

def run_tree(tree: str | None, repeats: int, best: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "--repeats", str(repeats)] + (["--tree", tree] if tree else [])
    cmd += ["--best"] if best else []
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


TARGETS = {"predict u8 B=64": 50.0, "to_dict": 20.0, "read jpeg path": 30.0, "read jpeg path bulk": 30.0,
           "sniff jpeg bytes": 10.0, "sniff png bytes": 10.0, "predict u8 B=1 latency p50": 300.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", help="a checkout of the code before the change (with its cxrkit._C)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--best", action="store_true", help="report the fastest repeat instead of the median")
    ap.add_argument("--json", help="write both trees' figures here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    global STAT
    if a.best:
        STAT = min
    if a.child:
        print(json.dumps(child(a.tree, a.repeats)))
        return 0
    new = run_tree(None, a.repeats, a.best)
    old = run_tree(a.baseline, a.repeats, a.best) if a.baseline else {}
    print(f"# host µs per image ({'best' if a.best else 'median'} of {a.repeats}), network replayed; "
          f"{platform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, python "
          f"{platform.python_version()}; baseline {old.get('cxrkit', '-')}, this tree {new['cxrkit']}")
    print(f"{'row':28s} {'baseline':>10s} {'this tree':>10s} {'ratio':>7s} {'target':>7s}")
    for k, v in new.items():
        if k == "cxrkit":
            continue
        o = old.get(k)
        ratio = f"{o / v:6.2f}x" if o else "      -"
        t = TARGETS.get(k)
        print(f"{k:28s} {o if o is not None else float('nan'):10.1f} {v:10.1f} {ratio} "
              f"{'<= ' + format(t, 'g') if t else '':>7s}")
    if a.json:
        Path(a.json).write_text(json.dumps({"baseline": old, "new": new}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
