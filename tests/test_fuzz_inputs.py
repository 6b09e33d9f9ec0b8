"""Hostile inputs, end to end: mutated real files through ``Detector.predict``.

Seeds are real fixtures from the shared data folder (see its README for sources and licences),
some re-encoded small so that thousands of cases stay fast: the NEMA/highdicom DX in native,
implicit, Deflated, RLE, JPEG-LS and JPEG 2000 encodings, the SIIM CR's JPEG frame, a 16-bit crop
of the NEMA RG1 CR, a real 12-bit JPEG Extended DICOM, real lung-box JPEG/PNG files, and NIH
ChestX-ray14 pixels written as gray/16-bit/RGB/palette/interlaced PNG and progressive JPEG.

Mutations (hypothesis): bit flips, truncation and byte overwrites aimed at the header, the pixel
stream or the tail; DICOM US fields (Rows, Columns, BitsAllocated, BitsStored...) that disagree
with the pixel data, replaced strings (Transfer Syntax UID, Photometric Interpretation,
NumberOfFrames, LUT attributes...), element lengths set to 0 / odd / 0xFFFFFFFF / huge, dropped
elements, codestream sizes inside compressed frames; PNG IHDR fields, CRCs, chunk lengths,
truncated IDAT, dropped / duplicated / inserted chunks; JPEG SOF fields, DHT/DQT/SOS corruption,
segment lengths, dropped / duplicated segments, stray markers, missing EOI.

Each case runs ``predict([mutated, clean_jpeg, clean_array])`` and must give three Predictions:
the first valid (finite scores in [0, 1], finite boxes) or carrying an ``InputError`` subclass;
the two clean ones bit-identical to a clean run (isolation). The io layer is checked on its own
too (``load_item`` + ``decode_pixels`` return finite gray pixels or raise ``InputError``).
A case slower than ``HANG_S`` counts as a hang; the peak RSS growth of each case is measured
(VmHWM, reset per case) and must stay under ``PEAK_RSS_BOUND_MB``. A real hang cannot stall CI:
a watchdog (faulthandler) dumps every thread's stack and ends the process after ``WATCHDOG_S``.

Runs: ``pytest tests/test_fuzz_inputs.py`` (about 300 cases), ``pytest -m slow tests/test_fuzz_inputs.py``
(>= 10,000 cases). Both are derandomized: the same cases on every run. ``-s`` prints the counts;
``CXRKIT_FUZZ_REPORT=path.json`` also writes them; ``CXRKIT_FUZZ_TRACE=path`` logs each case
before it runs (to name the case that takes the process down, e.g. under ``ulimit -v``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("pydicom")

import cxrkit  # noqa: E402
from cxrkit.config import Limits  # noqa: E402
from cxrkit.errors import InputError  # noqa: E402
from cxrkit.io import decode_pixels, load_item  # noqa: E402
from cxrkit.io.deadline import abandoned_decodes  # noqa: E402
from test_reliability_isolation import fingerprint  # noqa: E402

FAST_CASES = 300
SLOW_CASES = 10_000
HANG_S = 30.0
WATCHDOG_S = 300.0
PEAK_RSS_BOUND_MB = 1024.0
RSS_WATCHDOG_MIB = 4096.0
FUZZ_LIMITS = Limits(max_pixels=4_000_000, max_file_bytes=16 * 1024 * 1024, decode_timeout_s=10.0)

_COMMON = dict(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("cxrkit-fuzz-fast", max_examples=FAST_CASES, **_COMMON)
settings.register_profile("cxrkit-fuzz-slow", max_examples=SLOW_CASES, **_COMMON)


# ---------------------------------------------------------------------------------------------
# seeds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    name: str
    fmt: str  # "jpeg" | "png" | "dicom"
    data: bytes
    regions: dict  # "header" / "body" / "tail" -> (start, stop) byte ranges
    parts: tuple = ()  # JPEG segments / PNG chunks / DICOM elements (see the parsers below)

    def __repr__(self) -> str:  # keeps hypothesis' reports short (it prints strategy arguments)
        return f"Seed({self.name!r}, {len(self.data)} B)"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis' pretty printer asks for this
        p.text(repr(self))


@dataclass(frozen=True)
class Elem:  # one DICOM element in the file bytes
    tag: int
    vr: str  # "" when implicit
    start: int  # offset of the tag
    len_pos: int
    len_size: int  # 2 or 4
    value_pos: int
    length: int


_LONG_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UT", "UN", "UC", "UR", "SV", "UV"}


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset of the 0xFF, segment length) up to and including SOS."""
    out, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        (n,) = struct.unpack_from(">H", data, pos + 2)
        out.append((marker, pos, n))
        if marker == 0xDA:
            break
        pos += 2 + n
    return out


def png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, offset of the length field, data length) of every chunk."""
    out, pos = [], 8
    while pos + 12 <= len(data):
        n, kind = struct.unpack_from(">I4s", data, pos)
        out.append((kind, pos, n))
        pos += 12 + n
    return out


def dicom_elements(data: bytes) -> list[Elem]:
    """File meta elements (walked by hand) and top-level data set elements (pydicom's raw offsets)."""
    import pydicom

    out: list[Elem] = []
    pos = 132
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        tag = (2 << 16) | struct.unpack_from("<H", data, pos + 2)[0]
        vr = data[pos + 4 : pos + 6].decode("latin1")
        if vr in _LONG_VRS:
            n = struct.unpack_from("<I", data, pos + 8)[0]
            out.append(Elem(tag, vr, pos, pos + 8, 4, pos + 12, n))
            pos += 12 + n
        else:
            n = struct.unpack_from("<H", data, pos + 6)[0]
            out.append(Elem(tag, vr, pos, pos + 6, 2, pos + 8, n))
            pos += 8 + n
    ds = pydicom.dcmread(io.BytesIO(data))
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_deflated:
        return out
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        vt = getattr(raw, "value_tell", None)
        if vt is None:
            continue
        if ts.is_implicit_VR:
            out.append(Elem(int(tag), "", vt - 8, vt - 4, 4, vt, raw.length))
        elif raw.VR in _LONG_VRS:
            out.append(Elem(int(tag), raw.VR, vt - 12, vt - 4, 4, vt, raw.length))
        else:
            out.append(Elem(int(tag), raw.VR, vt - 8, vt - 2, 2, vt, raw.length))
    return out


def _seed(name: str, fmt: str, data: bytes) -> Seed:
    n = len(data)
    tail = (max(0, n - 16), n)
    if fmt == "jpeg":
        segs = jpeg_segments(data)
        sos_end = segs[-1][1] + 2 + segs[-1][2] if segs and segs[-1][0] == 0xDA else min(n, 600)
        return Seed(name, fmt, data, {"header": (0, sos_end), "body": (sos_end, tail[0]), "tail": tail}, tuple(segs))
    if fmt == "png":
        chunks = png_chunks(data)
        idat = [c for c in chunks if c[0] == b"IDAT"]
        first = idat[0][1] + 8 if idat else 33
        return Seed(name, fmt, data, {"header": (0, first), "body": (first, tail[0]), "tail": tail}, tuple(chunks))
    elems = dicom_elements(data)
    pix = next((e for e in elems if e.tag == 0x7FE00010), None)
    start = pix.value_pos if pix else min(n, 1024)
    return Seed(name, fmt, data, {"header": (0, start), "body": (start, tail[0]), "tail": tail}, tuple(elems))


def _png(arr: np.ndarray, **kw: Any) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(b, format="PNG", **kw)
    return b.getvalue()


def _jpeg(arr: np.ndarray, **kw: Any) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="JPEG", quality=90, **kw)
    return b.getvalue()


def _write(ds: Any) -> bytes:
    b = io.BytesIO()
    ds.save_as(b, enforce_file_format=True)
    return b.getvalue()


@lru_cache(maxsize=None)
def build_seeds(root: str, full: bool) -> tuple[Seed, ...]:
    import pydicom
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
        JPEGLSLossless, RLELossless,
    )

    r = Path(root)
    seeds: list[Seed] = []
    for rel in ("lungbox/images/ae6c954c0039de4b5edee53865ffee43-e6c8-0.jpg", "lungbox/images/paving.jpg",
                "lungbox/images/kjr-21-e24-g001-l-a.jpg"):
        seeds.append(_seed(Path(rel).stem[:12], "jpeg", (r / rel).read_bytes()))
    nih = np.asarray(Image.open(r / "torchxrayvision/00000001_000.png").convert("L"))[::4, ::4]  # (128, 128)
    seeds += [
        _seed("nih-jpeg-progressive", "jpeg", _jpeg(nih, progressive=True)),
        _seed("nih-png-gray8", "png", _png(nih)),
        _seed("nih-png-gray16", "png", _png(nih.astype(np.uint16) * 257)),
        _seed("nih-png-rgb", "png", _png(np.stack([nih, nih, nih], -1))),
        _seed("nih-png-palette", "png", _png(Image.fromarray(nih).convert("P"))),
        _seed("nih-png-rgba16", "png", _png_rgba16(nih)),
        _seed("nih-png-interlaced", "png", _png_interlaced(nih)),
        _seed("lungbox-png-rgba", "png", (r / "lungbox/images/16745_3_1.png").read_bytes()),
    ]
    tiny = r / "dicom/dx-tiny-monochrome1.dcm"
    seeds.append(_seed("dx-tiny-native", "dicom", tiny.read_bytes()))
    for uid, name in ((ImplicitVRLittleEndian, "implicit"), (DeflatedExplicitVRLittleEndian, "deflated")):
        ds = pydicom.dcmread(tiny)
        ds.file_meta.TransferSyntaxUID = uid
        seeds.append(_seed(f"dx-tiny-{name}", "dicom", _write(ds)))
    for uid, name in ((RLELossless, "rle"), (JPEGLSLossless, "jpegls"), (JPEG2000Lossless, "j2k")):
        ds = pydicom.dcmread(tiny)
        ds.compress(uid)
        seeds.append(_seed(f"dx-tiny-{name}", "dicom", _write(ds)))
    siim = pydicom.dcmread(r / "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    small = siim.pixel_array[::4, ::4]  # (256, 256) uint8
    siim.PixelData = encapsulate([_jpeg(np.ascontiguousarray(small))])
    siim["PixelData"].VR = "OB"
    siim.Rows, siim.Columns = small.shape
    siim.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    seeds.append(_seed("siim-cr-jpeg", "dicom", _write(siim)))
    rg1 = pydicom.dcmread(r / "dicom/nema-rg1/RG1_UNCR.dcm")
    crop = np.ascontiguousarray(rg1.pixel_array[800:960, 700:860])  # (160, 160) uint16, 15 bits
    rg1.PixelData, (rg1.Rows, rg1.Columns) = crop.tobytes(), crop.shape
    seeds.append(_seed("rg1-crop16-native", "dicom", _write(rg1)))
    rg1.compress(JPEG2000Lossless, crop)
    seeds.append(_seed("rg1-crop16-j2k", "dicom", _write(rg1)))
    seeds.append(_seed("rg3-jpeg-extended12", "dicom", (r / "dicom/codecs/JPLY/RG3_JPLY.dcm").read_bytes()))
    if full:
        seeds.append(_seed("rg3-jpeg-lossless", "dicom", (r / "dicom/codecs/JPLL/RG3_JPLL.dcm").read_bytes()))
        seeds.append(_seed("siim-cr-jpeg-1024", "dicom", (r / "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904."
                                                            "1517875201.850819.dcm").read_bytes()))
        seeds.append(_seed("wong-0004", "jpeg", (r / "lungbox/images/wong-0004.jpg").read_bytes()))
    return tuple(seeds)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_rgba16(gray: np.ndarray) -> bytes:
    """16-bit RGBA PNG written by hand (Pillow cannot write it)."""
    h, w = gray.shape
    px = np.empty((h, w, 4), ">u2")
    g = gray.astype(np.uint32)
    px[..., 0], px[..., 1], px[..., 2], px[..., 3] = g * 257, g * 200, g * 100, 65535
    raw = b"".join(b"\x00" + px[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")


def _png_interlaced(gray: np.ndarray) -> bytes:
    """8-bit gray Adam7 PNG written by hand (Pillow does not write interlaced PNG)."""
    h, w = gray.shape
    passes = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))
    raw = b""
    for y0, x0, dy, dx in passes:
        sub = gray[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# mutations: each draws its parameters and returns (mutated bytes, short description)
# ---------------------------------------------------------------------------------------------

_U16_EDGES = [0, 1, 2, 3, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 63, 64, 255, 256, 4095, 32767, 32768, 65535]
_U32_EDGES = [0, 1, 2, 3, 4, 7, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFF0, 0xFFFF_FFFE, 0xFFFF_FFFF, 1 << 20, 1 << 30]


def _pos(draw, seed: Seed, data: bytes) -> tuple[str, int]:
    names = [k for k, (a, b) in seed.regions.items() if b > a]
    region = draw(st.sampled_from(names))
    a, b = seed.regions[region]
    return region, draw(st.integers(a, min(b, len(data)) - 1))


def m_bitflip(draw, seed: Seed) -> tuple[bytes, str]:
    data = bytearray(seed.data)
    n = draw(st.integers(1, 8))
    where = []
    for _ in range(n):
        region, p = _pos(draw, seed, data)
        data[p] ^= 1 << draw(st.integers(0, 7))
        where.append(f"{region}@{p}")
    return bytes(data), "bitflip " + ",".join(where)


def m_truncate(draw, seed: Seed) -> tuple[bytes, str]:
    region, p = _pos(draw, seed, seed.data)
    return seed.data[:p], f"truncate {region}@{p}"


def m_overwrite(draw, seed: Seed) -> tuple[bytes, str]:
    region, p = _pos(draw, seed, seed.data)
    payload = draw(st.one_of(st.binary(min_size=1, max_size=32),
                             st.sampled_from([b"\x00" * 64, b"\xff" * 64, b"\xff\xd9", b"\xff\xda", b"IEND"])))
    return seed.data[:p] + payload + seed.data[p + len(payload):], f"overwrite {region}@{p} {payload[:8].hex()}"


def m_splice(draw, seed: Seed) -> tuple[bytes, str]:
    region, p = _pos(draw, seed, seed.data)
    n = draw(st.integers(1, 512))
    if draw(st.booleans()):
        return seed.data[:p] + seed.data[p + n:], f"delete {region}@{p}+{n}"
    return seed.data[:p] + seed.data[p : p + n] * draw(st.integers(2, 4)) + seed.data[p + n:], f"repeat {region}@{p}+{n}"


def _u16(draw, orig: int | None = None) -> int:
    opts = [st.sampled_from(_U16_EDGES), st.integers(0, 65535)]
    if orig is not None:
        opts.append(st.integers(max(0, orig - 2), min(65535, orig + 2)))
        opts.append(st.just(min(65535, orig * 2)))
    return draw(st.one_of(*opts))


# -- JPEG ------------------------------------------------------------------------------------


def m_jpeg_sof(draw, seed: Seed) -> tuple[bytes, str]:
    sof = next(s for s in seed.parts if 0xC0 <= s[0] <= 0xCF and s[0] not in (0xC4, 0xC8, 0xCC))
    data, at = bytearray(seed.data), sof[1] + 4  # P, Y(2), X(2), Nf
    fld = draw(st.sampled_from(["precision", "height", "width", "components", "marker"]))
    if fld == "precision":
        v = draw(st.sampled_from([0, 1, 2, 7, 8, 9, 12, 16, 255]))
        data[at] = v
    elif fld in ("height", "width"):
        off = at + (1 if fld == "height" else 3)
        v = _u16(draw, struct.unpack_from(">H", data, off)[0])
        struct.pack_into(">H", data, off, v)
    elif fld == "components":
        v = draw(st.sampled_from([0, 1, 2, 3, 4, 255]))
        data[at + 5] = v
    else:
        v = draw(st.sampled_from([0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC9, 0xCB, 0xF7]))
        data[sof[1] + 1] = v
    return bytes(data), f"jpeg SOF {fld}={v}"


def m_jpeg_segment(draw, seed: Seed) -> tuple[bytes, str]:
    marker, at, n = draw(st.sampled_from(seed.parts))
    data = bytearray(seed.data)
    how = draw(st.sampled_from(["length", "payload", "drop", "duplicate"]))
    if how == "length":
        v = draw(st.one_of(st.sampled_from([0, 1, 2, 3, n - 1, n + 1, 0xFFFF]), st.integers(0, 0xFFFF)))
        struct.pack_into(">H", data, at + 2, v & 0xFFFF)
        return bytes(data), f"jpeg {marker:02X} length={v}"
    if how == "payload" and n > 2:
        p = draw(st.integers(at + 4, at + 1 + n))
        payload = draw(st.binary(min_size=1, max_size=8))
        data[p : p + len(payload)] = payload
        return bytes(data[: len(seed.data)]), f"jpeg {marker:02X} payload@{p - at}"
    seg = seed.data[at : at + 2 + n]
    if how == "drop":
        return seed.data[:at] + seed.data[at + 2 + n:], f"jpeg drop {marker:02X}"
    return seed.data[:at] + seg + seg + seed.data[at + 2 + n:], f"jpeg duplicate {marker:02X}"


def m_jpeg_stream(draw, seed: Seed) -> tuple[bytes, str]:
    data = seed.data
    how = draw(st.sampled_from(["no-eoi", "early-eoi", "stray-marker", "rst-soup"]))
    if how == "no-eoi":
        k = draw(st.integers(2, 64))
        return data[:-k] if data.endswith(b"\xff\xd9") else data[:-1], f"jpeg no EOI (-{k})"
    a, b = seed.regions["body"]
    p = draw(st.integers(a, max(a, b - 1)))
    if how == "early-eoi":
        return data[:p] + b"\xff\xd9", f"jpeg EOI@{p}"
    m = draw(st.sampled_from([0xD9, 0xDA, 0xC4, 0xDB, 0xD0, 0xD7, 0xC0, 0xDD, 0xFE, 0x00, 0xFF]))
    reps = 1 if how == "stray-marker" else draw(st.integers(2, 200))
    return data[:p] + bytes([0xFF, m]) * reps + data[p:], f"jpeg marker FF{m:02X}x{reps}@{p}"


# -- PNG -------------------------------------------------------------------------------------


def _fix_crc(data: bytearray, at: int) -> None:
    n = struct.unpack_from(">I", data, at)[0]
    if at + 12 + n <= len(data):
        struct.pack_into(">I", data, at + 8 + n, zlib.crc32(bytes(data[at + 4 : at + 8 + n])))


def m_png_ihdr(draw, seed: Seed) -> tuple[bytes, str]:
    data = bytearray(seed.data)
    fld = draw(st.sampled_from(["width", "height", "depth", "color", "compression", "filter", "interlace"]))
    if fld in ("width", "height"):
        off = 16 if fld == "width" else 20
        orig = struct.unpack_from(">I", data, off)[0]
        v = draw(st.one_of(st.sampled_from(_U32_EDGES + [orig + 1, orig - 1, orig * 2, 65535, 100_000]),
                           st.integers(0, 2**32 - 1)))
        struct.pack_into(">I", data, off, v & 0xFFFFFFFF)
    else:
        off = {"depth": 24, "color": 25, "compression": 26, "filter": 27, "interlace": 28}[fld]
        v = draw(st.sampled_from([0, 1, 2, 3, 4, 6, 7, 8, 16, 255]))
        data[off] = v
    fixed = draw(st.booleans())
    if fixed:
        _fix_crc(data, 8)
    return bytes(data), f"png IHDR {fld}={v}{' crc-fixed' if fixed else ''}"


def m_png_chunk(draw, seed: Seed) -> tuple[bytes, str]:
    kind, at, n = draw(st.sampled_from(seed.parts))
    data = bytearray(seed.data)
    how = draw(st.sampled_from(["crc", "length", "drop", "duplicate"]))
    name = kind.decode("latin1")
    if how == "crc":
        p = at + 8 + n
        if p + 4 <= len(data):
            data[p + draw(st.integers(0, 3))] ^= 0xFF
        return bytes(data), f"png {name} bad CRC"
    if how == "length":
        v = draw(st.one_of(st.sampled_from(_U32_EDGES + [n + 1, max(0, n - 1)]), st.integers(0, 2**32 - 1)))
        struct.pack_into(">I", data, at, v & 0xFFFFFFFF)
        return bytes(data), f"png {name} length={v}"
    chunk = seed.data[at : at + 12 + n]
    if how == "drop":
        return seed.data[:at] + seed.data[at + 12 + n:], f"png drop {name}"
    return seed.data[:at] + chunk + chunk + seed.data[at + 12 + n:], f"png duplicate {name}"


def m_png_idat(draw, seed: Seed) -> tuple[bytes, str]:
    """Cut inside IDAT data but keep a valid container: fixed length and CRC, then IEND."""
    kind, at, n = next(c for c in seed.parts if c[0] == b"IDAT")
    cut = draw(st.integers(0, max(0, n - 1)))
    payload = seed.data[at + 8 : at + 8 + cut]
    if draw(st.booleans()):  # or corrupt the zlib stream instead of cutting it
        payload = seed.data[at + 8 : at + 8 + n]
        p = draw(st.integers(0, max(0, n - 1)))
        payload = payload[:p] + bytes([payload[p] ^ 0x55]) + payload[p + 1:] if n else payload
        return seed.data[:at] + _png_chunk(b"IDAT", payload) + _png_chunk(b"IEND", b""), f"png IDAT byte@{p}"
    return seed.data[:at] + _png_chunk(b"IDAT", payload) + _png_chunk(b"IEND", b""), f"png IDAT cut@{cut}/{n}"


def m_png_insert(draw, seed: Seed) -> tuple[bytes, str]:
    kind = draw(st.sampled_from([b"tRNS", b"PLTE", b"gAMA", b"sBIT", b"zTXt", b"iCCP", b"acTL", b"fcTL", b"fdAT",
                                 b"IHDR", b"IEND", b"aBcD"]))
    payload = draw(st.one_of(st.binary(max_size=64), st.just(b"k\x00\x00" + zlib.compress(b"\x00" * (1 << 22)))))
    _, at, n = draw(st.sampled_from(seed.parts))
    chunk = _png_chunk(kind, payload)
    return seed.data[:at] + chunk + seed.data[at:], f"png insert {kind.decode()}({len(payload)} B)"


# -- DICOM -----------------------------------------------------------------------------------

_US_TAGS = {0x00280010: "Rows", 0x00280011: "Columns", 0x00280100: "BitsAllocated", 0x00280101: "BitsStored",
            0x00280102: "HighBit", 0x00280002: "SamplesPerPixel", 0x00280103: "PixelRepresentation",
            0x00280006: "PlanarConfiguration"}
_STRINGS = {
    0x00020010: ("TransferSyntaxUID", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                                       "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
                                       "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
                                       "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5",
                                       "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.201", "1.2.3.4", "", "x"]),
    0x00280004: ("PhotometricInterpretation", ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422",
                                               "PALETTE COLOR", "YBR_RCT", "", "HSV"]),
    0x00280008: ("NumberOfFrames", ["0", "1", "2", "-1", "3", "1000000", "4294967296", "abc", "1e9"]),
    0x00080060: ("Modality", ["CR", "DX", "MG", "CT", "SR", "", "XA"]),
    0x00281050: ("WindowCenter", ["0", "-1", "1e308", "nan", "inf", "abc", "100\\200", "-1e9"]),
    0x00281051: ("WindowWidth", ["0", "-1", "1", "1e308", "nan", "abc", "0.5", "100\\0"]),
    0x00281053: ("RescaleSlope", ["0", "-1", "1e308", "nan", "inf", "abc", "1e-30"]),
    0x00281052: ("RescaleIntercept", ["0", "-1e308", "1e308", "nan", "abc"]),
    0x00185101: ("ViewPosition", ["LL", "RL", "LATERAL", "PA", ""]),
    0x00280030: ("PixelSpacing", ["0\\0", "-1\\1", "abc", "1", "nan\\nan", "0.1\\0.1"]),
    0x20500020: ("PresentationLUTShape", ["INVERSE", "IDENTITY", "", "X"]),
}


def _elems(seed: Seed) -> dict[int, Elem]:
    return {e.tag: e for e in seed.parts}


def _fix_meta_group_length(data: bytearray, delta: int) -> None:
    if data[132:136] == b"\x02\x00\x00\x00" and data[136:138] == b"UL":
        v = struct.unpack_from("<I", data, 140)[0]
        struct.pack_into("<I", data, 140, max(0, v + delta))


def _replace_value(seed: Seed, e: Elem, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if e.tag == 0x00020010 or e.vr == "UI" else b" "
    if e.len_size == 2 and len(value) > 0xFFFF:
        value = value[:0xFFFE]
    data = bytearray(seed.data[: e.len_pos])
    data += struct.pack("<H" if e.len_size == 2 else "<I", len(value))
    data += value + seed.data[e.value_pos + e.length:]
    if e.tag >> 16 == 2:
        _fix_meta_group_length(data, len(value) - e.length)
    return bytes(data)


def m_dicom_us(draw, seed: Seed) -> tuple[bytes, str]:
    elems = _elems(seed)
    tags = [t for t in _US_TAGS if t in elems and elems[t].length == 2]
    if not tags:
        return m_bitflip(draw, seed)
    e = elems[draw(st.sampled_from(tags))]
    orig = struct.unpack_from("<H", seed.data, e.value_pos)[0]
    v = _u16(draw, orig)
    data = bytearray(seed.data)
    struct.pack_into("<H", data, e.value_pos, v)
    return bytes(data), f"dicom {_US_TAGS[e.tag]}={v} (was {orig})"


def m_dicom_string(draw, seed: Seed) -> tuple[bytes, str]:
    elems = _elems(seed)
    tag = draw(st.sampled_from(sorted(_STRINGS)))
    name, choices = _STRINGS[tag]
    value = draw(st.one_of(st.sampled_from(choices), st.text("0123456789.-\\eE ", max_size=12)))
    if tag not in elems:  # an absent attribute: only a few are worth inserting, via pydicom
        return _insert_attr(seed, name, value), f"dicom insert {name}={value!r}"
    return _replace_value(seed, elems[tag], value.encode("latin1")), f"dicom {name}={value!r}"


def _insert_attr(seed: Seed, name: str, value: str) -> bytes:
    import pydicom
    from pydicom.dataelem import DataElement
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    ds = pydicom.dcmread(io.BytesIO(seed.data))
    tag = tag_for_keyword(name)
    b = io.BytesIO()
    try:
        ds[tag] = DataElement(tag, dictionary_VR(tag), value)
        ds.save_as(b)
    except Exception:  # pydicom refuses some values: keep the seed (a valid case too)
        return seed.data
    return b.getvalue()


def m_dicom_length(draw, seed: Seed) -> tuple[bytes, str]:
    e = draw(st.sampled_from(seed.parts))
    lim = 0xFFFF if e.len_size == 2 else 0xFFFFFFFF
    v = draw(st.one_of(st.sampled_from(_U32_EDGES + [e.length + 1, max(0, e.length - 1), e.length + 2, 1]),
                       st.integers(0, lim)))
    data = bytearray(seed.data)
    struct.pack_into("<H" if e.len_size == 2 else "<I", data, e.len_pos, v & lim)
    return bytes(data), f"dicom length of ({e.tag >> 16:04X},{e.tag & 0xFFFF:04X})={v & lim}"


def m_dicom_drop(draw, seed: Seed) -> tuple[bytes, str]:
    e = draw(st.sampled_from(seed.parts))
    if e.length == 0xFFFFFFFF:
        data = bytearray(seed.data[: e.start])
    else:
        data = bytearray(seed.data[: e.start] + seed.data[e.value_pos + e.length:])
        if e.tag >> 16 == 2:
            _fix_meta_group_length(data, -(e.value_pos + e.length - e.start))
    return bytes(data), f"dicom drop ({e.tag >> 16:04X},{e.tag & 0xFFFF:04X})"


def m_dicom_codestream(draw, seed: Seed) -> tuple[bytes, str]:
    """Corrupt the size fields of the codestream inside an encapsulated frame."""
    a, b = seed.regions["body"]
    data = bytearray(seed.data)
    body = bytes(data[a:b])
    siz = body.find(b"\xff\x4f\xff\x51")
    if siz >= 0:
        fld = draw(st.sampled_from([8, 12, 16, 20, 40]))  # Xsiz, Ysiz, XOsiz, YOsiz, Csiz
        v = draw(st.one_of(st.sampled_from(_U32_EDGES + [60000, 100_000]), st.integers(0, 2**32 - 1)))
        if fld == 40:
            struct.pack_into(">H", data, a + siz + fld, v & 0xFFFF)
        else:
            struct.pack_into(">I", data, a + siz + fld, v & 0xFFFFFFFF)
        return bytes(data), f"j2k SIZ+{fld}={v}"
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc3", b"\xff\xf7"):
        sof = body.find(marker)
        if sof >= 0:
            off = draw(st.sampled_from([5, 7]))  # Y, X
            v = _u16(draw, struct.unpack_from(">H", body, sof + off)[0])
            struct.pack_into(">H", data, a + sof + off, v)
            return bytes(data), f"frame SOF {marker.hex()}+{off}={v}"
    return m_bitflip(draw, seed)


GENERIC = (m_bitflip, m_truncate, m_overwrite, m_splice)
OPS: dict[str, tuple[Callable, ...]] = {
    "jpeg": GENERIC + (m_jpeg_sof, m_jpeg_sof, m_jpeg_segment, m_jpeg_segment, m_jpeg_stream),
    "png": GENERIC + (m_png_ihdr, m_png_ihdr, m_png_chunk, m_png_chunk, m_png_idat, m_png_insert),
    "dicom": GENERIC + (m_dicom_us, m_dicom_us, m_dicom_string, m_dicom_string, m_dicom_length, m_dicom_length,
                        m_dicom_drop, m_dicom_codestream),
}


@st.composite
def cases(draw, seeds: tuple[Seed, ...]) -> tuple[str, str, bytes]:
    seed = draw(st.sampled_from(seeds))
    op = draw(st.sampled_from(OPS[seed.fmt]))
    data, what = op(draw, seed)
    return seed.name, what, data


# ---------------------------------------------------------------------------------------------
# the harness
# ---------------------------------------------------------------------------------------------


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


@dataclass
class Stats:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    by_seed: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)
    hangs: int = 0
    crashes: int = 0
    max_case_s: float = 0.0
    max_case_what: str = ""
    max_peak_rss_mb: float = 0.0
    wall_s: float = 0.0
    rss_mb: tuple = (0.0, 0.0)  # at the start, at the end
    vm_mb: tuple = (0.0, 0.0)
    predict_raised: int = 0  # cases where predict itself raised (counted in crashes too)
    io_untyped: int = 0  # cases where load_item/decode_pixels raised something not an InputError (crashes too)
    hypothesis: dict = field(default_factory=dict)  # why hypothesis stopped, its generate-phase counts

    def tally(self) -> dict:
        """Each case ends in exactly one end-to-end outcome (a valid Prediction, a typed error in it,
        or predict raising) and one io outcome (pixels, InputError, or an untyped exception)."""
        e2e = {k[4:]: v for k, v in self.outcomes.items() if k.startswith("e2e:")}
        io = {k[3:]: v for k, v in self.outcomes.items() if k.startswith("io:")}
        valid = e2e.get("ok", 0)
        errors = sum(v for k, v in e2e.items() if k != "ok")
        return {
            "valid_predictions": valid, "typed_input_errors": errors, "predict_raised": self.predict_raised,
            "e2e_adds_up": valid + errors + self.predict_raised == self.cases,
            "io_ok": io.get("ok", 0), "io_typed_errors": sum(v for k, v in io.items() if k != "ok"),
            "io_adds_up": sum(io.values()) + self.io_untyped == self.cases,
        }

    def summary(self) -> dict:
        return {
            "cases": self.cases, **self.tally(), "crashes": self.crashes, "hangs": self.hangs,
            "failures": len(self.failures), "max_case_s": round(self.max_case_s, 3),
            "slowest_case": self.max_case_what, "max_peak_rss_growth_mb": round(self.max_peak_rss_mb, 1),
            "wall_s": round(self.wall_s, 1), "rss_mb_start_end": self.rss_mb, "vmsize_mb_start_end": self.vm_mb,
            "outcomes": dict(self.outcomes.most_common()),
            "cases_by_seed": dict(sorted(self.by_seed.items())),
            "hypothesis": self.hypothesis,
        }


class Harness:
    def __init__(self, det: "cxrkit.Detector", clean: list) -> None:
        self.det, self.clean = det, clean
        self.baseline = [fingerprint(p) for p in det.predict(clean)]
        self.stats = Stats()
        self.current = ""
        self.can_peak = _peak_rss_reset()
        trace = os.environ.get("CXRKIT_FUZZ_TRACE")
        self.trace = open(trace, "a") if trace else None

    def run(self, case: tuple[str, str, bytes]) -> None:
        name, what, data = case
        st_, label = self.stats, f"{name}: {what} ({len(data)} B)"
        self.current = label
        st_.cases += 1
        st_.by_seed[name] += 1
        if self.trace is not None:  # written before the case runs: names the culprit of a hard crash
            self.trace.write(f"{st_.cases}\t{label}\n")
            self.trace.flush()
        faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
        rss0 = _status_kb("VmRSS:")
        if self.can_peak:
            _peak_rss_reset()
        t0 = time.perf_counter()
        try:
            problems = self._io_check(data) + self._e2e_check(data)
        except Exception as exc:  # predict itself raised: a crash
            problems = [f"predict raised {type(exc).__name__}: {exc}"]
            st_.crashes += 1
            st_.predict_raised += 1
        finally:
            faulthandler.cancel_dump_traceback_later()
        dt = time.perf_counter() - t0
        if self.can_peak:
            peak_mb = (_status_kb("VmHWM:") - rss0) / 1024
            st_.max_peak_rss_mb = max(st_.max_peak_rss_mb, peak_mb)
            if peak_mb > PEAK_RSS_BOUND_MB:
                problems.append(f"peak RSS grew by {peak_mb:.0f} MB")
        if self.trace is not None:
            self.trace.write(f"\t{dt:.2f} s, VmSize {_status_kb('VmSize:') // 1024} MB, "
                             f"{abandoned_decodes()} decodes running late\n")
            self.trace.flush()
        if dt > st_.max_case_s:
            st_.max_case_s, st_.max_case_what = dt, label
        if dt > HANG_S:
            st_.hangs += 1
            problems.append(f"took {dt:.1f} s (> {HANG_S} s: counted as a hang)")
        if problems:
            st_.failures.append(f"{label}: " + "; ".join(problems))

    def _io_check(self, data: bytes) -> list[str]:
        try:
            img = decode_pixels(load_item(data, 0, limits=FUZZ_LIMITS))
        except InputError as e:
            self.stats.outcomes[f"io:{type(e).__name__}{_net(e)}"] += 1
            return []
        except Exception as e:
            self.stats.crashes += 1
            self.stats.io_untyped += 1
            return [f"io raised untyped {type(e).__name__}: {e}"]
        self.stats.outcomes["io:ok"] += 1
        px, (lo, hi) = img.pixels, img.value_range
        bad = []
        if px is None or px.ndim != 2 or px.dtype not in (np.uint8, np.uint16, np.float32):
            bad.append(f"io pixels {None if px is None else (px.dtype, px.shape)}")
        elif px.shape != tuple(img.image_size):
            bad.append(f"io pixels {px.shape} vs image_size {img.image_size}")
        elif px.dtype == np.float32 and not np.isfinite(px).all():
            bad.append("io pixels not finite")
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            bad.append(f"io value_range {(lo, hi)}")
        return bad

    def _e2e_check(self, data: bytes) -> list[str]:
        preds = self.det.predict([data] + self.clean)
        bad = []
        if len(preds) != 1 + len(self.clean) or not all(isinstance(p, cxrkit.Prediction) for p in preds):
            return [f"predict returned {preds!r}"]
        p = preds[0]
        if p.error is not None:
            if not isinstance(p.error, InputError):
                self.stats.crashes += 1
                bad.append(f"untyped error {type(p.error).__name__}: {p.error}")
            # "unexpected": a decoder raised something cxrkit does not anticipate; the safety net
            # typed it (DecodeError), but each such case is worth a look
            self.stats.outcomes[f"e2e:{type(p.error).__name__}{_net(p.error)}"] += 1
        else:
            self.stats.outcomes["e2e:ok"] += 1
            bad += _invalid(p, self.det.labels)
        for k, q in enumerate(preds[1:]):
            if fingerprint(q) != self.baseline[k]:
                bad.append(f"clean item {k + 1} differs from the clean run")
        return bad


def _net(err: Exception) -> str:
    """'(safety net: KeyError)' when a decoder raised something cxrkit does not anticipate and the
    safety net typed it as DecodeError "unexpected ...": each such kind is worth a look."""
    import re

    m = re.search(r"unexpected (\w+)(?: while (?:reading|decoding))?:", str(err))
    return f"(safety net: {m.group(1)})" if m else ""


def _invalid(p: "cxrkit.Prediction", labels: tuple[str, ...]) -> list[str]:
    bad = []
    if set(p.findings) != set(labels):
        bad.append(f"findings {sorted(p.findings)}")
    h, w = p.image_size or (0, 0)
    for key, f in p.findings.items():
        if not (np.isfinite(f.score) and 0.0 <= f.score <= 1.0):
            bad.append(f"{key} score {f.score}")
        if not np.isfinite(f.boxes_xyxy).all() or not np.isfinite(f.points_xy).all():
            bad.append(f"{key} boxes/points not finite")
    if not (h > 0 and w > 0):
        bad.append(f"image_size {p.image_size}")
    return bad


def _clean_inputs() -> list:
    from PIL import Image

    rng = np.random.default_rng(5)
    arr = (rng.random((64, 64)) * 255).astype(np.uint8)
    arr[16:48, 16:48] = 89  # a 0.35 square: "mass" fires
    b = io.BytesIO()
    Image.fromarray(np.full((96, 80), 64, np.uint8)).save(b, format="JPEG", quality=95)
    return [b.getvalue(), arr]


@pytest.fixture(scope="module")
def fuzz_det():
    with cxrkit.Detector.from_pretrained("cxr-probe", batch_size=4, limits=FUZZ_LIMITS) as d:
        yield d


def _report(tag: str, stats: Stats) -> None:
    summary = stats.summary()
    print(f"\n[fuzz {tag}] " + json.dumps(summary, indent=None))
    out = os.environ.get("CXRKIT_FUZZ_REPORT")
    if out:
        Path(out).write_text(json.dumps({tag: summary}, indent=2))


@contextlib.contextmanager
def _rss_watchdog(harness: "Harness", extra_mib: float):
    """End the process, naming the case, if RSS climbs ``extra_mib`` above its level at the start:
    a runaway decoder must not pull the machine into the OOM killer (found: pylibjpeg grew to
    21 GB on a JPEG frame with height 0). RLIMIT_AS is no use here: address space grows by
    itself over thousands of cases (DALI pipelines, malloc arenas) while RSS stays flat."""
    limit_kb = _status_kb("VmRSS:") + int(extra_mib * 1024)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            if _status_kb("VmRSS:") > limit_kb:
                os.write(2, f"\n[fuzz] RSS over {limit_kb // 1024} MB during case: {harness.current}\n".encode())
                os._exit(70)

    t = threading.Thread(target=watch, name="fuzz-rss-watchdog", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def _fuzz(det, seeds, profile: str, tag: str) -> Stats:
    harness = Harness(det, _clean_inputs())

    @settings(settings.get_profile(profile))
    @given(case=cases(seeds))
    def one(case):
        harness.run(case)

    t0 = time.perf_counter()
    rss0, vm0 = _status_kb("VmRSS:") // 1024, _status_kb("VmSize:") // 1024
    # pydicom logs every failed decode with its traceback; pytest's log capture would keep those
    # records (and through their frames each case's arrays) until the test ends: GBs over 10,000
    # cases. Logging is off while fuzzing; errors are counted from the Predictions instead.
    logging.disable(logging.CRITICAL)
    from hypothesis.statistics import collector

    hyp: list = []
    try:
        with _rss_watchdog(harness, RSS_WATCHDOG_MIB), collector.with_value(hyp.append):
            one()
    finally:
        logging.disable(logging.NOTSET)
    if hyp:  # why hypothesis stopped: it runs fewer than max_examples cases when its search space runs dry
        gen = [tc["status"] for tc in hyp[-1].get("generate-phase", {}).get("test-cases", [])]
        harness.stats.hypothesis = {
            "max_examples": settings.get_profile(profile).max_examples,
            "stopped_because": hyp[-1].get("stopped-because"),
            "generate_phase": dict(Counter(gen)),
        }
    harness.stats.wall_s = time.perf_counter() - t0
    harness.stats.rss_mb = (rss0, _status_kb("VmRSS:") // 1024)
    harness.stats.vm_mb = (vm0, _status_kb("VmSize:") // 1024)
    _report(tag, harness.stats)
    return harness.stats


def test_seeds_are_valid(shared_data, fuzz_det):
    """Every unmutated seed predicts without error (else the mutations prove little)."""
    seeds = build_seeds(str(shared_data), True)
    preds = fuzz_det.predict([s.data for s in seeds])
    assert [p.error for p in preds] == [None] * len(seeds), [(s.name, p.error) for s, p in zip(seeds, preds) if p.error]


def test_fuzz_fast(shared_data, fuzz_det):
    stats = _fuzz(fuzz_det, build_seeds(str(shared_data), False), "cxrkit-fuzz-fast", "fast")
    t = stats.tally()
    assert t["e2e_adds_up"] and t["io_adds_up"], t
    assert stats.cases >= FAST_CASES * 0.9
    assert not stats.failures, "\n".join(stats.failures[:20])


@pytest.mark.slow
def test_fuzz_slow(shared_data, fuzz_det):
    """Writes benchmarks/reports/fuzz-slow.json (README and RESULTS quote it)."""
    from slow_reports import now_utc, write_report

    started = now_utc()
    stats = _fuzz(fuzz_det, build_seeds(str(shared_data), True), "cxrkit-fuzz-slow", "slow")
    write_report("fuzz-slow", {"summary": stats.summary(), "failures_first_50": stats.failures[:50]}, started)
    t = stats.tally()
    assert t["e2e_adds_up"] and t["io_adds_up"], t
    assert stats.cases >= SLOW_CASES * 0.9
    assert not stats.failures, "\n".join(stats.failures[:50])
