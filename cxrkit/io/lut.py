"""The DICOM grayscale pipeline, stored values -> bone-bright gray with an explicit value range.

Order (DICOM PS3.3 C.11 / PS3.4 N.2): Modality LUT -> VOI LUT -> Presentation LUT.

1. Modality LUT: the Modality LUT Sequence if present, else Rescale Slope/Intercept.
2. VOI: the VOI LUT Sequence if present (preferred over windows, like pydicom's
   ``apply_voi_lut``), else Window Center/Width with VOI LUT Function LINEAR (default),
   LINEAR_EXACT or SIGMOID. ``voi_window_index`` picks the item; a missing index falls back to the
   first with a warning. A LINEAR window keeps the modality values, clipped to the window
   bounds [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2], and reports those bounds as ``value_range``:
   normalizing (x - lo) / (hi - lo) is then exactly the DICOM LINEAR window.
   Without VOI information the range is the full stored range ``[0, 2**BitsStored - 1]``
   (signed: ``[-2**(BitsStored-1), 2**(BitsStored-1) - 1]``) mapped through the Modality LUT:
   it needs no pass over the pixels and does not depend on their content.
3. Bone bright: the output is inverted (x -> lo + hi - x) when PhotometricInterpretation is
   MONOCHROME1 **or** Presentation LUT Shape is INVERSE, and only once when both are set. DX
   requires INVERSE exactly when MONOCHROME1 (PS3.3 C.8.11.6.1.2): the two restate one fact,
   so inverting for each would undo the correction. MONOCHROME2 + INVERSE inverts (the standard's
   "output after inversion is in P-Values"); MONOCHROME1 + IDENTITY is contradictory and is
   inverted per the Photometric Interpretation, with a warning.

Output dtype: the stored integers (uint8/uint16) when no step changed values, else float32 (exact
for integers below 2**24, so 16-bit precision is kept).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["GrayResult", "to_display", "stored_range", "should_invert", "window_bounds", "lut_from_item"]

logger = logging.getLogger(__name__)


@dataclass
class GrayResult:
    pixels: np.ndarray
    value_range: tuple[float, float]
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The representable range of stored values."""
    if signed:
        return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    return 0, 2**bits_stored - 1


def should_invert(photometric: str, presentation_lut_shape: str | None) -> tuple[bool, str | None]:
    """Rule 3 above: returns (invert, warning or None)."""
    mono1 = photometric == "MONOCHROME1"
    shape = (presentation_lut_shape or "").upper()
    if mono1 and shape == "IDENTITY":
        return True, "MONOCHROME1 with Presentation LUT Shape IDENTITY is contradictory; inverted per MONOCHROME1"
    return mono1 or shape == "INVERSE", None


def window_bounds(center: float, width: float, function: str = "LINEAR") -> tuple[float, float]:
    """Input values mapping to the bottom and top of the window output (PS3.3 C.11.2.1.2)."""
    if function == "LINEAR_EXACT":
        return center - width / 2.0, center + width / 2.0
    return center - 0.5 - (width - 1.0) / 2.0, center - 0.5 + (width - 1.0) / 2.0


def lut_from_item(item: Any, signed_input: bool = False) -> tuple[int, np.ndarray, int]:
    """(first mapped value, LUT entries as int64, bits per entry) from a LUT sequence item."""
    desc = [int(v) for v in item.LUTDescriptor]
    n_entries, first, bits = (desc[0] or 65536), desc[1], desc[2]
    if signed_input and first > 32767:
        first -= 65536
    raw = item.LUTData
    if isinstance(raw, (bytes, bytearray)):
        dtype = "<u1" if (bits <= 8 and len(raw) == n_entries) else "<u2"
        data = np.frombuffer(raw, dtype=dtype).astype(np.int64)
    elif isinstance(raw, (int, np.integer)):
        data = np.asarray([raw], dtype=np.int64)
    else:  # list / pydicom MultiValue of ints
        data = np.asarray(list(raw), dtype=np.int64)
    if data.size < n_entries:
        raise ValueError(f"LUT Data has {data.size} entries, the descriptor says {n_entries}")
    return first, data[:n_entries], bits


def _apply_lut(x: np.ndarray, first: int, lut: np.ndarray) -> np.ndarray:
    """Look every value up in ``lut``; values outside the table take its first / last entry."""
    xi = np.floor(x).astype(np.int64) if x.dtype.kind == "f" else x.astype(np.int64)
    return lut[np.clip(xi - first, 0, lut.size - 1)]


def _pick(n: int, index: int, what: str, warnings_: list[str]) -> int:
    if 0 <= index < n:
        return index
    warnings_.append(f"{what} index {index} does not exist ({n} present); used the first")
    return 0


def _multi(value: Any) -> list[float]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):
        return [float(v) for v in value]
    return [float(value)]


def _cast_out(y: np.ndarray, hi: float) -> np.ndarray:
    """Integer results in [0, 65535] stay integer (uint8 when hi <= 255); the rest float32."""
    if y.dtype.kind in "ui" and hi <= 65535 and int(y.min(initial=0)) >= 0:
        return y.astype(np.uint8 if hi <= 255 else np.uint16)
    return y.astype(np.float32)


def to_display(stored: np.ndarray, ds: Any, *, voi_window_index: int = 0) -> GrayResult:
    """Stored (h, w) values of a monochrome image -> bone-bright pixels + value_range.

    ``ds`` is the (frame-0 flattened) pydicom Dataset holding the LUT attributes.
    """
    w_: list[str] = []
    meta: dict = {}
    bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or (8 * stored.dtype.itemsize))
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    lo, hi = stored_range(bits_stored, signed)
    x: np.ndarray = stored
    if x.dtype.kind == "f":  # Float Pixel Data: no bit range to speak of; use the image min/max
        if not np.isfinite(x).all():
            raise ValueError("float pixel data contains NaN or inf")
        lo, hi = float(x.min()), float(x.max())
        hi = hi if hi > lo else lo + 1.0
        w_.append("float pixel data: value range taken from the image min/max")
    elif x.dtype.kind in "ui" and not signed and int(x.max(initial=0)) > hi:
        x = np.minimum(x, hi)  # bits above BitsStored are not part of the value
        w_.append(f"pixel values above the {bits_stored}-bit stored range were clipped")
    changed = False

    # 1. Modality LUT --------------------------------------------------------------------------
    mlut = ds.get("ModalityLUTSequence")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0) if "RescaleSlope" in ds else 1.0
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0) if "RescaleIntercept" in ds else 0.0
    if mlut:
        first, table, _ = lut_from_item(mlut[0], signed)
        x = _apply_lut(x, first, table)
        lo, hi = int(table.min()), int(table.max())
        changed, meta["modality_lut"] = True, "sequence"
    elif slope != 1.0 or intercept != 0.0:
        x = x.astype(np.float64) * slope + intercept
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
        changed, meta["modality_lut"] = True, f"rescale {slope:g}x{intercept:+g}"

    # 2. VOI -----------------------------------------------------------------------------------
    voi_seq = ds.get("VOILUTSequence")
    centers, widths = _multi(ds.get("WindowCenter")), _multi(ds.get("WindowWidth"))
    function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
    if voi_seq:
        k = _pick(len(voi_seq), voi_window_index, "VOI LUT Sequence", w_)
        first, table, bits = lut_from_item(voi_seq[k], signed and not changed)
        x = _apply_lut(x, first, table)
        lo, hi = 0, 2**bits - 1
        if int(table.max()) > hi:  # descriptor understates the entry size (seen in the wild)
            hi = 2 ** int(np.ceil(np.log2(int(table.max()) + 1))) - 1
        changed = True
        meta["voi"] = f"VOI LUT Sequence item {k}" + _explain(voi_seq[k].get("LUTExplanation"))
    elif centers and widths:
        n = min(len(centers), len(widths))
        k = _pick(n, voi_window_index, "window", w_)
        c, w = centers[k], widths[k]
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            w_.append(f"unknown VOI LUT Function {function!r}; used LINEAR")
            function = "LINEAR"
        if w < (1.0 if function == "LINEAR" else 1e-12):
            w_.append(f"invalid window width {w:g}; used the full stored range instead")
        else:
            x, (lo, hi) = _window(x, c, w, function)
            changed = True
            expl = _multi_str(ds.get("WindowCenterWidthExplanation"))
            meta["voi"] = f"window {c:g}/{w:g} {function}" + _explain(expl[k] if k < len(expl) else None)
    if "voi" not in meta:
        full = "image min/max" if stored.dtype.kind == "f" else f"full {bits_stored}-bit stored range"
        meta["voi"] = full + (" after the modality LUT" if changed else "")
        if voi_window_index != 0:
            w_.append(f"voi_window_index {voi_window_index} ignored: the DICOM has no VOI LUT or window")

    # 3. Bone bright -------------------------------------------------------------------------
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper()
    invert, note = should_invert(photometric, ds.get("PresentationLUTShape"))
    if note:
        w_.append(note)
    if invert:
        if x.dtype.kind in "ui":  # integer values imply integer lo, hi: stay exact in integers
            x = int(lo + hi) - x.astype(np.int64)
        elif x.dtype == np.float32 and x is not stored and _exact_f32(lo, hi, lo + hi):  # exact, see _window
            np.subtract(np.float32(lo + hi), x, out=x)
        else:
            x = (lo + hi) - x.astype(np.float64)
    meta["inverted"] = invert
    if x.dtype == np.float32 and x is not stored:  # already the output (see _window): no copy
        out = x
    else:
        out = _cast_out(x, hi) if lo >= 0 else x.astype(np.float32)
    return GrayResult(np.ascontiguousarray(out), (float(lo), float(hi)), meta, w_)


def _exact_f32(*values: float) -> bool:
    """True if every value is a float32 number with at most one fractional bit below 2**22: then
    clipping integers to them and (lo + hi) - x are exact in float32, equal to the float64 result."""
    return all(abs(v) < 2**22 and float(np.float32(v)) == v and (2 * v).is_integer() for v in values)


def _window(x: np.ndarray, c: float, w: float, function: str) -> tuple[np.ndarray, tuple[float, float]]:
    if function == "SIGMOID":
        xf = x.astype(np.float64)
        return 1.0 / (1.0 + np.exp(-4.0 * (xf - c) / w)), (0.0, 1.0)
    lo, hi = window_bounds(c, w, function)
    if hi <= lo:  # LINEAR with width 1: a threshold at c - 0.5
        return (x.astype(np.float64) > c - 0.5).astype(np.float64), (0.0, 1.0)
    if x.dtype.kind in "ui" and x.dtype.itemsize <= 2 and _exact_f32(lo, hi, lo + hi):
        # the usual integer window on 8/16-bit data: the same values as float64, in float32, in
        # place (a 2k x 2k radiograph: ~6 instead of ~20 ms)
        xf = x.astype(np.float32)
        np.clip(xf, np.float32(lo), np.float32(hi), out=xf)
        return xf, (lo, hi)
    return np.clip(x.astype(np.float64), lo, hi), (lo, hi)


def _multi_str(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _explain(text: Any) -> str:
    return f" ({text})" if text else ""
