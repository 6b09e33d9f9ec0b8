"""The Detector: inputs in, one Prediction per input out, in input order.

A batch's path, one stage per module of ``cxrkit/_stages``::

    inputs ─ prefetch.chunks ─▶ read ─▶ preprocess ─▶ infer ─▶ localize ─▶ assemble ─▶ Predictions
             (index, item)      Reader   Preprocessor  Inference  Localizer   views over
                                (io)     (DALI/native) (runner,   (columns)   BatchColumns
                                                        OOM retry)
             └──── prepare.py: caller or prefetch thread ────┘└──── under the inference lock ────┘

Thread safety: a Detector may be shared across threads. Reading runs in the calling thread (or
the prefetch thread) with file reads and heavy decodes on the Detector's I/O pool; preprocessing
runs under one lock and inference plus post-processing under another (DALI pipelines and CUDA
graphs are not re-entrant), so concurrent callers are serialized stage by stage, batch by batch,
and each gets exactly the results of a serial call. For throughput under many concurrent
single-image callers use ``cxrkit.BatchingDetector``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ._stages.assemble import assemble
from ._stages.infer import Inference
from ._stages.localize import Localizer
from ._stages.prefetch import Prefetcher, chunks
from ._stages.prepare import Prepared, closed_error, prepare
from ._stages.read import Reader
from .config import Device, Limits, LocalizeConfig, Precision
from .errors import OutOfMemoryError
from .io.sources import _is_dataset
from .models import ModelPackage, load_model_package
from .results import Prediction

__all__ = ["Detector"]

log = logging.getLogger(__name__)

_SINGLE = (str, bytes, bytearray, memoryview, os.PathLike, np.ndarray)


class Detector:
    """Chest X-ray finding detector.

    >>> det = Detector.from_pretrained("cxr29-demo")                  # doctest: +SKIP
    >>> preds = det.predict(["a.dcm", "b.png", jpeg_bytes, uint16_array])  # doctest: +SKIP
    >>> preds[0].findings["nodule"].score, preds[0].findings["nodule"].boxes_xyxy  # doctest: +SKIP

    ``runner_options`` go to the backend (e.g. ``{"compile": True, "cuda_graphs": False}`` for
    torch); ``preprocess_options`` to the Preprocessor (e.g. ``{"hw_decoder_load": 0.9,
    "jpeg_dct_scaling": True, "dicom_j2k": "auto"}``).

    Boxes and points are in original-image pixels. By default boxes are reported only for
    findings that are positive at the card's operating threshold (``boxes="positive"``);
    ``boxes="all"`` reports every heatmap peak above the finding's heatmap threshold.

    ``strict``: a DICOM whose header says it is not a frontal chest radiograph (lateral view,
    another body part or modality, colour) gets an ``UnsuitableImageError`` instead of being read
    with warnings (see ``cxrkit.io.load_item``).
    """

    def __init__(
        self,
        model: "ModelPackage | str | Path",
        *,
        device: str = "cpu",
        backend: str = "auto",
        precision: str = "fp32",
        batch_size: int = 8,
        localize: LocalizeConfig | None = None,
        limits: Limits | None = None,
        preprocess: str = "auto",
        num_threads: int | None = None,
        voi_window_index: int = 0,
        boxes: str = "positive",
        strict: bool = False,
        runner_options: dict[str, Any] | None = None,
        preprocess_options: dict[str, Any] | None = None,
    ) -> None:
        from .backends import create_runner
        from .preprocess import Preprocessor

        self.model = model if isinstance(model, ModelPackage) else load_model_package(model)
        self.card = self.model.card
        self.device = Device.parse(device)
        self.device_str = str(device)
        self.precision = Precision.parse(precision)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if boxes not in ("positive", "all"):
            raise ValueError(f"boxes must be 'positive' or 'all', got {boxes!r}")
        self.batch_size = int(batch_size)
        loc = dict(self.card.raw.get("localize", {}))
        self.localize = localize or LocalizeConfig(**loc)
        self.limits = limits or Limits()
        self.voi_window_index = int(voi_window_index)
        self.boxes = boxes
        self.strict = bool(strict)
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        opts = dict(runner_options or {})
        opts.setdefault("num_threads", self.num_threads)
        opts.setdefault("max_batch", self.batch_size)
        self.runner = create_runner(self.model, backend, self.device_str, self.precision, **opts)
        self.runner.load()
        self._inference = Inference(self.runner, Localizer(self.card, self.localize, boxes))
        self._prepare_runner()  # CUDA graphs of every batch size, before any other thread uses the GPU
        self.preprocessor = Preprocessor(
            self.card.input_hw, self.card.mean, self.card.std,
            device=self.device.value, backend=preprocess, batch_size=self.batch_size,
            num_threads=self.num_threads, fit=self.card.fit,
            device_id=None if self.device is Device.CPU else _cuda_index(self.device_str),
            **(preprocess_options or {}),
        )
        self._reader = Reader(limits=self.limits, voi_window_index=self.voi_window_index,
                              keep_j2k_frame=self.device is Device.CUDA, strict=self.strict,
                              num_threads=self.num_threads)
        self._prefetcher = Prefetcher()
        self._lock = threading.Lock()  # runner + post-processing
        self._pre_lock = threading.Lock()  # preprocessing pipelines
        self._closed = False
        log.info("Detector %s on %s via %s (%s)", self.model.name, self.device.value, self.runner.name,
                 self.precision.value)

    @classmethod
    def from_pretrained(cls, name_or_path: "str | Path", device: str = "cpu", backend: str = "auto",
                        precision: str = "fp32", **kwargs: Any) -> "Detector":
        """Load a bundled model by name (see ``cxrkit.list_models()``) or a model folder / card / ONNX file."""
        return cls(load_model_package(name_or_path), device=device, backend=backend, precision=precision, **kwargs)

    # -- properties ----------------------------------------------------------------------------
    @property
    def labels(self) -> tuple[str, ...]:
        return self.card.labels

    @property
    def backend_name(self) -> str:
        return self.runner.name

    @property
    def _oom_step(self) -> int | None:
        """The slice size that fit after an out-of-memory retry (None: the whole batch)."""
        return self._inference.step

    # -- prediction ----------------------------------------------------------------------------
    def predict(self, inputs: Any, batch_size: int | None = None, return_heatmaps: bool = False) -> list[Prediction]:
        """Predict every input; returns one Prediction per input, in input order.

        ``inputs``: a sequence of file paths, bytes (JPEG/PNG/DICOM), numpy arrays (2-D uint8/uint16/
        float32, or (h, w, 3|4) uint8 RGB(A)) or pydicom Datasets; a single such item is treated as a
        sequence of one. A bad item gets a Prediction with ``error`` set; the others are unaffected.
        """
        if isinstance(inputs, _SINGLE) or not isinstance(inputs, Iterable) or _is_dataset(inputs):
            inputs = [inputs]
        return list(self.predict_iter(inputs, batch_size=batch_size, return_heatmaps=return_heatmaps))

    def predict_iter(self, inputs: Iterable[Any], batch_size: int | None = None,
                     return_heatmaps: bool = False, prefetch: bool = True) -> Iterator[Prediction]:
        """Stream predictions for an iterable of inputs, at most two batches in memory at a time.

        With ``prefetch`` (default), reading and preprocessing (decode, resize) of batch n+1 runs in
        the Detector's prefetch thread while batch n is inferred and post-processed, so the decoder
        and the network overlap; results are identical to ``prefetch=False``.
        """
        bs = int(batch_size or self.batch_size)
        for prep in self._prefetcher.run(chunks(inputs, bs), self._prepare, prefetch):  # read → preprocess
            yield from self._finish(prep, return_heatmaps)  # infer → localize → assemble

    # -- stages --------------------------------------------------------------------------------
    def _prepare(self, chunk: list[tuple[int, Any]]) -> Prepared:
        return prepare(chunk, self._reader, self.preprocessor, self._pre_lock, lambda: self._closed)

    def _finish(self, prep: Prepared, return_heatmaps: bool) -> list[Prediction]:
        inferred = None
        if prep.ok:
            with self._lock:
                if self._closed:  # never let infer() load the runner again after close()
                    raise closed_error()
                inferred = self._inference.run(prep.batch, prep.transforms, return_heatmaps)
        return assemble(prep, inferred, self.model.name)

    def _prepare_runner(self) -> None:
        """``runner.prepare`` for every batch size a call can run (1..batch_size); after an
        out-of-memory, the largest size that fit becomes where the inference retry starts."""
        prep = getattr(self.runner, "prepare", None)
        if prep is None:  # a runner from before Runner.prepare
            return
        top = self.batch_size
        while True:
            try:
                prep(range(1, top + 1))
                break
            except OutOfMemoryError as e:
                if top == 1:
                    log.warning("out of memory preparing the runner even for batch 1 (%s); batches will run as "
                                "memory allows", e)
                    break
                top = max(1, top // 2)
                log.warning("out of memory preparing the runner for batches up to %d; trying up to %d",
                            self.batch_size, top)
        if top < self.batch_size:
            self._inference.step = top

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        with self._pre_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            self.runner.close()
            self.preprocessor.close()
        # the threads are joined outside the locks: a prefetch still waiting for one sees _closed
        self._prefetcher.close()
        self._reader.close()

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Detector(model={self.model.name!r}, device={self.device_str!r}, backend={self.runner.name!r}, "
                f"precision={self.precision.value!r})")


def _cuda_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0
