"""Detector options and card fields, each changing what a known input gives (the probe model, whose
outputs are decided by the pixels): the card's ``enabled`` gate, ``boxes="all"``, ``localize``
overrides from the card and from the Detector; then the README's first Python example with
cxr29-demo, and torch bf16 on the CPU. cxr29-demo's weights change with retraining: its tests check
properties (decisions follow the card, equal inputs give equal outputs, bf16 close to fp32), not
its exact outputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import cxrkit
from cxrkit.config import LocalizeConfig
from probe_images import Square, encode, render

PROBE = Path(cxrkit.__file__).parent / "models" / "cxr-probe"
REPO = Path(__file__).resolve().parents[1]


def _probe_with(tmp_path: Path, **card_fields) -> Path:
    d = tmp_path / "probe"
    shutil.copytree(PROBE, d)
    card = json.loads((d / "card.json").read_text())
    card.update(card_fields)
    (d / "card.json").write_text(json.dumps(card))
    return d


# 256 x 256 (no resize: one heatmap cell = 8 pixels); a nodule and a mass square
SCENE = [Square(0, 32, 32, 96, 96), Square(1, 160, 160, 224, 224)]


def _predict(model, items, **kw):
    with cxrkit.Detector.from_pretrained(model, backend="onnxruntime", **kw) as det:
        return det.predict(items)


def test_enabled_false_gates_decisions_and_boxes(tmp_path):
    img = encode(render(256, 256, SCENE), "u8")
    (on,) = _predict("cxr-probe", [img])
    assert on.findings["nodule"].positive and len(on.findings["nodule"].boxes_xyxy) == 1
    off_dir = _probe_with(tmp_path, enabled={"nodule": False})
    for boxes in ("positive", "all"):
        (off,) = _predict(off_dir, [img], boxes=boxes)
        n = off.findings["nodule"]
        assert not n.positive and len(n.boxes_xyxy) == 0 and len(n.points_xy) == 0, boxes
        assert n.score == pytest.approx(on.findings["nodule"].score)  # the score is still reported
        assert off.findings["mass"].positive  # the other findings are untouched
        np.testing.assert_array_equal(off.findings["mass"].boxes_xyxy, on.findings["mass"].boxes_xyxy)


def test_boxes_all_reports_peaks_of_findings_below_their_operating_point(tmp_path):
    """mass: heatmap peaks above its heatmap threshold (0.5) but an image score (sigmoid(8) =
    0.99966) below its operating threshold (0.9999): not positive; boxes only with boxes="all"."""
    pkg = _probe_with(tmp_path, thresholds={**json.loads((PROBE / "card.json").read_text())["thresholds"],
                                            "mass": 0.9999}, heatmap_thresholds={"mass": 0.5})
    img = encode(render(256, 256, SCENE), "u8")
    (pos,) = _predict(pkg, [img])
    (allb,) = _predict(pkg, [img], boxes="all")
    assert not pos.findings["mass"].positive and not allb.findings["mass"].positive
    assert len(pos.findings["mass"].boxes_xyxy) == 0
    (box,) = allb.findings["mass"].boxes_xyxy
    np.testing.assert_allclose(box, [160, 160, 224, 224], atol=1.5)
    assert allb.findings["mass"].box_scores[0] == pytest.approx(allb.findings["mass"].score)
    for key in ("nodule", "consolidation"):  # positive ones / empty ones: the same either way
        np.testing.assert_array_equal(pos.findings[key].boxes_xyxy, allb.findings[key].boxes_xyxy)
    assert len(allb.findings["consolidation"].boxes_xyxy) == 0


def test_localize_overrides_from_the_card_and_the_detector(tmp_path):
    """Two nodule squares side by side: 2 boxes by default; the card's "localize" {"max_peaks": 1}
    keeps the first peak only (raster order); a Detector's own LocalizeConfig overrides the card;
    max_extent limits how far a region grows from its peak."""
    two = [Square(0, 16, 64, 80, 128), Square(0, 160, 64, 224, 128)]
    img = encode(render(256, 256, two), "u8")
    (p,) = _predict("cxr-probe", [img])
    assert sorted(b[0] for b in p.findings["nodule"].boxes_xyxy) == pytest.approx([16, 160], abs=1.5)
    one = _probe_with(tmp_path, localize={"max_peaks": 1})
    (p1,) = _predict(one, [img])
    (box,) = p1.findings["nodule"].boxes_xyxy
    np.testing.assert_allclose(box, [16, 64, 80, 128], atol=1.5)
    (p2,) = _predict(one, [img], localize=LocalizeConfig())  # the Detector's config wins over the card's
    assert len(p2.findings["nodule"].boxes_xyxy) == 2
    (p3,) = _predict("cxr-probe", [img], localize=LocalizeConfig(max_extent=1))
    w = p3.findings["nodule"].boxes_xyxy[:, 2] - p3.findings["nodule"].boxes_xyxy[:, 0]
    assert len(w) >= 1 and (w <= 3 * 8 + 1e-3).all()  # peak cell +- 1 cell at stride 8


def test_readme_first_example_with_cxr29_demo():
    """README "Use": cxr29-demo on the CPU with a DICOM path, a PNG path, JPEG bytes and a uint16
    array, in one call; the same pixels in two forms give the same answer."""
    from PIL import Image

    dcm, png = REPO / "samples" / "siim_chest_cr.dcm", REPO / "samples" / "00000001_000.png"
    jpeg_bytes = (REPO / "samples" / "41182_2020_203_Fig3_HTML.jpg").read_bytes()
    png8 = np.asarray(Image.open(png).convert("L"))
    uint16_array = png8.astype(np.uint16) * 257  # the PNG's pixels at 16 bits: the same unit intensities
    with cxrkit.Detector.from_pretrained("cxr29-demo", device="cpu") as det:
        preds = det.predict([str(dcm), str(png), jpeg_bytes, uint16_array])
        card = det.card
    assert [p.index for p in preds] == [0, 1, 2, 3] and all(p.error is None for p in preds)
    thresholds = dict(zip(card.labels, card.thresholds))
    enabled = dict(zip(card.labels, card.enabled))
    for p in preds:
        assert list(p.findings) == list(card.labels)
        h, w = p.image_size
        for k, f in p.findings.items():
            assert 0.0 <= f.score <= 1.0
            assert f.positive == bool(enabled[k] and f.score >= thresholds[k]), k
            assert f.boxes_xyxy.dtype == np.float32 and f.boxes_xyxy.shape[1:] == (4,)
            assert f.points_xy.shape == (len(f.boxes_xyxy), 2)
            if len(f.boxes_xyxy):  # original pixels, inside the image
                assert (f.boxes_xyxy[:, [0, 2]] <= w).all() and (f.boxes_xyxy[:, [1, 3]] <= h).all()
                assert (f.boxes_xyxy >= 0).all()
        json.dumps(p.to_dict())
    assert preds[0].meta.get("sop_instance_uid") and preds[1].image_size == png8.shape
    for k in card.labels:  # the PNG path and its 16-bit array: the same answer
        assert preds[3].findings[k].score == pytest.approx(preds[1].findings[k].score, abs=1e-6), k
        assert preds[3].findings[k].positive == preds[1].findings[k].positive


def test_torch_bf16_on_the_cpu_runs_and_stays_close_to_fp32():
    """precision="bf16" with the torch backend on the CPU: every item predicts, the runner really is
    bf16 (its outputs differ from fp32), and scores / heatmaps stay close (bf16 keeps 8 bits of mantissa)."""
    from cxrkit.bench import synthetic_radiograph

    imgs = [synthetic_radiograph(320, 1)]
    with cxrkit.Detector.from_pretrained("cxr29-demo", backend="torch", precision="bf16") as d16, \
            cxrkit.Detector.from_pretrained("cxr29-demo", backend="torch") as d32:
        assert d16.runner.precision.value == "bf16" and d32.runner.precision.value == "fp32"
        p16, p32 = d16.predict(imgs, return_heatmaps=True), d32.predict(imgs, return_heatmaps=True)
    for a, b in zip(p16, p32):
        assert a.error is None and b.error is None
        assert a.heatmaps.dtype == np.float32 and a.heatmaps.shape == b.heatmaps.shape
        sa = np.array([f.score for f in a.findings.values()])
        sb = np.array([f.score for f in b.findings.values()])
        assert not np.array_equal(a.heatmaps, b.heatmaps)  # really bf16
        assert np.abs(sa - sb).max() < 0.05, np.abs(sa - sb).max()
        assert np.corrcoef(a.heatmaps.ravel(), b.heatmaps.ravel())[0, 1] > 0.99
