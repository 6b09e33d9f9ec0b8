"""The bundled cxr29-demo through the Detector on real NIH radiographs: int8 out of the box (the
CPU form the card ships) agrees with fp32, and the card's operating points are what it reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import cxrkit

from conftest import SHARED_DATA  # noqa: E402

NIH = SHARED_DATA / "nih14"
SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def _images(n: int = 6) -> list[str]:
    if (NIH / "images").is_dir():
        return sorted(str(p) for p in (NIH / "images").glob("*.jpg"))[:n]
    found = sorted(str(p) for p in SAMPLES.glob("*.png"))[:n] + sorted(str(p) for p in SAMPLES.glob("*.jpg"))[:n]
    if not found:
        pytest.skip("no radiographs to run on")
    return found[:n]


@pytest.fixture(scope="module")
def fp32():
    if "cxr29-demo" not in cxrkit.list_models():
        pytest.skip("cxr29-demo is not bundled")
    with cxrkit.Detector.from_pretrained("cxr29-demo", device="cpu", boxes="all") as det:
        yield det.predict(_images())


def test_int8_out_of_the_box_agrees_with_fp32(fp32):
    with cxrkit.Detector.from_pretrained("cxr29-demo", device="cpu", precision="int8", boxes="all") as det:
        assert det.runner.precision.value == "int8"
        q = det.predict(_images())
    card = cxrkit.models.load_model_package("cxr29-demo").card
    for a, b in zip(fp32, q):
        assert a.error is None and b.error is None
        sa = np.array([a.findings[k].score for k in card.labels])
        sb = np.array([b.findings[k].score for k in card.labels])
        assert np.abs(sa - sb).max() < 0.05, np.abs(sa - sb).max()


def test_decisions_follow_the_card(fp32):
    card = cxrkit.models.load_model_package("cxr29-demo").card
    for p in fp32:
        for k in card.labels:
            f = p.findings[k]
            want = bool(card.raw["enabled"][k] and f.score >= card.raw["thresholds"][k])
            assert f.positive == want, k
            if not card.raw["enabled"][k]:
                assert len(f.points_xy) == 0, f"disabled {k} reported peaks"
