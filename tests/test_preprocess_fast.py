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
