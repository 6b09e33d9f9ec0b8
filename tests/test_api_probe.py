"""The geometry proof: the probe model finds every square, in ORIGINAL pixels, in every format.

Tolerance: a box edge may lie inside the square by up to one heatmap stride plus the resize
filter's one-pixel rim (a heatmap cell lights only when the whole cell lies inside the square),
and never outside it by more than that rim; in original pixels both are divided by the letterbox
scale. Points (cell centres) must lie inside the square.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import cxrkit
from probe_images import PROBE_LABELS, encode, random_squares, render

FORMATS = ["jpeg", "png8", "png16", "u8", "u16", "f32", "dicom", "dicom-j2k"]
SIZES = [(300, 500), (640, 360), (256, 256), (1100, 900)]


@pytest.fixture(scope="module")
def det():
    with cxrkit.Detector.from_pretrained("cxr-probe", batch_size=4) as d:
        yield d


def _check(pred, squares, scale, stride=8, rim=1.5):
    assert pred.error is None, pred.error
    want = {s.key: s for s in squares}
    tol_in = (stride + rim) / scale + 1e-3
    tol_out = rim / scale + 1e-3
    for key in PROBE_LABELS:
        f = pred.findings[key]
        if key not in want:
            assert not f.positive and len(f.boxes_xyxy) == 0, (key, f)
            continue
        s = want[key]
        assert f.positive, (key, f.score)
        assert len(f.boxes_xyxy) == 1, (key, f.boxes_xyxy)
        x0, y0, x1, y1 = f.boxes_xyxy[0]
        assert s.x0 - tol_out <= x0 <= s.x0 + tol_in, (key, "x0", x0, s)
        assert s.y0 - tol_out <= y0 <= s.y0 + tol_in, (key, "y0", y0, s)
        assert s.x1 - tol_in <= x1 <= s.x1 + tol_out, (key, "x1", x1, s)
        assert s.y1 - tol_in <= y1 <= s.y1 + tol_out, (key, "y1", y1, s)
        px, py = f.points_xy[0]
        assert s.x0 <= px <= s.x1 and s.y0 <= py <= s.y1


@pytest.mark.parametrize("fmt", FORMATS)
def test_probe_finds_every_square_in_original_pixels(det, fmt):
    rng = np.random.default_rng(100 + FORMATS.index(fmt))
    inputs, truth = [], []
    for h, w in SIZES:
        scale = min(256 / h, 256 / w)
        sq = random_squares(rng, h, w, n=3, min_side=int(np.ceil(40 / scale)))
        inputs.append(encode(render(h, w, sq), fmt))
        truth.append((sq, scale, (h, w)))
    preds = det.predict(inputs)
    assert len(preds) == len(inputs)
    for i, (pred, (sq, scale, hw)) in enumerate(zip(preds, truth)):
        assert pred.index == i
        assert pred.image_size == hw
        _check(pred, sq, scale)
        json.dumps(pred.to_dict())


def test_torch_and_onnxruntime_agree():
    """Same batch through both backends with cxr29-demo (continuous outputs; the probe's +-8 logit
    steps would agree even if one backend were slightly wrong): heatmaps and scores within 1e-5,
    the same decisions (but for a score within 1e-5 of its threshold) and the same boxes.
    Properties of the packaged model whatever its weights, not its exact outputs."""
    from cxrkit.bench import synthetic_radiograph

    imgs = [synthetic_radiograph(s, i) for i, s in enumerate((300, 640, 256))]
    imgs[1] = imgs[1][:, :360]  # non-square: letterbox padding in play
    with cxrkit.Detector.from_pretrained("cxr29-demo", backend="torch") as dt, \
            cxrkit.Detector.from_pretrained("cxr29-demo", backend="onnxruntime") as do:
        assert dt.backend_name == "torch" and do.backend_name == "onnxruntime"
        pt, po = dt.predict(imgs, return_heatmaps=True), do.predict(imgs, return_heatmaps=True)
        thresholds = dict(zip(do.labels, do.card.thresholds))
    spread = 0.0
    for a, b in zip(pt, po):
        assert a.error is None and b.error is None
        np.testing.assert_allclose(a.heatmaps, b.heatmaps, rtol=0, atol=1e-5)
        spread = max(spread, float(a.heatmaps.max() - a.heatmaps.min()))
        for key, fa in a.findings.items():
            fb = b.findings[key]
            assert abs(fa.score - fb.score) <= 1e-5, (key, fa.score, fb.score)
            if abs(fa.score - thresholds[key]) > 1e-5:
                assert fa.positive == fb.positive, key
                if fa.positive:
                    np.testing.assert_allclose(fa.boxes_xyxy, fb.boxes_xyxy, rtol=0, atol=1e-3)
    assert spread > 1e-2  # the heatmaps vary: the comparison is not between two flat maps


def test_corrupt_item_leaves_batch_identical(det):
    rng = np.random.default_rng(11)
    imgs = [encode(render(300, 400, random_squares(rng, 300, 400, 2, 60)), "jpeg") for _ in range(8)]
    clean = det.predict(imgs, batch_size=8)
    bad = list(imgs)
    bad[3] = imgs[3][: len(imgs[3]) // 3]  # truncated JPEG
    dirty = det.predict(bad, batch_size=8)
    assert isinstance(dirty[3].error, cxrkit.InputError), dirty[3]
    assert dirty[3].findings == {}
    for i in range(8):
        if i == 3:
            continue
        assert dirty[i].error is None
        for key in PROBE_LABELS:
            a, b = clean[i].findings[key], dirty[i].findings[key]
            assert a.score == b.score
            np.testing.assert_array_equal(a.boxes_xyxy, b.boxes_xyxy)
            np.testing.assert_array_equal(a.points_xy, b.points_xy)


def test_predict_iter_and_single_item(det):
    rng = np.random.default_rng(3)
    imgs = [encode(render(256, 256, random_squares(rng, 256, 256, 1, 48)), "png8") for _ in range(5)]
    a = det.predict(imgs, batch_size=2)
    b = list(det.predict_iter(iter(imgs), batch_size=3))
    assert [p.index for p in b] == list(range(5))
    for x, y in zip(a, b):
        assert x.to_dict()["findings"] == y.to_dict()["findings"]
    single = det.predict(imgs[0])
    assert len(single) == 1 and single[0].to_dict()["findings"] == a[0].to_dict()["findings"]


def test_prediction_fields(det):
    from probe_images import Square

    sq = [Square(0, 40, 50, 140, 150)]
    (p,) = det.predict([encode(render(300, 300, sq), "dicom")], return_heatmaps=True)
    assert p.error is None
    assert p.heatmaps.shape == (6, 32, 32) and p.heatmaps.dtype == np.float32
    assert set(p.timings_ms) >= {"load", "preprocess", "infer", "postprocess"}
    assert p.meta.get("pixel_spacing_mm") is not None
    assert p.meta.get("sop_instance_uid")
    d = p.to_dict()
    json.dumps(d)
    assert d["findings"]["nodule"]["positive"] is True
    f = p.findings["nodule"]
    assert f.boxes_xyxy.dtype == np.float32 and f.boxes_xyxy.shape == (1, 4)
    assert f.box_scores.shape == (1,) and f.points_xy.shape == (1, 2)


@pytest.mark.dali
@pytest.mark.parametrize("fmt", ["jpeg", "png8", "png16", "u16", "dicom"])
def test_dali_cpu_path_gives_the_same_answers(det, fmt):
    """The DALI pipeline (device="cpu") and the default native path compute the same model input:
    preprocessed tensors within 1.5e-5 in unit intensity (one 16-bit step; measured 8.1e-6), the
    same letterbox transforms; then the same findings through the probe."""
    from cxrkit.io import load_item

    rng = np.random.default_rng(200 + FORMATS.index(fmt))
    inputs = []
    for h, w in SIZES:
        scale = min(256 / h, 256 / w)
        inputs.append(encode(render(h, w, random_squares(rng, h, w, n=3, min_side=int(np.ceil(40 / scale)))), fmt))
    with cxrkit.Detector.from_pretrained("cxr-probe", batch_size=4, preprocess="dali") as dd:
        assert dd.preprocessor.backend == "dali" and det.preprocessor.backend == "numpy" and det.preprocessor.fast_resize
        rd = dd.preprocessor.run([load_item(x, i) for i, x in enumerate(inputs)])
        rn = det.preprocessor.run([load_item(x, i) for i, x in enumerate(inputs)])
        pd = dd.predict(inputs)
    assert rd.ok_positions == rn.ok_positions == list(range(len(inputs))) and rd.transforms == rn.transforms
    std = det.card.std
    assert np.abs(rd.batch - rn.batch).max() * std <= 1.5e-5
    assert np.ptp(rn.batch) * std > 0.5  # real images, not flat ones
    pn = det.predict(inputs)
    for a, b in zip(pd, pn):
        assert a.error is None and b.error is None
        for key in PROBE_LABELS:
            fa, fb = a.findings[key], b.findings[key]
            assert fa.positive == fb.positive and abs(fa.score - fb.score) < 1e-4
            np.testing.assert_allclose(fa.boxes_xyxy, fb.boxes_xyxy, atol=1e-3)
