"""Post-processing: heatmap logits -> peaks, regions and boxes (:func:`detect`), and batched NMS.

Each op has a numpy reference (``_reference``), a C++ kernel (``cxrkit._C``) and a CUDA kernel
(``csrc/cuda``, compiled at run time by CuPy); ``impl="auto"`` picks by the array's device.
:func:`to_host` brings a batch's logits and Detections to numpy in one packed transfer.
"""

from __future__ import annotations

from .localize import Detections, detect, host_detector, logit_thresholds
from .host import to_host
from .nms import batched_nms

__all__ = ["Detections", "detect", "host_detector", "batched_nms", "logit_thresholds", "to_host"]
