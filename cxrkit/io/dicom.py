"""DICOM CR/DX reading with pydicom 3: checks, frame-0 decode, grayscale pipeline, metadata.

pydicom is imported lazily (``import cxrkit`` does not import it). Compressed pixel data is decoded
by pydicom's pixel handlers: pylibjpeg-libjpeg (JPEG baseline/extended/lossless), pylibjpeg-openjpeg
(JPEG 2000), pyjpegls (JPEG-LS), pylibjpeg-rle / numpy (RLE).

Policies:
- Multi-frame: frame 0 is read, with a warning; the other frames are not decoded.
- Enhanced (functional-group) objects: attributes of the Shared and frame-0 Per-frame
  Functional Groups (pixel measures, VOI, pixel value transformation) are used as if top-level.
- Modality: CR, DX, DR, RG, OT (or none) are read; MG, IO, PX, XA, RF are read with a warning;
  anything else (CT, MR, US, NM, PT, SR...) raises ``UnsupportedFormatError``.
- The header quality gate (``cxrkit.io.quality``: modality, body part, lateral view, colour, field
  of view) runs before the decode; its findings are warnings, or ``UnsuitableImageError`` when strict.
- Colour (RGB/YBR/PALETTE COLOR) pixel data is converted to gray by ITU-R 601 luminance, with a
  warning; no Modality/VOI LUT applies to colour data.
- Grayscale: see ``cxrkit.io.lut`` for the LUT order, the VOI fallback and the inversion rule.
- Sizes are checked before anything is decoded: Rows x Columns against ``limits.max_pixels``;
  the bytes of one frame (Rows x Columns x SamplesPerPixel x BitsAllocated/8) against
  8 x max_pixels; a compressed frame's own codestream header (JPEG SOF, JPEG-LS SOF55,
  JPEG 2000 SIZ) against max_pixels and against Rows/Columns; a Deflated data set's inflated size
  against ``limits.max_file_bytes``.
- A JPEG (baseline/extended) frame whose scan header says Se = 0 for a sequential process (seen
  in the NEMA WG04 JPEG Extended samples) is decoded again with Se = 63, with a warning.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

import numpy as np

from cxrkit.config import Limits
from cxrkit.errors import DecodeError, ImageTooLargeError, InputError, UnsupportedFormatError
from cxrkit.io.image import LoadedImage, luminance_float, luminance_u8
from cxrkit.io.lut import to_display
from cxrkit.io.quality import (  # noqa: F401 - the gate's tables, re-exported where they used to live
    CHEST_BODY_PARTS,
    LATERAL_VIEWS,
    OTHER_XRAY_MODALITIES,
    RADIOGRAPH_MODALITIES,
    HeaderIssue,
    check_header,
)
from cxrkit.io.sniff import MAX_JPEG_SCANS, codestream_size, patch_sequential_scan_end

__all__ = ["read_dataset", "load_dicom", "encapsulated_frame"]

logger = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


_DEFLATED_UID = b"1.2.840.10008.1.2.1.99"
_JPEG_TS = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                      "1.2.840.10008.1.2.4.70"})
_JPEG_LS_TS = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
_J2K_TS = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                     "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                     "1.2.840.10008.1.2.4.203"})
_HTJ2K_TS = frozenset({"1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"})


def read_dataset(data: bytes, source: str, limits: Limits = Limits()) -> Any:
    """Parse DICOM bytes (with or without the 128-byte preamble) into a pydicom Dataset.

    A Deflated Explicit VR data set is inflated once here with a bound (``limits.max_file_bytes``)
    before pydicom inflates it without one."""
    from pydicom import dcmread

    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    _check_deflated_size(data, source, limits)
    try:
        return dcmread(io.BytesIO(data), force=not has_preamble)
    except Exception as exc:  # InvalidDicomError, EOFError, struct.error, ValueError...
        raise DecodeError(source, f"unreadable DICOM: {type(exc).__name__}: {exc}") from exc


def _check_deflated_size(data: bytes, source: str, limits: Limits) -> None:
    """ImageTooLargeError if a Deflated data set inflates past ``limits.max_file_bytes``."""
    import zlib

    if data.find(_DEFLATED_UID, 0, 4096) < 0:  # cheap pre-filter
        return
    # walk the file meta group (always explicit VR little endian) to its end and its (0002,0010)
    pos, ts = (132 if data[128:132] == b"DICM" else 0), b""
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV", b"SV", b"UV"):
            length, hdr = int.from_bytes(data[pos + 8 : pos + 12], "little"), 12
        else:
            length, hdr = int.from_bytes(data[pos + 6 : pos + 8], "little"), 8
        if length == 0xFFFFFFFF:
            return  # malformed meta: pydicom reports it
        if data[pos + 2 : pos + 4] == b"\x10\x00":
            ts = bytes(data[pos + hdr : pos + hdr + length]).rstrip(b"\x00 ")
        pos += hdr + length
    if ts != _DEFLATED_UID:
        return
    # feed 64 kB at a time (zlib inflates at most ~1032x, so one step yields at most ~66 MB)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    budget, total, stream = limits.max_file_bytes, 0, memoryview(data)[pos:]
    try:
        for off in range(0, len(stream), 1 << 16):
            total += len(inflater.decompress(stream[off : off + (1 << 16)], budget - total + 1))
            if total > budget:
                raise ImageTooLargeError(
                    source, f"the Deflated data set inflates to more than limits.max_file_bytes = {budget} bytes"
                )
    except zlib.error as exc:
        raise DecodeError(source, f"corrupt Deflated DICOM data set: {exc}") from exc


def _check_frame_size(ds: Any, rows: int, cols: int, source: str, limits: Limits) -> None:
    """Before decoding: the bytes of one frame, and a compressed frame's own header."""
    spp = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.get("BitsAllocated") or 0)
    if spp not in (1, 3, 4):
        raise DecodeError(source, f"DICOM SamplesPerPixel is {spp}; expected 1 (gray) or 3 (colour)")
    if bits < 1 or bits > 64:
        raise DecodeError(source, f"DICOM BitsAllocated is {bits}; expected 1, 8, 16, 32 or 64")
    frame_bytes = rows * cols * spp * ((bits + 7) // 8)
    if frame_bytes > 8 * limits.max_pixels:
        raise ImageTooLargeError(
            source, f"one {rows}x{cols}x{spp} frame of {bits}-bit samples is {frame_bytes} bytes, over "
            f"8 x limits.max_pixels = {8 * limits.max_pixels}",
        )
    ts = _transfer_syntax(ds)
    if ts is None or not ts.is_encapsulated or "PixelData" not in ds:
        return
    uid = str(ts)
    kind = "jpeg" if uid in _JPEG_TS else "jpeg-ls" if uid in _JPEG_LS_TS else "j2k" if uid in _J2K_TS else None
    if kind is None:  # RLE and others: the decoder sizes its output from Rows/Columns, checked above
        return
    from pydicom.encaps import get_frame

    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=int(ds.get("NumberOfFrames") or 1))
    except Exception as exc:
        raise DecodeError(source, f"cannot extract compressed frame 0 ({ts.name}): {exc}") from exc
    size = codestream_size(frame, kind)
    if size is None:
        raise DecodeError(source, f"compressed frame 0 has no {ts.name} frame header; the pixel data is corrupt")
    h, w, ncomp = size
    if h * w > limits.max_pixels:
        raise ImageTooLargeError(
            source, f"compressed frame 0 declares {h}x{w} = {h * w} pixels, over limits.max_pixels = "
            f"{limits.max_pixels}",
        )
    if h == 0 and kind == "jpeg":  # decoders grow their buffers without bound waiting for the DNL
        raise UnsupportedFormatError(source, "a JPEG frame whose height is set by a DNL marker is not supported")
    if (h, w) != (rows, cols):
        raise DecodeError(
            source, f"compressed frame 0 is {h}x{w} but the DICOM header says Rows x Columns = {rows}x{cols}"
        )
    if ncomp not in (1, 3, 4):
        raise DecodeError(source, f"compressed frame 0 has {ncomp} components; expected 1 or 3")
    if kind == "jpeg" and bytes(frame).count(b"\xff\xda") > MAX_JPEG_SCANS:
        raise ImageTooLargeError(source, f"compressed frame 0 has more than {MAX_JPEG_SCANS} JPEG scans: "
                                 "refused as a scan bomb")


def load_dicom(
    ds: Any, *, source: str, index: int, limits: Limits = Limits(), voi_window_index: int = 0,
    keep_j2k_frame: bool = False, strict: bool = False,
) -> LoadedImage:
    """Check a Dataset, decode frame 0 and map it to bone-bright gray (see module docstring).

    The header quality gate (``cxrkit.io.quality``) runs before anything is decoded: its issues
    become warnings, or with ``strict`` an ``UnsuitableImageError``."""
    warnings_: list[str] = []
    if len(ds) == 0:
        raise DecodeError(source, "DICOM data set is empty after the file meta (truncated file?)")
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise InputError(source, f"DICOM has no PixelData ({_sop_class_phrase(ds)})")
    modality = str(ds.get("Modality") or "").upper()
    if modality not in RADIOGRAPH_MODALITIES and modality not in OTHER_XRAY_MODALITIES:
        raise UnsupportedFormatError(
            source, f"DICOM modality {modality} is not a radiograph (expected CR or DX; {_sop_class_phrase(ds)})"
        )
    issues = check_header(ds, source, strict=strict)
    warnings_.extend(i.message for i in issues)
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or cols <= 0:
        raise DecodeError(source, f"DICOM Rows/Columns missing or zero ({rows}x{cols})")
    if rows * cols > limits.max_pixels:
        raise ImageTooLargeError(
            source, f"{rows}x{cols} = {rows * cols} pixels exceeds limits.max_pixels = {limits.max_pixels}"
        )
    _check_frame_size(ds, rows, cols, source, limits)
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if n_frames > 1:
        warnings_.append(f"multi-frame DICOM ({n_frames} frames): only frame 0 is read")
    view = _frame0_view(ds)
    if keep_j2k_frame:
        deferred = _deferred_j2k(ds, view, source, index, limits, voi_window_index, warnings_, issues)
        if deferred is not None:
            return deferred

    stored = _decode_frame0(ds, source, warnings_)
    _warn_excess_native_bytes(ds, rows, cols, n_frames, warnings_)
    if stored.shape[:2] != (rows, cols):
        raise DecodeError(source, f"decoded frame is {stored.shape[:2]}, the header says {(rows, cols)}")
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper()
    meta = _meta(ds, view, warnings_, issues)
    if photometric in ("MONOCHROME1", "MONOCHROME2") and stored.ndim == 2:
        try:
            gray = to_display(stored, view, voi_window_index=voi_window_index)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            raise DecodeError(source, f"invalid Modality/VOI LUT attributes: {exc}") from exc
        pixels, vrange = gray.pixels, gray.value_range
        meta.update(gray.meta)
        warnings_.extend(gray.warnings)
    else:
        pixels, vrange = _colour_to_gray(stored, ds, photometric, source)
        if not any(i.code == "colour_image" for i in issues):  # the gate said it already
            warnings_.append(f"colour DICOM ({photometric}) converted to gray by luminance")
    _check_finite(pixels, vrange, view, source)
    for w in warnings_:
        logger.debug("%s: %s", source, w)
    img = LoadedImage(
        source=source,
        index=index,
        format="dicom",
        image_size=(rows, cols),
        encoded=None,
        pixels=pixels,
        value_range=vrange,
        meta=meta,
        warnings=warnings_,
        limits=limits,
    )
    if keep_j2k_frame:
        from cxrkit.io.dicom_j2k import attach_j2k_frame

        img = attach_j2k_frame(img, ds, voi_window_index)
    return img


def _deferred_j2k(ds: Any, view: Any, source: str, index: int, limits: Limits, voi_window_index: int,
                  warnings_: list[str], issues: list[HeaderIssue]) -> LoadedImage | None:
    """A single-frame JPEG 2000 DICOM with a linear gray mapping, left encoded for the GPU decoder
    (nvJPEG2000 through DALI): no CPU decode here, which would cost more than the GPU decode it
    feeds (hundreds of ms for a lossless 12-bit radiograph). ``pixels`` is None; ``value_range``
    and ``meta`` are what a decode would give (the gray mapping's range depends on the header
    only, for integer data); ``decode_fallback`` decodes it on the CPU if the GPU decoder cannot.
    The frame header (size, components) was checked by ``_check_frame_size``. None: decode as usual.
    """
    import dataclasses
    import functools

    from cxrkit.io.dicom_j2k import attach_j2k_frame, is_encoded_j2k

    if int(ds.get("SamplesPerPixel") or 1) != 1 or int(ds.get("NumberOfFrames") or 1) != 1:
        return None
    dtype = np.uint8 if int(ds.get("BitsAllocated") or 16) <= 8 else np.uint16
    try:
        gray = to_display(np.zeros((1, 1), dtype), view, voi_window_index=voi_window_index)
        _check_finite(gray.pixels, gray.value_range, view, source)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, InputError):
        return None  # the usual path raises the typed error
    w = list(warnings_) + list(gray.warnings)
    meta = _meta(ds, view, w, issues)
    meta.update(gray.meta)
    rows, cols = int(ds.Rows), int(ds.Columns)
    img = LoadedImage(source=source, index=index, format="dicom", image_size=(rows, cols), encoded=None,
                      pixels=None, value_range=gray.value_range, meta=meta, warnings=w, limits=limits)
    img = attach_j2k_frame(img, ds, voi_window_index)
    if not is_encoded_j2k(img):
        return None
    fallback = functools.partial(load_dicom, ds, source=source, index=index, limits=limits,
                                 voi_window_index=voi_window_index)
    return dataclasses.replace(img, decode_fallback=fallback)


def _check_finite(pixels: np.ndarray, vrange: tuple[float, float], view: Any, source: str) -> None:
    """DecodeError when the Modality/VOI attributes (NaN, inf, 1e308...) made values non-finite."""
    lo, hi = float(vrange[0]), float(vrange[1])
    ok = np.isfinite(lo) and np.isfinite(hi) and hi > lo
    if ok and pixels.dtype.kind == "f":
        ok = bool(np.isfinite(pixels).all())
    if not ok:
        attrs = ", ".join(f"{k}={view.get(k)!s}" for k in ("RescaleSlope", "RescaleIntercept", "WindowCenter",
                                                             "WindowWidth") if view.get(k) is not None)
        raise DecodeError(source, f"the Modality/VOI LUT attributes give non-finite gray values ({attrs or 'none'}; "
                          f"value range {lo:g}..{hi:g})")


def _warn_excess_native_bytes(ds: Any, rows: int, cols: int, n_frames: int, warnings_: list[str]) -> None:
    """Native PixelData longer than its header says (e.g. Rows too small): read, with a warning."""
    ts = _transfer_syntax(ds)
    bits = int(ds.get("BitsAllocated") or 0)
    if (ts is not None and ts.is_encapsulated) or "PixelData" not in ds or bits % 8:
        return
    want = rows * cols * int(ds.get("SamplesPerPixel") or 1) * (bits // 8) * max(1, n_frames)
    have = len(ds.PixelData)
    if have > want + 1:  # +1: the pad byte that makes a value even
        warnings_.append(
            f"PixelData holds {have} bytes, more than Rows x Columns x samples x frames needs ({want}); "
            "the header may be wrong; read as the header says"
        )


def encapsulated_frame(ds: Any, index: int = 0) -> tuple[bytes, str]:
    """The encapsulated (JPEG / JPEG 2000 / JPEG-LS / RLE) bytes of one frame and the transfer
    syntax UID, for hardware decoders (nvJPEG, nvJPEG2000). Raises ``InputError`` for native data."""
    from pydicom.encaps import get_frame

    source = describe_dataset(ds)
    ts = _transfer_syntax(ds)
    if ts is None or not ts.is_encapsulated:
        raise InputError(source, f"pixel data is not encapsulated (transfer syntax {ts or 'missing'})")
    if "PixelData" not in ds:
        raise InputError(source, f"DICOM has no PixelData ({_sop_class_phrase(ds)})")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    try:
        frame = get_frame(ds.PixelData, index, number_of_frames=n_frames)
    except Exception as exc:
        raise DecodeError(source, f"cannot extract encapsulated frame {index}: {exc}") from exc
    return bytes(frame), str(ts)


def describe_dataset(ds: Any, index: int | None = None) -> str:
    """'<Dataset 1.2.826.0.1.3680043... #2>' - a short label for a Dataset input."""
    uid = str(ds.get("SOPInstanceUID") or "")
    uid = uid if len(uid) <= 24 else uid[:24] + "..."
    parts = ["Dataset"] + ([uid] if uid else []) + ([f"#{index}"] if index is not None else [])
    return "<" + " ".join(parts) + ">"


# ---------------------------------------------------------------------------------------------


def _sop_class_phrase(ds: Any) -> str:
    from pydicom.uid import UID

    uid = ds.get("SOPClassUID")
    if not uid:
        return "no SOP Class UID"
    name = UID(str(uid)).name
    if name == str(uid):
        return f"SOP Class {uid}"
    if " SR " in f" {name} ":
        return f"SOP Class {uid} is {name}, a Structured Report"
    return f"SOP Class {uid} is {name}"


def _transfer_syntax(ds: Any) -> Any:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return ts


def _shallow(ds: Any) -> Any:
    """A new Dataset sharing ds's elements; replace elements with ``tmp[tag] = ...`` only."""
    from pydicom.dataset import Dataset, FileMetaDataset

    tmp = Dataset()
    for elem in ds:
        tmp.add(elem)
    tmp.file_meta = FileMetaDataset()
    for elem in getattr(ds, "file_meta", None) or []:
        tmp.file_meta.add(elem)
    return tmp


def _frame0_view(ds: Any) -> Any:
    """ds itself, or for enhanced objects a shallow view with frame-0 functional-group attributes."""
    shared, per_frame = ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")
    if not shared and not per_frame:
        return ds
    view = _shallow(ds)
    for groups in (shared, per_frame):  # per-frame overrides shared
        if not groups:
            continue
        for macro in groups[0]:
            if macro.VR == "SQ" and macro.value:
                for elem in macro.value[0]:
                    view[elem.tag] = elem
    return view


def _decode_frame0(ds: Any, source: str, warnings_: list[str]) -> np.ndarray:
    from pydicom.pixels import get_decoder, pixel_array
    from pydicom.uid import ExplicitVRLittleEndian, JPEGExtended12Bit

    ts = _transfer_syntax(ds)
    if ts is None:  # an in-memory Dataset: assume native little endian, as pydicom would write it
        ds = _shallow(ds)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ts = ds.file_meta.TransferSyntaxUID
        warnings_.append("no Transfer Syntax UID; assumed Explicit VR Little Endian")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise UnsupportedFormatError(source, f"DICOM transfer syntax {ts} ({ts.name}) is not supported") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise UnsupportedFormatError(source, f"decoding {ts.name} needs one of: {missing}")
    plugin = ""  # pydicom's order
    if ts == JPEGExtended12Bit and int(ds.get("BitsStored") or 8) > 8 and "pylibjpeg" in decoder.available_plugins:
        plugin = "pylibjpeg"  # Pillow cannot read 12-bit JPEG: trying it first logs an ERROR with a traceback
    # a sequential JPEG frame that says Se = 0 is patched before the first attempt: a strict
    # decoder would fail on it first, and pydicom logs each failure as an ERROR with a traceback
    arr = _retry_sequential_jpeg(ds, ts, warnings_, plugin)
    if arr is None:
        arr = _j2k_imagecodecs(ds, str(ts))
    if arr is None:
        try:
            arr = pixel_array(ds, index=0, decoding_plugin=plugin)
        except Exception as exc:  # plugins raise RuntimeError/ValueError/...; never let one escape
            first = str(exc).strip().splitlines()
            detail = " ".join(s.strip() for s in first[:3])
            raise DecodeError(source, f"cannot decode the {ts.name} pixel data: {detail}") from exc
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    return arr


def _j2k_imagecodecs(ds: Any, uid: str) -> np.ndarray | None:
    """Frame 0 of a gray, unsigned JPEG 2000 DICOM decoded by imagecodecs (OpenJPEG, multi-threaded
    and without the GIL) when it is installed (``pip install cxrkit[fast]``): the same values as
    pydicom's plugins (tests/test_io_dicom_j2k_fast.py), ~2x faster on 2 cores for one image, and a
    batch decodes in parallel (pylibjpeg-openjpeg holds the GIL). None: let pydicom decode it."""
    if uid not in _J2K_TS or uid in _HTJ2K_TS:
        return None
    if int(ds.get("SamplesPerPixel") or 1) != 1 or int(ds.get("PixelRepresentation") or 0) != 0:
        return None
    bits_alloc = int(ds.get("BitsAllocated") or 0)
    if bits_alloc not in (8, 16):
        return None
    try:
        import imagecodecs
        from pydicom.encaps import get_frame

        frame = get_frame(ds.PixelData, 0, number_of_frames=int(ds.get("NumberOfFrames") or 1))
        arr = imagecodecs.jpeg2k_decode(frame, numthreads=min(4, os.cpu_count() or 1))
    except Exception:  # not installed, or a frame it will not read: pydicom decides
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    if arr.shape != (rows, cols) or arr.dtype.kind != "u" or arr.dtype.itemsize * 8 > bits_alloc:
        return None
    return np.ascontiguousarray(arr, dtype=np.uint8 if bits_alloc == 8 else np.uint16)


def _retry_sequential_jpeg(ds: Any, ts: Any, warnings_: list[str], plugin: str = "") -> np.ndarray | None:
    """Decode with the SOS 'Se' byte set to 63 when a sequential JPEG frame says Se = 0; None when
    the frame does not need it (or the patched frame does not decode either)."""
    from pydicom.dataelem import DataElement
    from pydicom.encaps import encapsulate, get_frame
    from pydicom.pixels import pixel_array
    from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

    if ts not in (JPEGBaseline8Bit, JPEGExtended12Bit):
        return None
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=int(ds.get("NumberOfFrames") or 1))
    except Exception:
        return None
    patched = patch_sequential_scan_end(bytes(frame))
    if patched is None:
        return None
    tmp = _shallow(ds)
    tmp[0x7FE00010] = DataElement(0x7FE00010, "OB", encapsulate([patched]))
    tmp[0x00280008] = DataElement(0x00280008, "IS", 1)
    try:
        arr = pixel_array(tmp, index=0, decoding_plugin=plugin)
    except Exception:
        return None
    warnings_.append("non-conformant JPEG scan header (Se = 0 in a sequential scan) read as Se = 63")
    return arr


def _colour_to_gray(arr: np.ndarray, ds: Any, photometric: str, source: str) -> tuple[np.ndarray, tuple[float, float]]:
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
    elif arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise UnsupportedFormatError(source, f"DICOM photometric interpretation {photometric} is not supported")
    if arr.dtype == np.uint8:
        return luminance_u8(arr), (0.0, 255.0)
    bits = int(ds.get("BitsStored") or 16) if photometric != "PALETTE COLOR" else 8 * arr.dtype.itemsize
    hi = float(2 ** min(bits, 16) - 1)
    return np.clip(np.rint(luminance_float(arr)), 0, hi).astype(np.uint16), (0.0, hi)


def _pair(value: Any) -> tuple[float, float] | None:
    try:
        vals = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(vals) != 2 or not all(np.isfinite(v) and v > 0 for v in vals):
        return None
    return vals[0], vals[1]


def _meta(ds: Any, view: Any, warnings_: list[str], issues: list[HeaderIssue]) -> dict:
    ts = _transfer_syntax(ds)
    view_position = str(view.get("ViewPosition") or "").upper()
    body_part = str(view.get("BodyPartExamined") or "").upper()
    meta: dict = {
        "sop_instance_uid": str(ds.get("SOPInstanceUID") or "") or None,
        "sop_class_uid": str(ds.get("SOPClassUID") or "") or None,
        "modality": str(ds.get("Modality") or "") or None,
        "photometric_interpretation": str(ds.get("PhotometricInterpretation") or "") or None,
        "presentation_lut_shape": str(view.get("PresentationLUTShape") or "") or None,
        "view_position": view_position or None,
        "body_part_examined": body_part or None,
        "bits_stored": int(ds.get("BitsStored") or 0) or None,
        "bits_allocated": int(ds.get("BitsAllocated") or 0) or None,
        "pixel_representation": int(ds.get("PixelRepresentation") or 0),
        "number_of_frames": int(ds.get("NumberOfFrames") or 1),
        "transfer_syntax": str(ts) if ts else None,
        "transfer_syntax_name": ts.name if ts else None,
        "header_issues": [i.code for i in issues],
    }
    spacing, note = None, None
    ps = _pair(view.get("PixelSpacing")) if "PixelSpacing" in view else None
    if "PixelSpacing" in view and ps is None:
        warnings_.append(f"PixelSpacing {list(view.PixelSpacing or [])} is not valid; ignored")
    if ps is not None:
        spacing, note = ps, "PixelSpacing"
    else:
        ips = _pair(view.get("ImagerPixelSpacing")) if "ImagerPixelSpacing" in view else None
        if ips is not None:
            emf = view.get("EstimatedRadiographicMagnificationFactor")
            emf = float(emf) if emf not in (None, "") and float(emf) > 0 else None
            if emf:
                spacing = (ips[0] / emf, ips[1] / emf)
                note = f"ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor {emf:g}"
            else:
                spacing = ips
                note = "ImagerPixelSpacing (at the detector, not corrected for magnification)"
    meta["pixel_spacing_mm"] = spacing
    meta["pixel_spacing_source"] = note
    return meta
