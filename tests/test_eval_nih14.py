"""nih14-format evaluation: label matching, AUROC paired with CheXNet, localization against real
boxes (positives without a box left out), threshold tuning and its bar, and `cxrkit eval` on both
annotation formats."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest

from cxrkit.eval import _Peaks, auroc
from cxrkit.eval_nih14 import Collected, match_labels, nih14_metrics
from cxrkit.labels import nih14_key
from cxrkit.training.nih14 import BOX_NAMES, Nih14Record, load_nih14, make_split
from cxrkit.tune import BAR, apply_to_card, choose_thresholds



def test_nih14_names_map_to_the_ontology():
    assert nih14_key("Effusion") == "pleural_effusion" and nih14_key("Infiltrate") == "opacity"
    assert nih14_key("pleural thickening") == "pleural_thickening" and nih14_key("Hernia") == "hiatal_hernia"
    assert nih14_key("Pneumonia") == nih14_key("Consolidation") == "consolidation"
    assert nih14_key("No Finding") is None


def test_match_labels_by_key_or_nih_name():
    m = match_labels(["nodule", "pleural_effusion", "cardiomegaly"])
    assert m == {"Cardiomegaly": "cardiomegaly", "Effusion": "pleural_effusion", "Nodule": "nodule"}
    m = match_labels(["Effusion", "Infiltration", "Pleural_Thickening", "Lung Lesion"])  # an imported model's names
    assert m == {"Effusion": "Effusion", "Infiltration": "Infiltration", "Pleural_Thickening": "Pleural_Thickening"}
    assert match_labels(["infiltrate"])["Infiltration"] == "infiltrate"


def _rec(i, names=(), boxes=(), chex=None, patient=None):
    return Nih14Record(f"{i:03d}.jpg", str(patient if patient is not None else i), "PA", tuple(names), list(boxes), chex, 0.4)


def _collected(recs, labels, score_fn, peaks_fn):
    scores = {k: np.array([score_fn(r, k) for r in recs], float) for k in labels}
    peaks = {k: [peaks_fn(r, k) for r in recs] for k in labels}
    return Collected([r.image for r in recs], scores, peaks, [])


def _peak(*pts, score=0.9):
    pts = np.array(pts, float).reshape(-1, 2)
    return _Peaks(np.full(len(pts), score), pts, None)


def test_localization_counts_hits_inside_boxes_and_leaves_out_unboxed_positives():
    box = ("Nodule", 100.0, 100.0, 150.0, 150.0)
    recs = [
        _rec(0, ["Nodule"], [box]),  # hit
        _rec(1, ["Nodule"], [box]),  # miss: its peak is outside the box -> one FP
        _rec(2, ["Nodule"]),  # positive, no box: its peak counts as nothing
        _rec(3, []),  # normal, no peak
        _rec(4, ["Mass"], [("Mass", 0, 0, 10, 10)]),
    ]
    labels = ["nodule", "mass"]

    def peaks(r, k):
        if k != "nodule":
            return _peak()
        return {0: _peak((120, 120)), 1: _peak((300, 300), score=0.8), 2: _peak((500, 500), score=0.95)}.get(int(r.patient), _peak())

    col = _collected(recs, labels, lambda r, k: 0.9 if k in r.keys else 0.1, peaks)
    res = nih14_metrics(col, recs, labels)
    loc = res["findings"]["Nodule"]["localization"]
    assert loc["images"] == 4 and loc["lesion_images"] == 2 and loc["n_lesions"] == 2
    # 4 counted images: after the hit (0.9) sens 0.5 at 0 FP; the 0.8 peak is 1 FP = 0.25/image
    assert loc["sensitivity"] == {"0.5": 0.5, "1": 0.5, "2": 0.5}
    assert res["findings"]["Nodule"]["auroc"] == 1.0
    assert not res["findings"]["Atelectasis"]["evaluated"]
    assert res["summary"]["mean_paired_gap_8"] is None  # no CheXNet images here


def test_paired_auroc_is_chexnets_on_the_same_images():
    rng = np.random.default_rng(0)
    recs = []
    for i in range(60):
        names = [n for n in BOX_NAMES if rng.random() < 0.3]
        chex = {n: float(rng.random()) for n in BOX_NAMES} if i < 40 else None
        recs.append(_rec(i, names, chex=chex, patient=i // 2))
    labels = sorted({nih14_key(n) for n in BOX_NAMES})
    col = _collected(recs, labels, lambda r, k: float(rng.random()), lambda r, k: _peak())
    res = nih14_metrics(col, recs, labels)
    assert res["n_paired"] == 40
    sub = recs[:40]
    for n in BOX_NAMES:
        p = res["findings"][n]["paired"]
        y = np.array([n in r.names for r in sub])
        assert p["chexnet_auroc"] == pytest.approx(auroc([r.chexnet[n] for r in sub], y))
        assert p["auroc"] == pytest.approx(auroc(col.scores[nih14_key(n)][:40], y))
        assert p["gap"] == pytest.approx(p["auroc"] - p["chexnet_auroc"])
    s = res["summary"]
    assert s["mean_paired_gap_8"] == pytest.approx(np.mean([res["findings"][n]["paired"]["gap"] for n in BOX_NAMES]))
    lo, hi = s["mean_paired_gap_8_ci95"]
    assert lo < s["mean_paired_gap_8"] < hi


def test_split_is_by_patient_and_seeded():
    recs = [_rec(i, patient=i // 3) for i in range(90)]
    a, b = make_split(recs, seed=0), make_split(recs, seed=0)
    assert a == b and a != make_split(recs, seed=1)
    assert not set(a["train"]["patients"]) & set(a["val"]["patients"])
    assert len(a["train"]["images"]) + len(a["val"]["images"]) == 90
    assert 15 <= len(a["val"]["images"]) <= 21


def test_tuning_threshold_and_bar():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(30, bool), np.zeros(70, bool)]
    good = np.where(y, rng.uniform(0.4, 1.0, 100), rng.uniform(0.0, 0.6, 100))
    weak = rng.random(100)
    few = np.r_[np.ones(5, bool), np.zeros(95, bool)]
    peaks = [_peak(score=0.5)] * 100
    loc_ok = {"sensitivity": {"1": 0.6}, "score_at": {"1": 0.3}}
    loc_bad = {"sensitivity": {"1": 0.1}, "score_at": {"1": 0.3}}
    ch = choose_thresholds({"a": y, "b": y, "c": few, "d": y}, {"a": good, "b": weak, "c": good, "d": good},
                           {k: peaks for k in "abcd"}, {"a": loc_ok, "b": None, "c": None, "d": loc_bad})
    assert ch["a"]["enabled"] and ch["a"]["auroc"] >= BAR["min_auroc"]
    assert 0.4 <= ch["a"]["threshold"] <= 0.7 and ch["a"]["heatmap_threshold"] == 0.3
    assert not ch["b"]["enabled"]  # AUROC ~0.5
    assert not ch["c"]["enabled"]  # 5 positives < 10
    assert not ch["d"]["enabled"]  # localization below the bar
    s, t = good, ch["a"]["threshold"]
    j = (s[y] >= t).mean() + (s[~y] < t).mean() - 1
    assert ch["a"]["youden_j"] == pytest.approx(j)
    assert all(j >= (s[y] >= u).mean() + (s[~y] < u).mean() - 1 - 1e-12 for u in np.unique(s))
    card = {"labels": ["a", "b", "z"], "thresholds": {"a": 0.5, "b": 0.5, "z": 0.5}, "enabled": {"a": False, "b": True, "z": False}}
    new = apply_to_card(card, {k: ch[k] for k in ("a", "b")}, "test data")
    assert new["enabled"] == {"a": True, "b": False, "z": False} and new["thresholds"]["z"] == 0.5
    assert new["tuning"]["untuned"] == ["z"] and card["enabled"]["b"] is True  # the input is not modified


# --- `cxrkit eval` end to end on real nih14 files and on COCO ------------------------------------

@pytest.fixture(scope="module")
def nih_small(tmp_path_factory):
    from conftest import SHARED_DATA

    NIH = SHARED_DATA / "nih14"
    if not (NIH / "labels.json").is_file():
        pytest.skip(f"{NIH} not present (set CXRKIT_SHARED_DATA)")
    recs = json.loads((NIH / "labels.json").read_text())
    pick = [r for r in recs if r["boxes"] and r.get("chexnet_test_probs")][:6] + [r for r in recs if r["labels"] == "No Finding"][:4]
    out = tmp_path_factory.mktemp("nih")
    (out / "images").mkdir()
    for r in pick:
        shutil.copy(NIH / "images" / r["image"], out / "images" / r["image"])
    (out / "labels.json").write_text(json.dumps(pick))
    return out


def test_cli_eval_nih14_and_tune(nih_small, tmp_path, capsys):
    from cxrkit.cli import main

    rc = main(["eval", str(nih_small / "images"), str(nih_small / "labels.json"), "--model", "cxr-probe",
               "--out", str(tmp_path / "m.json"), "--tune-thresholds", "--card-out", str(tmp_path / "card.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Cardiomegaly" in out and "CheXNet" in out and "loc@1FP" in out
    res = json.loads((tmp_path / "m.json").read_text())
    n_chex = sum(r.chexnet is not None for r in load_nih14(nih_small))
    assert res["format"] == "nih14" and res["n_evaluated"] == 10 and res["n_paired"] == n_chex >= 6
    assert res["label_match"]["Effusion"] == "pleural_effusion"
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["name"] == "cxr-probe" and "tuning" in card and card["tuning"]["bar"] == BAR
    assert set(card["tuning"]["per_label"]) <= set(card["labels"])
    assert all(not card["enabled"][k] for k in card["tuning"]["per_label"])  # 10 images: under the 10-positive bar
    recs = load_nih14(nih_small)
    assert len(recs) == 10 and sum(len(r.boxes) for r in recs) >= 6


def test_cli_eval_nih14_split_part(nih_small, tmp_path, capsys):
    from cxrkit.cli import main

    recs = load_nih14(nih_small)
    split = make_split(recs, seed=0)
    (tmp_path / "split.json").write_text(json.dumps(split))
    assert main(["eval", str(nih_small / "images"), str(nih_small / "labels.json"), "--model", "cxr-probe",
                 "--split", str(tmp_path / "split.json"), "--part", "val", "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["n_images"] == len(split["val"]["images"])
    with pytest.raises(ValueError, match="no part 'test'"):
        main(["eval", str(nih_small / "images"), str(nih_small / "labels.json"), "--model", "cxr-probe",
              "--split", str(tmp_path / "split.json"), "--part", "test"])


def test_cli_eval_coco_still_works_and_tunes(tmp_path, capsys):
    from cxrkit.cli import main
    from cxrkit.synth import procedural_chest
    from cxrkit.synth.coco import write_coco_set

    bgs = [procedural_chest(np.random.default_rng(i), (192, 160)) for i in range(2)]
    ann = write_coco_set(bgs, tmp_path / "set", per_background=4, seed=3, labels=("nodule", "cardiomegaly"))
    assert main(["eval", str(tmp_path / "set" / "images"), str(ann), "--model", "cxr-probe",
                 "--out", str(tmp_path / "m.json"), "--tune-thresholds", "--card-out", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "sens@1FP" in out and "nodule" in out
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["n_images"] == 8 and res["findings"]["nodule"]["evaluated"]
    assert json.loads((tmp_path / "c.json").read_text())["tuning"]["data"].endswith("annotations.json")


@dataclass
class _Pred:
    findings: dict = field(default_factory=dict)
    error: object = None
