"""The GPU path's logic that a CPU can check (issue 12): runner preparation and buckets, out-of-memory
conversion (torch's real exception class, DALI's messages), DALI batch failures isolated in a few runs,
the decode-alone ceiling of bench_e2e_gpu.py on DALI's CPU decoder, and device_check.sh's commands."""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxrkit.backends.base import as_out_of_memory, buckets
from cxrkit.errors import BackendError, DecodeError, OutOfMemoryError

ROOT = Path(__file__).resolve().parents[1]


# ---- out of memory -----------------------------------------------------------------------------

def test_as_out_of_memory_recognises_the_libraries_errors():
    torch = pytest.importorskip("torch")
    e = as_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "torch")
    assert isinstance(e, OutOfMemoryError) and isinstance(e, BackendError) and "torch" in str(e)
    for text in ("Critical error in pipeline: Error in MIXED operator nvidia.dali.fn.decoders.image: "
                 "CUDA allocation failed", "cudaErrorMemoryAllocation: out of memory",
                 "CUDNN_STATUS_ALLOC_FAILED", "nvjpeg2k status 5 NVJPEG2K_STATUS_ALLOCATOR_FAILURE",
                 "CUDA_ERROR_OUT_OF_MEMORY", "std::bad_alloc"):
        assert isinstance(as_out_of_memory(RuntimeError(text)), OutOfMemoryError), text
    assert isinstance(as_out_of_memory(MemoryError()), OutOfMemoryError)
    for text in ("Failed to decode sample #3 : Premature end of JPEG data", "CUDA error: illegal address"):
        assert as_out_of_memory(RuntimeError(text)) is None, text
    mine = OutOfMemoryError("already ours")
    assert as_out_of_memory(mine) is mine
    # an OOM that surfaces as a follow-up error (e.g. ending a CUDA graph capture it interrupted)
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        except Exception:
            raise RuntimeError("operation not permitted when stream is capturing")
    except RuntimeError as follow_up:
        assert isinstance(as_out_of_memory(follow_up, "capture"), OutOfMemoryError)


class _FakeCudaArray:
    """A host-only stand-in that says it lives on CUDA (DLPack device type 2), so detect() dispatches
    to the CUDA kernels, which are replaced here by a function raising the library's real OOM."""

    shape = (1, 2, 8, 8)
    dtype = np.float32

    def __dlpack_device__(self):
        return (2, 0)


def test_kernel_out_of_memory_becomes_cxrkit_error(monkeypatch):
    torch = pytest.importorskip("torch")
    from cxrkit import kernels
    from cxrkit.postprocess import batched_nms, detect

    class Module:
        @staticmethod
        def localize(*a, **k):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")

        @staticmethod
        def batched_nms(*a, **k):
            raise RuntimeError("cudaErrorMemoryAllocation: out of memory")

    monkeypatch.setattr(kernels, "cuda_module", lambda: Module)
    with pytest.raises(OutOfMemoryError, match="localize"):
        detect(_FakeCudaArray(), [0.5, 0.5])
    with pytest.raises(OutOfMemoryError, match="batched_nms"):
        batched_nms(_FakeCudaArray(), _FakeCudaArray(), _FakeCudaArray(), 0.5)
    # anything else keeps its own type
    Module.localize = staticmethod(lambda *a, **k: (_ for _ in ()).throw(RuntimeError("illegal address")))
    with pytest.raises(RuntimeError, match="illegal address"):
        detect(_FakeCudaArray(), [0.5, 0.5])


# ---- runners -----------------------------------------------------------------------------------

def test_buckets_and_prepare_on_cpu_runners():
    assert buckets(1) == [1] and buckets(64) == [1, 2, 4, 8, 16, 32, 64] and buckets(48)[-2:] == [32, 48]
    with pytest.raises(ValueError):
        buckets(0)
    pytest.importorskip("torch")
    from cxrkit.backends import create_runner
    from cxrkit.models import load_model_package

    m = load_model_package("cxr-probe")
    r = create_runner(m, "torch", "cpu", "fp32")
    r.prepare(range(1, 9))  # loads, nothing to capture on the CPU
    assert r._loaded
    H, W = m.card.input_hw
    assert r.infer(np.zeros((3, 1, H, W), np.float32))["logits"].shape == (3, m.card.num_classes)
    with pytest.raises(ValueError):
        r.prepare([0])
    r.close()


def test_torch_runner_bucket_choice_without_cuda():
    """The bucket arithmetic the CUDA runner uses (a batch of n runs in the smallest bucket >= n)."""
    from cxrkit.backends.torch_runner import TorchRunner

    r = TorchRunner.__new__(TorchRunner)
    r._max_batch = 48
    assert [r.bucket_for(n) for n in (1, 2, 3, 5, 33, 48, 49)] == [1, 2, 4, 8, 48, 48, None]


# ---- DALI: failures isolated in a few runs, OOM never reported as corrupt ------------------------

def _jpeg_items(n: int):
    from PIL import Image

    from cxrkit.io import load_item

    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        b = io.BytesIO()
        Image.fromarray((rng.random((48, 40)) * 255).astype(np.uint8)).save(b, format="JPEG", quality=90)
        items.append(load_item(b.getvalue(), i))
    return items


def _preprocessor():
    pytest.importorskip("nvidia.dali")
    from cxrkit.preprocess import Preprocessor

    return Preprocessor((32, 32), 0.5, 0.25, backend="dali", batch_size=16, num_threads=1)


@pytest.mark.dali
def test_one_corrupt_file_costs_a_few_runs_not_one_per_image(monkeypatch):
    items = _jpeg_items(16)
    good = dict(enumerate(items))
    data = bytearray(items[11].encoded[: len(items[11].encoded) // 3])  # headers intact, scan cut short
    data[200:260] = b"\x07" * 60
    items[11] = dataclasses.replace(items[11], source="broken.jpg", encoded=bytes(data))
    with _preprocessor() as pre:
        clean = pre.run([good[i] for i in range(16)]).batch
        sizes = []
        real = pre._run_chunk

        def counting(key, chunk, *a):
            sizes.append(len(chunk))
            return real(key, chunk, *a)

        monkeypatch.setattr(pre, "_run_chunk", counting)
        res = pre.run(items)
    assert list(res.errors) == [11] and isinstance(res.errors[11], DecodeError)
    assert res.ok_positions == [i for i in range(16) if i != 11]
    np.testing.assert_array_equal(res.batch, clean[res.ok_positions])
    # DALI names the failing sample: the batch, that item alone, the other 15 together
    assert sizes == [16, 1, 15], sizes
    # a file whose header does not parse ("nvImageCodec failure", no sample index): bisection
    items[11] = dataclasses.replace(items[11], encoded=items[11].encoded[:200])
    sizes.clear()
    with _preprocessor() as pre:
        monkeypatch.setattr(pre, "_run_chunk", lambda key, chunk, *a: (sizes.append(len(chunk)),
                                                                       type(pre)._run_chunk(pre, key, chunk, *a))[1])
        res = pre.run(items)
    assert list(res.errors) == [11] and len(sizes) <= 2 * 4 + 1, sizes


@pytest.mark.dali
def test_failures_without_a_sample_index_bisect(monkeypatch):
    items = _jpeg_items(16)
    with _preprocessor() as pre:
        real = pre._run_chunk
        sizes = []

        def flaky(key, chunk, *a):  # item 5 fails with a message naming no sample
            sizes.append(len(chunk))
            if any(j.pos == 5 for j in chunk):
                raise RuntimeError("Critical error in pipeline: something went wrong")
            return real(key, chunk, *a)

        monkeypatch.setattr(pre, "_run_chunk", flaky)
        res = pre.run(items)
    assert list(res.errors) == [5] and isinstance(res.errors[5], DecodeError)
    assert len(sizes) <= 2 * 4 + 1, sizes  # log2(16) levels, two runs each, not 16 single runs


@pytest.mark.dali
def test_dali_out_of_memory_halves_and_is_never_called_corrupt(monkeypatch):
    items = _jpeg_items(8)
    with _preprocessor() as pre:
        want = pre.run(items).batch
        real = pre._run_chunk
        sizes = []

        def small_memory(key, chunk, *a):  # more than 2 images "do not fit"; item 6 never fits
            sizes.append(len(chunk))
            if len(chunk) > 2 or any(j.pos == 6 for j in chunk):
                raise RuntimeError("Critical error in pipeline: Error in MIXED operator "
                                   "nvidia.dali.fn.decoders.image: CUDA allocation failed")
            return real(key, chunk, *a)

        monkeypatch.setattr(pre, "_run_chunk", small_memory)
        res = pre.run(items)
    assert list(res.errors) == [6]
    err = res.errors[6]
    assert isinstance(err, OutOfMemoryError) and not isinstance(err, DecodeError)
    assert "corrupt" not in str(err) and "out of GPU memory" in str(err)
    np.testing.assert_array_equal(res.batch, want[[0, 1, 2, 3, 4, 5, 7]])
    assert max(sizes[1:]) <= 4 and sizes[0] == 8


# ---- benchmarks/bench_e2e_gpu.py: the decode-alone ceiling (issue 12, item 6) -------------------

@pytest.mark.dali
def test_decode_ceiling_runs_on_dali_cpu():
    """prefetch_queue_depth=2 fed one batch per run raised on the second run (DALI 2.4); the ceiling
    now feeds from a source callback and runs several iterations."""
    pytest.importorskip("nvidia.dali")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_e2e_gpu as b
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    jpegs = b.make_jpegs(3, 96)
    rate = b.decode_ceiling(jpegs, batch=4, iters=5, device="cpu", size=48, num_threads=1)
    assert rate > 0


# ---- benchmarks/device_check.sh ------------------------------------------------------------------

def test_device_check_script_uses_only_what_the_gpu_machine_has():
    text = (ROOT / "benchmarks" / "device_check.sh").read_text()
    assert "--timeout" not in text  # pytest-timeout is not on the GPU machine (GPU.md)
    for rel in re.findall(r"(benchmarks/[\w]+\.py|tests/[\w]+\.py|\.ci/[\w]+\.(?:sh|py))", text):
        assert (ROOT / rel).is_file(), rel
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "device_check.sh")], check=True)


def test_carried_wheels_cover_what_the_gpu_check_imports():
    """The static half of benchmarks/check_device_wheels.py (the venv half runs by hand before a GPU
    session): every third-party module the GPU tests and benchmarks import, lazy imports in cxrkit
    included, is on the GPU machine, absent by design, or downloaded by the README's recipe."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import check_device_wheels as cdw
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    found = cdw.collect()
    assert {"safetensors", "pydicom", "jsonschema", "nvidia.dali", "torch"} <= set(found.third_party)
    assert any(u.where.startswith("cxrkit/nets/weights.py") for u in found.third_party["safetensors"])
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    recipe = " ".join(re.findall(r"pip download[^\n]*(?:\n[^\n]*\\\\?)*", readme)) + readme
    for name in found.third_party:
        if name in cdw.GPU_MACHINE_HAS or name in cdw.NOT_ON_GPU_MACHINE:
            continue
        project = cdw.IMPORT_TO_PROJECT.get(name)
        assert project is not None, f"{name}: imported by the GPU check, not mapped to a carried wheel"
        assert re.search(rf"(?<![\w-]){re.escape(project)}(==|\s|;|$)", recipe), f"{project} not in the README recipe"
