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
