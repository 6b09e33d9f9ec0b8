"""Preprocessing: decode (DALI), letterbox resize, normalise; numpy reference as the fallback.

Importing this package never imports DALI; the pipeline imports it on first use.
"""

from __future__ import annotations

from cxrkit.io.dicom_j2k import attach_j2k_frame, is_encoded_j2k, linear_stored_range
from cxrkit.preprocess.letterbox import LetterboxTransform, letterbox_geometry
from cxrkit.preprocess.pipeline import PreprocessResult, Preprocessor, dali_available, dct_scale
from cxrkit.preprocess.reference import preprocess_reference, resize_linear_aa, resize_weights

__all__ = [
    "LetterboxTransform",
    "letterbox_geometry",
    "Preprocessor",
    "PreprocessResult",
    "dali_available",
    "dct_scale",
    "attach_j2k_frame",
    "is_encoded_j2k",
    "linear_stored_range",
    "preprocess_reference",
    "resize_linear_aa",
    "resize_weights",
]
