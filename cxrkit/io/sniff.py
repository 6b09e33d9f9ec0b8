"""Format sniffing and header parsing, from content only (never the file name).

``sniff(data)`` names the container: ``"jpeg"``, ``"png"`` or ``"dicom"``; anything else raises
``UnsupportedFormatError`` saying what the first bytes look like (GIF, PDF, TIFF, MetaImage...).

``png_header`` / ``jpeg_header`` read the image size and the pixel layout from the header alone, so
that size limits are checked before any pixel is decoded and the preprocessor can tell whether
DALI can decode the stream. Both need only the first few kilobytes for ordinary files.
"""

from __future__ import annotations

import logging
import struct

from cxrkit.errors import DecodeError, UnsupportedFormatError

__all__ = [
    "sniff",
    "png_header",
    "jpeg_header",
    "codestream_size",
    "patch_sequential_scan_end",
    "SNIFF_BYTES",
    "MAX_JPEG_SCANS",
]

logger = logging.getLogger(__name__)

#: How many leading bytes ``sniff`` needs to decide (DICOM preamble + "DICM" + a little more).
SNIFF_BYTES = 512

#: More scans than this in one JPEG is refused as a scan bomb: each progressive scan costs a pass
#: over every block, so a few bytes per scan can keep a decoder busy for hours. Real progressive
#: JPEGs have about 10 scans; libjpeg-turbo suggests a limit of 500 for untrusted input.
MAX_JPEG_SCANS = 500

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Explicit VRs, used to recognise DICOM without the 128-byte preamble.
_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)

# (magic at offset 0, what it is) for formats we recognise but do not read.
_KNOWN_OTHER: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"%PDF", "PDF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"),
    (b"BM", "BMP"),
    (b"\xffO\xffQ", "JPEG 2000 codestream (not wrapped in DICOM)"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000 (JP2)"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"qoif", "QOI"),
    (b"\x93NUMPY", "NumPy .npy"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip archive"),
    (b"BZh", "bzip2 archive"),
    (b"\xfd7zXZ\x00", "xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "7z archive"),
    (b"NRRD", "NRRD"),
    (b"\x89HDF\r\n\x1a\n", "HDF5"),
    (b"\xd0\xcf\x11\xe0", "Microsoft Office (OLE) document"),
    (b"8BPS", "Photoshop PSD"),
    (b"DDS ", "DirectDraw Surface"),
    (b"{", "JSON or other text"),
)


def sniff(data: bytes, *, source: str = "") -> str:
    """Return ``"jpeg"``, ``"png"`` or ``"dicom"`` from the leading bytes of a file.

    DICOM is recognised by the 128-byte preamble followed by ``DICM`` and also without the
    preamble (a raw data set starting with a group 0x0002 or 0x0008 element). Raises
    ``UnsupportedFormatError`` naming what the content looks like otherwise; ``source`` only
    labels the error.
    """
    head = bytes(data[:SNIFF_BYTES])
    if not head:
        raise UnsupportedFormatError(source, "empty file (0 bytes)")
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if _looks_like_raw_dicom(head):
        return "dicom"
    raise UnsupportedFormatError(
        source, f"not a JPEG, PNG or DICOM file: the content looks like {describe_content(head)}"
    )


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A DICOM data set without preamble: (0002,eeee) with an explicit VR (file meta is always
    explicit VR little endian), or (0008,eeee) with an explicit VR or a short implicit length."""
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    if head[4:6] in _DICOM_VRS:  # explicit VR
        return True
    group, element, length = struct.unpack_from("<HHI", head, 0)
    return group == 0x0008 and element <= 0x0020 and length < 256


def describe_content(head: bytes) -> str:
    """A short human description of unknown leading bytes, for error messages."""
    if not head:
        return "an empty file"
    for magic, name in _KNOWN_OTHER:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        return "HEIF/AVIF" if brand in {"heic", "heix", "mif1", "avif", "msf1"} else f"ISO media ({brand})"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "NIfTI"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    low = text[:64].lower()
    if low.startswith((b"objecttype", b"ndims")) or b"\nndims" in head.lower() or b"elementtype" in head.lower():
        return "MetaImage (.mha/.mhd)"
    if low.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if low.startswith(b"<?xml") or low.startswith(b"<"):
        return "XML/HTML text"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head[:64]):
        return "plain text"
    return f"unknown binary data (first bytes {head[:8].hex(' ')})"


# ---------------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------------

_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
PNG_COLOR_NAMES = {0: "gray", 2: "rgb", 3: "palette", 4: "gray_alpha", 6: "rgba"}


def png_header(data: bytes, *, source: str = "") -> tuple[tuple[int, int], dict]:
    """Parse IHDR (and scan for PLTE/tRNS before the first IDAT) without decoding pixels.

    Returns ``((h, w), meta)`` with meta keys ``png_color_type`` (int, PNG colour type),
    ``png_color`` (name), ``bit_depth``, ``png_interlaced`` and ``png_has_trns``.
    Raises ``DecodeError`` for a truncated or inconsistent header.
    """
    if len(data) < 33:
        raise DecodeError(source, f"truncated PNG: {len(data)} bytes, the header alone needs 33")
    length, ctype = struct.unpack_from(">I4s", data, 8)
    if ctype != b"IHDR" or length != 13:
        raise DecodeError(source, "corrupt PNG: the first chunk is not a 13-byte IHDR")
    w, h, depth, color, compression, filt, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if w == 0 or h == 0 or w > 2**31 - 1 or h > 2**31 - 1:
        raise DecodeError(source, f"corrupt PNG: invalid size {w}x{h} in IHDR")
    if depth not in _PNG_DEPTHS.get(color, ()):
        raise DecodeError(source, f"corrupt PNG: colour type {color} with bit depth {depth} is not valid")
    if compression != 0 or filt != 0 or interlace not in (0, 1):
        raise DecodeError(source, "corrupt PNG: unknown compression, filter or interlace method in IHDR")
    has_trns = False
    pos = 33
    while pos + 8 <= len(data):  # walk chunk headers up to the first IDAT; cheap (jumps over data)
        (clen, cname) = struct.unpack_from(">I4s", data, pos)
        if cname in (b"IDAT", b"IEND"):
            break
        if cname == b"tRNS":
            has_trns = True
        pos += 12 + clen
    meta = {
        "png_color_type": color,
        "png_color": PNG_COLOR_NAMES[color],
        "bit_depth": depth,
        "png_interlaced": bool(interlace),
        "png_has_trns": has_trns,
    }
    return (h, w), meta


# ---------------------------------------------------------------------------------------------
# JPEG
# ---------------------------------------------------------------------------------------------

_SOF_PROCESS = {
    0xC0: "baseline",
    0xC1: "extended",
    0xC2: "progressive",
    0xC3: "lossless",
    0xC5: "differential-sequential",
    0xC6: "differential-progressive",
    0xC7: "differential-lossless",
    0xC9: "extended-arithmetic",
    0xCA: "progressive-arithmetic",
    0xCB: "lossless-arithmetic",
    0xCD: "differential-sequential-arithmetic",
    0xCE: "differential-progressive-arithmetic",
    0xCF: "differential-lossless-arithmetic",
}


def jpeg_header(data: bytes, *, source: str = "") -> tuple[tuple[int, int], dict]:
    """Walk JPEG marker segments up to the frame header (SOFn) without decoding pixels.

    Returns ``((h, w), meta)`` with meta keys ``jpeg_process`` (e.g. "baseline", "progressive",
    "lossless"), ``bit_depth`` (sample precision), ``components``, ``adobe_transform``
    (APP14 colour transform flag or None), ``jpeg_scans`` (number of SOS markers) and
    ``exif_orientation`` (EXIF tag 0x0112 or None;
    recorded, not applied: (h, w) and the decoded pixels are in stored order). Raises ``DecodeError`` if no frame header is found.
    """
    n = len(data)
    pos = 2
    adobe_transform: int | None = None
    exif_orientation: int | None = None
    while pos < n:
        if data[pos] != 0xFF:
            raise DecodeError(source, f"corrupt JPEG: expected a marker at byte {pos}, found 0x{data[pos]:02x}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue
        if marker in (0xD9, 0xDA):
            raise DecodeError(source, "corrupt JPEG: scan data or end of image before any frame header (SOF)")
        if pos + 2 > n:
            break
        (seg_len,) = struct.unpack_from(">H", data, pos)
        if seg_len < 2:
            raise DecodeError(source, f"corrupt JPEG: marker 0x{marker:02x} has invalid length {seg_len}")
        # the segment is data[pos + 2 : pos + seg_len]; only APP14, APP1 and SOF are looked into
        # (slicing every segment would copy ICC profiles and thumbnails for nothing)
        if marker == 0xEE and data[pos + 2 : pos + 7] == b"Adobe" and min(seg_len, n - pos) >= 14:
            adobe_transform = data[pos + 13]
        elif marker == 0xE1 and seg_len >= 8 and data[pos + 2 : pos + 8] == b"Exif\x00\x00":
            exif_orientation = _exif_orientation(bytes(data[pos + 8 : pos + seg_len]))
        elif marker in _SOF_PROCESS:
            if min(seg_len, n - pos) - 2 < 6:
                break
            precision, h, w, ncomp = struct.unpack_from(">BHHB", data, pos + 2)
            if h == 0:
                raise UnsupportedFormatError(
                    source, "JPEG whose height is set by a DNL marker is not supported"
                )
            if w == 0 or ncomp == 0:
                raise DecodeError(source, f"corrupt JPEG: frame header gives {w}x{h}, {ncomp} components")
            meta = {
                "jpeg_process": _SOF_PROCESS[marker],
                "bit_depth": int(precision),
                "components": int(ncomp),
                "adobe_transform": adobe_transform,
                "exif_orientation": exif_orientation,
                # SOS markers (0xFF is stuffed in scan data). Counted only where scans can repeat
                # work (progressive, lossless, arithmetic): a sequential Huffman JPEG (SOF0/SOF1)
                # has at most one scan per component, and counting costs a pass over the file.
                "jpeg_scans": bytes(data).count(b"\xff\xda") if marker not in (0xC0, 0xC1) else 1,
            }
            return (int(h), int(w)), meta
        pos += seg_len
    raise DecodeError(source, f"truncated JPEG: no frame header (SOF) in its {n} bytes")


def _exif_orientation(tiff: bytes) -> int | None:
    """EXIF Orientation (tag 0x0112) from IFD0 of the TIFF structure inside APP1, or None."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    end = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(end + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(end + "H", tiff, ifd)
    for k in range(count):
        off = ifd + 2 + 12 * k
        if off + 12 > len(tiff):
            return None
        tag, typ, _, value = struct.unpack_from(end + "HHIH", tiff, off)
        if tag == 0x0112 and typ == 3:
            return int(value)
    return None


# ---------------------------------------------------------------------------------------------
# Compressed DICOM frames: the codestream's own size, checked before a decoder allocates for it
# ---------------------------------------------------------------------------------------------

#: How far into a frame to look for the JPEG 2000 SIZ marker (a JP2 wrapper puts boxes before it).
_J2K_SEARCH_BYTES = 1 << 16


def codestream_size(data: bytes, kind: str) -> tuple[int, int, int] | None:
    """``(h, w, components)`` from the header of a compressed frame, without decoding it.

    kind: ``"jpeg"`` (JPEG baseline/extended/lossless: SOF0..SOF15), ``"jpeg-ls"`` (SOF55) or
    ``"j2k"`` (JPEG 2000 / HTJ2K: SIZ). Returns None when no frame header is found; a decoder
    would fail on such a frame too. ``h`` is 0 when a JPEG defers its height to a DNL marker.
    """
    if kind == "j2k":
        at = bytes(data[:_J2K_SEARCH_BYTES]).find(b"\xff\x4f\xff\x51")  # SOC then SIZ
        if at < 0 or at + 4 + 38 > len(data):
            return None
        xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", data, at + 8)
        (csiz,) = struct.unpack_from(">H", data, at + 4 + 36)
        return max(0, ysiz - yosiz), max(0, xsiz - xosiz), int(csiz)
    sofs = {0xF7} if kind == "jpeg-ls" else set(_SOF_PROCESS)
    n, pos = len(data), 2
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue
        if marker in (0xD9, 0xDA) or pos + 2 > n:
            return None
        (seg_len,) = struct.unpack_from(">H", data, pos)
        if seg_len < 2:
            return None
        if marker in sofs:
            if pos + 2 + 6 > n:
                return None
            _, h, w, ncomp = struct.unpack_from(">BHHB", data, pos + 2)
            return int(h), int(w), int(ncomp)
        pos += seg_len
    return None


def patch_sequential_scan_end(data: bytes) -> bytes | None:
    """Return ``data`` with the first scan header's Se set to 63 when a sequential (SOF0/SOF1)
    JPEG says Ss = Se = 0, as the NEMA WG04 JPEG Extended samples do; None when not applicable.

    Strict decoders (libjpeg) reject Se = 0 in a sequential scan; IJG-based ones ignore it.
    """
    sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc1"))
    sos = data.find(b"\xff\xda")
    if sof < 0 or sos < 0 or sos + 5 >= len(data):
        return None
    se_pos = sos + 5 + 2 * data[sos + 4] + 1  # marker(2) length(2) Ns(1) Ns x (Cs, Td|Ta) Ss Se
    if se_pos >= len(data) or data[se_pos - 1] != 0 or data[se_pos] != 0:
        return None
    patched = bytearray(data)
    patched[se_pos] = 63
    return bytes(patched)
