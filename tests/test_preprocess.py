"""Preprocessing: numpy reference (ground truth), DALI pipeline (CPU here, "mixed" on a GPU), and
the Preprocessor around them (routing, chunking, per-item errors, numpy fallback).

Tolerances, in unit space (u = (x - lo) / (hi - lo)), DALI vs reference:
- TOL_UNIT = 1.5e-5 (one 16-bit LSB) for raw uint8 / uint16 / float32 inputs, gray JPEG and
  gray PNG 8/16-bit. Both sides decode these bit-exactly (libjpeg-turbo, zlib);
  what is left is float32 rounding of the filter positions and weights in DALI (measured <= 8e-6).
- TOL_COLOUR = 1/255 + TOL_UNIT for colour sources: DALI converts RGB to gray in its decoder
  (truncating for PNG, -0.5 LSB on average; from the Y plane for JPEG) while Pillow "L" rounds;
  on natural images a gray pixel differs by <= 1 LSB, and the resize (weights >= 0, sum 1) cannot
  make it worse. (Pure colour noise that saturates RGB differs by more: not a radiograph.)
- GPU tolerances are set below, next to the GPU test.
- jpeg_dct_scaling (libjpeg 1/k decode + the same resize) is NOT the reference function; its
  measured and allowed difference to the reference is stated next to its test below.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cxrkit.errors import DecodeError, InputError
from cxrkit.io import decode_pixels, load_item
from cxrkit.preprocess import pipeline as pipeline_mod
from cxrkit.preprocess.letterbox import letterbox_geometry
from cxrkit.preprocess._blas import _openblas, blas_single_thread
from cxrkit.preprocess.pipeline import Preprocessor, dct_scale
from cxrkit.preprocess.reference import (
    pad_value,
    preprocess_reference,
    resize_linear_aa,
    resize_weights,
)

TOL_UNIT = 1.5e-5
TOL_COLOUR = 1 / 255 + TOL_UNIT
MEAN, STD = 0.45, 0.22
HW = (96, 128)  # model input (H, W), not square so both letterbox directions are exercised


# --- items, built by cxrkit.io as the Detector builds them -----------------------------------
def make_image(source: str, *, pixels=None, encoded=None, fmt=None, value_range=None):
    """LoadedImage from an array or file bytes via cxrkit.io.load_item; `fmt` is only checked."""
    img = load_item(pixels if pixels is not None else encoded, 0)
    assert fmt is None or img.format == fmt
    img = dataclasses.replace(img, source=source)
    return img if value_range is None else dataclasses.replace(img, value_range=value_range)


# --- synthetic images: smooth random field + noise, never constant --------------------------
def field_image(h: int, w: int, seed: int, noise: float = 0.05) -> np.ndarray:
    """(h, w) float in [0, 1]: a smooth random field (bilinear upsampled 6x6 noise) plus noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.random((6, 6)).astype(np.float32), mode="F")
    smooth = np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.float64)
    return np.clip(0.1 + 0.8 * smooth + noise * rng.standard_normal((h, w)), 0.0, 1.0)


def as_dtype(u: np.ndarray, dtype) -> np.ndarray:
    if dtype == np.float32:
        return u.astype(np.float32)
    return np.round(u * np.iinfo(dtype).max).astype(dtype)


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def reference_of(img) -> np.ndarray:
    d = decode_pixels(img)  # unchanged if it has pixels; else Pillow pixels and their value range
    return preprocess_reference(d.pixels, d.value_range, HW, MEAN, STD)[0]


def unit_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() * STD)


SIZES = {
    "portrait": (300, 200),
    "landscape": (150, 330),
    "tiny": (17, 300),
    "exact": HW,
    "upscale": (40, 50),
}


@pytest.fixture(scope="module")
def dali_pre():
    pytest.importorskip("nvidia.dali")
    with Preprocessor(HW, MEAN, STD, backend="dali", batch_size=4, num_threads=2) as pre:
        yield pre


# --- the reference alone --------------------------------------------------------------------
def test_resize_weights_hand_computed():
    np.testing.assert_array_equal(resize_weights(5, 5), np.eye(5))  # exact size: a copy
    up = resize_weights(2, 4)  # bilinear, pixel centres, edges clamped
    np.testing.assert_allclose(up, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], atol=1e-12)
    down = resize_weights(8, 4)  # triangle of half-width 2 centred at 2i + 0.5
    np.testing.assert_allclose(down[1, 1:5], [0.125, 0.375, 0.375, 0.125], atol=1e-12)
    np.testing.assert_allclose(down[0, :3], [0.5, 0.375, 0.125], atol=1e-12)  # tap -1 clamps to 0
    for n_in, n_out in [(2048, 512), (300, 17), (17, 300), (7, 3)]:
        np.testing.assert_allclose(resize_weights(n_in, n_out).sum(axis=1), 1.0, atol=1e-12)


def test_blocked_resize_equals_dense_weights():
    img = field_image(301, 257, seed=1).astype(np.float32)
    for out_hw in [(75, 64), (17, 300), (301, 257), (1, 1)]:
        dense = resize_weights(301, out_hw[0]) @ img.astype(np.float64) @ resize_weights(257, out_hw[1]).T
        np.testing.assert_allclose(resize_linear_aa(img, out_hw), dense, atol=2e-6)


@pytest.mark.parametrize("shape", list(SIZES.values()), ids=list(SIZES))
def test_reference_letterbox_geometry(shape):
    img = 0.1 + 0.8 * field_image(*shape, seed=2)  # unit values in [0.1, 0.9]: never the padding
    out, t = preprocess_reference(img.astype(np.float32), (0.0, 1.0), HW, MEAN, STD)
    assert out.shape == (1, *HW) and out.dtype == np.float32
    assert t == letterbox_geometry(shape, HW)
    (nh, nw), (top, left) = t.resized_hw, t.offset_yx
    inside = np.zeros(HW, bool)
    inside[top : top + nh, left : left + nw] = True
    assert np.all(out[0][~inside] == np.float32(pad_value(MEAN, STD)))  # exactly (0 - mean) / std
    unit = out[0][inside] * STD + MEAN
    assert unit.min() >= 0.1 - 1e-5 and unit.max() <= 0.9 + 1e-5


def test_reference_clips_to_value_range_and_allows_inverted_range():
    u = field_image(120, 90, seed=3)
    wide = (u * 3000 - 1000).astype(np.float32)  # values outside the window [0, 1000]
    clipped = np.clip(wide, 0, 1000)
    a, _ = preprocess_reference(wide, (0, 1000), HW, MEAN, STD)
    b, _ = preprocess_reference(clipped, (0, 1000), HW, MEAN, STD)
    np.testing.assert_array_equal(a, b)
    px = as_dtype(u, np.uint16)
    inv, _ = preprocess_reference(px, (65535, 0), HW, MEAN, STD)  # inverted window
    ref, _ = preprocess_reference(65535 - px, (0, 65535), HW, MEAN, STD)
    assert unit_diff(inv, ref) <= TOL_UNIT


def test_reference_rejects_bad_value_range():
    with pytest.raises(ValueError, match="value_range"):
        preprocess_reference(np.zeros((4, 4), np.uint8), (3, 3), HW, MEAN, STD)


# --- DALI vs reference ----------------------------------------------------------------------
@pytest.mark.dali
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32], ids=["u8", "u16", "f32"])
def test_dali_raw_matches_reference(dali_pre, dtype):
    imgs = [make_image(name, pixels=as_dtype(field_image(*hw, seed=i), dtype))
            for i, (name, hw) in enumerate(SIZES.items())]
    res = dali_pre.run(imgs)
    assert res.errors == {} and res.ok_positions == list(range(len(imgs)))
    for row, img in enumerate(imgs):
        assert res.transforms[row] == letterbox_geometry(img.image_size, HW)
        assert unit_diff(res.batch[row], reference_of(img)) <= TOL_UNIT, img.source


def _encoded_cases() -> list:
    cases = []
    for i, (name, hw) in enumerate(SIZES.items()):
        u = field_image(*hw, seed=10 + i)
        cases.append((f"jpeg-gray-{name}", encode(as_dtype(u, np.uint8), "JPEG", quality=90), "jpeg", TOL_UNIT))
        cases.append((f"png8-{name}", encode(as_dtype(u, np.uint8), "PNG"), "png", TOL_UNIT))
        cases.append((f"png16-{name}", encode(as_dtype(u, np.uint16), "PNG"), "png", TOL_UNIT))
    rgb = np.stack([as_dtype(field_image(300, 220, seed=30 + c), np.uint8) for c in range(3)], -1)
    cases.append(("jpeg-colour", encode(rgb, "JPEG", quality=90), "jpeg", TOL_COLOUR))
    cases.append(("png-rgb", encode(rgb, "PNG"), "png", TOL_COLOUR))
    return cases


@pytest.mark.dali
def test_dali_encoded_matches_reference(dali_pre):
    cases = _encoded_cases()
    imgs = [make_image(name, encoded=data, fmt=fmt) for name, data, fmt, _ in cases]
    res = dali_pre.run(imgs)
    assert res.errors == {} and res.ok_positions == list(range(len(imgs)))
    for row, (img, (_, _, _, tol)) in enumerate(zip(imgs, cases)):
        assert unit_diff(res.batch[row], reference_of(img)) <= tol, img.source


@pytest.mark.dali
def test_dali_keeps_16bit_png_precision(dali_pre):
    """A 16-bit PNG whose values differ below 8-bit resolution must not be rounded to 8 bits."""
    px = (30000 + np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 200).astype(np.uint16)
    img = make_image("png16-fine", encoded=encode(px, "PNG"), fmt="png")
    assert pipeline_mod._encoded_dtype(img) == "uint16"
    res = dali_pre.run([img])
    assert unit_diff(res.batch[0], reference_of(img)) <= TOL_UNIT
    assert np.unique(res.batch[0]).size > 10  # an 8-bit decode would leave about 1 level


@pytest.mark.dali
@pytest.mark.parametrize("shape", list(SIZES.values()), ids=list(SIZES))
def test_dali_letterbox_geometry_exact(dali_pre, shape):
    u = 0.1 + 0.8 * field_image(*shape, seed=4)
    res = dali_pre.run([make_image("g", pixels=u.astype(np.float32))])
    out, t = res.batch[0, 0], res.transforms[0]
    (nh, nw), (top, left) = t.resized_hw, t.offset_yx
    inside = np.zeros(HW, bool)
    inside[top : top + nh, left : left + nw] = True
    assert np.all(out[~inside] == np.float32(pad_value(MEAN, STD)))
    assert np.all(out[inside] * STD + MEAN >= 0.1 - 1e-4)  # the image fills exactly the inside


# --- Preprocessor behaviour -----------------------------------------------------------------
def _jpegs(n: int) -> list:
    return [make_image(f"img{i}.jpg", fmt="jpeg",
                       encoded=encode(as_dtype(field_image(200 + 10 * i, 150, seed=50 + i), np.uint8), "JPEG"))
            for i in range(n)]


@pytest.mark.dali
def test_corrupt_item_does_not_spoil_the_batch():
    imgs = _jpegs(8)
    with Preprocessor(HW, MEAN, STD, backend="dali", batch_size=8) as pre:
        clean = pre.run(imgs)
        bad = list(imgs)
        bad[3] = dataclasses.replace(imgs[3], source="broken.jpg", encoded=imgs[3].encoded[:300])
        res = pre.run(bad)
        again = pre.run(imgs)  # the pipeline still works after the failure
    assert list(res.errors) == [3] and isinstance(res.errors[3], DecodeError)
    assert res.errors[3].source == "broken.jpg"
    assert res.ok_positions == [0, 1, 2, 4, 5, 6, 7]
    np.testing.assert_array_equal(res.batch, clean.batch[res.ok_positions])  # bit-identical
    assert res.transforms == [clean.transforms[p] for p in res.ok_positions]
    np.testing.assert_array_equal(again.batch, clean.batch)


@pytest.mark.dali
def test_chunking_and_mixed_routes_keep_order():
    u = [field_image(120 + 7 * i, 100 + 11 * i, seed=60 + i) for i in range(11)]
    imgs = []
    for i, x in enumerate(u):  # interleave the four pipeline variants
        kind = i % 4
        if kind == 0:
            imgs.append(make_image(f"{i}.jpg", fmt="jpeg", encoded=encode(as_dtype(x, np.uint8), "JPEG")))
        elif kind == 1:
            imgs.append(make_image(f"{i}.png", fmt="png", encoded=encode(as_dtype(x, np.uint16), "PNG")))
        elif kind == 2:
            imgs.append(make_image(f"{i}.npy", pixels=as_dtype(x, np.uint16)))
        else:  # gray+alpha PNG, not DALI-decodable: decoded by cxrkit.io, then the raw pipeline
            la = np.stack([as_dtype(x, np.uint8), np.full(x.shape, 255, np.uint8)], -1)
            imgs.append(make_image(f"{i}.png", fmt="png", encoded=encode(la, "PNG")))
            assert not imgs[-1].dali_decodable
    with Preprocessor(HW, MEAN, STD, backend="dali", batch_size=2) as pre:
        res = pre.run(imgs)
        singles = [pre.run([im]).batch[0] for im in imgs]
    assert res.ok_positions == list(range(11)) and res.batch.shape == (11, 1, *HW)
    for row, img in enumerate(imgs):
        assert unit_diff(res.batch[row], reference_of(img)) <= TOL_UNIT, img.source
        np.testing.assert_array_equal(res.batch[row], singles[row])  # batch composition is irrelevant


def test_numpy_backend_is_the_reference_exactly():
    imgs = [make_image("a", pixels=as_dtype(field_image(130, 90, seed=70), np.uint16)),
            make_image("b.png", fmt="png", encoded=encode(as_dtype(field_image(60, 200, seed=71), np.uint8), "PNG")),
            make_image("d", pixels=as_dtype(field_image(30, 30, seed=72), np.uint8), value_range=(9, 9))]
    imgs.insert(2, dataclasses.replace(imgs[0], source="c", pixels=np.zeros((0, 5), np.uint8)))
    with Preprocessor(HW, MEAN, STD, backend="numpy") as pre:
        res = pre.run(imgs)
    assert res.ok_positions == [0, 1] and set(res.errors) == {2, 3}
    assert all(isinstance(e, InputError) for e in res.errors.values())
    for row in range(2):
        np.testing.assert_array_equal(res.batch[row], reference_of(imgs[row]))


@pytest.mark.dali
def test_bad_items_are_reported_by_the_dali_path(dali_pre):
    good = make_image("ok", pixels=as_dtype(field_image(50, 60, seed=80), np.uint8))
    imgs = [make_image("flat", pixels=np.zeros((8, 8), np.uint8), value_range=(5, 5)), good,
            dataclasses.replace(good, source="3d", pixels=np.zeros((4, 4, 3), np.uint8))]
    res = dali_pre.run(imgs)
    assert res.ok_positions == [1] and set(res.errors) == {0, 2}
    assert res.errors[0].source == "flat" and isinstance(res.errors[2], InputError)
    assert dali_pre.run([]).batch.shape == (0, 1, *HW)


@pytest.mark.dali
def test_windows_are_clipped_like_the_reference(dali_pre):
    px = as_dtype(field_image(140, 100, seed=81), np.uint16)
    imgs = [make_image("w", pixels=px, value_range=(10000, 40000)),  # DICOM-like VOI window
            make_image("inv", pixels=px, value_range=(40000, 10000)),  # inverted window
            make_image("f", pixels=(px / 30000).astype(np.float32), value_range=(0.2, 1.0))]
    assert pipeline_mod.clip_to_range(px, (10000, 40000)) is not px  # the data does exceed it
    res = dali_pre.run(imgs)
    for row, img in enumerate(imgs):
        assert unit_diff(res.batch[row], reference_of(img)) <= TOL_UNIT, img.source


def test_auto_backend_logs_once_without_dali(monkeypatch, caplog):
    monkeypatch.setattr(pipeline_mod, "dali_available", lambda: False)
    monkeypatch.setattr(pipeline_mod, "_warned_no_dali", False)
    with caplog.at_level(logging.WARNING, logger=pipeline_mod.__name__):
        native = Preprocessor(HW, MEAN, STD, backend="auto")  # the CPU default needs no DALI: no warning
        assert native.fast_resize == pipeline_mod._native_available()
        monkeypatch.setattr(pipeline_mod, "_native_available", lambda: False)
        a = Preprocessor(HW, MEAN, STD, backend="auto")
        b = Preprocessor(HW, MEAN, STD, backend="auto")
    assert a.backend == b.backend == "numpy"
    msgs = [r.getMessage() for r in caplog.records if "DALI" in r.getMessage()]
    assert len(msgs) == 1 and "pip install nvidia-dali" in msgs[0]


def test_import_cxrkit_does_not_import_dali():
    code = ("import sys, cxrkit, cxrkit.preprocess, cxrkit.preprocess.pipeline; "
            "assert 'nvidia.dali' not in sys.modules, 'DALI imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_resize_extent_is_a_crop_of_the_continuous_image():
    """Weights over [0, extent) of a longer input: an input that repeats its last pixel past the
    extent resizes like the image alone (the 1/k JPEG decode case: a partly padded last pixel)."""
    np.testing.assert_allclose(resize_weights(8, 4, extent=8.0), resize_weights(8, 4), atol=0)
    img = field_image(40, 50, seed=5).astype(np.float32)
    padded = np.pad(img, ((0, 1), (0, 1)), mode="edge")  # 41 x 51, image part 40 x 50
    a = resize_linear_aa(padded, (10, 12), extent_hw=(40.0, 50.0))
    np.testing.assert_allclose(a, resize_linear_aa(img, (10, 12)), atol=2e-6)
    with pytest.raises(ValueError, match="extent"):
        resize_weights(8, 4, extent=9.0)


def test_dct_scale_policy():
    assert dct_scale((2048, 2048), (512, 512)) == 4
    assert dct_scale((2000, 2000), (512, 512)) == 2  # factor 3.9
    assert dct_scale((1000, 1000), (512, 512)) == 1  # factor < 2: full decode
    assert dct_scale((8000, 8000), (512, 512)) == 8  # libjpeg stops at 1/8
    assert dct_scale((1148, 2563), (229, 512)) == 4  # the smaller axis factor decides


def test_blas_single_thread_restores_the_thread_count():
    fns = _openblas()
    if fns is None:
        pytest.skip("numpy's OpenBLAS not found among the loaded libraries")
    before = fns[1]()
    with blas_single_thread():
        assert fns[1]() == 1
        with blas_single_thread():  # re-entrant
            assert fns[1]() == 1
        assert fns[1]() == 1
    assert fns[1]() == before


def test_numpy_backend_threads_equal_serial():
    imgs = _jpegs(5) + [make_image("u16", pixels=as_dtype(field_image(90, 70, seed=6), np.uint16))]
    with Preprocessor(HW, MEAN, STD, backend="numpy", num_threads=1) as one, \
            Preprocessor(HW, MEAN, STD, backend="numpy", num_threads=3) as many:
        a, b = one.run(imgs), many.run(imgs)
    np.testing.assert_array_equal(a.batch, b.batch)
    assert a.transforms == b.transforms and a.ok_positions == b.ok_positions == list(range(6))


# jpeg_dct_scaling tolerance, unit space, vs the reference on the full decode, model input 512^2.
# Measured (2026-11, libjpeg-turbo via Pillow 13): synthetic 2048^2 radiographs (cxrkit.bench,
# q90, k = 4): max 4.0 / mean 0.64 LSB (1 LSB = 1/255); real chest X-ray JPEGs of
# /work/shared/data/lungbox (factor >= 2, k = 2 or 4): max 33.9 / mean 0.93 LSB, the max at sharp
# edges (burned-in text, image borders) where the 8x8 DCT reduction is not a triangle filter. For
# scale: q90 JPEG compression itself moves the resized image by max 0.6 / mean 0.11 LSB.
DCT_SYNTH_MAX, DCT_SYNTH_MEAN = 5 / 255, 0.75 / 255
DCT_REAL_MAX, DCT_REAL_MEAN = 40 / 255, 1.0 / 255
DCT_HW = (512, 512)


def _dct_diffs(imgs, backend="numpy"):
    """(max, mean) unit differences per image: jpeg_dct_scaling=True vs the reference."""
    with Preprocessor(DCT_HW, MEAN, STD, backend=backend, jpeg_dct_scaling=True, batch_size=4) as pre:
        res = pre.run(imgs)
    assert res.errors == {}
    out = []
    for row, img in enumerate(imgs):
        d = decode_pixels(img)
        ref = preprocess_reference(d.pixels, d.value_range, DCT_HW, MEAN, STD)[0]
        diff = np.abs(res.batch[row].astype(np.float64) - ref) * STD
        out.append((float(diff.max()), float(diff.mean())))
    return out, res


def _synthetic_jpegs(n=2, size=2048):
    from cxrkit.bench import synthetic_radiograph

    return [make_image(f"syn{i}.jpg", fmt="jpeg", encoded=encode(synthetic_radiograph(size, i), "JPEG", quality=90))
            for i in range(n)]


def test_jpeg_dct_scaling_tolerance_synthetic():
    imgs = _synthetic_jpegs()
    diffs, res = _dct_diffs(imgs)
    for (mx, mean), img in zip(diffs, imgs):
        assert mx <= DCT_SYNTH_MAX and mean <= DCT_SYNTH_MEAN, (img.source, mx * 255, mean * 255)
        assert mx > 0  # it is a different function (k = 4 here)
    assert res.transforms[0] == letterbox_geometry((2048, 2048), DCT_HW)


def test_jpeg_dct_scaling_tolerance_real(shared_data):
    folder = shared_data / "lungbox" / "images"
    paths = sorted(p for p in folder.glob("*.jp*g")) if folder.is_dir() else []
    imgs = [load_item(str(p), i) for i, p in enumerate(paths)]
    imgs = [im for im in imgs if dct_scale(im.image_size, letterbox_geometry(im.image_size, DCT_HW).resized_hw) > 1]
    if len(imgs) < 3:
        pytest.skip("no real JPEGs with a downscale factor >= 2 found")
    diffs, _ = _dct_diffs(imgs)
    for (mx, mean), img in zip(diffs, imgs):
        assert mx <= DCT_REAL_MAX and mean <= DCT_REAL_MEAN, (img.source, mx * 255, mean * 255)


@pytest.mark.dali
def test_jpeg_dct_scaling_dali_equals_numpy():
    """Both backends compute the same function with DCT scaling on (same decode, same resize)."""
    imgs = _synthetic_jpegs(1, 1536) + _jpegs(2) + [make_image("big.jpg", fmt="jpeg", encoded=encode(
        as_dtype(field_image(701, 533, seed=7), np.uint8), "JPEG"))]  # odd sizes: partial blocks
    _, a = _dct_diffs(imgs, "numpy")
    _, b = _dct_diffs(imgs, "dali")
    assert a.transforms == b.transforms
    for row in range(len(imgs)):
        assert unit_diff(a.batch[row], b.batch[row]) <= TOL_UNIT, imgs[row].source


def test_jpeg_dct_scaling_off_by_default_and_reports_corrupt_items():
    imgs = _synthetic_jpegs(1)
    with Preprocessor(DCT_HW, MEAN, STD, backend="numpy") as pre:
        assert pre.jpeg_dct_scaling is False and pre._dct_k(imgs[0]) == 1
    bad = dataclasses.replace(imgs[0], source="broken.jpg", encoded=imgs[0].encoded[:500])
    with Preprocessor(DCT_HW, MEAN, STD, backend="numpy", jpeg_dct_scaling=True) as pre:
        res = pre.run([bad, imgs[0]])
    assert res.ok_positions == [1] and isinstance(res.errors[0], DecodeError)


# --- GPU ("mixed" decode, GPU resize): runs only on a CUDA machine with DALI ------------------
TOL_GPU = 2e-5  # GPU resampling: float32 positions/weights computed differently from the CPU kernel
TOL_GPU_JPEG = 2 / 255  # nvJPEG (hardware / CUDA IDCT) vs libjpeg-turbo: 1-2 LSB per pixel


@pytest.mark.gpu
@pytest.mark.dali
def test_gpu_mixed_matches_reference_and_isolates_bad_items():
    torch = pytest.importorskip("torch")
    cases = _encoded_cases()
    imgs = [make_image(name, encoded=data, fmt=fmt) for name, data, fmt, _ in cases]
    tols = [max(tol, TOL_GPU_JPEG if fmt == "jpeg" else TOL_GPU) for _, _, fmt, tol in cases]
    imgs.append(make_image("raw-u16", pixels=as_dtype(field_image(300, 200, seed=90), np.uint16)))
    tols.append(TOL_GPU)
    with Preprocessor(HW, MEAN, STD, device="cuda", backend="dali", batch_size=4) as pre:
        res = pre.run(imgs)
        assert isinstance(res.batch, torch.Tensor) and res.batch.is_cuda
        assert res.errors == {} and tuple(res.batch.shape) == (len(imgs), 1, *HW)
        out = res.batch.cpu().numpy()
        for row, (img, tol) in enumerate(zip(imgs, tols)):
            assert unit_diff(out[row], reference_of(img)) <= tol, img.source
        jpegs = _jpegs(4)
        clean = pre.run(jpegs).batch.cpu().numpy()
        jpegs[1] = dataclasses.replace(jpegs[1], source="broken.jpg", encoded=jpegs[1].encoded[:300])
        bad = pre.run(jpegs)
    assert list(bad.errors) == [1] and bad.errors[1].source == "broken.jpg"
    # The HW / CUDA decoder split depends on the batch, so bit-identity is not promised on GPU.
    assert unit_diff(bad.batch.cpu().numpy(), clean[[0, 2, 3]]) <= TOL_GPU_JPEG


TOL_GPU_J2K_LOSSY = 2e-4  # irreversible 9/7 wavelet: nvJPEG2000 vs OpenJPEG float rounding, a few stored LSB


@pytest.mark.gpu
@pytest.mark.dali
def test_gpu_handover_and_j2k_dicom(shared_data):
    """device="cuda": a contiguous float32 CUDA tensor (B, 1, H, W), finished when run() returns,
    sliceable as the Detector slices it; JPEG, PNG and DICOM JPEG 2000 (nvJPEG2000, stored-unit
    value range) against the reference on io's pixels."""
    torch = pytest.importorskip("torch")
    pydicom = pytest.importorskip("pydicom")
    from cxrkit.io.dicom_j2k import attach_j2k_frame, is_encoded_j2k

    imgs, tols, refs = [], [], []
    for name, data, fmt, tol in _encoded_cases()[:6]:
        img = make_image(name, encoded=data, fmt=fmt)
        imgs.append(img)
        tols.append(max(tol, TOL_GPU_JPEG if fmt == "jpeg" else TOL_GPU))
        refs.append(reference_of(img))
    for rel, tol in [("dicom/nema-rg1/RG1_J2KR.dcm", TOL_GPU), ("dicom/chest-dx-966-j2k.dcm", TOL_GPU),
                     ("dicom/nema-rg1/RG1_J2KI.dcm", TOL_GPU_J2K_LOSSY)]:
        path = shared_data / rel
        if not path.exists():
            continue
        io_img = load_item(str(path), 0)
        enc = load_item(str(path), 0, keep_j2k_frame=True)  # what the Detector reads on CUDA
        assert is_encoded_j2k(enc) and enc.pixels is None  # no CPU decode: the GPU route needs none
        assert is_encoded_j2k(attach_j2k_frame(io_img, pydicom.dcmread(path)))
        imgs.append(enc)
        tols.append(tol)
        refs.append(preprocess_reference(io_img.pixels, io_img.value_range, HW, MEAN, STD)[0])
    with Preprocessor(HW, MEAN, STD, device="cuda", backend="dali", batch_size=4,
                      hw_decoder_load=1.0, num_threads=4) as pre:
        res = pre.run(imgs)
        if any(is_encoded_j2k(im) for im in imgs):
            assert (True, "uint16", True) in pre._pipes  # the DICOMs went through nvJPEG2000
    b = res.batch
    assert res.errors == {}, {k: str(v) for k, v in res.errors.items()}
    assert isinstance(b, torch.Tensor) and b.is_cuda and b.dtype == torch.float32
    assert tuple(b.shape) == (len(imgs), 1, *HW) and b.is_contiguous()
    out = b.cpu().numpy()
    for row, (img, tol, ref) in enumerate(zip(imgs, tols, refs)):
        d = unit_diff(out[row], ref)
        hint = "" if d < 0.5 else " (a 12/15-bit J2K scaled to the uint16 range by the decoder?)"
        assert d <= tol, f"{img.source}: {d:.3g} > {tol:.3g}{hint}"
    part = b[1:3]  # the Detector slices the batch
    assert part.is_cuda and tuple(part.shape) == (2, 1, *HW)
    np.testing.assert_array_equal(part.cpu().numpy(), out[1:3])
