"""Named hostile headers, one test each: header fields that disagree with the data, wrong transfer
syntaxes, absurd lengths, and size bombs that must be refused BEFORE a decoder allocates.

The fuzzer (test_fuzz_inputs.py) finds these by chance; here each has a fixed case and an exact
expected error type, so a regression names itself.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

import cxrkit  # noqa: E402
from cxrkit.config import Limits  # noqa: E402
from cxrkit.errors import DecodeError, ImageTooLargeError, InputError, UnsupportedFormatError  # noqa: E402
from cxrkit.io import decode_pixels, load_item  # noqa: E402


def make_dx(px: np.ndarray | None = None, ts: str = "1.2.840.10008.1.2.1", *, raw: bool = False, **attrs):
    """A small DX Dataset (12-bit, MONOCHROME2) with ``attrs`` overriding tags; bytes unless ``raw``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, generate_uid

    px = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) % 4096) if px is None else px
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = px.tobytes()
    if UID(ts).is_compressed:
        ds.compress(ts, px)
    else:
        ds.file_meta.TransferSyntaxUID = ts
    for k, v in attrs.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    if raw:
        return ds
    b = io.BytesIO()
    ds.save_as(b, enforce_file_format=True)
    return b.getvalue()


@pytest.fixture
def no_decoder(monkeypatch):
    """Fail the test if pydicom's frame decoder runs (the check must come before it)."""
    import pydicom.pixels

    def boom(*a, **k):
        raise AssertionError("the decoder ran; the size check must refuse the item before decoding")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", boom)


def _load(data, **limits):
    return load_item(data, 0, limits=Limits(**limits) if limits else Limits())


# -- DICOM: header fields that disagree with the pixel data ------------------------------------


DX_PIXELS = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) % 4096  # make_dx's default pixels
READ = "read"  # decodes to DX_PIXELS (cut to the header's Rows), no warning
READ_WARN = "read with a warning"  # the same, and LoadedImage.warnings says the header may be wrong


# Each case's outcome as measured on 2026-11-30 (pydicom 3.0), pinned: a change of behaviour must
# be a decision, not an accident.
@pytest.mark.parametrize(
    "attrs, expected",
    [
        (dict(Rows=96), DecodeError),  # more rows than the data holds
        (dict(Columns=65535), DecodeError),
        (dict(Rows=0), DecodeError),
        (dict(Rows=24), READ_WARN),  # fewer rows: the first 24 rows are read; extra data noted
        (dict(BitsAllocated=8), DecodeError),  # 8 allocated < 12 stored: pydicom refuses
        (dict(BitsAllocated=0), DecodeError),
        (dict(BitsAllocated=12), DecodeError),
        (dict(BitsAllocated=128), DecodeError),
        (dict(BitsStored=17), DecodeError),  # more stored bits than allocated
        (dict(BitsStored=0), DecodeError),
        (dict(HighBit=40), READ),  # HighBit is not used by the decoders: read as BitsStored says
        (dict(SamplesPerPixel=3), DecodeError),
        (dict(SamplesPerPixel=200), DecodeError),
        (dict(PixelRepresentation=7), DecodeError),
        (dict(PhotometricInterpretation="HSV"), UnsupportedFormatError),
        (dict(NumberOfFrames=1000000), DecodeError),  # far more frames than the bytes hold
        (dict(PixelData=None), InputError),
    ],
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else getattr(v, "__name__", v),
)
def test_dicom_fields_that_disagree_with_the_data(attrs, expected):
    data = make_dx(**attrs)
    if isinstance(expected, type):
        with pytest.raises(InputError) as ei:
            _load(data)
        assert type(ei.value) is expected, ei.value  # the exact type, not a subclass of the expected one
        return
    img = decode_pixels(_load(data))
    rows = attrs.get("Rows", 48)
    np.testing.assert_array_equal(img.pixels, DX_PIXELS[:rows])
    assert img.value_range == (0.0, 4095.0)
    if expected == READ_WARN:
        assert any("more than Rows x Columns" in w for w in img.warnings), img.warnings
    else:
        assert img.warnings == [], img.warnings


@pytest.mark.parametrize(
    "ts, err",
    [
        ("1.2.840.10008.1.2.4.90", DecodeError),  # native bytes labelled JPEG 2000
        ("1.2.840.10008.1.2.4.50", DecodeError),  # ... labelled JPEG baseline
        ("1.2.840.10008.1.2.5", DecodeError),  # ... labelled RLE
        ("1.2.3.4.5", InputError),  # not a transfer syntax at all
        ("1.2.840.10008.1.2.4.100", InputError),  # MPEG2: a video syntax
    ],
)
def test_wrong_transfer_syntax_uid(ts, err):
    with pytest.raises(err):
        _load(set_transfer_syntax(make_dx(), ts))


def test_compressed_data_labelled_native():
    with pytest.raises(InputError):
        _load(set_transfer_syntax(make_dx(ts="1.2.840.10008.1.2.4.90"), "1.2.840.10008.1.2.1"))


def set_transfer_syntax(data: bytes, uid: str) -> bytes:
    """Rewrite (0002,0010) in the file bytes (pydicom will not write a mismatch), fixing the
    file meta group length."""
    at = data.find(b"\x02\x00\x10\x00UI", 132)
    (n,) = struct.unpack_from("<H", data, at + 6)
    value = uid.encode() + (b"\x00" if len(uid) % 2 else b"")
    out = bytearray(data[: at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + n :])
    (group_len,) = struct.unpack_from("<I", out, 140)
    struct.pack_into("<I", out, 140, group_len + len(value) - n)
    return bytes(out)


def _elem_len_pos(data: bytes, tag: int) -> tuple[int, int]:
    """(offset of the length field, its size) of the first explicit-VR LE element ``tag``."""
    at = data.find(struct.pack("<HH", tag >> 16, tag & 0xFFFF), 132)
    vr = data[at + 4 : at + 6]
    return (at + 8, 4) if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT") else (at + 6, 2)


_NO_PIXELDATA = (InputError, "DICOM has no PixelData")
_EMPTY = (DecodeError, "data set is empty after the file meta")
_LENGTH_OUTCOMES = {  # measured 2026-11-30 (pydicom 3.0), pinned; READ = the intact pixels
    0x00280010: {n: _NO_PIXELDATA for n in (0, 1, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF)},  # Rows (US)
    0x00080060: {n: _NO_PIXELDATA for n in (0, 1, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF)},  # Modality (CS)
    0x7FE00010: {0: (DecodeError, "cannot decode"), 1: (DecodeError, "cannot decode"), 0xFFFF: READ,
                 0xFFFFFFFF: _EMPTY, 0xFFFFFFF0: READ, 0x7FFFFFFF: READ},  # PixelData (OW): read to the end
    0x00020010: {0: (InputError, "no SOP Class UID"), 1: (InputError, "no SOP Class UID"), 0xFFFF: _EMPTY,
                 0xFFFFFFFF: _EMPTY, 0xFFFFFFF0: _EMPTY, 0x7FFFFFFF: _EMPTY},  # Transfer Syntax UID
}


@pytest.mark.parametrize("tag", [0x00280010, 0x00080060, 0x7FE00010, 0x00020010])
@pytest.mark.parametrize("length", [0, 1, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF])
def test_absurd_element_lengths(tag, length):
    expected = _LENGTH_OUTCOMES[tag][length]
    data = bytearray(make_dx())
    pos, size = _elem_len_pos(bytes(data), tag)
    if size == 2 and length > 0xFFFF:
        length &= 0xFFFF
    struct.pack_into("<H" if size == 2 else "<I", data, pos, length)
    if expected == READ:
        img = decode_pixels(_load(bytes(data)))
        np.testing.assert_array_equal(img.pixels, DX_PIXELS)
        return
    err, match = expected
    with pytest.raises(InputError, match=match) as ei:
        _load(bytes(data))
    assert type(ei.value) is err, ei.value


# -- DICOM: compressed frames whose codestream says something else -----------------------------


def _patch_codestream(data: bytes, ts: str, h: int, w: int) -> bytes:
    b = bytearray(data)
    if ts.startswith("1.2.840.10008.1.2.4.9"):
        at = data.find(b"\xff\x4f\xff\x51")
        xo, yo = struct.unpack_from(">II", b, at + 16)
        struct.pack_into(">II", b, at + 8, w + xo, h + yo)
    else:
        at = max(data.find(m) for m in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc3", b"\xff\xf7"))
        struct.pack_into(">HH", b, at + 5, h, w)
    return bytes(b)


CODECS = ["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"]  # JPEG 2000, JPEG-LS (encoders present)


@pytest.mark.parametrize("ts", CODECS)
def test_compressed_frame_bomb_refused_before_decoding(ts, no_decoder):
    data = _patch_codestream(make_dx(ts=ts), ts, 60000, 60000)
    with pytest.raises(ImageTooLargeError, match="compressed frame 0 declares 60000x60000"):
        _load(data)


@pytest.mark.parametrize("ts", CODECS)
def test_compressed_frame_size_disagrees_with_rows_columns(ts, no_decoder):
    data = _patch_codestream(make_dx(ts=ts), ts, 40, 64)
    with pytest.raises(DecodeError, match="compressed frame 0 is 40x64 but the DICOM header says"):
        _load(data)


def test_jpeg_frame_in_dicom_checked(shared_data, no_decoder):
    """The SIIM CR (JPEG baseline): its frame's SOF set to 30000x30000."""
    data = (shared_data / "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm").read_bytes()
    pix = data.find(b"\xe0\x7f\x10\x00")
    sof = data.find(b"\xff\xc0", pix)
    b = bytearray(data)
    struct.pack_into(">HH", b, sof + 5, 30000, 30000)
    with pytest.raises(ImageTooLargeError, match="30000x30000"):
        _load(bytes(b))


def test_pixel_bomb_in_rows_columns_and_samples(no_decoder):
    with pytest.raises(ImageTooLargeError, match="max_pixels"):
        _load(make_dx(Rows=20000, Columns=20000))
    # 1000 x 1000 RGB at 64 bits allocated = 24 MB per frame, over 8 x max_pixels = 8 MB
    with pytest.raises(ImageTooLargeError, match="bytes, over 8 x limits.max_pixels"):
        _load(make_dx(Rows=1000, Columns=1000, SamplesPerPixel=3, BitsAllocated=64), max_pixels=1_000_000)


def test_deflate_bomb_refused():
    """A Deflated data set that inflates to 40 MB, under a 4 MB file limit: refused before pydicom
    inflates it (it would do so without a bound)."""
    px = np.zeros((4000, 5000), np.uint16)  # 40 MB of zeros deflate to ~40 kB
    data = make_dx(px, ts="1.2.840.10008.1.2.1.99")
    assert len(data) < 100_000
    with pytest.raises(ImageTooLargeError, match="inflates to more than limits.max_file_bytes"):
        _load(data, max_file_bytes=4 * 1024 * 1024)
    img = _load(make_dx(ts="1.2.840.10008.1.2.1.99"))  # a normal Deflated file still reads
    assert img.image_size == (48, 64)


# -- PNG -------------------------------------------------------------------------------------


def _png(w=40, h=30, depth=8, color=0, idat: bytes | None = None, ihdr_crc_ok=True) -> bytes:
    def chunk(kind, payload, ok=True):
        crc = zlib.crc32(kind + payload) ^ (0 if ok else 1)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(b"".join(b"\x00" + bytes(range(w)) for _ in range(h)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr, ihdr_crc_ok) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_png_cases():
    ok = decode_pixels(_load(_png()))
    assert ok.pixels.shape == (30, 40)
    with pytest.raises(ImageTooLargeError):  # refused from IHDR, no pixel decoded
        _load(_png(w=100_000, h=100_000, idat=b""))
    with pytest.raises(DecodeError):
        _load(_png(w=0))
    with pytest.raises(DecodeError):
        _load(_png(depth=3))
    good_data = zlib.compress(b"".join(b"\x00" + bytes(range(40)) for _ in range(30)))
    clean = np.tile(np.arange(40, dtype=np.uint8), (30, 1))
    for bad, match in (  # outcomes measured 2026-11-30, pinned
        (_png(idat=good_data[: len(good_data) // 2]), "truncated"),  # truncated zlib stream
        (_png(idat=b"\x78\x9c" + b"\xff" * 20), "corrupt or truncated PNG"),  # garbage zlib
        (_png(ihdr_crc_ok=False), "corrupt or truncated PNG"),  # CRC error in IHDR
    ):
        with pytest.raises(DecodeError, match=match):
            decode_pixels(_load(bad))
    # IHDR says 60 rows, the data holds 30: read leniently, the missing rows are zeros
    img = decode_pixels(_load(_png(h=60, idat=good_data)))
    np.testing.assert_array_equal(img.pixels[:30], clean)
    assert img.pixels.shape == (60, 40) and not img.pixels[30:].any()
    # no IEND (cut after IDAT): every pixel is there, read as the clean image
    np.testing.assert_array_equal(decode_pixels(_load(_png()[:-20])).pixels, clean)


# -- JPEG ------------------------------------------------------------------------------------


def _jpeg(h=48, w=64) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray((np.arange(h * w) % 251).astype(np.uint8).reshape(h, w)).save(b, format="JPEG")
    return b.getvalue()


def _segment(data: bytes, marker: int) -> int:
    pos = 2
    while data[pos + 1] != marker:
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return pos


def test_jpeg_cases():
    data = _jpeg()
    sof = _segment(data, 0xC0)
    big = bytearray(data)
    struct.pack_into(">HH", big, sof + 5, 65535, 65535)
    with pytest.raises(ImageTooLargeError):
        _load(bytes(big))
    clean = decode_pixels(_load(data)).pixels
    # outcomes measured 2026-11-30 (Pillow 13 / libjpeg-turbo), pinned
    sized = {}
    for h, w in ((96, 64), (48, 8), (1, 1)):  # SOF size disagrees with the scan data: all read leniently
        b = bytearray(data)
        struct.pack_into(">HH", b, sof + 5, h, w)
        sized[h, w] = decode_pixels(_load(bytes(b))).pixels
        assert sized[h, w].shape == (h, w) and sized[h, w].dtype == np.uint8
    np.testing.assert_array_equal(sized[96, 64][:48], clean)  # SOF taller than the scan: the real rows, then filler
    np.testing.assert_array_equal(sized[1, 1], clean[:1, :1])
    dht, dqt = _segment(data, 0xC4), _segment(data, 0xDB)
    refused = []
    for at in (dht, dqt):
        b = bytearray(data)
        b[at + 5 : at + 25] = b"\xff" * 20  # table contents corrupted
        refused.append((bytes(b), "broken data stream") if at == dht else None)
        if at == dqt:  # any byte is a valid quantizer: read, with other pixels (nothing to detect)
            px = decode_pixels(_load(bytes(b))).pixels
            assert px.shape == clean.shape and not np.array_equal(px, clean)
        b = bytearray(data)
        struct.pack_into(">H", b, at + 2, 3)  # table length too short
        refused.append((bytes(b), "broken data stream" if at == dht else "expected a marker"))
    refused.append((data[:-2], "truncated"))  # missing EOI
    refused.append((data[: len(data) // 2], "truncated"))  # truncated scan
    for bad, match in filter(None, refused):
        with pytest.raises(DecodeError, match=match):
            decode_pixels(_load(bad))
    # no Huffman tables: libjpeg uses the standard ones, which Pillow wrote: the same pixels
    no_dht = data[:dht] + data[_segment(data, 0xDA):]
    np.testing.assert_array_equal(decode_pixels(_load(no_dht)).pixels, clean)


def test_end_to_end_each_case_is_a_prediction(tmp_path):
    """The same hostile headers through Detector.predict: one Prediction each, typed errors only."""
    sof = _segment(_jpeg(), 0xC0)
    big = bytearray(_jpeg())
    struct.pack_into(">HH", big, sof + 5, 65535, 65535)
    items = [
        make_dx(Rows=96), make_dx(BitsAllocated=12), make_dx(PixelData=None),
        _patch_codestream(make_dx(ts=CODECS[0]), CODECS[0], 60000, 60000),
        make_dx(np.zeros((4000, 5000), np.uint16), ts="1.2.840.10008.1.2.1.99"),
        _png(w=100_000, h=100_000, idat=b""), _png(h=60), bytes(big), _jpeg()[:-2], _jpeg()[:300],
    ]
    with cxrkit.Detector.from_pretrained("cxr-probe", limits=Limits(max_file_bytes=4 << 20)) as det:
        preds = det.predict(items)
    assert len(preds) == len(items)
    for p in preds:
        assert p.error is None or isinstance(p.error, InputError), p.error
    kinds = [type(p.error).__name__ if p.error else "ok" for p in preds]
    assert kinds[:6] == ["DecodeError", "DecodeError", "InputError", "ImageTooLargeError",
                         "ImageTooLargeError", "ImageTooLargeError"], kinds


def test_unsupported_format_is_typed():
    with pytest.raises(UnsupportedFormatError):
        _load(b"GIF89a" + b"\x00" * 64)


def test_jpeg_scan_bomb_refused_from_the_header():
    """A progressive JPEG whose last scan is repeated 600 times (each pass re-walks every block)."""
    from PIL import Image

    from cxrkit.io.sniff import MAX_JPEG_SCANS

    b = io.BytesIO()
    Image.fromarray((np.arange(64 * 64) % 253).astype(np.uint8).reshape(64, 64)).save(b, format="JPEG", progressive=True)
    data = b.getvalue()
    last, eoi = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    ok = data[:eoi] + data[last:eoi] * 10 + data[eoi:]
    assert decode_pixels(_load(ok)).pixels.shape == (64, 64)  # a few extra scans: fine
    bomb = data[:eoi] + data[last:eoi] * (MAX_JPEG_SCANS + 100) + data[eoi:]
    with pytest.raises(ImageTooLargeError, match="scan bomb"):
        _load(bomb)


def test_dnl_height_zero_jpeg_frame_refused(shared_data, no_decoder):
    """Found by the fuzzer: a JPEG frame whose SOF height is 0 (height deferred to a DNL marker)
    made pylibjpeg grow its buffers until the machine's OOM killer stepped in (21 GB)."""
    data = (shared_data / "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm").read_bytes()
    sof = data.find(b"\xff\xc0", data.find(b"\xe0\x7f\x10\x00"))
    b = bytearray(data)
    struct.pack_into(">H", b, sof + 5, 0)
    with pytest.raises(UnsupportedFormatError, match="DNL"):
        _load(bytes(b))


@pytest.mark.parametrize(
    "attrs",
    [dict(RescaleSlope="nan"), dict(RescaleIntercept="nan"), dict(RescaleSlope="inf"),
     dict(RescaleIntercept="-1e308"), dict(WindowCenter="nan", WindowWidth="100"),
     dict(WindowCenter="100", WindowWidth="nan"), dict(WindowCenter="100", WindowWidth="34E388")],
)
def test_non_finite_lut_attributes_are_decode_errors(attrs):
    """Found by the fuzzer: NaN / inf / overflowing Rescale or Window values gave NaN pixels; now
    every one of these is refused (measured 2026-11-30, pinned)."""
    ds = make_dx(raw=True)
    for k, v in attrs.items():
        ds.add_new(k, "DS", v)
    b = io.BytesIO()
    ds.save_as(b)
    with pytest.raises(DecodeError, match="Modality/VOI LUT attributes give non-finite gray values") as ei:
        _load(b.getvalue())
    assert all(f"{k}={v}" in str(ei.value) for k, v in attrs.items() if v in ("nan", "inf")), ei.value
