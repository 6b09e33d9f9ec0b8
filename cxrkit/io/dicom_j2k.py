"""DICOM JPEG 2000 frames as encoded input for the GPU decoder (nvJPEG2000 via DALI "mixed").

A DICOM image can skip the CPU decode when its frame is JPEG 2000 and its gray mapping is linear:
then normalising the *stored* values with a value range in stored units is the same function as
normalising io's display pixels with io's value range. Linear means:

- MONOCHROME1 or MONOCHROME2, one sample per pixel, unsigned, 1 <= BitsStored <= 16;
- Modality LUT: Rescale Slope/Intercept (or none), no Modality LUT Sequence;
- VOI: a LINEAR / LINEAR_EXACT window of width >= 1 (the one ``voi_window_index`` picks, as
  cxrkit.io does), or none (then the full stored range); no VOI LUT Sequence, no SIGMOID.

With x = s * slope + intercept and the display range (lo, hi) of cxrkit.io.lut (window bounds, or
the rescaled full stored range), the stored range is ((lo - b) / m, (hi - b) / m); it is swapped
when the image is inverted (MONOCHROME1 or Presentation LUT Shape INVERSE, cxrkit.io.lut's rule)
or when the slope is negative. Clipping to the window and the inversion are then both expressed by
that (possibly inverted) range, which the pipeline applies exactly like the reference does.

Decoded values: nvJPEG2000 (DALI "mixed") scales a p-bit frame decoded as uint16 to the full uint16
range, DALI's CPU decoder only frames of <= 8 bits (:func:`dali_uint16_multiplier`); the pipeline
undoes that per sample before it clamps to the stored-unit range, using the precision read from
the codestream (:func:`codestream_precision`).

The item format (what cxrkit.io is asked to provide for a DICOM LoadedImage, see
:func:`attach_j2k_frame`): ``encoded`` = the frame's JPEG 2000 codestream bytes and
``meta["linear_stored_range"] = (lo, hi)`` in stored units; ``meta["transfer_syntax"]`` one of
:data:`J2K_TRANSFER_SYNTAXES`. ``value_range`` stays io's display range; ``pixels`` are io's
display pixels when attached to a decoded image, and None from ``load_item(keep_j2k_frame=True)``,
which skips the CPU decode (~0.6 s for a 2k x 2k lossless 12-bit frame here, against ~6 ms to read
the header) and leaves ``decode_fallback`` to decode it on the CPU if the GPU decoder cannot.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = [
    "J2K_TRANSFER_SYNTAXES",
    "linear_stored_range",
    "attach_j2k_frame",
    "is_encoded_j2k",
    "codestream_precision",
    "dali_uint16_multiplier",
]

J2K_TRANSFER_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Image Compression (Lossless Only)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000 Image Compression
    "1.2.840.10008.1.2.4.201",  # HTJ2K (Lossless Only)
    "1.2.840.10008.1.2.4.202",  # HTJ2K (Lossless RPCL)
    "1.2.840.10008.1.2.4.203",  # HTJ2K
})


def codestream_precision(data: bytes) -> int | None:
    """Bit depth (1..38) of component 0 from a JPEG 2000 / HTJ2K codestream's SIZ marker (``Ssiz``),
    or None when ``data`` is not a codestream that starts SOC, SIZ (a JP2 file wrapper is looked
    into for its ``jp2c`` box). Signed components also give None (the linear route is unsigned)."""
    mv = memoryview(data)
    if bytes(mv[:4]) != b"\xff\x4f\xff\x51" and bytes(mv[4:8]) == b"jP  ":  # JP2 boxes: find jp2c
        off = 0
        while off + 8 <= len(mv):
            size = int.from_bytes(mv[off:off + 4], "big")
            kind = bytes(mv[off + 4:off + 8])
            head = 8
            if size == 1 and off + 16 <= len(mv):
                size, head = int.from_bytes(mv[off + 8:off + 16], "big"), 16
            if kind == b"jp2c":
                mv = mv[off + head:]
                break
            if size < head:
                return None
            off += size
    # SOC, SIZ, Lsiz(2) Rsiz(2) 8 x 4-byte sizes, Csiz(2), then Ssiz of component 0 at offset 42
    if len(mv) < 43 or bytes(mv[:4]) != b"\xff\x4f\xff\x51":
        return None
    ssiz = mv[42]
    if ssiz & 0x80:
        return None
    return (ssiz & 0x7F) + 1


def dali_uint16_multiplier(precision: int, gpu: bool) -> float:
    """The factor by which DALI's ``fn.decoders.image(dtype=UINT16)`` multiplies a ``precision``-bit
    unsigned JPEG 2000 sample (read in DALI 2.4's ``imgcodec`` decoder source, 2026-11-30, and
    measured on the CPU; the GPU side is checked by tests/test_preprocess_j2k.py on a GPU):

    - both devices convert the decoded type to uint16's dynamic range: frames of <= 8 bits are
      decoded as uint8 and come out x257 (65535 / 255);
    - on the GPU ("mixed", nvJPEG2000) DALI also stretches the codestream's precision to the full
      range of that type (``DynamicRangeMultiplier`` = max / (2^p - 1), then rounds), so in all a
      p-bit frame comes out x 65535 / (2^p - 1): 12-bit x16.004, 15-bit x2.00003; its CPU
      backend skips that step (a TODO in DALI), so 9..16-bit frames come out unscaled there.

    The pipeline divides by this factor and rounds, which restores the stored values exactly (the
    decoder's rounding error, <= 0.5, shrinks below 0.25 of one stored unit)."""
    if not 1 <= precision <= 16:
        raise ValueError(f"precision must be 1..16 for a uint16 decode, got {precision}")
    if gpu:
        return 65535.0 / float((1 << precision) - 1)
    return 257.0 if precision <= 8 else 1.0


def _float(value: Any, default: float) -> float:
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _first(value: Any, index: int) -> float | None:
    """Item ``index`` (or the first, as cxrkit.io falls back) of a possibly multi-valued element."""
    if value is None or value == "":
        return None
    vals = list(value) if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)) else [value]
    if not vals:
        return None
    v = vals[index] if 0 <= index < len(vals) else vals[0]
    return _float(v, float("nan"))


def linear_stored_range(ds: Any, voi_window_index: int = 0) -> tuple[float, float] | None:
    """(value mapping to 0.0, value mapping to 1.0) in STORED units, or None if the mapping of
    ``ds`` (a frame-0 flat pydicom Dataset) is not linear (see module doc)."""
    from cxrkit.io.lut import should_invert, stored_range, window_bounds

    photometric = str(ds.get("PhotometricInterpretation") or "").upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    if int(ds.get("SamplesPerPixel") or 1) != 1 or int(ds.get("PixelRepresentation") or 0) != 0:
        return None
    bits = int(ds.get("BitsStored") or 0)
    if not 1 <= bits <= 16 or ds.get("ModalityLUTSequence") or ds.get("VOILUTSequence"):
        return None
    slope = _float(ds.get("RescaleSlope"), 1.0) or 1.0  # io reads a 0 / empty slope as 1
    intercept = _float(ds.get("RescaleIntercept"), 0.0)
    s_lo, s_hi = stored_range(bits, False)
    lo, hi = sorted((s_lo * slope + intercept, s_hi * slope + intercept))  # modality units
    c = _first(ds.get("WindowCenter"), voi_window_index)
    w = _first(ds.get("WindowWidth"), voi_window_index)
    function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
    if c is not None and w is not None:
        if function not in ("LINEAR", "LINEAR_EXACT"):
            return None  # SIGMOID (unknown functions: io uses LINEAR with a warning; stay safe)
        if not (math.isfinite(c) and math.isfinite(w)):
            return None
        if w >= 1.0:  # io ignores a narrower window (warning) and keeps the full range
            lo, hi = window_bounds(c, w, function)
            if hi <= lo:  # LINEAR width 1: a threshold, not a linear map
                return None
    invert, _ = should_invert(photometric, ds.get("PresentationLUTShape"))
    a, b = (lo - intercept) / slope, (hi - intercept) / slope  # stored values of lo, hi
    if invert:
        a, b = b, a
    if a == b or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return float(a), float(b)


def attach_j2k_frame(img: Any, ds: Any, voi_window_index: int = 0) -> Any:
    """``img`` (io's LoadedImage of ``ds``) with its JPEG 2000 frame 0 as ``encoded`` and
    ``meta["linear_stored_range"]``, ready for the GPU decoder; ``img`` itself if the DICOM is not
    single-frame-usable JPEG 2000 with a linear mapping. Used by cxrkit.io.load_item(keep_j2k_frame=True)."""
    from cxrkit.errors import InputError
    from cxrkit.io import encapsulated_frame

    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID") or "") if meta is not None else ""
    if ts not in J2K_TRANSFER_SYNTAXES or int(ds.get("NumberOfFrames") or 1) != 1:
        return img
    if ds.get("SharedFunctionalGroupsSequence") or ds.get("PerFrameFunctionalGroupsSequence"):
        return img  # enhanced objects: io reads the mapping from functional groups; left to io
    rng = linear_stored_range(ds, voi_window_index)
    if rng is None or int(ds.get("Rows") or 0) != img.image_size[0] or int(ds.get("Columns") or 0) != img.image_size[1]:
        return img
    try:
        frame, ts = encapsulated_frame(ds, 0)
    except InputError:
        return img
    new_meta = dict(img.meta, linear_stored_range=rng, transfer_syntax=ts)
    return dataclasses.replace(img, encoded=frame, meta=new_meta)


def is_encoded_j2k(img: Any) -> bool:
    """True if ``img`` carries a JPEG 2000 frame and its stored-unit range (see module doc)."""
    m = getattr(img, "meta", None) or {}
    return (
        getattr(img, "format", None) == "dicom"
        and getattr(img, "encoded", None) is not None
        and m.get("transfer_syntax") in J2K_TRANSFER_SYNTAXES
        and m.get("linear_stored_range") is not None
    )
