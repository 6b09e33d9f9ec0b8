"""cxrkit.io.png: the fast gray PNG decode (ISA-L/zlib inflate + C++ unfilter) equals Pillow's.

PNGs are written here with a small encoder that chooses each row's filter (all five types, in
8- and 16-bit, odd sizes, the stream split over several IDAT chunks), so every unfilter branch is
compared with Pillow; anything outside the plain case must return None (Pillow then decides).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cxrkit.io.png import available, decode_gray_png

pytestmark = pytest.mark.skipif(not available(), reason="cxrkit._C (the C++ kernels) is not built")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _png(arr: np.ndarray, filters, *, idat_sizes=(1 << 30,), level=6, interlace=0, before_idat=(), raw_tail=b"") -> bytes:
    """A gray PNG of ``arr`` (uint8 / uint16) with row y filtered by ``filters[y % len]``."""
    h, w = arr.shape
    depth = 16 if arr.dtype == np.uint16 else 8
    bpp = depth // 8
    rows = arr.astype(">u2").view(np.uint8).reshape(h, w * 2) if depth == 16 else arr
    out, prev = bytearray(), np.zeros(w * bpp, np.int32)
    zero = np.zeros(bpp, np.int32)
    for y in range(h):
        cur = rows[y].astype(np.int32)
        left, upleft = np.concatenate([zero, cur[:-bpp]]), np.concatenate([zero, prev[:-bpp]])
        f = filters[y % len(filters)]
        pred = [0, left, prev, (left + prev) // 2, _paeth(left, prev, upleft)][f]
        out.append(f)
        out += ((cur - pred) & 0xFF).astype(np.uint8).tobytes()
        prev = cur
    z = zlib.compress(bytes(out) + raw_tail, level)
    pieces, at, k = [], 0, 0
    while at < len(z):
        n = idat_sizes[k % len(idat_sizes)]
        pieces.append(_chunk(b"IDAT", z[at:at + n]))
        at, k = at + n, k + 1
    ihdr = struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(_chunk(t, b) for t, b in before_idat)
            + b"".join(pieces) + _chunk(b"IEND", b""))


def _pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("hw", [(1, 1), (1, 7), (9, 1), (33, 17), (64, 257)])
def test_all_filters_equal_pillow(dtype, hw):
    rng = np.random.default_rng(hash((dtype().itemsize, hw)) % 2**32)
    top = 255 if dtype == np.uint8 else 65535
    smooth = np.cumsum(rng.integers(-3, 4, hw), axis=1)  # image-like rows, and pure noise rows
    arr = np.clip(np.where(rng.random(hw) < 0.3, rng.integers(0, top + 1, hw), smooth + top // 2), 0, top).astype(dtype)
    for filters in ([0], [1], [2], [3], [4], [4, 3, 2, 1, 0], list(rng.integers(0, 5, 11))):
        data = _png(arr, filters, idat_sizes=(7, 1000, 3))
        got = decode_gray_png(data)
        assert got is not None and got.dtype == dtype, filters
        np.testing.assert_array_equal(got, _pillow(data))
        np.testing.assert_array_equal(got, arr)


def test_pillow_written_and_sample_pngs_equal_pillow(tmp_path):
    rng = np.random.default_rng(0)
    for arr in (rng.integers(0, 65536, (300, 211)).astype(np.uint16), rng.integers(0, 256, (97, 301)).astype(np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=9)
        np.testing.assert_array_equal(decode_gray_png(buf.getvalue()), arr)
    from pathlib import Path

    for p in sorted((Path(__file__).resolve().parents[1] / "samples").glob("*.png")):
        data = p.read_bytes()
        got = decode_gray_png(data)
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "I;16"):
                assert got is None
                continue
        np.testing.assert_array_equal(got, _pillow(data))


def test_not_the_plain_case_returns_none():
    arr = np.arange(40, dtype=np.uint8).reshape(5, 8)
    good = _png(arr, [4])
    assert decode_gray_png(good) is not None
    assert decode_gray_png(_png(arr, [4], interlace=1)) is None
    assert decode_gray_png(_png(arr, [4], before_idat=[(b"tRNS", b"\x00\x05")])) is None
    assert decode_gray_png(_png(arr, [4], raw_tail=b"\x00" * 9)) is None  # inflates past the image
    bad_filter = bytearray(zlib.decompress(good[33 + 8:-12 - 4]))
    bad_filter[0] = 5
    assert decode_gray_png(_png(arr, [4])[:33] + _chunk(b"IDAT", zlib.compress(bytes(bad_filter)))
                           + _chunk(b"IEND", b"")) is None
    flipped = bytearray(good)
    flipped[33 + 10] ^= 0xFF  # inside IDAT: CRC mismatch
    assert decode_gray_png(bytes(flipped)) is None
    assert decode_gray_png(good[:-12]) is None  # no IEND
    assert decode_gray_png(good[: len(good) // 2]) is None  # truncated
    assert decode_gray_png(good, max_pixels=39) is None
    assert decode_gray_png(b"not a png at all, not a png at all, not a png") is None
    rgb = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb, format="PNG")
    assert decode_gray_png(rgb.getvalue()) is None


def test_io_uses_it_and_keeps_pillow_for_broken_files(tmp_path):
    """decode_pixels on a gray PNG gives Pillow's pixels; a damaged one still gets Pillow's typed error."""
    from cxrkit.errors import DecodeError
    from cxrkit.io import decode_pixels, load_item

    arr = (np.arange(64 * 80, dtype=np.uint32).reshape(64, 80) * 13 % 65536).astype(np.uint16)
    data = _png(arr, [1, 4])
    img = decode_pixels(load_item(data, 0))
    assert img.pixels.dtype == np.uint16 and img.value_range == (0.0, 65535.0)
    np.testing.assert_array_equal(img.pixels, arr)
    broken = bytearray(data)
    broken[60:90] = bytes(30)
    with pytest.raises(DecodeError):
        decode_pixels(load_item(bytes(broken), 0))


def test_damaged_files_never_raise_and_never_disagree_with_pillow():
    """Byte flips, truncations and junk in 600 damaged copies: the fast decoder returns None (then
    Pillow decides) or exactly what Pillow decodes; it never raises."""
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 65536, (23, 19)).astype(np.uint16)
    good = _png(arr, [0, 1, 2, 3, 4], idat_sizes=(50, 200))
    for k in range(600):
        data = bytearray(good)
        kind = k % 3
        if kind == 0:
            for pos in rng.integers(0, len(data), rng.integers(1, 4)):
                data[pos] ^= int(rng.integers(1, 256))
        elif kind == 1:
            data = data[: int(rng.integers(8, len(data)))]
        else:
            at = int(rng.integers(8, len(data)))
            data = data[:at] + bytes(rng.integers(0, 256, int(rng.integers(1, 40))).astype(np.uint8)) + data[at:]
        got = decode_gray_png(bytes(data))
        if got is not None:
            np.testing.assert_array_equal(got, _pillow(bytes(data)))
