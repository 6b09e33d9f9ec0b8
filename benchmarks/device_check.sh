#!/usr/bin/env bash
# The whole GPU check of cxrkit in one call, for the bare H100/H200 machine of ../shared/GPU.md:
# Python 3.12, torch 2.11+cu130, torchvision, CuPy 14 (NVRTC), numpy, Pillow, OpenCV, pybind11,
# pytest, pytest-benchmark, nvcc, cmake, ninja; NO DALI, NO pytest-timeout, NO safetensors/pydicom/
# jsonschema, no network. What it needs beyond that travels as wheels (benchmarks/README.md):
#   .device/dali_part_NN/dali_part_NN   the DALI wheels as a split tar (carried one part per call;
#                                        earlier calls copy theirs to /tmp/cxrkit-parts/, see README)
#   .device/extras/*.whl                 everything else the GPU tests import (check_device_wheels.py)
#   .device/extras/dali_parts.sha256     the parts' checksums
# Steps (each with its own time limit inside one overall DEADLINE, default 540 s, so the whole call
# fits the device tool's 600 s): install, build cxrkit._C, GPU tests (pytest -m gpu), kernel
# benchmark, end-to-end benchmark, then a summary table. Logs go to $OUT (at most 7 files).
#   STAGE=all (default) | tests | kernels | e2e   run only that step after install + build;
#   STAGE=batching: bench_batching.py on CUDA (not in "all": it does not fit the same call)
#   PYTEST_ARGS="tests/test_kernels_cuda.py"      narrow the tests;  E2E_ARGS="--batches 64"
set -u
T0=$(date +%s)
DEADLINE=${DEADLINE:-540}
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=/tmp/cxrkit-site
SETUP="$OUT/setup.txt"; SUMMARY="$OUT/summary.txt"
: > "$SETUP"; : > "$SUMMARY"
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
cap() {  # seconds for a step: min(cap, time left - reserve for later steps), at least 20
  local l; l=$(( $(left) - ${2:-0} )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 20 ] && l=20; echo "$l"; }
step() { echo; echo "=== $* (t=$(( $(date +%s) - T0 ))s, $(left)s left)"; }
note() { echo "$*" | tee -a "$SUMMARY"; }

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
  python3 -c "import sys, torch, cupy; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cupy', cupy.__version__, '|', torch.cuda.get_device_name(0))"
  nvcc --version | tail -1; } 2>&1 | tee -a "$SETUP"
note "card: $(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null | head -1)  date: $(date -u +%F)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo n/a)"

step "install the carried wheels into $SITE"
INSTALL=FAIL
if [ ! -f $SITE/.ok ]; then
  mkdir -p /tmp/cxrkit-parts
  for d in .device/dali_part_*; do [ -d "$d" ] && cp -rT "$d" "/tmp/cxrkit-parts/$(basename "$d")"; done  # this call's part(s)
  MANIFEST=$PWD/.device/extras/dali_parts.sha256
  if [ -f "$MANIFEST" ] && (cd /tmp/cxrkit-parts && sha256sum -c --quiet "$MANIFEST") >> "$SETUP" 2>&1; then
    cat /tmp/cxrkit-parts/dali_part_*/dali_part_* > /tmp/dali_wheels.tar && rm -rf /tmp/whl && tar xf /tmp/dali_wheels.tar -C /tmp \
      && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE /tmp/whl/*.whl .device/extras/*.whl >> "$SETUP" 2>&1 \
      && touch $SITE/.ok && rm -f /tmp/dali_wheels.tar
    # nvjpeg2k / nvtiff ship a comment-only nvidia/__init__.py (nvimgcodec's extends the path): whichever
    # pip wrote last, a plain package there would hide the machine's own nvidia/* (torch's and CuPy's
    # CUDA wheels) behind $SITE; make it span both
    if [ -f $SITE/nvidia/__init__.py ] && ! grep -q extend_path $SITE/nvidia/__init__.py; then
      echo "__path__ = __import__('pkgutil').extend_path(__path__, __name__)" >> $SITE/nvidia/__init__.py; fi
  else
    echo "DALI parts missing or damaged in /tmp/cxrkit-parts (have: $(ls /tmp/cxrkit-parts 2>/dev/null | tr '\n' ' ')); see benchmarks/README.md" | tee -a "$SETUP"
  fi
fi
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
if python3 -c "import nvidia.dali as d, safetensors, pydicom, jsonschema; print('DALI', d.__version__)" 2>&1 | tee -a "$SETUP" | grep -q '^DALI'; then INSTALL=ok; fi
note "install:  $INSTALL"

step "build cxrkit._C in place (CMake, as pip would)"
BUILD=FAIL
if ls cxrkit/_C*.so >/dev/null 2>&1; then BUILD=ok; else
  timeout "$(cap 120)" bash -c "cmake -S . -B /tmp/cxrkit-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(which python3) \
    -Dpybind11_DIR=$(python3 -m pybind11 --cmakedir) && cmake --build /tmp/cxrkit-build -j 16" >> "$SETUP" 2>&1 \
    && cp /tmp/cxrkit-build/_C*.so cxrkit/ && BUILD=ok || tail -20 "$SETUP"
fi
python3 -c "import cxrkit._C, cxrkit; print('cxrkit', cxrkit.__version__, 'with _C')" 2>&1 | tee -a "$SETUP"
note "build:    $BUILD"

STAGE=${STAGE:-all}
if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then
  step "GPU tests (pytest -m gpu; no pytest-timeout there: coreutils timeout)"
  FILES=${PYTEST_ARGS:-$(grep -lE 'pytest\.mark\.gpu\b' tests/test_*.py | tr '\n' ' ')}
  T=$(cap 240 200)  # leave 200 s for the benchmarks
  timeout -k 10 "$T" python3 -m pytest -m gpu -q -p no:cacheprovider -rfEs --continue-on-collection-errors \
    $FILES > "$OUT/pytest_gpu.txt" 2>&1
  RC=$?
  tail -30 "$OUT/pytest_gpu.txt"
  LINE=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped)' "$OUT/pytest_gpu.txt" | tail -1)
  [ "$RC" = 124 ] && LINE="TIMED OUT after ${T}s; ${LINE:-$(grep -oE '^[.sFEx]+' "$OUT/pytest_gpu.txt" | tr -d '\n' | wc -c) results so far}"
  note "tests:    rc=$RC  ${LINE:-no summary line (see pytest_gpu.txt)}"
  grep -E '^(FAILED|ERROR) ' "$OUT/pytest_gpu.txt" | head -15 | tee -a "$SUMMARY"
fi

if [ "$STAGE" = all ] || [ "$STAGE" = kernels ]; then
  step "kernel benchmark"
  T=$(cap 100 130)
  timeout -k 5 "$T" python3 benchmarks/bench_kernels.py --json "$OUT/kernels.json" > "$OUT/bench_kernels.txt" 2>&1
  RC=$?
  tail -12 "$OUT/bench_kernels.txt"
  note "kernels:  rc=$RC$([ "$RC" = 124 ] && echo " TIMED OUT after ${T}s")"
  grep -E '^(localize|batched_nms)' "$OUT/bench_kernels.txt" | tee -a "$SUMMARY"
fi

if [ "$STAGE" = all ] || [ "$STAGE" = e2e ]; then
  step "end-to-end benchmark"
  T=$(cap 240 10)
  timeout -k 5 "$T" python3 benchmarks/bench_e2e_gpu.py --json "$OUT/e2e.json" ${E2E_ARGS:-} > "$OUT/bench_e2e.txt" 2>&1
  RC=$?
  tail -16 "$OUT/bench_e2e.txt"
  note "e2e:      rc=$RC$([ "$RC" = 124 ] && echo " TIMED OUT after ${T}s")"
  sed -n '/^== end to end/,$p' "$OUT/bench_e2e.txt" | tee -a "$SUMMARY"
fi

if [ "$STAGE" = batching ]; then  # only when asked: BatchingDetector vs direct calls at 1/8/64 clients
  step "micro-batching benchmark"
  timeout -k 5 "$(cap 400 10)" python3 benchmarks/bench_batching.py --device cuda --model cxr29-demo \
    --json "$OUT/batching.json" ${BATCHING_ARGS:-} > "$OUT/bench_batching.txt" 2>&1
  RC=$?
  tail -16 "$OUT/bench_batching.txt" | tee -a "$SUMMARY"
  note "batching: rc=$RC"
fi

step "summary ($(( $(date +%s) - T0 ))s)"
cat "$SUMMARY"
