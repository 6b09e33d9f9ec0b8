"""Runner contract and registry: checks in the public methods, auto selection, clear errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cxrkit.backends import available_backends, create_runner
from cxrkit.errors import BackendError, BackendUnavailableError
from cxrkit.models import load_model_package


@pytest.fixture(scope="module")
def probe():
    return load_model_package("cxr-probe")


def test_auto_on_cpu_picks_onnxruntime_and_says_so(probe, caplog):
    with caplog.at_level(logging.INFO, logger="cxrkit.backends.base"):
        r = create_runner(probe, "auto", "cpu", "fp32")
    assert r.name == "onnxruntime"
    assert "picked 'onnxruntime'" in caplog.text


def test_unknown_and_unavailable_backends(probe):
    with pytest.raises(BackendUnavailableError, match="registered"):
        create_runner(probe, "nonsense")
    with pytest.raises(BackendUnavailableError, match="TensorRT needs a CUDA device|tensorrt"):
        create_runner(probe, "tensorrt", "cpu", "fp16")
    with pytest.raises(BackendUnavailableError, match="fp16"):
        create_runner(probe, "onnxruntime", "cpu", "fp16")
    av = available_backends("cpu", "fp32")
    assert av["onnxruntime"] is None and av["torch"] is None and av["tensorrt"]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_runner_checks_shapes_and_returns_contract(probe, backend):
    with create_runner(probe, backend, "cpu", "fp32") as r:
        x = np.random.default_rng(0).standard_normal((3, 1, 256, 256)).astype(np.float32)
        out = r.infer(x)
        assert out["logits"].shape == (3, 6) and out["heatmaps"].shape == (3, 6, 32, 32)
        with pytest.raises(BackendError, match=r"expected a batch \(B, 1, 256, 256\)"):
            r.infer(np.zeros((1, 1, 128, 128), np.float32))


def test_backends_agree_on_random_batch():
    """ONNX Runtime and torch on the same batch with cxr29-demo, a trained network with continuous
    outputs (the probe's logits are +-8 steps, which agree even when a backend is slightly off)."""
    demo = load_model_package("cxr29-demo")
    H, W = demo.card.input_hw
    x = np.random.default_rng(1).uniform(-2, 2, (2, 1, H, W)).astype(np.float32)
    with create_runner(demo, "onnxruntime") as a, create_runner(demo, "torch") as b:
        oa, ob = a.infer(x), b.infer(x)
    assert np.ptp(oa["heatmaps"]) > 1.0 and len(np.unique(oa["logits"])) > 1  # not step outputs
    np.testing.assert_allclose(oa["logits"], ob["logits"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(oa["heatmaps"], ob["heatmaps"], rtol=0, atol=1e-4)
