"""TensorRT backend: the engine cache on any machine (fake builder), engines on a GPU (marked trt)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cxrkit.backends.tensorrt.cache import EngineCache, EngineKey, default_cache_dir
from cxrkit.errors import BackendError, BackendUnavailableError


def _key(**kw) -> EngineKey:
    base = dict(model_name="m", model_hash="a" * 64, graph_sha256="b" * 64, precision="int8", input_hw=(256, 256),
                profile=(1, 8, 16), trt_version="10.13.0", gpu_name="NVIDIA H100", compute_capability="9.0")
    base.update(kw)
    return EngineKey(**base)


class FakeBuilder:
    def __init__(self, payload: bytes = b"ENGINE") -> None:
        self.calls = 0
        self.payload = payload

    def __call__(self) -> bytes:
        self.calls += 1
        return self.payload + str(self.calls).encode()


def _load(data: bytes):
    return None if data.startswith(b"BAD") else ("engine", data)


@pytest.mark.parametrize("field,value", [
    ("model_hash", "c" * 64), ("graph_sha256", "d" * 64), ("precision", "fp16"), ("input_hw", (512, 512)),
    ("profile", (1, 8, 32)), ("trt_version", "11.0.0"), ("gpu_name", "NVIDIA A100"), ("compute_capability", "8.0"),
])
def test_key_changes_with_every_field(field, value):
    assert _key().digest != _key(**{field: value}).digest
    assert _key().digest == _key().digest


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CXRKIT_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "engines"
    monkeypatch.delenv("CXRKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "cxrkit" / "engines"


def test_build_once_then_hit(tmp_path):
    cache, b = EngineCache(tmp_path), FakeBuilder()
    obj, built = cache.get_or_build(_key(), b, _load)
    assert built and obj == ("engine", b"ENGINE1") and b.calls == 1
    obj, built = cache.get_or_build(_key(), b, _load)
    assert not built and obj == ("engine", b"ENGINE1") and b.calls == 1
    engine, sidecar, _ = cache.paths(_key())
    meta = json.loads(sidecar.read_text())
    assert meta["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    assert meta["key"] == _key().digest and meta["profile"] == [1, 8, 16] and meta["gpu_name"] == "NVIDIA H100"
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


def test_other_key_builds_separately(tmp_path):
    cache, b = EngineCache(tmp_path), FakeBuilder()
    cache.get_or_build(_key(), b, _load)
    cache.get_or_build(_key(precision="fp16"), b, _load)
    assert b.calls == 2 and len(list(tmp_path.glob("*.engine"))) == 2


def test_corrupt_engine_is_rebuilt_not_loaded(tmp_path):
    cache, b = EngineCache(tmp_path), FakeBuilder()
    cache.get_or_build(_key(), b, _load)
    engine, _, _ = cache.paths(_key())
    engine.write_bytes(b"ENGINE1 but flipped")
    seen = []
    obj, built = cache.get_or_build(_key(), b, lambda d: seen.append(d) or _load(d))
    assert built and obj == ("engine", b"ENGINE2") and seen == [b"ENGINE2"]  # the corrupt bytes never reach load


def test_truncated_engine_is_rebuilt(tmp_path):
    cache, b = EngineCache(tmp_path), FakeBuilder()
    cache.get_or_build(_key(), b, _load)
    engine, _, _ = cache.paths(_key())
    engine.write_bytes(engine.read_bytes()[:3])
    assert cache.get_or_build(_key(), b, _load)[1]


@pytest.mark.parametrize("edit", ["trt_version", "gpu_name", "garbage", "missing", "engine_sha256"])
def test_sidecar_mismatch_is_rebuilt(tmp_path, edit):
    cache, b = EngineCache(tmp_path), FakeBuilder()
    cache.get_or_build(_key(), b, _load)
    _, sidecar, _ = cache.paths(_key())
    if edit == "garbage":
        sidecar.write_text("{not json")
    elif edit == "missing":
        sidecar.unlink()
    else:
        meta = json.loads(sidecar.read_text())
        meta[edit] = "something else"
        sidecar.write_text(json.dumps(meta))
    obj, built = cache.get_or_build(_key(), b, _load)
    assert built and obj == ("engine", b"ENGINE2")
    assert json.loads(sidecar.read_text())["engine_sha256"] == hashlib.sha256(b"ENGINE2").hexdigest()


def test_deserialize_failure_is_rebuilt(tmp_path):
    cache = EngineCache(tmp_path)
    cache.get_or_build(_key(), FakeBuilder(b"BAD"), lambda d: ("ok", d))  # valid files, but this runtime rejects them
    b = FakeBuilder()
    obj, built = cache.get_or_build(_key(), b, _load)  # _load returns None for BAD...
    assert built and obj == ("engine", b"ENGINE1")

    def raising(d):
        raise RuntimeError("Serialization assertion failed: version mismatch")

    cache.get_or_build(_key(model_name="m2"), FakeBuilder(), lambda d: ("ok", d))
    with pytest.raises(BackendError, match="does not load"):  # a fresh build that cannot load is an error
        cache.get_or_build(_key(model_name="m2"), FakeBuilder(), raising)


def test_rebuild_flag_and_empty_build(tmp_path):
    cache, b = EngineCache(tmp_path), FakeBuilder()
    cache.get_or_build(_key(), b, _load)
    assert cache.get_or_build(_key(), b, _load, rebuild=True)[1] and b.calls == 2
    with pytest.raises(BackendError, match="no engine"):
        cache.get_or_build(_key(model_name="x"), lambda: b"", _load)


def test_lock_serializes_threads(tmp_path):
    """Two threads asking for the same missing engine: one builds, the other waits and loads it."""
    calls = []

    def slow_build() -> bytes:
        calls.append(1)
        time.sleep(0.3)
        return b"ENGINE-slow"

    out = []
    ts = [threading.Thread(target=lambda: out.append(EngineCache(tmp_path).get_or_build(_key(), slow_build, _load)))
          for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(calls) == 1 and sorted(b for _, b in out) == [False, True]


def _proc_build(root: str, q) -> None:
    def build() -> bytes:
        time.sleep(0.3)
        return b"ENGINE-proc"

    q.put(EngineCache(root).get_or_build(_key(), build, _load)[1])


def test_lock_serializes_processes(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=_proc_build, args=(str(tmp_path), q)) for _ in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(30)
    assert sorted(q.get(timeout=5) for _ in ps) == [False, True]


def test_tensorrt_missing_gives_install_hint():
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed here")
    from cxrkit.backends.tensorrt.build import import_tensorrt

    with pytest.raises(BackendUnavailableError, match="pip install"):
        import_tensorrt()


def test_build_engine_cli_options():
    from cxrkit.cli import build_parser

    a = build_parser().parse_args(["build-engine", "--model", "cxr-probe", "--precision", "int8", "--min-batch", "1",
                                   "--opt-batch", "8", "--max-batch", "16", "--rebuild"])
    assert (a.min_batch, a.opt_batch, a.max_batch, a.rebuild, a.precision) == (1, 8, 16, True, "int8")


def test_batch_profile_validation():
    from cxrkit.backends.tensorrt.build import BatchProfile

    assert BatchProfile(1, 8, 16).as_tuple() == (1, 8, 16)
    with pytest.raises(ValueError):
        BatchProfile(4, 2, 16)


def test_graph_for_names_the_quantize_command():
    from cxrkit.backends.tensorrt.build import graph_for
    from cxrkit.models import load_model_package

    pkg = load_model_package("cxr-probe")
    assert graph_for(pkg, "fp32") == pkg.onnx_path
    if pkg.file("onnx_int8") is None:
        with pytest.raises(BackendUnavailableError, match="cxrkit quantize"):
            graph_for(pkg, "int8")


# -- on a GPU with TensorRT --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probe_quantized(tmp_path_factory) -> Path:
    from cxrkit.models import load_model_package
    from cxrkit.quant import quantize

    pkg = load_model_package("cxr-probe")
    H, W = pkg.card.input_hw
    rng = np.random.default_rng(0)
    calib = ((rng.uniform(0, 1, (16, 1, H, W)) - pkg.card.mean) / pkg.card.std).astype(np.float32)
    out = tmp_path_factory.mktemp("probe") / "pkg"
    quantize(pkg, calib, out=out, allow_accuracy_drop=True)
    return out


@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_matches_onnxruntime(probe_quantized, precision, tmp_path):
    import torch

    from cxrkit.backends import create_runner
    from cxrkit.models import load_model_package

    pkg = load_model_package(probe_quantized)
    H, W = pkg.card.input_hw
    x = ((np.random.default_rng(1).uniform(0, 1, (5, 1, H, W)) - pkg.card.mean) / pkg.card.std).astype(np.float32)
    ort_prec = "int8" if precision == "int8" else "fp32"
    with create_runner(pkg, "onnxruntime", "cpu", ort_prec) as ref:
        want = ref.infer(x)
    opts = dict(max_batch=8, opt_batch=4, cache_dir=str(tmp_path))
    tol = {"fp32": 1e-3, "fp16": 2e-2, "int8": 0.5}[precision]

    def check(got, n):
        assert got["logits"].is_cuda and tuple(got["heatmaps"].shape) == want["heatmaps"][:n].shape
        np.testing.assert_allclose(got["logits"].float().cpu().numpy(), want["logits"][:n], atol=tol)
        np.testing.assert_allclose(got["heatmaps"].float().cpu().numpy(), want["heatmaps"][:n], atol=4 * tol)

    with create_runner(pkg, "tensorrt", "cuda", precision, **opts) as r:
        assert r.engine_built  # a fresh cache folder: built here
        r.prepare([5])  # bucket 8, its own execution context
        for cuda_graphs in (True, False):
            r._use_graphs = cuda_graphs
            check(r.infer(torch.from_numpy(x).cuda()), 5)
            check(r.infer(torch.from_numpy(x[:3]).cuda()), 3)  # another bucket (4), lazily captured
        assert sorted(r._graphs) == [4, 8] and r._graphs[4][1] is not r._graphs[8][1]
        first = r.infer(torch.from_numpy(x).cuda())["logits"].cpu().numpy()
    engines = sorted(Path(tmp_path).glob("*.engine"))
    assert len(engines) == 1  # cache_dir is the engine folder itself
    stamp = engines[0].stat().st_mtime_ns
    # second runner: the engine is loaded from the cache (not rebuilt) and gives the same outputs
    with create_runner(pkg, "tensorrt", "cuda", precision, **opts) as r2:
        assert r2.engine_built is False
        got = r2.infer(torch.from_numpy(x).cuda())
        check(got, 5)
        np.testing.assert_array_equal(got["logits"].cpu().numpy(), first)
    assert engines[0].stat().st_mtime_ns == stamp
