"""The C++ sparse-tap resize (cxrkit._C, the CPU default "native" path) equals the numpy reference.

Tolerance: float32 rounding of a different summation order: max |diff| <= 2e-6 x the input's
full scale, on random images of many sizes and aspect ratios, up- and downscaling, every dtype.
"""

from __future__ import annotations

import numpy as np
import pytest

from cxrkit.io import load_item
from cxrkit.preprocess import Preprocessor
from cxrkit.preprocess.reference import preprocess_reference, resize_linear_aa, resize_linear_aa_fast

pytest.importorskip("cxrkit._C")

SHAPES = [((2048, 2048), (256, 256)), ((2000, 1500), (256, 192)), ((300, 500), (154, 256)),
          ((17, 300), (15, 256)), ((100, 100), (256, 256)), ((1, 1), (5, 3)), ((513, 257), (512, 255))]


@pytest.mark.parametrize("shape, out", SHAPES)
@pytest.mark.parametrize("dtype, full", [(np.uint8, 255), (np.uint16, 65535), (np.float32, 1.0)])
def test_fast_resize_equals_reference(shape, out, dtype, full):
    rng = np.random.default_rng(shape[0] * 7 + out[1])
    a = (rng.random(shape) * full).astype(dtype)
    ref, fast = resize_linear_aa(a, out), resize_linear_aa_fast(a, out)
    assert fast.shape == ref.shape and fast.dtype == np.float32
    assert np.abs(fast - ref).max() <= 2e-6 * full


def test_fast_resize_with_extent_equals_reference():
    a = (np.random.default_rng(1).random((257, 190)) * 255).astype(np.uint8)
    ext = (256.5, 189.25)
    assert np.abs(resize_linear_aa_fast(a, (128, 96), ext) - resize_linear_aa(a, (128, 96), ext)).max() <= 2e-6 * 255


def test_native_backend_is_the_cpu_default_and_matches_the_reference():
    from PIL import Image
    import io

    rng = np.random.default_rng(3)
    imgs = []
    for i, (h, w) in enumerate([(700, 500), (256, 256), (300, 900)]):
        b = io.BytesIO()
        Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8)).save(b, format="PNG")
        imgs.append(load_item(b.getvalue(), i))
    pre = Preprocessor((256, 256), 0.5, 0.25)
    assert pre.backend == "numpy" and pre.fast_resize
    res = pre.run(imgs)
    for row, img in zip(res.batch, imgs):
        from cxrkit.io import decode_pixels

        d = decode_pixels(img)
        ref, _ = preprocess_reference(d.pixels, d.value_range, (256, 256), 0.5, 0.25)
        assert np.abs(row - ref).max() <= 2e-6 / 0.25


# ---- the one-pass normalisation kernel (model-size inputs) == the numpy steps, bit for bit ------------

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_native_normalize_equals_numpy_bit_for_bit(dtype):
    """cxrkit._C.normalize_u8 / normalize_u16 (via _normalize_fast) against _normalize_in_place, the five
    numpy float32 passes it replaces: every value of the dtype (uint8) or 2^16 random ones, odd sizes
    (vector tails), power-of-two and other ranges and stds (the multiply-by-inverse branches), inverted
    and fractional windows, negative means."""
    from cxrkit.preprocess.reference import _normalize_fast, _normalize_in_place

    rng = np.random.default_rng(21 + np.dtype(dtype).itemsize)
    top = np.iinfo(dtype).max
    shapes = [(1, 1), (3, 5), (17, 33), (256, 256)] if dtype == np.uint8 else [(1, 7), (31, 9), (256, 256)]
    ranges = [(0.0, float(top)), (0.0, 256.0), (10.0, top / 3), (top * 0.8, 5.0), (-3.5, 200.25), (1.0, 3.0),
              (0.0, 4096.0), (100.0, 4095.0)]
    norms = [(0.5, 0.25), (0.485, 0.229), (0.0, 1.0), (-1.75, 3.0), (0.5, 0.5), (0.449, 0.226)]
    for shape in shapes:
        px = rng.integers(0, top, shape, dtype=dtype, endpoint=True)
        if dtype == np.uint8 and shape == (256, 256):
            px.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)  # every uint8 value
        for lo, hi in ranges:
            for mean, std in norms:
                want = _normalize_in_place(px, lo, hi, mean, std)
                got = _normalize_fast(px, lo, hi, mean, std)
                assert got.shape == (1,) + shape and got.dtype == np.float32
                assert got.view(np.uint32).tobytes() == want.view(np.uint32).tobytes(), (shape, lo, hi, mean, std)
        out = np.full((2, 1) + shape, np.nan, np.float32)
        row = out[1]
        assert _normalize_fast(px, 0.0, float(top), 0.5, 0.25, row) is row
        assert np.isnan(out[0]).all() and out[1].tobytes() == _normalize_in_place(px, 0.0, float(top), 0.5, 0.25).tobytes()


def test_native_normalize_refuses_a_wrong_out():
    from cxrkit import _C

    px = np.zeros((4, 4), np.uint8)
    for bad in (np.zeros((1, 4, 3), np.float32), np.zeros((1, 4, 4), np.float64), np.zeros((1, 4, 8), np.float32)[..., ::2]):
        with pytest.raises(ValueError, match="out must be"):
            _C.normalize_u8(px, 0.0, 255.0, 0.5, 0.25, bad)
    ro = np.zeros((1, 4, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be"):
        _C.normalize_u8(px, 0.0, 255.0, 0.5, 0.25, ro)
