"""cxrkit.synth: deterministic lesion insertion with honest ground-truth boxes."""

from __future__ import annotations

import numpy as np
import pytest

from cxrkit.labels import FINDINGS
from cxrkit.synth import SYNTH_LABELS, load_lungbox, procedural_chest, split_by_patient, synthesize


@pytest.fixture(scope="module")
def backgrounds(shared_data):
    bgs = load_lungbox(shared_data / "lungbox", max_side=512)
    assert len(bgs) >= 40
    return bgs


@pytest.fixture(scope="module")
def procedural():
    return procedural_chest(np.random.default_rng(5), (384, 320))


def test_labels_are_findings():
    assert set(SYNTH_LABELS) <= set(FINDINGS)
    assert {"nodule", "mass", "consolidation", "pleural_effusion", "pneumothorax", "cardiomegaly"} <= set(SYNTH_LABELS)


def test_procedural_is_deterministic_and_sane():
    a = procedural_chest(np.random.default_rng(1), (256, 200))
    b = procedural_chest(np.random.default_rng(1), (256, 200))
    np.testing.assert_array_equal(a.image, b.image)
    assert a.image.shape == (256, 200) and a.image.dtype == np.float32
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    x0, y0, x1, y1 = a.lungs_xyxy[0]
    assert a.image[int(y0):int(y1), int(x0):int(x1)].mean() < a.image.mean() + 0.1


def test_split_by_patient_is_disjoint(backgrounds):
    parts = split_by_patient(backgrounds, seed=0)
    pats = {k: {b.patient for b in v} for k, v in parts.items()}
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
    assert sum(len(v) for v in parts.values()) == len(backgrounds)
    assert all(len(v) >= 5 for v in parts.values())
    assert split_by_patient(backgrounds, seed=0)["test"][0].source == parts["test"][0].source


@pytest.mark.parametrize("label", SYNTH_LABELS)
def test_lesion_deterministic_box_and_locality(label, backgrounds, procedural):
    for bg in (backgrounds[3], backgrounds[17], procedural):
        img1, les1 = synthesize(bg, [label], seed=11)
        img2, les2 = synthesize(bg, [label], seed=11)
        np.testing.assert_array_equal(img1, img2)
        assert les1 == les2
        (les,) = les1
        assert les.label == label
        h, w = bg.hw
        x0, y0, x1, y1 = les.box_xyxy
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert img1.dtype == np.float32 and 0 <= img1.min() and img1.max() <= 1
        diff = np.abs(img1 - bg.image)
        inside = diff[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
        assert inside.max() > 0.02, f"{label}: no visible change inside its box"
        # Nothing changes far outside the box (a margin of 10% of the box size + 3 px for blur tails).
        mx, my = 0.1 * (x1 - x0) + 3, 0.1 * (y1 - y0) + 3
        far = np.ones_like(diff, bool)
        far[max(0, int(y0 - my)):int(np.ceil(y1 + my)), max(0, int(x0 - mx)):int(np.ceil(x1 + mx))] = False
        assert diff[far].max(initial=0) < 0.01, f"{label}: changed pixels far outside its box"
        # Most of the change is inside the box.
        assert inside.sum() >= 0.8 * diff.sum()


def test_different_seeds_differ(backgrounds):
    a, la = synthesize(backgrounds[0], ["nodule"], seed=1)
    b, lb = synthesize(backgrounds[0], ["nodule"], seed=2)
    assert la != lb and not np.array_equal(a, b)


def test_several_lesions_and_unknown_label(backgrounds):
    img, les = synthesize(backgrounds[1], ["nodule", "pleural_effusion", "cardiomegaly"], seed=3)
    assert [x.label for x in les] == ["nodule", "pleural_effusion", "cardiomegaly"]
    with pytest.raises(ValueError, match="renderable findings: nodule"):
        synthesize(backgrounds[1], ["rib_fracture"], seed=0)
