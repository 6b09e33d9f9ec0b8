"""The run-time compile path of the CUDA kernels, without a GPU.

On a GPU, ``cxrkit.kernels._cuda`` hands ``cuda_source.source()`` to CuPy, which compiles it with
NVRTC. NVRTC needs no driver, so here the same text is compiled by NVRTC itself (the
``nvidia-cuda-nvrtc`` wheel, a test extra) for the architectures cxrkit targets; a broken kernel
must fail it. ``.ci/run`` sets CXRKIT_REQUIRE_NVRTC=1, so in CI a missing library is an error, not a skip.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from cxrkit.kernels import cuda_source
from cxrkit.kernels.cuda_source import cuda_include_dirs, find_nvrtc, nvrtc_compile, source

LIB = find_nvrtc()
INC = cuda_include_dirs()
_MISSING = ("NVRTC (pip install nvidia-cuda-nvrtc, a test extra) or the CUDA headers (cuda_fp16.h, from the "
            "toolkit CI has for nvcc) not found")
if (LIB is None or not INC) and os.environ.get("CXRKIT_REQUIRE_NVRTC") == "1":  # .ci/run sets it: never skipped in CI
    raise RuntimeError(_MISSING)
pytestmark = pytest.mark.skipif(LIB is None or not INC, reason=_MISSING)


ARCHS = ("compute_80", "compute_90")


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_with_nvrtc_as_loaded_at_run_time(arch):
    """~6 CPU-s per architecture (two threads do not help: measured 11.7 s serial, 11.5 s parallel)."""
    r = nvrtc_compile(source(), arch, include_dirs=INC, lib=LIB)
    assert r.arch == arch and r.ok, r.log
    assert r.ptx_bytes > 10_000


def test_every_kernel_the_loader_launches_is_in_the_compiled_source():
    """The names _cuda.py asks the module for exist as extern "C" __global__ functions in source()."""
    loader = Path(cuda_source.__file__).with_name("_cuda.py").read_text()
    tree = ast.parse(loader)
    asked = {n.args[1].value for n in ast.walk(tree)
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "_function"
             and len(n.args) == 2 and isinstance(n.args[1], ast.Constant)}
    assert asked, "no _function(device, 'name') calls found in _cuda.py"
    src = source()
    missing = [name for name in asked if f"{name}(" not in src]
    assert not missing, missing
    assert "from .cuda_source import source" in loader  # the loader compiles exactly this text


def test_a_broken_kernel_fails_the_check():
    """The check can fail: a kernel with an error gives ok=False, the compiler's log, no PTX (a small
    unit: the full source takes seconds to compile, and the error path is the same)."""
    broken = '#include <cuda_fp16.h>\nextern "C" __global__ void cxr_broken(float* x) { x[0] = undeclared_value_xyz; }\n'
    r = nvrtc_compile(broken, "compute_90", include_dirs=INC, lib=LIB)
    assert not r.ok and "undeclared_value_xyz" in r.log and r.ptx_bytes == 0
