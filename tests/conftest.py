"""Shared fixtures; GPU and TensorRT tests skip cleanly where the hardware or library is missing."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CXRKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@functools.lru_cache(maxsize=None)
def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def _tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return _cuda_available()


@functools.lru_cache(maxsize=None)
def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    no_trt = pytest.mark.skip(reason="needs TensorRT >= 10.12 and a CUDA GPU")
    no_dali = pytest.mark.skip(reason="needs NVIDIA DALI (pip install nvidia-dali-cuda130)")
    for item in items:
        if "gpu" in item.keywords and not _cuda_available():
            item.add_marker(no_gpu)
        if "trt" in item.keywords and not _tensorrt_available():
            item.add_marker(no_trt)
        if "dali" in item.keywords and not _dali_available():
            item.add_marker(no_dali)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not found (set CXRKIT_SHARED_DATA)")
    return SHARED_DATA
