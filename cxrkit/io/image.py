"""``LoadedImage`` (what io hands to preprocessing) and the Pillow decode of JPEG/PNG bytes.

Conventions:
- ``pixels`` is a 2-D (h, w) gray image with bone bright, dtype uint8, uint16 or float32.
- ``value_range`` = (value that maps to 0.0, value that maps to 1.0) at normalization.
- Colour is turned to gray by ITU-R 601 luminance, L = 0.299 R + 0.587 G + 0.114 B, computed
  exactly as Pillow's ``convert("L")`` does for 8-bit data (fixed point, rounded); alpha is ignored.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cxrkit.config import Limits
from cxrkit.errors import DecodeError, ImageTooLargeError, InputError, UnsupportedFormatError
from cxrkit.io.deadline import call_with_deadline

__all__ = ["LoadedImage", "decode_pixels", "header_value_range", "luminance_u8", "luminance_float"]

logger = logging.getLogger(__name__)


@dataclass
class LoadedImage:
    """One input item after io: either still encoded (JPEG/PNG) or decoded to gray pixels.

    source: path string or a short description ("<bytes 12345 B #3>").
    index: position in the caller's input list.
    format: "jpeg" | "png" | "dicom" | "array".
    image_size: (h, w) of the original image in pixels (from the header for JPEG/PNG).
    encoded: the JPEG/PNG file bytes, decoded later by the preprocessor; a DICOM's JPEG 2000
        frame for the GPU decoder (``load_item(keep_j2k_frame=True)``); None otherwise.
    pixels: (h, w) gray, bone bright, uint8 | uint16 | float32; None while still encoded.
    value_range: pixel values mapping to 0.0 and 1.0 at normalization.
    meta: pixel_spacing_mm (row, col), DICOM tags, png_color_type, bit_depth, jpeg_process...
    warnings: human-readable notes on what was assumed or changed for this item.
    limits: the limits it was read under; ``decode_pixels`` applies ``decode_timeout_s`` and
        ``max_pixels`` from here (not part of equality or repr).
    """

    source: str
    index: int
    format: str
    image_size: tuple[int, int]
    encoded: bytes | None
    pixels: np.ndarray | None
    value_range: tuple[float, float]
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits, repr=False, compare=False)
    #: for a DICOM JPEG 2000 frame left encoded for the GPU decoder (``pixels`` None): decodes it
    #: on the CPU instead, returning the LoadedImage io would have made (see cxrkit.io.dicom)
    decode_fallback: Callable[[], "LoadedImage"] | None = field(default=None, repr=False, compare=False)

    @property
    def dali_decodable(self) -> bool:
        """True for 8-bit baseline/progressive JPEG (1 or 3 components, not CMYK) and for PNG of
        colour type gray or RGB, 8 or 16 bit, without tRNS transparency. Everything else goes
        through ``decode_pixels``."""
        if self.encoded is None:
            return False
        m = self.meta
        if self.format == "jpeg":
            return (
                m.get("jpeg_process") in ("baseline", "progressive")
                and m.get("bit_depth") == 8
                and m.get("components") in (1, 3)
            )
        if self.format == "png":
            return (
                m.get("png_color_type") in (0, 2)
                and m.get("bit_depth") in (8, 16)
                and not m.get("png_has_trns", False)
            )
        return False


# ---------------------------------------------------------------------------------------------
# luminance
# ---------------------------------------------------------------------------------------------


def luminance_u8(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3|4) uint8 -> (h, w) uint8, bit-exact with Pillow's RGB(A) -> "L" conversion."""
    r = rgb[..., 0].astype(np.uint32)
    g = rgb[..., 1].astype(np.uint32)
    b = rgb[..., 2].astype(np.uint32)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def luminance_float(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3|4) any numeric dtype -> (h, w) float64, 0.299 R + 0.587 G + 0.114 B."""
    c = rgb[..., :3].astype(np.float64)
    return c[..., 0] * 0.299 + c[..., 1] * 0.587 + c[..., 2] * 0.114


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------

# Exceptions Pillow / zlib / struct raise on bad data; turned into DecodeError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error, zlib.error)


def header_value_range(meta: dict) -> tuple[float, float]:
    """The value range ``load_item`` gives an encoded JPEG/PNG from its header: (0, 2**bits - 1),
    with 8 bits for 1/2/4-bit PNG (Pillow scales those to 0..255)."""
    bits = int(meta.get("bit_depth") or 8)
    return (0.0, 255.0 if bits <= 8 else float(2**bits - 1))


def decode_pixels(img: LoadedImage) -> LoadedImage:
    """Decode ``img.encoded`` (JPEG/PNG) into gray ``pixels``; returns a new LoadedImage.

    ``encoded`` is kept. 8-bit data -> uint8, 16-bit PNG -> uint16 (full precision, 16-bit RGB/RGBA
    luminance computed in numpy). 12-bit and lossless JPEG are decoded with pylibjpeg-libjpeg when
    installed (Pillow reads 8-bit JPEG only). An image that already has pixels is returned unchanged.

    ``value_range`` is kept as it was (a window set on the encoded item survives), unless decoding
    changes what the values mean, e.g. a 16-bit colour PNG that this Pillow can only read at 8
    bits: then a header-default range becomes the decoded data's range and a custom window is
    rescaled with it, with a warning.

    Limits (``img.limits``): the header size is checked against ``max_pixels`` before decoding, and
    the decode runs under ``decode_timeout_s`` (see ``cxrkit.io.deadline``).
    Raises ``DecodeError`` (naming the source) for corrupt, truncated or too-slow data,
    ``ImageTooLargeError`` over a limit.
    """
    if img.pixels is not None:
        return img
    if img.decode_fallback is not None:  # a DICOM JPEG 2000 frame left for the GPU: decode it here
        return img.decode_fallback()
    if img.encoded is None:
        raise DecodeError(img.source, "nothing to decode: the item has neither pixels nor encoded bytes")
    limits = img.limits
    h, w = (int(v) for v in img.image_size)
    if h * w > limits.max_pixels:
        raise ImageTooLargeError(
            img.source, f"{h}x{w} = {h * w} pixels exceeds limits.max_pixels = {limits.max_pixels}"
        )
    try:
        return call_with_deadline(lambda: _decode(img), limits.decode_timeout_s, img.source)
    except InputError:
        raise
    except MemoryError as exc:
        raise ImageTooLargeError(img.source, "out of memory while decoding") from exc
    except Exception as exc:  # safety net: never let a malformed stream escape untyped
        logger.debug("unexpected error decoding %s", img.source, exc_info=True)
        raise DecodeError(img.source, f"unexpected {type(exc).__name__} while decoding: {exc}") from exc


def _decode(img: LoadedImage) -> LoadedImage:
    warnings_: list[str] = list(img.warnings)
    if img.format == "jpeg" and (
        img.meta.get("bit_depth", 8) != 8 or img.meta.get("jpeg_process", "").startswith(("lossless", "differential"))
    ):
        pixels, vrange = _decode_jpeg_libjpeg(img, warnings_)
    elif img.format in ("jpeg", "png"):
        fast = _decode_gray_png_fast(img) if img.format == "png" else None
        pixels, vrange = fast if fast is not None else _decode_pillow(img, warnings_)
    else:
        raise UnsupportedFormatError(img.source, f"cannot decode encoded bytes of format {img.format!r}")
    if pixels.shape != tuple(img.image_size):
        raise DecodeError(
            img.source, f"decoded size {pixels.shape} differs from the header size {tuple(img.image_size)}"
        )
    vrange = _carry_value_range(img, vrange, warnings_)
    return dataclasses.replace(img, pixels=pixels, value_range=vrange, warnings=warnings_, meta=dict(img.meta))


def _carry_value_range(img: LoadedImage, decoded: tuple[float, float], warnings_: list[str]) -> tuple[float, float]:
    """The value range after decoding: ``img.value_range`` unless decoding changed the scale."""
    header = header_value_range(img.meta)
    current = (float(img.value_range[0]), float(img.value_range[1]))
    decoded = (float(decoded[0]), float(decoded[1]))
    if decoded == header:
        return current  # same scale as the header promised: the item's window stands
    if current == header:
        return decoded  # the default window follows the decoded scale
    if header[1] > header[0] and decoded[1] > decoded[0]:  # a custom window on a changed scale
        k = (decoded[1] - decoded[0]) / (header[1] - header[0])
        new = (decoded[0] + (current[0] - header[0]) * k, decoded[0] + (current[1] - header[0]) * k)
        warnings_.append(
            f"value_range {current} is on the header's 0..{header[1]:g} scale; the pixels decoded on "
            f"0..{decoded[1]:g}, so it was rescaled to {new}"
        )
        return new
    return decoded


def _open(img: LoadedImage):
    from PIL import Image

    fmt = "PNG" if img.format == "png" else "JPEG"
    return Image.open(io.BytesIO(img.encoded), formats=[fmt])


def _decode_gray_png_fast(img: LoadedImage) -> tuple[np.ndarray, tuple[float, float]] | None:
    """The plain gray PNG through cxrkit.io.png (ISA-L inflate + C++ unfilter, Pillow's pixels,
    ~2x faster); None for anything else, or past Pillow's decompression-bomb threshold, where
    Pillow keeps deciding (warning / refusal)."""
    m = img.meta
    if m.get("png_color_type") != 0 or m.get("bit_depth") not in (8, 16) or m.get("png_has_trns"):
        return None
    from PIL import Image

    from cxrkit.io.png import decode_gray_png

    bomb = Image.MAX_IMAGE_PIXELS
    fast = decode_gray_png(img.encoded, max_pixels=None if bomb is None else int(bomb))
    if fast is None:
        return None
    return fast, (0.0, 255.0 if fast.dtype == np.uint8 else 65535.0)


def _decode_pillow(img: LoadedImage, warnings_: list[str]) -> tuple[np.ndarray, tuple[float, float]]:
    from PIL import Image

    what = "PNG" if img.format == "png" else "JPEG"
    try:
        if img.format == "png" and img.meta.get("bit_depth") == 16 and img.meta.get("png_color_type") in (2, 4, 6):
            wide = _decode_png16_color(img)
            if wide is not None:
                return wide, (0.0, 65535.0)
            warnings_.append("16-bit colour/alpha PNG decoded at 8-bit precision (Pillow limitation)")
        with _open(img) as im:
            im.load()
            mode = im.mode
            if mode == "L":
                arr = np.asarray(im)
            elif mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                arr = np.asarray(im).astype(np.uint16)
            elif mode == "I":
                a32 = np.asarray(im)
                arr = np.clip(a32, 0, 65535).astype(np.uint16)
                return arr, (0.0, 65535.0 if img.meta.get("bit_depth") == 16 else 255.0)
            elif mode == "F":
                return np.asarray(im, dtype=np.float32), (0.0, 1.0)
            elif mode == "CMYK":
                arr = np.asarray(im.convert("RGB").convert("L"))
            else:  # 1, P, PA, LA, La, RGB, RGBA, RGBX, YCbCr: Pillow's own ITU-R 601 luminance
                arr = np.asarray(im.convert("L"))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(img.source, f"{what} refused by Pillow's decompression-bomb guard: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise DecodeError(img.source, f"corrupt or truncated {what}: {exc}") from exc
    if arr.dtype == np.uint16:
        return np.ascontiguousarray(arr), (0.0, 65535.0)
    return np.ascontiguousarray(arr, dtype=np.uint8), (0.0, 255.0)


def _decode_png16_color(img: LoadedImage) -> np.ndarray | None:
    """16-bit RGB / RGBA / gray+alpha PNG -> uint16 luminance, keeping all 16 bits.

    Pillow unfilters the stream itself but only keeps 8 bits per sample; decoding twice with the
    big- and little-endian 16-bit raw modes yields the high and the low byte of every sample.
    Returns None if this Pillow does not allow it (the caller then falls back to 8 bits).
    """
    ctype = img.meta["png_color_type"]
    if ctype == 4:  # gray + alpha: read each 4-byte pixel as one big-endian int32, L = high half
        words = _decode_png_with_rawmode(img, "I", "I;32B")
        if words is None:
            return None
        return (words.view(np.uint32) >> 16).astype(np.uint16)
    mode = "RGB" if ctype == 2 else "RGBA"
    hi = _decode_png_with_rawmode(img, mode, f"{mode};16B")
    lo = _decode_png_with_rawmode(img, mode, f"{mode};16L")
    if hi is None or lo is None:
        return None
    rgb = hi[..., :3].astype(np.uint32) * 256 + lo[..., :3]
    return np.clip(np.rint(luminance_float(rgb)), 0, 65535).astype(np.uint16)


def _decode_png_with_rawmode(img: LoadedImage, mode: str, rawmode: str) -> np.ndarray | None:
    with _open(img) as im:
        tiles = list(getattr(im, "tile", []) or [])
        if len(tiles) != 1 or tiles[0][0] != "zip":
            return None
        name, extents, offset, args = tiles[0][:4]
        args = (rawmode,) + tuple(args[1:]) if isinstance(args, tuple) else rawmode
        try:
            im.tile = [type(tiles[0])(name, extents, offset, args)] if hasattr(tiles[0], "_fields") else [
                (name, extents, offset, args)
            ]
            if im.mode != mode:
                im._mode = mode  # Pillow >= 10.1 keeps the mode here
            im.load()
        except (AttributeError, TypeError, ValueError) as exc:  # internal layout changed: fall back
            logger.debug("16-bit PNG raw-mode decode unavailable (%s)", exc)
            return None
        if im.mode != mode:
            return None
        return np.asarray(im)


def _decode_jpeg_libjpeg(img: LoadedImage, warnings_: list[str]) -> tuple[np.ndarray, tuple[float, float]]:
    """12/16-bit or lossless JPEG via pylibjpeg-libjpeg (lazy import)."""
    from cxrkit.io.sniff import patch_sequential_scan_end

    process, depth = img.meta.get("jpeg_process"), img.meta.get("bit_depth")
    try:
        from libjpeg import decode  # pylibjpeg-libjpeg
    except ImportError as exc:
        raise UnsupportedFormatError(
            img.source,
            f"{depth}-bit {process} JPEG needs pylibjpeg-libjpeg (pip install pylibjpeg-libjpeg)",
        ) from exc
    try:
        arr = np.asarray(decode(img.encoded))
    except Exception as exc:  # libjpeg raises RuntimeError/ValueError with its own codes
        patched = patch_sequential_scan_end(img.encoded)
        try:
            if patched is None:
                raise exc
            arr = np.asarray(decode(patched))
            warnings_.append("non-conformant JPEG scan header (Se = 0 in a sequential scan) read as Se = 63")
        except Exception:
            raise DecodeError(img.source, f"corrupt {depth}-bit {process} JPEG: {exc}") from exc
    if arr.ndim == 3:
        arr = np.clip(np.rint(luminance_float(arr)), 0, 65535).astype(np.uint16)
    hi = float(2 ** int(depth or 8) - 1)
    arr = arr.astype(np.uint8 if hi <= 255 else np.uint16)
    return np.ascontiguousarray(arr), (0.0, hi)
