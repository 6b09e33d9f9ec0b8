"""The DICOM node against BatchingDetector alone, same run, same images, same model.

Workload: N chest CR DICOMs (12-bit, uncompressed, ``--size``^2, made from a real NIH radiograph
with a per-image shift and noise, unique UIDs) dealt into C client folders (``--clients 1,4``:
each count is a separate run).

    baseline   BatchingDetector(model, max_batch, max_delay_ms); C client threads, each predicting
               its folder's files one after another (``bd.predict(path)``): what the library does
               without any DICOM networking.
    node       ``cxrkit.dicom.DicomNode`` on localhost; C concurrent DCMTK ``storescu`` processes,
               one association each, send the same folders; timed from the first storescu start to
               the journal having every instance finished. With outputs, they are forwarded by
               C-STORE to a DCMTK ``storescp``.
    in-process the baseline plus ``make_outputs`` (same kinds, encoded to bytes) in the client
               threads: the library doing the node's work without the network, for the runs
               with outputs.

Prints images/s, the ratios node / baseline and node / in-process, and the floor it chases:
``Detector.predict`` on already-read images in full batches from one thread (no decode, no
queueing, no network), which neither can beat. Every node run checks that every sent SOP Instance
UID is in the journal as done (nothing lost).

    python benchmarks/bench_dicom_node.py --images 200 --clients 1,4 --size 1024 --outputs none,sr,sr+gsps+sc
    python benchmarks/bench_dicom_node.py --clients 1,4 --outputs none --receivers thread,process
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:
    import cxrkit  # noqa: F401
except ImportError:  # run as a script from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cxrkit.batching import BatchingDetector

SHARED = Path(os.environ.get("CXRKIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CR = "1.2.840.10008.5.1.4.1.1.1"


def dcmtk(name: str) -> str:
    """DCMTK's ``name`` (pynetdicom installs Python apps with the same names into venvs)."""
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        exe = os.path.join(d, name)
        if os.access(exe, os.X_OK):
            r = subprocess.run([exe, "--version"], capture_output=True, text=True)
            if "dcmtk" in (r.stdout + r.stderr).lower():
                return exe
    raise SystemExit(f"DCMTK's {name} is needed: apt-get install -y dcmtk")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_series(root: Path, clients: int, per_client: int, size: int) -> list[list[Path]]:
    import pydicom
    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    src = SHARED / "torchxrayvision" / "00000001_000.png"
    if src.is_file():
        base = np.asarray(Image.open(src).convert("L").resize((size, size), Image.BILINEAR), np.float32) * 16
    else:  # no shared data: a smooth synthetic field
        y, x = np.mgrid[0:size, 0:size] / size
        base = (0.3 + 0.4 * np.sin(3 * x) * np.cos(2 * y)).astype(np.float32) * 4095
    rng = np.random.default_rng(0)
    study = generate_uid()
    folders: list[list[Path]] = []
    for c in range(clients):
        d = root / f"client{c}"
        d.mkdir(parents=True)
        files = []
        for i in range(per_client):
            px = np.clip(np.roll(base, int(rng.integers(-16, 16)), axis=1) + rng.normal(0, 20, base.shape), 0, 4095)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CR, generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID, ds.SOPInstanceUID = CR, meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
            ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
            ds.PatientID, ds.PatientName, ds.StudyDate = f"BENCH{c}", "Bench^Patient", "20260101"
            ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = size, size, 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelSpacing = [0.35 * 1024 / size] * 2
            ds.PixelData = px.astype(np.uint16).tobytes()
            p = d / f"{i:04d}.dcm"
            ds.save_as(p, enforce_file_format=True)
            files.append(p)
        folders.append(files)
    _ = pydicom
    return folders


def split(files: Sequence[Path], clients: int, root: Path) -> list[list[Path]]:
    """``files`` dealt round-robin into ``clients`` folders (hard links), one per storescu."""
    folders: list[list[Path]] = [[] for _ in range(clients)]
    for i, f in enumerate(files):
        d = root / f"client{i % clients}"
        d.mkdir(parents=True, exist_ok=True)
        os.link(f, d / f.name)
        folders[i % clients].append(d / f.name)
    return folders


def run_baseline(bd: BatchingDetector, folders: Sequence[Sequence[Path]], kinds: tuple[str, ...]) -> float:
    """images/s of C client threads, each predicting (and, with ``kinds``, making and encoding
    outputs for) its files."""
    import pydicom

    from cxrkit.dicom import make_outputs

    errors: list[str] = []

    def client(files: Sequence[Path]) -> None:
        for f in files:
            p = bd.predict(str(f))
            if p.error is not None:
                errors.append(str(p.error))
            elif kinds:  # made and encoded, as the node must do to send them
                for ds in make_outputs(p, str(f), kinds=kinds).datasets():
                    pydicom.dcmwrite(io.BytesIO(), ds, enforce_file_format=True)

    threads = [threading.Thread(target=client, args=(fs,)) for fs in folders]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"baseline errors: {errors[:3]}")
    return sum(len(fs) for fs in folders) / dt


def run_node(bd: BatchingDetector, folders: Sequence[Sequence[Path]], kinds: tuple[str, ...], tmp: Path,
             max_queue: int, receiver: str = "thread") -> tuple[float, dict[str, Any]]:
    from cxrkit.dicom import DicomNode

    storescu = dcmtk("storescu")
    scp = None
    forward: list[str] = []
    received = tmp / f"received-{'-'.join(kinds) or 'none'}"
    if kinds:
        received.mkdir()
        port = free_port()
        scp = subprocess.Popen([dcmtk("storescp"), "--fork", "-aet", "STORESCP", "-od", str(received), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        forward = [f"127.0.0.1:{port}:STORESCP"]
    node = DicomNode(bd, host="127.0.0.1", port=0, outputs=kinds, forward=forward, max_queue=max_queue,
                     receiver=receiver).start()
    try:
        t0 = time.perf_counter()
        procs = [subprocess.Popen([storescu, "+sd", "-aet", f"SCU{c}", "-aec", "CXRKIT", "127.0.0.1", str(node.port),
                                   str(fs[0].parent)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c, fs in enumerate(folders)]
        for p in procs:
            out, _ = p.communicate()
            if p.returncode:
                raise SystemExit(f"storescu failed: {out[-2000:]}")
        if not node.wait_idle(timeout=3600):
            raise SystemExit("the node did not finish")
        dt = time.perf_counter() - t0
        stats = node.stats()
    finally:
        report = node.stop()
        if scp is not None:
            scp.terminate()
            scp.wait()
    entries = node.journal.entries()
    n = sum(len(fs) for fs in folders)
    done = sum(e.status == "done" for e in entries)
    if len(entries) != n or done != n or report.unfinished:
        raise SystemExit(f"node accounted {len(entries)} of {n}, done {done}: {node.journal.counts()}")
    if kinds:
        n_out = len(list(received.iterdir()))
        if n_out != n * len(kinds):
            raise SystemExit(f"storescp received {n_out} outputs, expected {n * len(kinds)}")
        shutil.rmtree(received)
    return n / dt, stats


def floor_rate(bd: BatchingDetector, folders: Sequence[Sequence[Path]], batch: int) -> float:
    import pydicom

    from cxrkit.io import load_item

    imgs = [load_item(pydicom.dcmread(f), 0) for f in folders[0][:batch]]
    det = bd.detector
    det.predict(imgs, batch_size=batch)
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        det.predict(imgs, batch_size=batch)
    return reps * len(imgs) / (time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cxr29-demo")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--clients", default="4", help="comma-separated client counts (threads / associations), e.g. 1,4")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-delay-ms", type=float, default=20.0)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--outputs", default="none,sr+gsps+sc", help="comma-separated runs; each a '+'-joined set of "
                    "sr/gsps/sc, or 'none'")
    ap.add_argument("--receivers", default="thread", help="comma-separated DicomNode receivers to run: thread "
                    "(pynetdicom in the detector's process), process (pynetdicom in a process of its own)")
    ap.add_argument("--repeat", type=int, default=1, help="passes of baseline and node runs, interleaved; medians")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.ERROR)
    runs = [tuple(k for k in r.split("+") if k and k != "none") for r in a.outputs.split(",")]
    client_counts = [int(c) for c in a.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="cxrkit-bench-node-"))
    try:
        (all_files,) = make_series(tmp / "in", 1, a.images, a.size)
        n = len(all_files)
        bd = BatchingDetector(a.model, max_batch=a.max_batch, max_delay_ms=a.max_delay_ms, max_queue=4 * a.max_queue)
        run_baseline(bd, [all_files[:8]], ())  # warm-up
        floor = floor_rate(bd, [all_files], a.max_batch)
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {n} CR images {a.size}^2 "
              f"12-bit uncompressed, model {a.model}, max_batch {a.max_batch}, max_delay_ms {a.max_delay_ms:g}")
        print(f"floor    Detector.predict on read images, batches of {a.max_batch}: {floor:7.1f} img/s")
        results: dict[str, Any] = {"images": n, "size": a.size, "model": a.model, "floor_img_s": floor, "runs": []}
        receivers = a.receivers.split(",")
        for clients in client_counts:
            folders = split(all_files, clients, tmp / f"c{clients}")
            for kinds in runs:
                label = "+".join(kinds) or "none"
                bases: list[float] = []
                inprocs: list[float] = []
                nodes: dict[str, list[float]] = {r: [] for r in receivers}
                stats: dict[str, dict[str, Any]] = {}
                for rep in range(a.repeat):  # interleaved, so that drifts of a shared box hit all alike
                    bases.append(run_baseline(bd, folders, ()))
                    inprocs.append(run_baseline(bd, folders, kinds) if kinds else bases[-1])
                    for receiver in receivers:
                        rate, stats[receiver] = run_node(bd, folders, kinds, tmp, a.max_queue, receiver)
                        nodes[receiver].append(rate)
                    print(f"  pass {rep + 1}: baseline {bases[-1]:6.1f}" + (f", in-process {inprocs[-1]:6.1f}" if kinds else "")
                          + "".join(f", node[{r}] {nodes[r][-1]:6.1f}" for r in receivers) + " img/s", flush=True)
                base, inproc = float(np.median(bases)), float(np.median(inprocs))
                print(f"baseline BatchingDetector, {clients} client thread(s):         {base:7.1f} img/s"
                      + (f" (median of {a.repeat})" if a.repeat > 1 else ""))
                for receiver in receivers:
                    rate = float(np.median(nodes[receiver]))
                    rel = rate / base
                    line = (f"node     {clients} association(s), receiver={receiver:<7} outputs={label:<11} {rate:7.1f} img/s"
                            f"  node/baseline {rel:5.2f}")
                    if a.repeat > 1:
                        line += f" (per pass {min(n / b for n, b in zip(nodes[receiver], bases)):.2f}-" \
                                f"{max(n / b for n, b in zip(nodes[receiver], bases)):.2f})"
                    if kinds:
                        line += f"  (in-process baseline+outputs {inproc:6.1f} img/s, node/in-process {rate / inproc:5.2f})"
                    print(line, flush=True)
                    results["runs"].append({"clients": clients, "outputs": label, "receiver": receiver,
                                            "baseline_img_s": base, "node_img_s": rate, "node_over_baseline": rel,
                                            "inprocess_img_s": inproc, "node_over_inprocess": rate / inproc,
                                            "passes": {"baseline": bases, "node": nodes[receiver]},
                                            "journal": {k: v for k, v in stats[receiver].items() if isinstance(v, int)}})
        bd.close()
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
