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
