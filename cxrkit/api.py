"""The Detector: inputs in, one Prediction per input out, in input order.

Thread safety: a Detector may be shared across threads. Reading and sniffing inputs runs in
the calling thread (or its prefetch thread); preprocessing runs under one lock and inference
plus post-processing under another (DALI pipelines and CUDA graphs are not re-entrant), so
concurrent callers are serialized stage by stage, batch by batch, and each gets exactly the
results of a serial call. For throughput
under many concurrent single-image callers use ``cxrkit.BatchingDetector``.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .config import Device, Limits, LocalizeConfig, Precision
from .errors import CxrkitError, DecodeError, InputError, OutOfMemoryError
from .io.sources import _is_dataset, describe_item
from .models import ModelPackage, load_model_package
from .results import Finding, Prediction

__all__ = ["Detector"]

log = logging.getLogger(__name__)

_SINGLE = (str, bytes, bytearray, memoryview, os.PathLike, np.ndarray)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach"):  # torch
        return a.detach().float().cpu().numpy() if a.dtype.is_floating_point else a.detach().cpu().numpy()
    if hasattr(a, "get"):  # cupy
        return a.get()
    return np.asarray(a)


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
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        opts = dict(runner_options or {})
        opts.setdefault("num_threads", self.num_threads)
        opts.setdefault("max_batch", self.batch_size)
        self.runner = create_runner(self.model, backend, self.device_str, self.precision, **opts)
        self.runner.load()
        self.preprocessor = Preprocessor(
            self.card.input_hw, self.card.mean, self.card.std,
            device=self.device.value, backend=preprocess, batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=None if self.device is Device.CPU else _cuda_index(self.device_str),
            **(preprocess_options or {}),
        )
        self._lock = threading.Lock()  # runner + post-processing
        self._pre_lock = threading.Lock()  # preprocessing pipelines
        self._pool_lock = threading.Lock()
        self._loader = None  # ThreadPoolExecutor reading inputs (see _load_pool)
        self._closed = False
        self._oom_step: int | None = None  # slice size that fit after an out-of-memory retry
        self._thresholds = self.card.thresholds  # (K,)
        self._heat_thresholds = self.card.heatmap_thresholds  # (K,)
        self._enabled = self.card.enabled  # (K,)
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
        a helper thread while batch n is inferred and post-processed, so the decoder and the
        network overlap; results are identical to ``prefetch=False``.
        """
        bs = int(batch_size or self.batch_size)
        it = iter(enumerate(inputs))
        chunks = iter(lambda: list(itertools.islice(it, bs)), [])
        if not prefetch:
            for chunk in chunks:
                yield from self._finish(self._prepare(chunk), return_heatmaps)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="cxrkit-prefetch") as ex:
            first = next(chunks, None)
            if first is None:
                return
            fut = ex.submit(self._prepare, first)
            for chunk in chunks:
                nxt = ex.submit(self._prepare, chunk)
                yield from self._finish(fut.result(), return_heatmaps)
                fut = nxt
            yield from self._finish(fut.result(), return_heatmaps)

    # -- internals -----------------------------------------------------------------------------
    def _load(self, index: int, item: Any):
        from .io import load_item

        t0 = time.perf_counter()
        try:
            img = load_item(item, index, limits=self.limits, voi_window_index=self.voi_window_index,
                            keep_j2k_frame=self.device is Device.CUDA)
        except InputError as e:
            return None, e, (time.perf_counter() - t0) * 1e3
        except Exception as e:  # a decoder bug must never take the batch down
            log.exception("unexpected error reading input #%d", index)
            return None, DecodeError(describe_item(item, index), f"unexpected {type(e).__name__}: {e}"), 0.0
        return img, None, (time.perf_counter() - t0) * 1e3

    def _load_pool(self):
        """The thread pool that reads inputs (created on first use; None with one thread)."""
        if self.num_threads <= 1:
            return None
        with self._pool_lock:
            if self._loader is None:
                from concurrent.futures import ThreadPoolExecutor

                self._loader = ThreadPoolExecutor(self.num_threads, thread_name_prefix="cxrkit-load")
            return self._loader

    def _prepare(self, chunk: Sequence[tuple[int, Any]]) -> "_Prepared":
        """Stage 1: read every item, then preprocess the readable ones as one batch."""
        if self._closed:
            raise RuntimeError("this Detector is closed")
        n = len(chunk)
        prep = _Prepared(chunk=chunk, loaded=[None] * n, errors={}, load_ms=[0.0] * n)
        # items are read in parallel (results keep the input order): file reads and Pillow/libjpeg
        # decodes release the GIL; measured here, OpenJPEG through pylibjpeg does not (4 J2K DICOMs:
        # 2.5-3.0 s serial, 2.4-2.5 s on 2 threads), so J2K DICOMs on the CPU gain little
        pool = self._load_pool() if n > 1 else None
        loads = pool.map(lambda t: self._load(*t), chunk) if pool is not None else (self._load(*t) for t in chunk)
        for pos, (img, err, ms) in enumerate(loads):
            prep.load_ms[pos] = ms
            if err is not None:
                prep.errors[pos] = err
            else:
                prep.loaded[pos] = img
        ok_pos = [p for p in range(n) if prep.loaded[p] is not None]
        if ok_pos:
            t0 = time.perf_counter()
            with self._pre_lock:
                if self._closed:  # close() may have run while this call was reading its inputs
                    raise RuntimeError("this Detector is closed")
                pre = self.preprocessor.run([prep.loaded[p] for p in ok_pos])
            prep.preprocess_ms = (time.perf_counter() - t0) * 1e3
            for p_local, err in pre.errors.items():
                prep.errors[ok_pos[p_local]] = err
            prep.ok = [ok_pos[p] for p in pre.ok_positions]
            prep.pre = pre
        return prep

    def _finish(self, prep: "_Prepared", return_heatmaps: bool) -> list[Prediction]:
        """Stage 2: infer and post-process the batch, then assemble one Prediction per item."""
        results: dict[int, dict[str, Any]] = {}
        stage_ms: dict[str, float] = {}
        if prep.ok:
            with self._lock:
                if self._closed:  # never let infer() load the runner again after close()
                    raise RuntimeError("this Detector is closed")
                results, stage_ms = self._infer(prep, return_heatmaps)
            stage_ms["preprocess"] = prep.preprocess_ms
        n_done = max(1, len(results))
        out = []
        for pos, (index, item) in enumerate(prep.chunk):
            img = prep.loaded[pos]
            err = prep.errors.get(pos)
            source = img.source if img is not None else getattr(err, "source", None) or describe_item(item, index)
            timings = {"load": prep.load_ms[pos]}
            if err is not None:
                out.append(Prediction(source=source, index=index, error=err, timings_ms=timings,
                                      image_size=img.image_size if img is not None else None,
                                      meta=dict(img.meta) if img is not None else {}, model=self.model.name))
                continue
            r = results[pos]
            timings.update({k: v / n_done for k, v in stage_ms.items()})
            out.append(Prediction(
                source=source, index=index, findings=r["findings"], image_size=img.image_size,
                heatmaps=r.get("heatmaps"), timings_ms=timings, meta=dict(img.meta),
                warnings=tuple(img.warnings), model=self.model.name,
            ))
        return out

    def _infer(self, prep: "_Prepared", return_heatmaps: bool) -> tuple[dict[int, dict[str, Any]], dict[str, float]]:
        ok, pre, errors = prep.ok, prep.pre, prep.errors
        results: dict[int, dict[str, Any]] = {}
        infer_ms = post_ms = 0.0
        # run in slices; a device out-of-memory halves the slice and retries before failing items,
        # and later batches start from the slice size that last worked
        start, step = 0, min(len(ok), self._oom_step or len(ok))
        while start < len(ok):
            stop = min(len(ok), start + step)
            ti = time.perf_counter()
            try:
                out = self.runner.infer(pre.batch[start:stop])
                tp = time.perf_counter()
                part = self._postprocess(out, pre.transforms[start:stop], return_heatmaps)
            except OutOfMemoryError as e:
                if step == 1:
                    for p in ok[start:stop]:
                        errors[p] = e
                    start = stop
                else:
                    step = max(1, step // 2)
                    self._oom_step = step
                    log.warning("out of memory at batch %d; retrying with batches of %d", stop - start, step)
                continue
            te = time.perf_counter()
            infer_ms += (tp - ti) * 1e3
            post_ms += (te - tp) * 1e3
            for p, r in zip(ok[start:stop], part):
                results[p] = r
            start = stop
        return results, {"infer": infer_ms, "postprocess": post_ms}

    def _postprocess(self, out: dict[str, Any], transforms: list[Any], return_heatmaps: bool) -> list[dict[str, Any]]:
        from .postprocess import detect

        logits = _to_numpy(out["logits"]).astype(np.float32, copy=False)  # (B, K)
        heat = out["heatmaps"]  # (B, K, h, w), numpy or device array
        det = detect(heat, self._heat_thresholds, self.localize)
        counts = _to_numpy(det.counts)  # (B, K)
        scores_b = _to_numpy(det.scores)  # (B, K, M)
        points_b = _to_numpy(det.points)  # (B, K, M, 2)
        boxes_b = _to_numpy(det.boxes)  # (B, K, M, 4)
        probs = _sigmoid(logits)  # (B, K)
        s = float(self.card.heatmap_stride)
        heat_np = _sigmoid(_to_numpy(heat)) if return_heatmaps else None
        res = []
        for b, tf in enumerate(transforms):
            findings = {}
            for k, key in enumerate(self.card.labels):
                score = float(probs[b, k])
                positive = bool(self._enabled[k] and score >= self._thresholds[k])
                c = int(counts[b, k])
                if c and (positive or self.boxes == "all"):
                    boxes = tf.boxes_to_source(boxes_b[b, k, :c].astype(np.float64) * s)
                    points = tf.points_to_source((points_b[b, k, :c].astype(np.float64) + 0.5) * s)
                    bscores = scores_b[b, k, :c]
                else:
                    boxes, points, bscores = np.zeros((0, 4), np.float32), np.zeros((0, 2), np.float32), np.zeros((0,), np.float32)
                findings[key] = Finding(key=key, score=score, positive=positive, threshold=float(self._thresholds[k]),
                                        boxes_xyxy=boxes, box_scores=bscores, points_xy=points)
            r: dict[str, Any] = {"findings": findings}
            if heat_np is not None:
                r["heatmaps"] = heat_np[b]
            res.append(r)
        return res

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        with self._pre_lock, self._lock:
            if not self._closed:
                self._closed = True
                self.runner.close()
                self.preprocessor.close()
                with self._pool_lock:
                    if self._loader is not None:
                        self._loader.shutdown(wait=True)
                        self._loader = None

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Detector(model={self.model.name!r}, device={self.device_str!r}, backend={self.runner.name!r}, "
                f"precision={self.precision.value!r})")


@dataclass
class _Prepared:
    chunk: Sequence[tuple[int, Any]]
    loaded: list[Any]
    errors: dict[int, CxrkitError]
    load_ms: list[float]
    ok: list[int] = field(default_factory=list)
    pre: Any = None
    preprocess_ms: float = 0.0


def _cuda_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


