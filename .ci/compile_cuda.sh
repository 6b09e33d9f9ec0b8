#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu for sm_80 and sm_90 with nvcc, and (when the NVRTC library is
# found) once more through NVRTC as CuPy does at run time. Non-zero exit on any error.
# Usage: bash .ci/compile_cuda.sh            (PTXAS_VERBOSE=1 prints registers / shared memory)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "compile_cuda: nvcc not found, skipping the CUDA compile check"
  exit 0
fi
extra=()
if [[ "${PTXAS_VERBOSE:-0}" == "1" ]]; then extra=(-Xptxas -v); fi
status=0
for cu in csrc/cuda/*.cu; do
  for arch in sm_80 sm_90; do
    if nvcc -c -arch="$arch" --std=c++17 -Werror all-warnings "${extra[@]}" -o /dev/null "$cu"; then
      echo "compile_cuda: ok   $cu ($arch, nvcc)"
    else
      echo "compile_cuda: FAIL $cu ($arch, nvcc)"
      status=1
    fi
  done
done
# NVRTC: the same single translation unit that cxrkit/kernels/_cuda.py hands to CuPy.
python3 - <<'PY' || status=1
import ctypes, ctypes.util, glob, os, re, sys
from pathlib import Path
cuda = Path(os.environ.get("CUDA_HOME", os.environ.get("CUDA_PATH", "/usr/local/cuda")))
cands = sorted(glob.glob(str(cuda / "lib64" / "libnvrtc.so*"))) + [ctypes.util.find_library("nvrtc") or ""]
cands = [c for c in cands if c and "builtins" not in c and "alt" not in c]
if not cands:
    print("compile_cuda: NVRTC library not found, skipping the NVRTC check")
    sys.exit(0)
lib = ctypes.CDLL(cands[0])
d = Path("csrc/cuda")
src = (d / "common.cuh").read_text().replace("#pragma once", "")
for name in ("localize.cu", "nms.cu"):
    src += "\n" + (d / name).read_text().replace('#include "common.cuh"', "")
ok = True
for arch in ("compute_80", "compute_90"):
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"cxrkit.cu", 0, None, None) == 0
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", f"-I{cuda / 'include'}".encode()]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace").strip()
    print(f"compile_cuda: {'ok  ' if rc == 0 else 'FAIL'} csrc/cuda/*.cu ({arch}, NVRTC)" + (f"\n{text}" if text else ""))
    ok &= rc == 0
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
sys.exit(0 if ok else 1)
PY
exit $status
