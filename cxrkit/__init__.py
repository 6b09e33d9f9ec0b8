"""cxrkit: fast chest X-ray detection and localization. A demonstration engine, not a medical device.

>>> import cxrkit
>>> det = cxrkit.Detector.from_pretrained("cxr29-demo")       # doctest: +SKIP
>>> preds = det.predict(["a.dcm", "b.png"])                     # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .config import Device, DetectorConfig, Limits, LocalizeConfig, Precision
from .errors import (
    BackendError,
    BackendUnavailableError,
    CxrkitError,
    DecodeError,
    ImageTooLargeError,
    InputError,
    ModelError,
    UnsupportedFormatError,
)
from .labels import FINDING_KEYS, FINDINGS
from .models import list_models
from .results import Finding, Prediction

__all__ = [
    "Detector",
    "BatchingDetector",
    "Prediction",
    "Finding",
    "list_models",
    "FINDINGS",
    "FINDING_KEYS",
    "Device",
    "Precision",
    "DetectorConfig",
    "LocalizeConfig",
    "Limits",
    "CxrkitError",
    "InputError",
    "DecodeError",
    "UnsupportedFormatError",
    "ImageTooLargeError",
    "ModelError",
    "BackendError",
    "BackendUnavailableError",
    "__version__",
]


def __getattr__(name: str) -> Any:  # lazy: keep `import cxrkit` light
    if name == "Detector":
        from .api import Detector

        return Detector
    if name == "BatchingDetector":
        from .batching import BatchingDetector

        return BatchingDetector
    raise AttributeError(f"module 'cxrkit' has no attribute {name!r}")
