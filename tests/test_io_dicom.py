"""cxrkit.io DICOM: codecs, LUT pipeline (hand-computed), MONOCHROME1, errors, metadata (CPU only).

The large NEMA/DX files are decoded once per session through module-scoped fixtures.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import (  # noqa: E402
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from cxrkit.errors import DecodeError, ImageTooLargeError, InputError, UnsupportedFormatError  # noqa: E402
from cxrkit.io import encapsulated_frame, load_item  # noqa: E402
from cxrkit.io.image import luminance_u8  # noqa: E402
from cxrkit.io.lut import should_invert, window_bounds  # noqa: E402

TWIN_M2 = "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
TWIN_M1 = "torchxrayvision/Fake_MONOHR1.dcm"


# ---------------------------------------------------------------------------------------------
# real files, each decoded once
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rg1(shared_data: Path) -> dict:
    names = ("UNCR", "UNCI", "J2KR", "J2KI", "JLSN")
    return {n: load_item(shared_data / f"dicom/nema-rg1/RG1_{n}.dcm", 0) for n in names}


@pytest.fixture(scope="module")
def codecs(shared_data: Path) -> dict:
    root = shared_data / "dicom/codecs"
    return {p.stem: load_item(p, 0) for p in sorted(root.rglob("*.dcm"))}


@pytest.fixture(scope="module")
def dx966(shared_data: Path):
    return load_item(shared_data / "dicom/chest-dx-966-j2k.dcm", 0)


def _norm(img) -> np.ndarray:
    lo, hi = img.value_range
    return (img.pixels.astype(np.float64) - lo) / (hi - lo)


def _region(p: np.ndarray, r0: float, r1: float, c0: float, c1: float) -> float:
    h, w = p.shape
    return float(p[int(r0 * h) : int(r1 * h), int(c0 * w) : int(c1 * w)].mean())


def _spine_brighter_than_lungs(img) -> None:
    p = _norm(img)
    spine = _region(p, 0.35, 0.65, 0.47, 0.53)
    lungs = max(_region(p, 0.30, 0.55, 0.22, 0.32), _region(p, 0.30, 0.55, 0.68, 0.78))
    assert spine > lungs + 0.05, (img.source, spine, lungs)


def test_j2k_lossless_is_exactly_uncompressed(rg1: dict) -> None:
    a, b = rg1["J2KR"], rg1["UNCR"]
    assert a.value_range == b.value_range and a.pixels.dtype == b.pixels.dtype
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.meta["transfer_syntax"] == str(JPEG2000Lossless)
    np.testing.assert_array_equal(rg1["J2KI"].pixels, rg1["UNCI"].pixels)  # UNCI is the decoded lossy image
    assert np.abs(rg1["JLSN"].pixels.astype(float) - b.pixels).max() <= 8  # near-lossless


def test_rg1_monochrome1_window_and_meta(rg1: dict) -> None:
    img = rg1["UNCR"]
    assert img.image_size == (1955, 1841) and img.pixels.shape == (1955, 1841)
    assert img.pixels.dtype == np.float32 and img.pixels.max() > 255  # 15-bit precision kept
    assert img.value_range == window_bounds(15000, 30000) == (0.0, 29999.0)
    assert img.meta["photometric_interpretation"] == "MONOCHROME1" and img.meta["inverted"] is True
    assert img.meta["pixel_spacing_mm"] is None and any("PixelSpacing" in w for w in img.warnings)
    assert img.meta["view_position"] == "PA" and img.meta["bits_stored"] == 15
    _spine_brighter_than_lungs(img)


def test_dx_j2k_monochrome1_inverse_bone_bright(dx966) -> None:
    assert dx966.meta["photometric_interpretation"] == "MONOCHROME1"
    assert dx966.meta["presentation_lut_shape"] == "INVERSE"
    assert dx966.meta["pixel_spacing_mm"] == (0.16, 0.16) and dx966.meta["pixel_spacing_source"] == "PixelSpacing"
    _spine_brighter_than_lungs(dx966)


def test_tiny_dx_monochrome1_with_inverse_shape_inverted_once(shared_data: Path) -> None:
    """MONOCHROME1 + Presentation LUT Shape INVERSE restate one fact: invert exactly once."""
    path = shared_data / "dicom/dx-tiny-monochrome1.dcm"
    img = load_item(path, 0)
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert img.value_range == (0.0, 255.0)  # window 128/256
    np.testing.assert_array_equal(img.pixels, 255.0 - np.clip(stored, 0, 255))
    p = _norm(img)  # lateral thorax: the spine band (upper quarter) is brighter than the lungs below it
    assert _region(p, 0.2, 0.3, 0.3, 0.7) > _region(p, 0.4, 0.5, 0.3, 0.7) + 0.1
    assert img.meta["pixel_spacing_mm"] == pytest.approx((1.2, 1.2012), abs=1e-4)


def test_fake_monochrome1_is_inverse_of_its_monochrome2_twin(shared_data: Path) -> None:
    m2, m1 = load_item(shared_data / TWIN_M2, 0), load_item(shared_data / TWIN_M1, 1)
    assert m2.pixels.dtype == m1.pixels.dtype == np.uint8  # no LUT changed values: stored dtype kept
    assert m2.value_range == m1.value_range == (0.0, 255.0)  # no VOI: full 8-bit stored range
    np.testing.assert_array_equal(m1.pixels.astype(int), 255 - m2.pixels.astype(int))
    assert m2.meta["inverted"] is False and m1.meta["inverted"] is True
    _spine_brighter_than_lungs(m2)


def test_codecs_lossless_agree_and_lossy_close(codecs: dict) -> None:
    for body in ("RG2", "RG3"):
        ref = codecs[f"{body}_JPLL"]
        for codec in ("RLE", "JLSL"):
            np.testing.assert_array_equal(codecs[f"{body}_{codec}"].pixels, ref.pixels)
        lossy = codecs[f"{body}_JPLY"]  # JPEG Extended 12-bit, with a non-conformant scan header
        assert any("Se = 63" in w for w in lossy.warnings)
        diff = np.abs(lossy.pixels.astype(float) - ref.pixels)
        assert diff.mean() < 0.01 * (ref.value_range[1] - ref.value_range[0])
        assert any("not CHEST" in w for w in ref.warnings)
    _, rg3 = codecs["RG2_RLE"], codecs["RG3_RLE"]
    assert rg3.meta["photometric_interpretation"] == "MONOCHROME1" and rg3.meta["inverted"]


def test_corrupt_j2k_gives_decode_error(shared_data: Path) -> None:
    path = shared_data / "dicom/corrupt/chest-dx-966-broken-j2k.dcm"
    with pytest.raises(DecodeError, match="JPEG 2000") as ei:
        load_item(path, 0)
    assert str(path) in str(ei.value)


def test_encapsulated_frame(shared_data: Path) -> None:
    ds = pydicom.dcmread(shared_data / "dicom/chest-dx-966-j2k.dcm")
    frame, ts = encapsulated_frame(ds)
    assert ts == JPEG2000Lossless
    assert frame.startswith(b"\xff\x4f\xff\x51") or frame[4:8] == b"jP  "
    with pytest.raises(InputError, match="not encapsulated"):
        encapsulated_frame(pydicom.dcmread(shared_data / "dicom/dx-tiny-monochrome1.dcm"))


@pytest.mark.parametrize("name", ["JPLL/RG2_JPLL", "JPLY/RG3_JPLY"])
def test_standalone_lossless_and_12bit_jpeg_decode(shared_data: Path, codecs: dict, name: str) -> None:
    """A DICOM frame handed over as plain JPEG bytes decodes through pylibjpeg-libjpeg."""
    from cxrkit.io import decode_pixels

    ds = pydicom.dcmread(shared_data / f"dicom/codecs/{name}.dcm")
    frame, _ = encapsulated_frame(ds)
    img = load_item(frame, 0)
    assert not img.dali_decodable and img.meta["bit_depth"] in (10, 12)
    out = decode_pixels(img)
    assert out.pixels.dtype == np.uint16 and out.value_range == (0.0, 2.0 ** img.meta["bit_depth"] - 1)
    if "JPLL" in name:
        np.testing.assert_array_equal(out.pixels, ds.pixel_array)
    else:
        assert any("Se = 63" in w for w in out.warnings)


def test_dataset_and_bytes_inputs(shared_data: Path) -> None:
    path = shared_data / "dicom/dx-tiny-monochrome1.dcm"
    ds = pydicom.dcmread(path)
    before = ds.PixelData
    a = load_item(ds, 2)
    assert a.source.startswith("<Dataset ") and a.source.endswith(" #2>")
    b = load_item(path.read_bytes(), 3)
    assert b.source == f"<bytes {path.stat().st_size} B #3>"
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert ds.PixelData is before  # the caller's Dataset is not modified


# ---------------------------------------------------------------------------------------------
# synthetic datasets: the LUT math against hand computations
# ---------------------------------------------------------------------------------------------


def make_ds(values, bits_stored: int = 12, signed: bool = False, **attrs) -> Dataset:
    arr = np.asarray(values, dtype=np.int16 if signed else np.uint16)
    arr = arr.reshape(1, -1) if arr.ndim == 1 else arr
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = arr.tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def _dicom_linear(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR, output range [0, 1]."""
    y = (x - (c - 0.5)) / (w - 1) + 0.5
    y[x <= c - 0.5 - (w - 1) / 2] = 0.0
    y[x > c - 0.5 + (w - 1) / 2] = 1.0
    return y


def test_window_center_width_matches_dicom_formula() -> None:
    x = np.array([0, 1499, 1500, 1501, 2000, 2499, 2500, 4095], float)
    img = load_item(make_ds(x, WindowCenter=2000, WindowWidth=1001), 0)
    assert img.value_range == (1499.5, 2499.5) and img.pixels.dtype == np.float32
    np.testing.assert_allclose(_norm(img)[0], _dicom_linear(x, 2000, 1001), atol=1e-9)
    assert img.meta["voi"].startswith("window 2000/1001")


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("c,w,function", [(2000, 1001, "LINEAR"), (15000, 30000, "LINEAR"), (2047.5, 4096, "LINEAR_EXACT"),
                                          (40.3, 80, "LINEAR"), (100, 2, "LINEAR_EXACT"), (-20, 500, "LINEAR")])
def test_float32_window_fast_path_equals_float64(photometric, c, w, function, monkeypatch) -> None:
    """The float32 in-place window (integer-exact bounds) gives the float64 path's values, bit for
    bit; bounds that are not exact in float32 (c = 40.3) take the float64 path."""
    import cxrkit.io.lut as lut
    from cxrkit.io.lut import to_display

    rng = np.random.default_rng(int(c * 10) % 1000)
    stored = rng.integers(0, 4096, (37, 41)).astype(np.uint16)
    stored[0, :4] = [0, 4095, max(int(c), 0), max(int(c) + 1, 0)]
    ds = make_ds(stored.astype(float), WindowCenter=c, WindowWidth=w)
    ds.VOILUTFunction, ds.PhotometricInterpretation = function, photometric
    lo, hi = lut.window_bounds(c, w, function)
    assert lut._exact_f32(lo, hi, lo + hi) == (c != 40.3)  # which path the first call takes
    fast = to_display(stored, ds)
    monkeypatch.setattr(lut, "_exact_f32", lambda *v: False)
    slow = to_display(stored, ds)
    assert fast.value_range == slow.value_range and fast.pixels.dtype == slow.pixels.dtype == np.float32
    np.testing.assert_array_equal(fast.pixels, slow.pixels)
    assert stored.dtype == np.uint16 and stored[0, 1] == 4095  # the input is not modified


def test_rescale_then_window_then_monochrome1() -> None:
    x = np.array([0, 100, 1000, 1600, 4095], float)
    ds = make_ds(x, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=[1000, 500], WindowWidth=[2000, 400])
    ds.PhotometricInterpretation = "MONOCHROME1"
    img = load_item(ds, 0, voi_window_index=1)
    hu = x * 2 - 1024
    lo, hi = 500 - 0.5 - 399 / 2, 500 - 0.5 + 399 / 2
    assert img.value_range == (lo, hi)
    np.testing.assert_allclose(img.pixels[0], lo + hi - np.clip(hu, lo, hi))
    np.testing.assert_allclose(_norm(img)[0], 1.0 - _dicom_linear(hu, 500, 400), atol=1e-9)
    bad = load_item(ds, 0, voi_window_index=7)  # no such window: first one, with a warning
    assert bad.value_range == window_bounds(1000, 2000) and any("index 7" in w for w in bad.warnings)


def test_no_voi_uses_stored_range_through_modality_lut() -> None:
    x = [0, 7, 4095]
    plain = load_item(make_ds(x), 0)
    assert plain.pixels.dtype == np.uint16 and plain.value_range == (0.0, 4095.0)
    np.testing.assert_array_equal(plain.pixels[0], x)
    ds = make_ds(x, RescaleSlope=0.5, RescaleIntercept=-100)
    img = load_item(ds, 0)
    assert img.value_range == (-100.0, 4095 * 0.5 - 100) and img.pixels.dtype == np.float32
    np.testing.assert_allclose(img.pixels[0], np.array(x) * 0.5 - 100)
    signed = load_item(make_ds([-2048, 0, 2047], signed=True), 0)
    assert signed.value_range == (-2048.0, 2047.0) and signed.pixels.dtype == np.float32
    m1 = make_ds(x)
    m1.PhotometricInterpretation = "MONOCHROME1"
    inv = load_item(m1, 0)
    assert inv.pixels.dtype == np.uint16
    np.testing.assert_array_equal(inv.pixels[0], 4095 - np.array(x))


def _lut_item(descriptor, data) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = data
    return item


def test_voi_lut_sequence_preferred_over_window() -> None:
    ds = make_ds([50, 100, 101, 102, 103, 500], WindowCenter=100, WindowWidth=10)
    ds.VOILUTSequence = Sequence([_lut_item([4, 100, 12], [10, 20, 4000, 4095])])
    img = load_item(ds, 0)
    np.testing.assert_array_equal(img.pixels[0], [10, 10, 20, 4000, 4095, 4095])
    assert img.value_range == (0.0, 4095.0) and img.meta["voi"].startswith("VOI LUT Sequence")


def test_malformed_lut_is_decode_error() -> None:
    ds = make_ds([1, 2])
    ds.VOILUTSequence = Sequence([Dataset()])  # no LUTDescriptor / LUTData
    with pytest.raises(DecodeError, match="LUT"):
        load_item(ds, 0)


def test_modality_lut_sequence() -> None:
    ds = make_ds([0, 1, 2, 3, 9])
    ds.ModalityLUTSequence = Sequence([_lut_item([4, 0, 16], [5, 50, 500, 5000])])
    ds.ModalityLUTSequence[0].ModalityLUTType = "US"
    img = load_item(ds, 0)
    np.testing.assert_array_equal(img.pixels[0], [5, 50, 500, 5000, 5000])
    assert img.value_range == (5.0, 5000.0)


def test_sigmoid_and_linear_exact() -> None:
    img = load_item(make_ds([1000, 2000, 3000], WindowCenter=2000, WindowWidth=1000, VOILUTFunction="SIGMOID"), 0)
    assert img.value_range == (0.0, 1.0)
    x = np.array([1000, 2000, 3000])
    np.testing.assert_allclose(img.pixels[0], 1 / (1 + np.exp(-4 * (x - 2000) / 1000)), rtol=1e-6)
    img = load_item(make_ds([0, 1600, 4000], WindowCenter=2000, WindowWidth=800, VOILUTFunction="LINEAR_EXACT"), 0)
    assert img.value_range == (1600.0, 2400.0)
    np.testing.assert_allclose(_norm(img)[0], [0.0, 0.0, 1.0])


def test_inversion_rule_truth_table() -> None:
    assert should_invert("MONOCHROME2", None) == (False, None)
    assert should_invert("MONOCHROME2", "IDENTITY") == (False, None)
    assert should_invert("MONOCHROME1", None) == (True, None)
    assert should_invert("MONOCHROME1", "INVERSE") == (True, None)  # once, not twice
    assert should_invert("MONOCHROME2", "INVERSE") == (True, None)
    invert, note = should_invert("MONOCHROME1", "IDENTITY")
    assert invert and "contradictory" in note
    img = load_item(make_ds([0, 4095], PresentationLUTShape="INVERSE"), 0)
    np.testing.assert_array_equal(img.pixels[0], [4095, 0])


def test_enhanced_functional_groups_window_and_spacing() -> None:
    ds = make_ds([0, 2000, 4095])
    voi, measures, group = Dataset(), Dataset(), Dataset()
    voi.WindowCenter, voi.WindowWidth = 2000, 1001
    measures.PixelSpacing = [0.2, 0.25]
    group.FrameVOILUTSequence = Sequence([voi])
    group.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    img = load_item(ds, 0)
    assert img.value_range == (1499.5, 2499.5) and img.meta["pixel_spacing_mm"] == (0.2, 0.25)
    assert "WindowCenter" not in ds  # the caller's dataset is untouched


def test_imager_pixel_spacing_note_and_lateral_warning() -> None:
    ds = make_ds([1, 2], ImagerPixelSpacing=[0.15, 0.15], ViewPosition="LL")
    img = load_item(ds, 0)
    assert img.meta["pixel_spacing_mm"] == (0.15, 0.15)
    assert "ImagerPixelSpacing" in img.meta["pixel_spacing_source"]
    assert any("lateral" in w for w in img.warnings)
    ds.EstimatedRadiographicMagnificationFactor = 1.5
    assert load_item(ds, 0).meta["pixel_spacing_mm"] == pytest.approx((0.1, 0.1))


def test_multiframe_uses_frame_zero_with_warning() -> None:
    frames = np.arange(3 * 2 * 4, dtype=np.uint16).reshape(3, 2, 4)
    ds = make_ds(frames[0])
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    img = load_item(ds, 0)
    np.testing.assert_array_equal(img.pixels, frames[0])
    assert any("3 frames" in w for w in img.warnings)


def test_rgb_dicom_to_luminance() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    ds = make_ds(np.zeros((4, 5)))
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = rgb.tobytes()
    img = load_item(ds, 0)
    np.testing.assert_array_equal(img.pixels, luminance_u8(rgb))
    assert img.value_range == (0.0, 255.0) and any("colour" in w for w in img.warnings)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def _to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    sr.SOPInstanceUID = generate_uid()
    sr.Modality = "SR"
    path = tmp_path / "sr.dcm"
    path.write_bytes(_to_bytes(sr))
    with pytest.raises(InputError) as ei:
        load_item(path, 0)
    msg = str(ei.value)
    assert msg.startswith(f"{str(path)!r}: DICOM has no PixelData (SOP Class 1.2.840.10008.5.1.4.1.1.88.22 is ")
    assert "Structured Report" in msg


def test_non_radiograph_modality_rejected() -> None:
    ds = make_ds([1, 2], Modality="CT")
    with pytest.raises(UnsupportedFormatError, match="CT is not a radiograph") as ei:
        load_item(_to_bytes(ds), 4)
    assert "#4" in str(ei.value)


def test_dicom_pixel_bomb_checked_before_decoding() -> None:
    ds = make_ds([1, 2])
    ds.Rows = ds.Columns = 60000  # header only; the pixel data is far too short to decode
    with pytest.raises(ImageTooLargeError, match="60000x60000"):
        load_item(ds, 0)


def test_truncated_dicom_is_decode_error(shared_data: Path) -> None:
    data = (shared_data / "dicom/dx-tiny-monochrome1.dcm").read_bytes()
    with pytest.raises(DecodeError) as ei:
        load_item(data[: len(data) - 5000], 1)
    assert "<bytes" in str(ei.value)
    with pytest.raises(DecodeError):
        load_item(data[:140], 2)


def test_in_memory_dataset_without_transfer_syntax() -> None:
    ds = make_ds([1, 2, 3])
    ds.file_meta = FileMetaDataset()
    img = load_item(ds, 0)
    np.testing.assert_array_equal(img.pixels[0], [1, 2, 3])
    assert any("Transfer Syntax" in w for w in img.warnings)
    assert "TransferSyntaxUID" not in ds.file_meta  # the caller's dataset is untouched


def test_keep_j2k_frame_attaches_codestream_and_stored_range(shared_data):
    """For the GPU decoder: JPEG 2000 frame bytes and the stored-unit range, instead of pixels
    (decoded on the CPU only on demand, equal to a plain load)."""
    from cxrkit.io import load_item
    from cxrkit.io.dicom_j2k import is_encoded_j2k

    path = shared_data / "dicom" / "nema-rg1" / "RG1_J2KR.dcm"
    plain = load_item(str(path), 0)
    kept = load_item(str(path), 0, keep_j2k_frame=True)
    assert not is_encoded_j2k(plain) and is_encoded_j2k(kept)
    assert kept.encoded[:4] in (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c")  # J2K codestream or JP2 box
    assert kept.pixels is None and kept.value_range == plain.value_range
    assert np.array_equal(kept.decode_fallback().pixels, plain.pixels)
    lo, hi = kept.meta["linear_stored_range"]
    assert lo != hi
    unc = load_item(str(shared_data / "dicom" / "nema-rg1" / "RG1_UNCR.dcm"), 0, keep_j2k_frame=True)
    assert not is_encoded_j2k(unc)  # not JPEG 2000: nothing attached
