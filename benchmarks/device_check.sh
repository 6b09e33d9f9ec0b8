#!/usr/bin/env bash
# GPU check for cxrkit, for a bare H100/H200 machine with torch, CuPy, nvcc (no DALI, no network).
# DALI wheels travel in parts under .device/dali_part_NN/ (see benchmarks/README.md); this script
# reassembles and installs them, builds cxrkit, runs the GPU tests, then the GPU benchmarks, and
# prints a short table last. Everything is logged under $OUT (or ./out).
set -u
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=/tmp/cxrkit-site
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__, torch.cuda.get_device_name(0))"

step "install DALI + extras from carried wheels"
if [ -d .device/extras ] && [ ! -f $SITE/.extras ]; then
  python3 -m pip install -q --no-index --no-deps --target $SITE .device/extras/*.whl && touch $SITE/.extras
fi
if ls .device/dali_part_*/dali_part_* >/dev/null 2>&1 && [ ! -f $SITE/.ok ]; then
  cat .device/dali_part_*/dali_part_* > /tmp/dali_wheels.tar && tar xf /tmp/dali_wheels.tar -C /tmp \
  && python3 -m pip install -q --no-index --no-deps --target $SITE /tmp/whl/*.whl && touch $SITE/.ok
fi
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import nvidia.dali as d; print('DALI', d.__version__)" 2>&1 | tail -1

step "build cxrkit._C in place (CMake, as pip would)"
cmake -S . -B /tmp/cxrkit-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(which python3) \
  -Dpybind11_DIR=$(python3 -m pybind11 --cmakedir) > "$OUT/cmake.txt" 2>&1 && cmake --build /tmp/cxrkit-build >> "$OUT/cmake.txt" 2>&1 \
  && cp /tmp/cxrkit-build/_C*.so cxrkit/ && echo "built $(ls cxrkit/_C*.so)" || tail -20 "$OUT/cmake.txt"

step "GPU tests"
timeout ${PYTEST_TIMEOUT:-240} python3 -m pytest -m "gpu or dali" -q -p no:cacheprovider --timeout 200 -rs ${PYTEST_ARGS:-tests} 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25

step "kernel benchmark"
timeout 120 python3 benchmarks/bench_kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/bench_kernels.txt" | tail -20

[ "${STAGE:-all}" = kernels ] && { step "summary"; grep -E "passed|failed" "$OUT/pytest_gpu.txt" | tail -2; tail -14 "$OUT/bench_kernels.txt"; exit 0; }
step "end-to-end benchmark"
timeout 240 python3 benchmarks/bench_e2e_gpu.py --json "$OUT/e2e.json" ${E2E_ARGS:-} 2>&1 | tee "$OUT/bench_e2e.txt" | tail -30

step "summary"
grep -E "passed|failed|error" "$OUT/pytest_gpu.txt" | tail -2
tail -12 "$OUT/bench_kernels.txt"
tail -14 "$OUT/bench_e2e.txt"
