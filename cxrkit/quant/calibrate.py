"""Calibration: inputs through the real preprocessing, and per-tensor activation ranges.

Ranges are symmetric (``amax``: the int8 scale is ``amax / 127``), measured by running the fp32
graph in ONNX Runtime with the tensors of interest added as outputs:

- ``minmax``: the largest ``|x|`` seen;
- ``percentile``: the ``percentile`` (default 99.99) of ``|x|`` from a 2048-bin histogram;
- ``entropy``: the clipping threshold whose 128-level quantized histogram is closest (KL
  divergence) to the clipped one, the classic TensorRT entropy calibrator, on the same histogram.

Percentile and entropy take two passes over the data (the first finds each tensor's ``max|x|``,
the second fills histograms over ``[0, max|x|]``), so only histograms are kept in memory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..errors import BackendUnavailableError, InputError, ModelError
from ..models import ModelPackage
from .graph import load_model

__all__ = ["METHODS", "load_calibration", "collect_ranges", "entropy_amax", "percentile_amax", "ort_session"]

log = logging.getLogger(__name__)

METHODS = ("percentile", "entropy", "minmax")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".npy", ""}


def _expand(items: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for it in items:
        if isinstance(it, (str, os.PathLike)) and Path(it).is_dir():
            out.extend(str(p) for p in sorted(Path(it).rglob("*"))
                       if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith("."))
        else:
            out.append(it)
    return out


def load_calibration(model: ModelPackage, data: Any, limit: int | None = None) -> np.ndarray:
    """Preprocessed inputs ``(N, 1, H, W)`` float32 for ``model``.

    ``data`` is either such an array already (normalized, the card's input size), or a sequence
    of items the Detector reads (paths, folders, bytes, arrays), which go through
    ``cxrkit.io.load_item`` and ``cxrkit.preprocess.Preprocessor``, the same path as inference.
    Items that cannot be read are skipped with a warning.
    """
    H, W = model.card.input_hw
    if isinstance(data, np.ndarray) and data.ndim == 4:
        if data.shape[1:] != (1, H, W):
            raise ModelError(f"calibration array has shape {data.shape}; model {model.name!r} wants (N, 1, {H}, {W})")
        x = np.ascontiguousarray(data[:limit], dtype=np.float32)
    else:
        items = _expand([data] if isinstance(data, (str, os.PathLike)) else data)[:limit]
        if not items:
            raise ModelError("no calibration items: pass images (paths, folders) or an (N, 1, H, W) array")
        try:
            from ..io import load_item
            from ..preprocess import Preprocessor
        except ImportError as e:
            raise BackendUnavailableError(
                f"reading calibration images needs cxrkit.io and cxrkit.preprocess ({e}); "
                "pass a preprocessed (N, 1, H, W) float32 array instead") from e
        card = model.card
        pre = Preprocessor(card.input_hw, card.mean, card.std, device="cpu", backend="auto", fit=card.fit,
                           batch_size=16, num_threads=min(8, os.cpu_count() or 1))
        batches = []
        try:
            for start in range(0, len(items), 16):
                imgs = []
                for k, it in enumerate(items[start:start + 16]):
                    try:
                        imgs.append(load_item(it, start + k))
                    except InputError as e:
                        log.warning("calibration: skipping %s", e)
                if not imgs:
                    continue
                res = pre.run(imgs)
                for p, err in res.errors.items():
                    log.warning("calibration: skipping %s", err)
                batches.append(np.asarray(res.batch, dtype=np.float32))
        finally:
            close = getattr(pre, "close", None)
            if close is not None:
                close()
        if not batches:
            raise ModelError("none of the calibration items could be read")
        x = np.concatenate(batches)
    if len(x) == 0:
        raise ModelError("the calibration set is empty")
    if not np.isfinite(x).all():
        raise ModelError("the calibration inputs hold NaN or infinite values")
    return x


def ort_session(model: Any, num_threads: int | None = None, optimize: bool = True):
    """An ONNX Runtime CPU session for a path or ModelProto."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(num_threads or min(8, os.cpu_count() or 1))
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    so.log_severity_level = 3
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])


def _batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for s in range(0, len(x), batch_size):
        yield x[s:s + batch_size]


def percentile_amax(hist: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    """Upper edge of the bin where the cumulative count of ``|x|`` reaches ``percentile`` %."""
    c = np.cumsum(hist, dtype=np.float64)
    if c[-1] <= 0:
        return float(edges[-1])
    k = int(np.searchsorted(c, c[-1] * percentile / 100.0))
    return float(edges[min(k + 1, len(edges) - 1)])


def entropy_amax(hist: np.ndarray, edges: np.ndarray, levels: int = 128, stride: int = 16) -> float:
    """KL-optimal clipping threshold of a histogram of ``|x|`` (TensorRT's entropy calibration).

    For each candidate ``i`` (a multiple of ``stride`` bins, at least ``levels``), the reference
    P is the first ``i`` bins with the tail folded into the last one; Q merges the unfolded first
    ``i`` bins into ``levels`` bins and spreads each back evenly over the bins where P is non-zero. The ``i`` with the smallest
    KL(P || Q) gives ``amax = edges[i]``.
    """
    hist = hist.astype(np.float64)
    n = len(hist)
    if hist.sum() <= 0 or n <= levels:
        return float(edges[-1])
    best, best_i = np.inf, n
    for i in range(levels, n + 1, stride):
        ref = hist[:i].copy()
        ref[-1] += hist[i:].sum()  # P: the clipped distribution, tail folded into the last bin
        nz = ref > 0
        bounds = np.linspace(0, i, levels + 1).astype(np.int64)
        starts = bounds[:-1]
        merged = np.add.reduceat(hist[:i], starts)  # Q from the unclipped bins, merged to `levels`
        counts = np.add.reduceat(nz.astype(np.float64), starts)
        per_bin = np.divide(merged, counts, out=np.zeros_like(merged), where=counts > 0)
        q = np.repeat(per_bin, np.diff(bounds)) * nz
        if q.sum() <= 0:
            continue
        pn, qn = ref[nz] / ref.sum(), q[nz] / q.sum()
        kl = float(np.sum(pn * np.log(pn / np.maximum(qn, 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return float(edges[best_i])


def collect_ranges(model: Any, tensors: Sequence[str], data: np.ndarray, method: str = "percentile", *,
                   percentile: float = 99.99, batch_size: int = 8, num_bins: int = 2048,
                   num_threads: int | None = None) -> dict[str, float]:
    """``amax`` per tensor of ``model`` (a path or ModelProto) over the calibration inputs ``data``."""
    import onnx
    from onnx import helper

    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    tensors = list(dict.fromkeys(tensors))
    m = load_model(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    sess = ort_session(m, num_threads, optimize=False)
    in_name = sess.get_inputs()[0].name

    def run(xb: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(tensors, sess.run(tensors, {in_name: xb})))

    amax = {t: 0.0 for t in tensors}
    for xb in _batches(data, batch_size):
        for t, v in run(xb).items():
            if v.size:
                amax[t] = max(amax[t], float(np.abs(v).max()))
    if method == "minmax":
        return amax
    hists = {t: np.zeros(num_bins, np.int64) for t in tensors}
    for xb in _batches(data, batch_size):
        for t, v in run(xb).items():
            if amax[t] > 0:
                hists[t] += np.histogram(np.abs(v), bins=num_bins, range=(0.0, amax[t]))[0]
    out = {}
    for t in tensors:
        if amax[t] <= 0:
            out[t] = 0.0
            continue
        edges = np.linspace(0.0, amax[t], num_bins + 1)
        out[t] = (percentile_amax(hists[t], edges, percentile) if method == "percentile"
                  else entropy_amax(hists[t], edges))
    return out
