"""DICOM JPEG 2000 frames as encoded input (nvJPEG2000 on CUDA): the value mapping in stored units.

What is tested here, on CPU:
- linear_stored_range: the stored-unit (lo, hi) of real J2K DICOMs and of variants with a rescale,
  a narrow window, MONOCHROME2/1 and Presentation LUT Shape; None for non-linear mappings;
- the mapping math without DALI: the reference on pydicom's stored values with that range equals
  the reference on cxrkit.io's display pixels with io's range (TOL_MAP);
- the encoded route itself through DALI's CPU decoder (OpenJPEG; ``dicom_j2k="dali"``), which
  decodes these frames bit-exactly like pydicom, against io's pixels through the reference.
The GPU comparison (nvJPEG2000) is in tests/test_preprocess.py (marked gpu + dali).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from cxrkit.io import load_item
from cxrkit.io.lut import to_display
from cxrkit.preprocess import Preprocessor, preprocess_reference
from cxrkit.io.dicom_j2k import attach_j2k_frame, is_encoded_j2k, linear_stored_range

pydicom = pytest.importorskip("pydicom")

MEAN, STD = 0.45, 0.22
HW = (96, 128)
# Stored-unit and display-unit normalisation are the same affine map computed in a different
# float32 order; measured <= 4e-7 (math) and <= 1.4e-6 (DALI CPU decode) in unit space.
TOL_MAP = 1e-5
FILES = ["dicom/nema-rg1/RG1_J2KR.dcm", "dicom/chest-dx-966-j2k.dcm", "dicom/nema-rg1/RG1_J2KI.dcm"]


def unit_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() * STD)


def _variants(ds):
    """(name, Dataset) pairs: the file itself and linear variants of its mapping."""
    out = [("as-is", ds)]
    v = copy.deepcopy(ds)  # MONOCHROME2, a rescale and a narrow window: clipping in stored units
    v.PhotometricInterpretation = "MONOCHROME2"
    if "PresentationLUTShape" in v:
        del v.PresentationLUTShape
    top = 2 ** int(ds.BitsStored) - 1
    v.RescaleSlope, v.RescaleIntercept = 2.0, -1000.0
    v.WindowCenter, v.WindowWidth = 2.0 * top * 0.45 - 1000.0, 2.0 * top * 0.3
    out.append(("mono2-rescale-window", v))
    w = copy.deepcopy(v)  # MONOCHROME1 with the same window, no VOI function given, LINEAR_EXACT
    w.PhotometricInterpretation = "MONOCHROME1"
    w.VOILUTFunction = "LINEAR_EXACT"
    out.append(("mono1-linear-exact", w))
    n = copy.deepcopy(v)  # no VOI at all: the full stored range through the rescale
    del n.WindowCenter, n.WindowWidth
    out.append(("no-voi", n))
    return out


@pytest.fixture(scope="module", params=FILES, ids=lambda p: p.split("/")[-1])
def j2k_file(request, shared_data):
    path = shared_data / request.param
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


def test_linear_stored_range_of_the_files(j2k_file):
    ds = pydicom.dcmread(j2k_file)
    rng = linear_stored_range(ds)
    # both files are MONOCHROME1 with a window covering [0, 2^n - 1]: inverted stored range
    expected = {"RG1_J2KR.dcm": (29999.0, 0.0), "RG1_J2KI.dcm": (29999.0, 0.0),
                "chest-dx-966-j2k.dcm": (4095.0, 0.0)}[j2k_file.name]
    assert rng == expected


def test_non_linear_mappings_are_refused(shared_data):
    ds = pydicom.dcmread(shared_data / FILES[1])
    sig = copy.deepcopy(ds)
    sig.VOILUTFunction = "SIGMOID"
    assert linear_stored_range(sig) is None
    rgb = copy.deepcopy(ds)
    rgb.PhotometricInterpretation = "RGB"
    assert linear_stored_range(rgb) is None
    signed = copy.deepcopy(ds)
    signed.PixelRepresentation = 1
    assert linear_stored_range(signed) is None
    thresh = copy.deepcopy(ds)
    thresh.WindowWidth = 1  # LINEAR width 1 is a threshold
    assert linear_stored_range(thresh) is None


def _io_display(stored, v, name):
    """io's (pixels, value_range) of variant v: load_item for the file itself, else io's LUT
    pipeline (cxrkit.io.lut.to_display, what load_dicom applies) on the decoded stored values."""
    if name == "as-is":
        img = load_item(v, 0)
        return img.pixels, img.value_range
    g = to_display(stored, v)
    return g.pixels, g.value_range


def test_stored_range_math_equals_io_pixels(j2k_file):
    """Without DALI: the reference on stored values + stored range == on io's pixels + range."""
    ds = pydicom.dcmread(j2k_file)
    stored = ds.pixel_array  # (h, w) uint16, what nvJPEG2000 / OpenJPEG decode
    for name, v in _variants(ds):
        px, vr = _io_display(stored, v, name)
        rng = linear_stored_range(v)
        assert rng is not None, name
        ref = preprocess_reference(px, vr, HW, MEAN, STD)[0]
        got = preprocess_reference(stored, rng, HW, MEAN, STD)[0]
        assert unit_diff(got, ref) <= TOL_MAP, name


@pytest.mark.dali
def test_encoded_j2k_route_on_dali_cpu_equals_io_pixels(j2k_file):
    ds = pydicom.dcmread(j2k_file)
    stored = ds.pixel_array
    base = load_item(ds, 0)
    items, refs = [], []
    for name, v in _variants(ds):
        px, vr = _io_display(stored, v, name)
        enc = attach_j2k_frame(dataclasses.replace(base, pixels=px, value_range=vr), v)
        assert is_encoded_j2k(enc), name
        items.append(enc)
        refs.append(preprocess_reference(px, vr, HW, MEAN, STD)[0])
    with Preprocessor(HW, MEAN, STD, backend="dali", dicom_j2k="dali", batch_size=4) as pre:
        res = pre.run(items)
        assert set(pre._pipes) == {(True, "uint16", True)}  # all went through the encoded J2K route
    assert res.errors == {} and res.ok_positions == list(range(len(items)))
    for row, (name, _) in enumerate(_variants(ds)):
        assert unit_diff(res.batch[row], refs[row]) <= TOL_MAP, name


@pytest.mark.dali
def test_cpu_default_uses_io_pixels(shared_data):
    path = shared_data / FILES[1]
    ds = pydicom.dcmread(path)
    img = load_item(path, 0)
    enc = attach_j2k_frame(img, ds)
    with Preprocessor(HW, MEAN, STD, backend="dali") as pre:  # device cpu, dicom_j2k="auto"
        res = pre.run([enc])
        assert (True, "uint16", True) not in pre._pipes
    ref = preprocess_reference(img.pixels, img.value_range, HW, MEAN, STD)[0]
    assert res.errors == {} and unit_diff(res.batch[0], ref) <= 1.5e-5


def test_not_j2k_is_left_alone(shared_data):
    path = shared_data / "dicom/nema-rg1/RG1_UNCR.dcm"
    if not path.exists():
        pytest.skip(f"{path} not found")
    img = load_item(path, 0)
    assert attach_j2k_frame(img, pydicom.dcmread(path)) is img


# -- the deferred decode: load_item(keep_j2k_frame=True) leaves the frame to the GPU decoder -----

def _meta_sans_frame(img):
    return {k: v for k, v in img.meta.items() if k != "linear_stored_range"}


def test_keep_j2k_frame_defers_the_cpu_decode(j2k_file):
    """What the Detector asks for on CUDA: a linear J2K frame stays encoded (no CPU decode, which
    would cost more than nvJPEG2000's), with io's value range and meta; ``decode_fallback``
    (through ``decode_pixels``) decodes it on the CPU on demand, equal to a plain load."""
    from cxrkit.io import decode_pixels

    ds = pydicom.dcmread(j2k_file)
    stored = ds.pixel_array  # decoded once; io's display of each variant is mapped from it
    for name, v in _variants(ds):
        lazy = load_item(v, 3, keep_j2k_frame=True)
        assert lazy.pixels is None and is_encoded_j2k(lazy) and lazy.decode_fallback is not None, name
        _, vr = _io_display(stored, v, name)
        assert lazy.value_range == vr and lazy.image_size == stored.shape, name
    full, lazy = load_item(ds, 3), load_item(ds, 3, keep_j2k_frame=True)
    assert _meta_sans_frame(lazy) == full.meta and lazy.warnings == full.warnings
    back = decode_pixels(lazy)
    assert back.pixels is not None and back.value_range == full.value_range and back.decode_fallback is None
    np.testing.assert_array_equal(back.pixels, full.pixels)


def test_non_linear_or_not_j2k_is_decoded_as_before(shared_data, j2k_file):
    v = pydicom.dcmread(j2k_file)
    v.WindowCenter, v.WindowWidth, v.VOILUTFunction = 2000.0, 1000.0, "SIGMOID"
    img = load_item(v, 0, keep_j2k_frame=True)
    assert img.pixels is not None and img.decode_fallback is None and not is_encoded_j2k(img)
    path = shared_data / "dicom/nema-rg1/RG1_UNCR.dcm"
    if path.exists():
        img = load_item(path, 0, keep_j2k_frame=True)
        assert img.pixels is not None and img.encoded is None and img.decode_fallback is None


@pytest.mark.dali
@pytest.mark.parametrize("backend", ["dali", "numpy", "native"])
def test_deferred_frames_preprocess_like_io_pixels(j2k_file, backend):
    """Deferred items through DALI's J2K route (``dicom_j2k="dali"``, OpenJPEG here, nvJPEG2000 on
    CUDA) and through the CPU routes (which call ``decode_fallback``) equal the reference on io's
    pixels of a plain load."""
    ds = pydicom.dcmread(j2k_file)
    stored = ds.pixel_array
    variants = _variants(ds) if backend == "dali" else _variants(ds)[::2]  # CPU routes decode each
    items = [load_item(v, k, keep_j2k_frame=True) for k, (_, v) in enumerate(variants)]
    refs = [preprocess_reference(*_io_display(stored, v, name), HW, MEAN, STD)[0] for name, v in variants]
    with Preprocessor(HW, MEAN, STD, backend=backend, dicom_j2k="dali", batch_size=4) as pre:
        res = pre.run(items)
        if backend == "dali":
            assert set(pre._pipes) == {(True, "uint16", True)}
    assert res.errors == {} and res.ok_positions == list(range(len(items)))
    for row, (name, _) in enumerate(variants):
        assert unit_diff(res.batch[row], refs[row]) <= TOL_MAP, (backend, name)


@pytest.mark.dali
def test_j2k_decoder_failure_falls_back_to_the_cpu_decode(shared_data):
    """A frame the J2K decoder refuses (here: a damaged copy of the codestream) is decoded on the
    CPU from the DICOM itself; when that fails too, the item gets a typed error and the rest of
    the batch is untouched."""
    from cxrkit.errors import DecodeError

    path = shared_data / FILES[1]
    if not path.exists():
        pytest.skip(f"{path} not found")
    lazy, full = load_item(path, 0, keep_j2k_frame=True), load_item(path, 0)
    damaged = dataclasses.replace(lazy, encoded=lazy.encoded[:64] + bytes(len(lazy.encoded) - 64))

    def broken():
        raise DecodeError(lazy.source, "CPU decode failed too")

    hopeless = dataclasses.replace(damaged, decode_fallback=broken)
    ref = preprocess_reference(full.pixels, full.value_range, HW, MEAN, STD)[0]
    with Preprocessor(HW, MEAN, STD, backend="dali", dicom_j2k="dali", batch_size=4) as pre:
        res = pre.run([damaged, lazy, hopeless])
    assert set(res.errors) == {2} and isinstance(res.errors[2], DecodeError)
    assert "CPU decode failed too" in str(res.errors[2])
    assert res.ok_positions == [0, 1]
    assert unit_diff(res.batch[0], ref) <= TOL_MAP and unit_diff(res.batch[1], ref) <= TOL_MAP


# --- J2K DICOMs encoded here: the decoder's uint16 rescaling (dicom_j2k.dali_uint16_multiplier) -----
# These need no ../shared/data, so they also run on the GPU machine. Lossless J2K, odd sizes >= 32
# (OpenJPEG's default 6 resolution levels), 8/12/15/16-bit stored values with and without a window.

def _j2k_dicom(bits: int, hw: tuple[int, int], seed: int, window: bool, mono1: bool = False) -> bytes:
    import io as _io

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    rng = np.random.default_rng(seed)
    top = 2**bits - 1
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
    smooth = 0.5 + 0.35 * np.sin(yy / 7.0 + seed) * np.cos(xx / 11.0)
    px = np.clip(np.round(smooth * top + rng.normal(0, top * 0.02, hw)), 0, top)
    px[: hw[0] // 6, : hw[1] // 5] = top  # saturated corner: the window clips it
    px = px.astype(np.uint8 if bits <= 8 else np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "J2K-PROBE"
    ds.Rows, ds.Columns = hw
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit = bits, bits - 1
    if window:
        ds.WindowCenter, ds.WindowWidth = round(top * 0.45), round(top * 0.5)
    ds.PixelData = px.tobytes()
    ds.compress(JPEG2000Lossless, px, encoding_plugin="pylibjpeg")
    b = _io.BytesIO()
    ds.save_as(b, enforce_file_format=True)
    return b.getvalue()


J2K_CASES = [(8, (40, 57), False), (12, (64, 45), True), (15, (37, 70), False), (15, (48, 48), True),
             (16, (33, 40), True)]


def _j2k_items(device_cuda: bool):
    """(deferred items as the Detector reads them, references on io's pixels of a plain load)."""
    pytest.importorskip("pylibjpeg")
    pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg encodes the J2K frames")
    items, refs = [], []
    for k, (bits, hw, window) in enumerate(J2K_CASES):
        data = _j2k_dicom(bits, hw, seed=k, window=window, mono1=k == 3)
        enc = load_item(data, k, keep_j2k_frame=True)
        full = load_item(data, k)
        assert is_encoded_j2k(enc), (bits, hw)
        items.append(enc)
        refs.append(preprocess_reference(full.pixels, full.value_range, HW, MEAN, STD)[0])
    return items, refs


def test_codestream_precision_and_multipliers():
    from cxrkit.io.dicom_j2k import codestream_precision, dali_uint16_multiplier

    pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg encodes the J2K frames")
    for bits, hw, window in J2K_CASES:
        enc = load_item(_j2k_dicom(bits, hw, seed=0, window=window), 0, keep_j2k_frame=True)
        assert codestream_precision(enc.encoded) == bits
        # the same codestream inside a JP2 wrapper (some writers do that)
        ftyp = b"\0\0\0\x14ftypjp2 \0\0\0\0jp2 "
        jp2 = b"\0\0\0\x0cjP  \r\n\x87\n" + ftyp + (8 + len(enc.encoded)).to_bytes(4, "big") + b"jp2c" + enc.encoded
        assert codestream_precision(jp2) == bits
    assert codestream_precision(b"\xff\xd8\xff\xe0" + bytes(60)) is None  # a JPEG
    assert codestream_precision(b"\xff\x4f\xff\x51") is None  # truncated
    assert dali_uint16_multiplier(12, gpu=True) == pytest.approx(65535 / 4095)
    assert dali_uint16_multiplier(15, gpu=True) == pytest.approx(65535 / 32767)
    assert dali_uint16_multiplier(16, gpu=True) == 1.0 and dali_uint16_multiplier(16, gpu=False) == 1.0
    assert dali_uint16_multiplier(8, gpu=False) == 257.0 and dali_uint16_multiplier(12, gpu=False) == 1.0
    # undoing it restores every stored value exactly, whatever the decoder's rounding
    for p in (5, 8, 12, 15, 16):
        s = np.arange(2**p, dtype=np.float64)
        m = dali_uint16_multiplier(p, gpu=True)
        for x in (np.floor(s * m + 0.5), np.floor(s * m), np.ceil(s * m)):
            back = np.floor(x.astype(np.float32) * np.float32(1 / m) + np.float32(0.5))
            np.testing.assert_array_equal(back, s)


@pytest.mark.dali
def test_encoded_j2k_bit_depths_on_dali_cpu():
    """8/12/15/16-bit J2K DICOMs through DALI's CPU J2K route equal the reference on io's pixels
    (8-bit frames come out x257 from DALI's uint16 decode: undone per sample)."""
    items, refs = _j2k_items(device_cuda=False)
    with Preprocessor(HW, MEAN, STD, backend="dali", dicom_j2k="dali", batch_size=8) as pre:
        res = pre.run(items)
        assert set(pre._pipes) == {(True, "uint16", True)}  # every frame went through the J2K route
    assert res.errors == {} and res.ok_positions == list(range(len(items)))
    for row, (bits, hw, window) in enumerate(J2K_CASES):
        assert unit_diff(res.batch[row], refs[row]) <= TOL_MAP, (bits, hw, window)


@pytest.mark.gpu
@pytest.mark.dali
def test_encoded_j2k_bit_depths_on_the_gpu():
    """The same DICOMs on device="cuda" (nvJPEG2000): a 12-bit frame decodes x16.004 and a 15-bit one
    x2.00003 there; the pipeline must undo it (issue 12, item 3). Needs no ../shared/data."""
    torch = pytest.importorskip("torch")
    items, refs = _j2k_items(device_cuda=True)
    with Preprocessor(HW, MEAN, STD, device="cuda", backend="dali", batch_size=8) as pre:
        res = pre.run(items)
        assert (True, "uint16", True) in pre._pipes  # nvJPEG2000, not the CPU fallback
    assert res.errors == {}, {k: str(v) for k, v in res.errors.items()}
    assert isinstance(res.batch, torch.Tensor) and res.batch.is_cuda
    out = res.batch.cpu().numpy()
    for row, (bits, hw, window) in enumerate(J2K_CASES):
        d = unit_diff(out[row], refs[row])
        assert d <= 2e-5, f"{bits}-bit {hw} window={window}: {d:.3g} (decoder scaling not undone?)"
