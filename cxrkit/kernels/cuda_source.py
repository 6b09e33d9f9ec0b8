"""The CUDA kernels' source as the run-time loader compiles it, and a direct NVRTC compile check.

``source()`` is the one translation unit that ``cxrkit.kernels._cuda`` hands to CuPy (``RawModule``,
which compiles it with NVRTC on first use); it lives here, free of CuPy, so that the same text can be
compiled without a GPU. ``nvrtc_compile`` calls NVRTC's C API through ctypes: NVRTC needs no driver
and no GPU (CuPy's own compile path refuses without a driver), so CI checks the run-time compile path
itself with the library from the ``nvidia-cuda-nvrtc`` wheel (``libnvrtc.so.13``).

Usage: ``python -m cxrkit.kernels.cuda_source [--arch compute_80 --arch compute_90] [-I DIR]``
exits non-zero when the library is missing or any architecture fails to compile.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

from ..errors import BackendUnavailableError

__all__ = ["SOURCES", "OPTIONS", "source", "find_nvrtc", "cuda_include_dirs", "nvrtc_compile", "NvrtcResult"]

SOURCES = ("localize.cu", "nms.cu")
OPTIONS = ("--std=c++17",)  # what _cuda.py passes to cupy.RawModule


def _source_dir() -> Path:
    here = Path(__file__).resolve()
    for d in (here.parents[2] / "csrc" / "cuda", here.parent / "cuda"):  # source tree, installed wheel
        if (d / "localize.cu").is_file():
            return d
    raise BackendUnavailableError("the CUDA kernel sources (csrc/cuda/*.cu) were not found next to cxrkit; reinstall cxrkit")


def source() -> str:
    """One translation unit: common.cuh inlined, then every kernel file (so CuPy's cache key covers all)."""
    d = _source_dir()
    common = (d / "common.cuh").read_text().replace("#pragma once", "")
    parts = [common]
    for name in SOURCES:
        parts.append(f"// ---- {name}\n" + (d / name).read_text().replace('#include "common.cuh"', ""))
    return "\n".join(parts)


def find_nvrtc() -> Path | None:
    """libnvrtc from the ``nvidia-cuda-nvrtc`` wheel (nvidia/cu13/lib), else from $CUDA_HOME/lib64."""
    cands: list[str] = []
    try:
        import nvidia  # namespace package of NVIDIA's wheels

        for root in nvidia.__path__:
            cands += sorted(glob.glob(os.path.join(root, "cu*", "lib", "libnvrtc.so.*")))
            cands += sorted(glob.glob(os.path.join(root, "cuda_nvrtc", "lib", "libnvrtc.so.*")))
    except ImportError:
        pass
    cuda = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cands += sorted(glob.glob(os.path.join(cuda, "lib64", "libnvrtc.so.*")))
    cands = [c for c in cands if "builtins" not in c and "alt" not in os.path.basename(c)]
    return Path(cands[0]) if cands else None


def cuda_include_dirs() -> list[Path]:
    """Where cuda_fp16.h is (the toolkit's include folder, as CuPy passes it at run time)."""
    out = []
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda_fp16.h").is_file():
            out.append(Path(base) / "include")
    try:
        import nvidia

        for root in nvidia.__path__:
            out += [Path(p).parent for p in glob.glob(os.path.join(root, "cu*", "include", "cuda_fp16.h"))]
    except ImportError:
        pass
    return list(dict.fromkeys(out))


class NvrtcResult(NamedTuple):
    arch: str
    ok: bool
    log: str
    ptx_bytes: int


def nvrtc_compile(src: str, arch: str, options: Sequence[str] = OPTIONS, include_dirs: Sequence[Path] = (),
                  lib: Path | None = None) -> NvrtcResult:
    """Compile ``src`` to PTX for ``arch`` (e.g. 'compute_90') with NVRTC's C API; no GPU needed."""
    path = lib or find_nvrtc()
    if path is None:
        raise BackendUnavailableError("NVRTC (libnvrtc.so) was not found: `pip install nvidia-cuda-nvrtc` "
                                      "(or set CUDA_HOME to a CUDA toolkit)")
    nv = ctypes.CDLL(str(path))
    prog = ctypes.c_void_p()
    rc = nv.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"cxrkit.cu", 0, None, None)
    if rc != 0:
        raise RuntimeError(f"nvrtcCreateProgram failed with status {rc}")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options),
                *(f"-I{d}".encode() for d in include_dirs)]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = nv.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(max(size.value, 1))
        nv.nvrtcGetProgramLog(prog, buf)
        ptx = ctypes.c_size_t(0)
        if rc == 0:
            nv.nvrtcGetPTXSize(prog, ctypes.byref(ptx))
        return NvrtcResult(arch, rc == 0, buf.value.decode(errors="replace").strip(), int(ptx.value))
    finally:
        nv.nvrtcDestroyProgram(ctypes.byref(prog))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrkit.kernels.cuda_source", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", action="append", help="compute_XX (repeatable; default compute_80 and compute_90)")
    ap.add_argument("-I", dest="include", action="append", default=[], help="extra include folder")
    a = ap.parse_args(argv)
    lib = find_nvrtc()
    if lib is None:
        print("nvrtc: FAIL libnvrtc not found; `pip install nvidia-cuda-nvrtc` (a test extra)", file=sys.stderr)
        return 1
    inc = [Path(p) for p in a.include] + cuda_include_dirs()
    src = source()
    status = 0
    for arch in a.arch or ["compute_80", "compute_90"]:
        r = nvrtc_compile(src, arch, include_dirs=inc, lib=lib)
        print(f"nvrtc: {'ok  ' if r.ok else 'FAIL'} csrc/cuda/*.cu as the run-time loader builds it ({arch}, {lib.name}, "
              f"PTX {r.ptx_bytes} B)" + (f"\n{r.log}" if r.log else ""))
        status |= not r.ok
    return status


if __name__ == "__main__":
    sys.exit(main())
