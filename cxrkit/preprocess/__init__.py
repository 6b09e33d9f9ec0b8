"""Preprocessing: decode (DALI), letterbox resize, normalise; numpy reference as the fallback.

Importing this package never imports DALI; the pipeline imports it on first use.
"""

from __future__ import annotations

from cxrkit.preprocess.letterbox import LetterboxTransform, letterbox_geometry
from cxrkit.preprocess.pipeline import PreprocessResult, Preprocessor, dali_available
from cxrkit.preprocess.reference import preprocess_reference, resize_linear_aa, resize_weights

__all__ = [
    "LetterboxTransform",
    "letterbox_geometry",
    "Preprocessor",
    "PreprocessResult",
    "dali_available",
    "preprocess_reference",
    "resize_linear_aa",
    "resize_weights",
]
