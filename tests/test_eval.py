"""cxrkit.eval: AUROC and FROC definitions, and run_eval on a small synthetic COCO set."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from cxrkit.eval import _ImageTruth, _Peaks, auroc, format_table, froc, run_eval
from cxrkit.synth import procedural_chest
from cxrkit.synth.coco import write_coco_set


def test_auroc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    s = np.round(rng.random(200), 1)  # many ties
    y = rng.random(200) < 0.3
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert auroc(s, y) == pytest.approx(brute)


def test_auroc_edges():
    assert auroc([0.1, 0.9], [False, True]) == 1.0
    assert auroc([0.9, 0.1], [False, True]) == 0.0
    assert auroc([0.5, 0.5], [False, True]) == 0.5
    assert auroc([0.1, 0.2], [True, True]) is None


def _t(*boxes, ignored=()):
    return _ImageTruth(np.array(boxes, float).reshape(-1, 4), np.array(ignored, float).reshape(-1, 4))


def _p(*peaks, boxes=None):
    sc = np.array([p[0] for p in peaks], float)
    pts = np.array([p[1:] for p in peaks], float).reshape(-1, 2)
    return _Peaks(sc, pts, None if boxes is None else np.array(boxes, float).reshape(-1, 4))


def test_froc_hits_duplicates_and_false_positives():
    truth = [_t([10, 10, 20, 20]), _t([50, 50, 60, 60]), _t()]
    peaks = [
        _p((0.9, 15, 15), (0.7, 12, 12)),  # hit, then a duplicate on the same box: counts as nothing
        _p((0.8, 0, 0), (0.3, 55, 55)),  # a false positive, then a late hit
        _p((0.6, 5, 5)),  # a false positive on a normal image
    ]
    fr = froc(truth, peaks, (0.5, 1.0, 2.0))
    assert fr["n_lesions"] == 2
    # After 0.9: 1 TP, 0 FP; 0.8: 1 FP (1/3 per image); 0.6: 2 FP (2/3); 0.3: TP 2 -> sens 1 at 2/3 FP/image.
    assert fr["sensitivity"] == {"0.5": 0.5, "1": 1.0, "2": 1.0}
    assert fr["fp_per_image_max"] == pytest.approx(2 / 3)
    assert fr["score_at"]["0.5"] == pytest.approx(0.8)


def test_froc_box_iou_hit_and_ignored_boxes():
    truth = [_t([0, 0, 10, 10], ignored=[[30, 30, 40, 40]])]
    peaks = [_p((0.9, 11, 5), (0.8, 35, 35), boxes=[[2, 0, 12, 10], [30, 30, 40, 40]])]
    fr = froc(truth, peaks, (0.5,))
    assert fr["sensitivity"]["0.5"] == 1.0  # point outside but IoU 0.67; the ignored box is no FP
    assert fr["fp_per_image_max"] == 0.0


@dataclass
class _F:
    score: float
    points_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    boxes_xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    box_scores: np.ndarray = field(default_factory=lambda: np.zeros((0,)))


@dataclass
class _Pred:
    findings: dict
    error: object = None


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    bgs = [procedural_chest(np.random.default_rng(i), (192, 160)) for i in range(3)]
    out = tmp_path_factory.mktemp("evalset")
    ann = write_coco_set(bgs, out, per_background=4, seed=3, labels=("nodule", "pleural_effusion", "mass"),
                         p_normal=0.3, max_lesions=2)
    return out, ann


def _oracle(ann_path: Path, noise: float = 0.0):
    coco = json.loads(ann_path.read_text())
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    by_name = {im["file_name"]: im["id"] for im in coco["images"]}
    rng = np.random.default_rng(0)

    def predict(paths):
        out = []
        for p in paths:
            iid = by_name[Path(p).name]
            fs = {}
            for key in cats.values():
                boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == iid and cats[a["category_id"]] == key]
                pts = np.array([[x + w / 2, y + h / 2] for x, y, w, h in boxes]).reshape(-1, 2)
                sc = np.full(len(pts), 0.9) + noise * rng.random(len(pts))
                fs[key] = _F(score=0.9 if boxes else 0.1 + noise * rng.random(), points_xy=pts,
                             boxes_xyxy=np.array([[x, y, x + w, y + h] for x, y, w, h in boxes]).reshape(-1, 4),
                             box_scores=sc)
            out.append(_Pred(fs))
        return out

    return predict


def test_run_eval_oracle_is_perfect(coco_set, tmp_path):
    folder, ann = coco_set
    res = run_eval(_oracle(ann), folder / "images", ann, out_json=tmp_path / "m.json", batch_size=5)
    assert res["n_images"] == 12 and res["n_failed"] == 0
    for key, m in res["findings"].items():
        assert m["evaluated"]
        if m["n_pos_images"] and m["n_neg_images"]:
            assert m["auroc"] == 1.0, key
        if m["froc"]["n_lesions"]:
            assert m["froc"]["sensitivity"]["0.5"] == 1.0, key
    assert "nodule>=10mm" in res["strata"]
    assert json.loads((tmp_path / "m.json").read_text())["n_images"] == 12
    table = format_table(res)
    assert "pleural_effusion" in table and "nodule>=10mm" in table and "sens@1FP" in table


def test_run_eval_counts_failures_and_missing_findings(coco_set):
    folder, ann = coco_set
    base = _oracle(ann)

    def flaky(paths):
        preds = base(paths)
        preds[0] = _Pred({}, error=RuntimeError("bad file"))
        return preds

    res = run_eval(flaky, folder / "images", ann, batch_size=6)
    assert res["n_failed"] == 2  # the first of each batch of 6

    def partial(paths):
        return [_Pred({"nodule": p.findings["nodule"]}) for p in base(paths)]

    res = run_eval(partial, folder / "images", ann)
    assert res["findings"]["nodule"]["evaluated"] and not res["findings"]["mass"]["evaluated"]
    assert "-" in format_table(res)


def test_run_eval_with_a_list_of_paths(coco_set):
    folder, ann = coco_set
    paths = sorted(str(p) for p in (folder / "images").glob("*.png"))[:5]
    res = run_eval(_oracle(ann), paths, ann)
    assert res["n_images"] == 5
    with pytest.raises(ValueError, match="predictions for"):
        run_eval(lambda ps: [], paths, ann)
