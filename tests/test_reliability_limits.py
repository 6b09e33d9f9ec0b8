"""The documented input limits and policies, end to end: each is either a typed error on the item's
Prediction or a warning on it (README, section "Limits and hostile input").

| limit / policy                           | outcome                                               |
|------------------------------------------|-------------------------------------------------------|
| pixels > Limits.max_pixels (100 MP)      | ImageTooLargeError, from the header, before decoding  |
| bytes > Limits.max_file_bytes (512 MiB)  | ImageTooLargeError, before reading the file           |
| decode > Limits.decode_timeout_s (60 s)  | DecodeError "took longer than"                        |
| DICOM without PixelData (SR, KO, PR...)  | InputError "DICOM has no PixelData (...)"             |
| multi-frame DICOM                        | frame 0 read, warning                                 |
| CT / MR / US / NM / PT / SR ... modality | UnsupportedFormatError                                |
| MG / IO / PX / XA / RF modality          | read, warning                                         |
| lateral view (ViewPosition LL/RL/LAT)    | read, warning                                         |
| BodyPartExamined not chest               | read, warning                                         |
| colour DICOM / RGB(A) array or file      | luminance, warning (DICOM, arrays)                    |
| EXIF orientation != 1                    | recorded in meta, not applied, warning                |
| float array outside [0, 1]               | min/max normalized, warning; NaN/inf: InputError      |
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

import cxrkit
from cxrkit.config import Limits
from cxrkit.errors import DecodeError, ImageTooLargeError, InputError, UnsupportedFormatError
from cxrkit.io import decode_pixels, load_item
from cxrkit.io.deadline import abandoned_decodes, call_with_deadline


@pytest.fixture(scope="module")
def det():
    with cxrkit.Detector.from_pretrained("cxr-probe", batch_size=8) as d:
        yield d


def _dx(px=None, **attrs) -> bytes:
    pytest.importorskip("pydicom")
    from test_fuzz_headers import make_dx

    return make_dx(px, **attrs)


def _png(arr: np.ndarray, **kw) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG", **kw)
    return b.getvalue()


def _jpeg_with_orientation(o: int) -> bytes:
    from PIL import Image

    im = Image.fromarray(np.full((40, 60), 100, np.uint8))
    exif = Image.Exif()
    exif[0x0112] = o
    b = io.BytesIO()
    im.save(b, format="JPEG", exif=exif.tobytes())
    return b.getvalue()


def test_defaults():
    lim = Limits()
    assert lim.max_pixels == 100_000_000
    assert lim.max_file_bytes == 512 * 1024 * 1024
    assert lim.decode_timeout_s == 60.0


def test_errors_are_typed_per_item(det, tmp_path):
    import struct
    import zlib

    def png_header_only(w, h):
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
        chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
        return b"\x89PNG\r\n\x1a\n" + chunk

    big_file = tmp_path / "big.png"
    big_file.write_bytes(_png(np.zeros((64, 64), np.uint8)) + b"\x00" * 5000)
    items = [
        png_header_only(10_001, 10_000),  # 100.01 MP > default max_pixels
        _dx(Modality="CT"),
        _dx(PixelData=None, SOPClassUID="1.2.840.10008.5.1.4.1.1.88.22"),  # Enhanced SR
        np.full((32, 32), np.nan, np.float32),
        b"GIF89a" + b"\x00" * 100,
        np.zeros((40, 40), np.uint8),  # fine
    ]
    preds = det.predict(items)
    kinds = [type(p.error).__name__ if p.error else None for p in preds]
    assert kinds == ["ImageTooLargeError", "UnsupportedFormatError", "InputError", "InputError",
                     "UnsupportedFormatError", None], kinds
    assert "max_pixels" in str(preds[0].error)
    assert "no PixelData" in str(preds[2].error) and "Structured Report" in str(preds[2].error)
    with cxrkit.Detector.from_pretrained("cxr-probe", limits=Limits(max_file_bytes=4096, max_pixels=1000)) as small:
        p_file, p_bytes, p_arr = small.predict([str(big_file), big_file.read_bytes(), np.zeros((40, 40), np.uint8)])
    assert isinstance(p_file.error, ImageTooLargeError) and "max_file_bytes" in str(p_file.error)
    assert isinstance(p_bytes.error, ImageTooLargeError)
    assert isinstance(p_arr.error, ImageTooLargeError) and "max_pixels = 1000" in str(p_arr.error)


def test_warnings_are_per_item(det):
    frames = np.stack([np.full((48, 64), v, np.uint16) for v in (100, 2000, 4000)])
    items = {
        "multi-frame": _dx(frames[0], NumberOfFrames=3, PixelData=frames.tobytes()),
        "mammo": _dx(Modality="MG"),
        "lateral": _dx(ViewPosition="LL"),
        "knee": _dx(BodyPartExamined="KNEE"),
        "exif": _jpeg_with_orientation(6),
        "rgb-array": np.zeros((40, 40, 3), np.uint8),
        "hdr-float": np.linspace(-5, 5, 1600, dtype=np.float32).reshape(40, 40),
    }
    want = {
        "multi-frame": "only frame 0 is read",
        "mammo": "modality MG is not a chest radiograph modality",
        "lateral": "lateral view",
        "knee": "BodyPartExamined is KNEE",
        "exif": "EXIF Orientation 6 is recorded, not applied",
        "rgb-array": "converted to gray",
        "hdr-float": "outside [0, 1]",
    }
    preds = det.predict(list(items.values()))
    for (name, _), p in zip(items.items(), preds):
        assert p.error is None, (name, p.error)
        assert any(want[name] in w for w in p.warnings), (name, p.warnings)
    assert preds[4].meta["exif_orientation"] == 6 and preds[4].image_size == (40, 60)
    plain = det.predict([_jpeg_with_orientation(1), _dx()])
    assert [p.warnings for p in plain] == [(), ()]


# -- the decode deadline ---------------------------------------------------------------------


def _wait_abandoned_zero(timeout_s: float = 10.0) -> None:
    t0 = time.monotonic()
    while abandoned_decodes() and time.monotonic() - t0 < timeout_s:
        time.sleep(0.05)
    assert abandoned_decodes() == 0


def test_call_with_deadline_contract():
    assert call_with_deadline(lambda: 7, 1.0, "x") == 7
    assert call_with_deadline(lambda: 7, None, "x") == 7  # off: inline
    with pytest.raises(ZeroDivisionError):  # the decoder's own exception, unchanged
        call_with_deadline(lambda: 1 / 0, 1.0, "x")
    release = threading.Event()
    t0 = time.perf_counter()
    with pytest.raises(DecodeError, match=r"took longer than 0.2 s.*cannot be stopped"):
        call_with_deadline(lambda: release.wait(10), 0.2, "slow.png")
    assert time.perf_counter() - t0 < 2.0
    assert abandoned_decodes() == 1  # still running in the background...
    release.set()
    _wait_abandoned_zero()  # ...until it returns on its own


def test_slow_dicom_decode_times_out_and_batch_goes_on(monkeypatch):
    import cxrkit.io.dicom as dicom

    real = dicom._decode_frame0
    slow_rows = 33

    def maybe_slow(ds, source, warnings_):
        if int(ds.Rows) == slow_rows:
            time.sleep(1.5)
        return real(ds, source, warnings_)

    monkeypatch.setattr(dicom, "_decode_frame0", maybe_slow)
    items = [_dx(), _dx(np.zeros((slow_rows, 40), np.uint16)), np.zeros((40, 40), np.uint8)]
    with cxrkit.Detector.from_pretrained("cxr-probe", limits=Limits(decode_timeout_s=0.3)) as d:
        t0 = time.perf_counter()
        preds = d.predict(items)
        assert time.perf_counter() - t0 < 1.4
    assert preds[0].error is None and preds[2].error is None
    assert isinstance(preds[1].error, DecodeError) and "took longer than 0.3 s" in str(preds[1].error)
    _wait_abandoned_zero()


def test_slow_pillow_decode_times_out(monkeypatch):
    """A palette PNG is not DALI-decodable: cxrkit.io.decode_pixels (Pillow) decodes it, under the deadline."""
    import cxrkit.io.image as image

    real = image._decode_pillow

    def slow(img, warnings_):
        time.sleep(1.5)
        return real(img, warnings_)

    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(np.full((40, 50), 90, np.uint8)).convert("P").save(b, format="PNG")
    monkeypatch.setattr(image, "_decode_pillow", slow)
    with cxrkit.Detector.from_pretrained("cxr-probe", limits=Limits(decode_timeout_s=0.3)) as d:
        pred, ok = d.predict([b.getvalue(), np.zeros((40, 40), np.uint8)])
    assert isinstance(pred.error, DecodeError) and "took longer than 0.3 s" in str(pred.error), pred.error
    assert ok.error is None
    img = load_item(b.getvalue(), 0, limits=Limits(decode_timeout_s=0.3))
    with pytest.raises(DecodeError, match="took longer"):
        decode_pixels(img)
    _wait_abandoned_zero()


# -- value_range survives decode_pixels ---------------------------------------------------------


def test_custom_window_on_encoded_item_survives_decode():
    import dataclasses

    img = load_item(_png(np.arange(0, 250, dtype=np.uint8).reshape(10, 25)), 0)
    assert img.value_range == (0.0, 255.0)
    windowed = dataclasses.replace(img, value_range=(20.0, 200.0))
    assert decode_pixels(windowed).value_range == (20.0, 200.0)
    assert decode_pixels(img).value_range == (0.0, 255.0)
    png16 = load_item(_png(np.arange(0, 60000, 100, dtype=np.uint16).reshape(20, 30)), 0)
    assert decode_pixels(dataclasses.replace(png16, value_range=(1000.0, 40000.0))).value_range == (1000.0, 40000.0)


def test_window_rescaled_when_decoding_changes_the_scale():
    """A 16-bit colour PNG read at 8 bits (old Pillow): the default range follows the data, a
    custom window is rescaled with it (and says so)."""
    import dataclasses

    from cxrkit.io.image import _carry_value_range

    img = load_item(_png(np.zeros((4, 4, 3), np.uint8)), 0)
    img16 = dataclasses.replace(img, meta={**img.meta, "bit_depth": 16}, value_range=(0.0, 65535.0))
    w: list[str] = []
    assert _carry_value_range(img16, (0.0, 255.0), w) == (0.0, 255.0) and not w
    win = dataclasses.replace(img16, value_range=(0.0, 32767.5))
    lo, hi = _carry_value_range(win, (0.0, 255.0), w)
    assert lo == 0.0 and hi == pytest.approx(127.5) and "rescaled" in w[0]


def test_unsupported_and_decode_errors_are_input_errors():
    for cls in (UnsupportedFormatError, DecodeError, ImageTooLargeError):
        assert issubclass(cls, InputError) and issubclass(cls, ValueError)
