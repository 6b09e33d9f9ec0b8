"""The bundled model's card claims, re-measured from the package at test time.

A card's figures are claims; trusting them by a field's value (``measured_by`` starting with some
string) proves nothing. Here the figures the card records for the nih14 validation part (per-label
AUROC and positives in ``tuning.per_label``, the same in ``metrics.nih14_val.per_finding``) are
measured again the way the card says they were (``cxrkit.evaluate.evaluate_nih14`` through a
Detector with every label enabled and peaks down to the eval floor, fp32, ONNX Runtime) on the
patient split the card names, and must agree to the card's rounding. Needs ../shared/data/nih14;
a card without such figures has nothing to check here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import cxrkit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_card():
    if "cxr29-demo" not in cxrkit.list_models():
        pytest.skip("cxr29-demo is not bundled")
    pkg = cxrkit.models.load_model_package("cxr29-demo")
    raw = pkg.card.raw
    if "tuning" not in raw or "split" not in raw.get("training", {}):
        pytest.skip("cxr29-demo's card records no nih14 validation figures to re-measure")
    return pkg


def test_card_validation_figures_are_reproduced(demo_card, shared_data):
    from cxrkit.evaluate import eval_card_package, evaluate_nih14

    root = shared_data / "nih14"
    if not (root / "labels.json").is_file():
        pytest.skip(f"{root} not found")
    raw = demo_card.card.raw
    split = REPO / raw["training"]["split"]["manifest"]
    _, measured = eval_card_package(demo_card)
    with cxrkit.Detector(measured, device="cpu", backend="onnxruntime", boxes="all", batch_size=16) as det:
        res, chosen = evaluate_nih14(det, root / "images", root / "labels.json", split, "val", tune=True)
    tuned = raw["tuning"]["per_label"]
    assert set(tuned) == set(chosen), (sorted(tuned), sorted(chosen))
    for lab, claim in tuned.items():
        got = chosen[lab]
        assert got["n_pos"] == claim["n_pos"], lab
        if claim.get("auroc") is not None:
            assert got["auroc"] == pytest.approx(claim["auroc"], abs=2e-4), lab
        assert got["enabled"] == claim["enabled"] == raw["enabled"][lab], lab
        assert round(got["threshold"], 4) == pytest.approx(raw["thresholds"][lab], abs=2e-4), lab
    per = raw.get("metrics", {}).get("nih14_val", {}).get("per_finding", {})
    for name, claim in per.items():
        m = res["findings"][name]
        assert m["n_pos"] == claim["n_pos"], name
        if claim.get("auroc") is not None:
            assert m["auroc"] == pytest.approx(claim["auroc"], abs=2e-3), name
