"""JPEG 2000 DICOM decode on the CPU: `cxrkit[fast]` (imagecodecs) vs pydicom's own plugins, same run.

Workload: the J2K DICOMs of ../shared/data (NEMA RG1 J2KR / J2KI, a 2128 x 2000 chest DX) when
present, plus N synthetic 2048² 12-bit lossless J2K DICOMs (``cxrkit.bench.write_dicom``). For each
file, interleaved and repeated (median): frame 0 decoded by pydicom (``pydicom.pixels.pixel_array``,
pylibjpeg-openjpeg: what cxrkit uses without the extra) and by ``cxrkit.io.dicom._j2k_imagecodecs``
(what cxrkit uses with it; multi-threaded OpenJPEG), asserting the two give the same array. Also
cxrkit's whole read of the file (``decode_pixels(load_item(path))``: header, decode, LUTs), which
takes the imagecodecs route when installed. The floor: none beyond the decoder itself (OpenJPEG
tier-1 decoding is the cost; the ratio is bounded by the threads imagecodecs may use, min(4, cores)).

    python benchmarks/bench_j2k_fast.py --synthetic 4 --repeat 3 --report j2k-fast
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

try:
    import cxrkit  # noqa: F401
except ImportError:  # run as a script from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHARED = Path(os.environ.get("CXRKIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
REAL = ["dicom/nema-rg1/RG1_J2KR.dcm", "dicom/nema-rg1/RG1_J2KI.dcm", "dicom/chest-dx-966-j2k.dcm"]


def _median_s(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(files: list[Path], repeat: int) -> list[dict]:
    import pydicom
    from pydicom.pixels import pixel_array

    from cxrkit.io import decode_pixels, load_item
    from cxrkit.io.dicom import _j2k_imagecodecs

    rows = []
    for path in files:
        ds = pydicom.dcmread(path)
        uid = str(ds.file_meta.TransferSyntaxUID)
        ref = pixel_array(ds, index=0)  # warm-up of both, and the equality check
        got = _j2k_imagecodecs(ds, uid)
        if got is None:
            rows.append({"file": path.name, "skipped": "imagecodecs declined this frame (pydicom decodes it)"})
            continue
        np.testing.assert_array_equal(got, ref)
        decode_pixels(load_item(str(path), 0))
        t_py, t_ic, t_cx = [], [], []
        for _ in range(repeat):  # interleaved, so load drifts hit both alike
            t_py.append(_median_s(lambda: pixel_array(ds, index=0), 1))
            t_ic.append(_median_s(lambda: _j2k_imagecodecs(ds, uid), 1))
            t_cx.append(_median_s(lambda: decode_pixels(load_item(str(path), 0)), 1))
        py, ic, cx = (statistics.median(t) * 1e3 for t in (t_py, t_ic, t_cx))
        rows.append({"file": path.name, "shape": list(ref.shape), "bits_stored": int(ds.BitsStored),
                     "transfer_syntax": uid, "pydicom_ms": round(py, 1), "imagecodecs_ms": round(ic, 1),
                     "speedup": round(py / ic, 2), "cxrkit_read_ms": round(cx, 1), "same_array": True})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synthetic", type=int, default=4, help="synthetic 2048² J2K DICOMs")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--report", metavar="NAME", help="also write benchmarks/reports/NAME.json (date, machine, code)")
    a = ap.parse_args(argv)
    try:
        import imagecodecs
    except ImportError:
        print("imagecodecs is not installed: pip install 'cxrkit[fast]'", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run_report import now_utc, write_report

    from cxrkit.bench import synthetic_radiograph, write_dicom

    started = now_utc()
    files = [SHARED / r for r in REAL if (SHARED / r).is_file()]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.synthetic):
            files.append(write_dicom(Path(tmp) / f"syn_j2k_{i}.dcm", synthetic_radiograph(a.size, i, bits=16) >> 4, j2k=True))
        rows = run(files, a.repeat)
    done = [r for r in rows if "speedup" in r]
    print(f"JPEG 2000 DICOM frame 0, median of {a.repeat}; cores={os.cpu_count()}; imagecodecs {imagecodecs.__version__} "
          f"threads min(4, cores)")
    print(f"{'file':28} {'shape':>11} {'pydicom ms':>11} {'imagecodecs ms':>15} {'speedup':>8} {'cxrkit read ms':>15}")
    for r in rows:
        if "speedup" not in r:
            print(f"{r['file']:28} {r['skipped']}")
            continue
        print(f"{r['file']:28} {'x'.join(map(str, r['shape'])):>11} {r['pydicom_ms']:11.1f} {r['imagecodecs_ms']:15.1f} "
              f"{r['speedup']:7.2f}x {r['cxrkit_read_ms']:15.1f}")
    total_py = sum(r["pydicom_ms"] for r in done)
    total_ic = sum(r["imagecodecs_ms"] for r in done)
    print(f"all {len(done)} files: {total_py:.0f} -> {total_ic:.0f} ms ({total_py / total_ic:.2f}x); same arrays")
    if a.report:
        summary = {"files": len(done), "pydicom_total_ms": round(total_py, 1), "imagecodecs_total_ms": round(total_ic, 1),
                   "speedup_total": round(total_py / total_ic, 2),
                   "speedup_range": [min(r["speedup"] for r in done), max(r["speedup"] for r in done)]}
        print(f"report: {write_report(a.report, {'summary': summary, 'rows': rows, 'repeat': a.repeat}, started)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
