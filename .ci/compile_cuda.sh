#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu for sm_80 and sm_90 with nvcc (build time), then the run-time
# path: the single translation unit that cxrkit/kernels/_cuda.py hands to CuPy, compiled by NVRTC
# itself (python -m cxrkit.kernels.cuda_source; libnvrtc from the nvidia-cuda-nvrtc wheel, no GPU
# needed). Non-zero exit on any error, and when nvcc is missing (CI has it; a skipped check is not a pass).
# Usage: bash .ci/compile_cuda.sh      PTXAS_VERBOSE=1 prints registers / shared memory;
#        NVRTC=0 skips the NVRTC part (.ci/run: pytest tests/test_kernels_nvrtc.py runs it, required there).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "compile_cuda: FAIL nvcc not found: install the CUDA toolkit (nvcc) or put it on PATH; the CUDA kernels were NOT compile-checked" >&2
  exit 1
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
if [[ "${NVRTC:-1}" != "0" ]]; then
  # the run-time compile path; fails when libnvrtc is missing (pip install nvidia-cuda-nvrtc)
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 -m cxrkit.kernels.cuda_source || status=1
fi
exit $status
