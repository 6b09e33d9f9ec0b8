"""Numpy ground truth of preprocessing, also the no-DALI fallback path.

The function, written once (``preprocess_reference``):

1. Unit range: ``u = clip((x - lo) / (hi - lo), 0, 1)`` with ``(lo, hi) = value_range``.
   Clipping is part of the contract: a value range is a window (DICOM VOI), and values outside it
   saturate, as a viewer shows them. ``lo > hi`` is allowed (an inverted window).
2. Letterbox resize to ``(nh, nw)`` from :func:`letterbox_geometry` with a separable antialiased
   linear (triangle) filter, the filter of DALI's ``fn.resize(interp_type=INTERP_LINEAR,
   antialias=True)``. Per axis, with ``s = n_in / n_out``, output pixel ``i`` sits at source
   position ``c = (i + 0.5) * s - 0.5`` (pixel centres, half-pixel convention); its weights are the
   triangle ``max(0, 1 - |k - c| / r)`` over integer taps ``k``, with half-width ``r = max(1, s)``
   (plain bilinear when upscaling, a support that grows with the downscale factor otherwise),
   normalised to sum 1; taps outside the image are clamped to the edge pixel (edge replication).
3. Place into an ``(H, W)`` canvas of unit value 0.0 at the letterbox offset.
4. Normalise: ``(u - mean) / std``. Output ``(1, H, W)`` float32.

Implementation notes. Resizing is linear with weights that sum to 1 and clipping happens in the
source dtype, so the affine map of step 1 is applied after the resize, on the small image; this
is the same function up to float32 rounding and it is what the DALI pipeline does too. Each axis'
weight matrix is banded; it is stored as dense blocks of ``_BLOCK`` output pixels over just the
source span they touch, and applied as two blocked matmuls (about 5 ms for 2048^2 -> 512^2).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from cxrkit.preprocess.letterbox import LetterboxTransform, letterbox_geometry

__all__ = [
    "preprocess_reference",
    "resize_weights",
    "resize_linear_aa",
    "clip_to_range",
    "check_value_range",
    "pad_value",
]

_BLOCK = 64  # output pixels per dense weight block

# A weight matrix as blocks: (out_start, out_stop, src_start, src_stop, weights (out, src) float32)
_Blocks = tuple[tuple[int, int, int, int, np.ndarray], ...]


def resize_taps(n_in: int, n_out: int, extent: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The filter as taps: first source index k0 (n_out,) int64 and weights (n_out, T) float64
    (rows sum to 1; indices outside [0, n_in) clamp to the edge). See resize_weights."""
    if n_in <= 0 or n_out <= 0:
        raise ValueError(f"sizes must be positive, got n_in={n_in}, n_out={n_out}")
    ext = float(n_in if extent is None else extent)
    if not 0 < ext <= n_in:
        raise ValueError(f"extent must be in (0, n_in={n_in}], got {extent}")
    s = ext / n_out
    r = max(1.0, s)  # triangle half-width in source pixels
    n_taps = int(math.ceil(2.0 * r)) + 1
    c = (np.arange(n_out) + 0.5) * s - 0.5  # (n_out,) source centre of each output pixel
    k0 = np.ceil(c - r).astype(np.int64)  # (n_out,) first tap (its weight may be 0)
    taps = k0[:, None] + np.arange(n_taps)[None, :]  # (n_out, T)
    w = np.maximum(0.0, 1.0 - np.abs(taps - c[:, None]) / r)  # (n_out, T)
    w /= w.sum(axis=1, keepdims=True)
    return k0, w


@functools.lru_cache(maxsize=256)
def _taps32(n_in: int, n_out: int, extent: float | None) -> tuple[np.ndarray, np.ndarray]:
    k0, w = resize_taps(n_in, n_out, extent)
    w32 = np.ascontiguousarray(w, dtype=np.float32)
    k0.setflags(write=False)
    w32.setflags(write=False)
    return k0, w32


def resize_linear_aa_fast(
    img: np.ndarray, out_hw: tuple[int, int], extent_hw: tuple[float, float] | None = None
) -> np.ndarray:
    """resize_linear_aa through the C++ sparse-tap kernel (cxrkit._C): the same function, ~30x
    less arithmetic when downscaling; equal to the reference within float32 rounding
    (tests/test_preprocess_fast.py). Falls back to the reference when _C is not built."""
    try:
        from cxrkit import _C
    except ImportError:
        return resize_linear_aa(img, out_hw, extent_hw)
    h, w = img.shape
    eh, ew = (None, None) if extent_hw is None else (float(extent_hw[0]), float(extent_hw[1]))
    k0y, wy = _taps32(h, int(out_hw[0]), None if eh == h else eh)
    k0x, wx = _taps32(w, int(out_hw[1]), None if ew == w else ew)
    src = np.ascontiguousarray(img)
    fn = {np.dtype(np.uint8): _C.resize_aa_u8, np.dtype(np.uint16): _C.resize_aa_u16}.get(src.dtype)
    if fn is None:
        fn, src = _C.resize_aa_f32, src.astype(np.float32, copy=False)
    return fn(src, k0y, wy, k0x, wx)  # (nh, nw) float32


def resize_weights(n_in: int, n_out: int, extent: float | None = None) -> np.ndarray:
    """Dense (n_out, n_in) float64 weight matrix of the antialiased triangle filter (see module doc).

    ``extent`` (default ``n_in``): the length, in input pixels, of the span [0, extent) that the
    n_out output pixels cover; a JPEG decoded at scale 1/k has ceil(n/k) pixels of which only the
    first n/k are image (the last one is partly padding), so its extent is n/k."""
    k0, w = resize_taps(n_in, n_out, extent)  # (n_out,), (n_out, T)
    n_taps = w.shape[1]
    taps = k0[:, None] + np.arange(n_taps)[None, :]  # (n_out, T)
    mat = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.repeat(np.arange(n_out), n_taps)
    np.add.at(mat, (rows, np.clip(taps, 0, n_in - 1).ravel()), w.ravel())  # edge clamp
    return mat


@functools.lru_cache(maxsize=256)
def _weight_blocks(n_in: int, n_out: int, extent: float | None = None) -> _Blocks:
    mat = resize_weights(n_in, n_out, extent)  # (n_out, n_in)
    blocks = []
    for i0 in range(0, n_out, _BLOCK):
        i1 = min(n_out, i0 + _BLOCK)
        cols = np.flatnonzero(mat[i0:i1].any(axis=0))
        s0, s1 = int(cols[0]), int(cols[-1]) + 1
        blk = np.ascontiguousarray(mat[i0:i1, s0:s1], dtype=np.float32)  # (i1-i0, s1-s0)
        blk.setflags(write=False)
        blocks.append((i0, i1, s0, s1, blk))
    return tuple(blocks)


def resize_linear_aa(
    img: np.ndarray, out_hw: tuple[int, int], extent_hw: tuple[float, float] | None = None
) -> np.ndarray:
    """(h, w) any real dtype -> (nh, nw) float32, antialiased linear resize (see module doc).
    ``extent_hw``: the part [0, eh) x [0, ew) of the input that is image (see resize_weights)."""
    h, w = img.shape
    nh, nw = int(out_hw[0]), int(out_hw[1])
    eh, ew = (None, None) if extent_hw is None else (float(extent_hw[0]), float(extent_hw[1]))
    eh = None if eh == h else eh
    ew = None if ew == w else ew
    tmp = np.empty((nh, w), dtype=np.float32)  # (nh, w) after the vertical pass
    for i0, i1, s0, s1, blk in _weight_blocks(h, nh, eh):
        np.matmul(blk, img[s0:s1].astype(np.float32, copy=False), out=tmp[i0:i1])
    out = np.empty((nh, nw), dtype=np.float32)  # (nh, nw)
    for j0, j1, s0, s1, blk in _weight_blocks(w, nw, ew):
        out[:, j0:j1] = tmp[:, s0:s1] @ blk.T
    return out


def check_value_range(value_range: tuple[float, float], source: str = "") -> tuple[float, float]:
    """Validate a value range; returns (lo, hi) as floats. Raises ValueError if lo == hi or not finite."""
    lo, hi = float(value_range[0]), float(value_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo == hi:
        where = f"{source!r}: " if source else ""
        raise ValueError(
            f"{where}value_range must be two different finite numbers (values mapping to 0.0 and "
            f"1.0), got {value_range!r}"
        )
    return lo, hi


_BOUNDS: dict[np.dtype, tuple[float, float] | None] = {}  # np.iinfo + issubdtype: ~3 µs a call


def _dtype_bounds(dtype: np.dtype) -> tuple[float, float] | None:
    try:
        return _BOUNDS[dtype]
    except KeyError:
        b = _BOUNDS[dtype] = _dtype_bounds_uncached(dtype)
        return b


def _dtype_bounds_uncached(dtype: np.dtype) -> tuple[float, float] | None:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    if dtype == np.bool_:
        return 0.0, 1.0
    return None


def clip_to_range(pixels: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Saturate pixels to the value range (in their own dtype when the bounds are integers, else
    in float32). Returns `pixels` itself when no value can lie outside (an integer dtype whose
    whole range is inside) or none does."""
    lo, hi = min(value_range), max(value_range)
    bounds = _dtype_bounds(pixels.dtype)
    if bounds is not None and lo <= bounds[0] and hi >= bounds[1]:
        return pixels
    if pixels.size == 0:
        return pixels
    mn, mx = float(pixels.min()), float(pixels.max())
    if mn >= lo and mx <= hi and not (np.isnan(mn) or np.isnan(mx)):
        return pixels
    if bounds is not None:
        lo_c, hi_c = float(max(lo, bounds[0])), float(min(hi, bounds[1]))
        if lo_c.is_integer() and hi_c.is_integer():  # exact in the integer dtype
            return np.clip(pixels, int(lo_c), int(hi_c))
        # A bound between two integers: a value below it must become the bound itself (unit 0.0
        # exactly), not the next integer, so clip in float32 (exact for integers below 2^24).
    out = np.clip(pixels.astype(np.float32, copy=False), lo, hi)
    return np.nan_to_num(out, nan=lo, copy=False)  # NaN -> the 0.0 end of the window


def pad_value(mean: float, std: float) -> float:
    """Normalised value of the padding (unit value 0.0)."""
    return float(np.float32((np.float32(0.0) - np.float32(mean)) / np.float32(std)))


def _normalize_in_place(src: np.ndarray, lo: float, hi: float, mean: float, std: float,
                        out: np.ndarray | None = None) -> np.ndarray:
    """Steps 1 and 4 for an (H, W) integer image that needs no resize: the resize at scale 1 is the
    identity (tap weights 0, 1, 0), so this is the same function bit for bit, as float32 operations
    in one (1, H, W) buffer instead of five temporaries (~13x less CPU for a 256^2 input)."""
    if out is None:
        out = np.empty((1,) + src.shape, np.float32)  # (1, H, W)
    o = out[0]
    np.copyto(o, src, casting="unsafe")  # exact: integers below 2^24
    np.subtract(o, np.float32(lo), out=o)
    _divide(o, np.float32(hi - lo))  # unit range
    np.subtract(o, np.float32(mean), out=o)
    _divide(o, np.float32(std))
    return out


def _normalize_fast(src: np.ndarray, lo: float, hi: float, mean: float, std: float,
                    out: np.ndarray | None = None) -> np.ndarray:
    """:func:`_normalize_in_place` in one pass of the C++ kernel (``cxrkit._C.normalize_u8`` /
    ``normalize_u16``: the same float32 steps, bit for bit, tests/test_preprocess_fast.py); the numpy
    version when _C is not built."""
    fn = _native_normalize().get(src.dtype)
    if fn is None:  # no cxrkit._C, or not uint8 / uint16
        return _normalize_in_place(src, lo, hi, mean, std, out)
    if out is None:
        out = np.empty((1,) + src.shape, np.float32)  # (1, H, W)
    # the constants numpy's version uses: each a float32 (hi - lo rounded from float64 once)
    fn(src, float(np.float32(lo)), float(np.float32(hi - lo)), float(np.float32(mean)), float(np.float32(std)), out)
    return out


@functools.lru_cache(maxsize=1)
def _native_normalize() -> dict[np.dtype, Any]:
    try:
        from cxrkit import _C
    except ImportError:
        return {}
    return {np.dtype(np.uint8): _C.normalize_u8, np.dtype(np.uint16): _C.normalize_u16}


def _divide(o: np.ndarray, d: np.float32) -> None:
    """``o /= d`` in float32; by a power of two as a multiplication by its inverse, which is exact
    and gives the same bits (both round the same exact quotient once), at a fraction of the cost."""
    m, _ = math.frexp(float(d))
    if abs(m) == 0.5:
        np.multiply(o, np.float32(1.0) / d, out=o)
    else:
        np.divide(o, d, out=o)


def preprocess_reference(
    pixels: np.ndarray,
    value_range: tuple[float, float],
    input_hw: tuple[int, int],
    mean: float,
    std: float,
    *,
    src_hw: tuple[int, int] | None = None,
    extent_hw: tuple[float, float] | None = None,
    fast: bool = False,
    fit: str = "letterbox",
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, LetterboxTransform]:
    """(h, w) gray pixels -> ((1, H, W) float32 normalised model input, its letterbox transform).

    ``src_hw`` / ``extent_hw``: for pixels that are a reduced decode of a larger image (a JPEG
    decoded at 1/k in the DCT domain): the original (h, w), which sets the letterbox geometry,
    and the part [0, eh) x [0, ew) of ``pixels`` that is image (h/k, w/k). ``fast``: resize with
    the C++ kernel (the same function within float32 rounding) instead of the numpy reference.
    ``fit``: "letterbox" (the steps above), "center_crop" or "stretch" (see letterbox.py): step 3
    then keeps the part of the resized image that falls inside (H, W). ``out``: a (1, H, W) float32
    C-contiguous buffer to write into (e.g. a row of the batch), returned; default a new one."""
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be (h, w) gray, got shape {pixels.shape}")
    lo, hi = check_value_range(value_range)
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    t = letterbox_geometry(pixels.shape if src_hw is None else src_hw, input_hw, fit)
    (nh, nw), (top, left) = t.resized_hw, t.offset_yx
    H, W = t.dst_hw

    src = clip_to_range(pixels, (lo, hi))  # (h, w) source dtype
    if out is not None and (out.shape != (1, H, W) or out.dtype != np.float32 or not out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous (1, {H}, {W}) float32 array, got {out.shape} {out.dtype}")
    if fast and extent_hw is None and (nh, nw) == (H, W) == pixels.shape and pixels.dtype in (np.uint8, np.uint16):
        return _normalize_fast(src, lo, hi, mean, std, out), t  # an image of the input's size: no resize
    resize = resize_linear_aa_fast if fast else resize_linear_aa
    resized = resize(src, (nh, nw), extent_hw)  # (nh, nw) float32, source units
    unit = (resized - np.float32(lo)) / np.float32(hi - lo)  # (nh, nw) in [0, 1]
    if out is None:
        out = np.full((1, H, W), pad_value(mean, std), dtype=np.float32)  # (1, H, W)
    else:
        out.fill(pad_value(mean, std))
    # the part of the resized image inside the canvas: all of it for a letterbox, a crop otherwise
    y0, y1, x0, x1 = max(0, -top), min(nh, H - top), max(0, -left), min(nw, W - left)
    out[0, top + y0 : top + y1, left + x0 : left + x1] = (unit[y0:y1, x0:x1] - np.float32(mean)) / np.float32(std)
    return out, t
