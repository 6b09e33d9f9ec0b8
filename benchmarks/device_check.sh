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
if ls .device/dali_part_*/dali_part_* >/dev/null 2>&1 && [ ! -f $SITE/.ok ]; then
  cat .device/dali_part_*/dali_part_* > /tmp/dali_wheels.tar && tar xf /tmp/dali_wheels.tar -C /tmp \
  && python3 -m pip install -q --no-index --no-deps --target $SITE /tmp/whl/*.whl .device/extras/*.whl && touch $SITE/.ok
fi
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import nvidia.dali as d; print('DALI', d.__version__)" 2>&1 | tail -1

step "build cxrkit._C in place"
python3 - <<'PY' 2>&1 | tail -3
import subprocess, sys, sysconfig, pybind11, pathlib
src = sorted(str(p) for p in pathlib.Path("csrc/cpu").glob("*.cpp"))
ext = sysconfig.get_config_var("EXT_SUFFIX")
cmd = ["c++", "-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-pthread", *src,
       f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", "-o", f"cxrkit/_C{ext}"]
r = subprocess.run(cmd, capture_output=True, text=True); print(r.stderr[-2000:]); print("built _C rc", r.returncode)
PY

step "GPU tests"
timeout 240 python3 -m pytest -m "gpu or dali" -q -p no:cacheprovider -x --timeout 200 tests 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25

step "kernel benchmark"
timeout 120 python3 benchmarks/bench_kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/bench_kernels.txt" | tail -20

step "end-to-end benchmark"
timeout 240 python3 benchmarks/bench_e2e_gpu.py --json "$OUT/e2e.json" ${E2E_ARGS:-} 2>&1 | tee "$OUT/bench_e2e.txt" | tail -30

step "summary"
grep -E "passed|failed|error" "$OUT/pytest_gpu.txt" | tail -2
tail -12 "$OUT/bench_kernels.txt"
tail -14 "$OUT/bench_e2e.txt"
