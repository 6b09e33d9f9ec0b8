"""cxrkit.training on synthetic data: targets sit on the lesions, the losses and peak picking behave."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cxrkit.labels import FINDING_KEYS  # noqa: E402
from cxrkit.synth import SYNTH_LABELS, procedural_chest  # noqa: E402
from cxrkit.training.data import SampleStream, augment_background, make_sample  # noqa: E402
from cxrkit.training.loop import choose_operating_points, heatmap_focal_loss, local_peaks  # noqa: E402


@pytest.fixture(scope="module")
def bank():
    rng = np.random.default_rng(0)
    return [augment_background(procedural_chest(rng, (320, 288)), rng, 256) for _ in range(3)]


def test_sample_targets_peak_inside_lesion_boxes(bank):
    rng = np.random.default_rng(1)
    labels, trained = list(FINDING_KEYS), list(SYNTH_LABELS)
    n_lesions = 0
    for _ in range(12):
        x, heat, present, boxes = make_sample(bank, rng, labels, trained, (128, 128), 0.5, 0.25, 8)
        assert x.shape == (1, 128, 128) and heat.shape == (29, 16, 16) and present.shape == (29,)
        assert set(np.flatnonzero(present)) == {b[0] for b in boxes}
        assert heat[[k for k in range(29) if not present[k]]].max(initial=0) == 0
        for k, x0, y0, x1, y1 in boxes:
            n_lesions += 1
            assert -1 <= x0 < x1 <= 129 and -1 <= y0 < y1 <= 129
            ci, cj = int((y0 + y1) / 2 / 8), int((x0 + x1) / 2 / 8)
            assert heat[k, min(ci, 15), min(cj, 15)] == 1.0
    assert n_lesions >= 5


def test_sample_stream_is_seeded_and_replays(bank):
    s = SampleStream(bank, FINDING_KEYS, SYNTH_LABELS, (64, 64), 0.5, 0.25, 8, seed=3, replay=1)
    a = [t[0] for _, t in zip(range(6), s.iterate(0))]
    b = [t[0] for _, t in zip(range(6), s.iterate(0))]
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_focal_loss_prefers_the_target():
    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, 3, 4] = 1.0
    good = torch.full((1, 1, 8, 8), -6.0)
    good[0, 0, 3, 4] = 6.0
    bad = torch.full((1, 1, 8, 8), -6.0)
    bad[0, 0, 6, 1] = 6.0
    assert heatmap_focal_loss(good, target) < 0.01 < heatmap_focal_loss(bad, target)


def test_local_peaks_and_operating_points():
    p = np.zeros((8, 8), np.float32)
    p[2, 3], p[6, 6], p[6, 5] = 0.9, 0.5, 0.4
    sc, cells = local_peaks(p, 0.01)
    np.testing.assert_allclose(sc, [0.9, 0.5])
    np.testing.assert_array_equal(cells, [[2, 3], [6, 6]])
    # Two images: finding 0 present in the first (box around cell (2, 3)), absent in the second.
    probs = np.array([[0.9], [0.1]], np.float32)
    heats = np.stack([p[None], np.zeros((1, 8, 8), np.float32)])
    boxes = [[(0, 20.0, 10.0, 36.0, 26.0)], []]
    ops = choose_operating_points(probs, heats, boxes, ["nodule"], ["nodule"], stride=8)
    assert ops["nodule"]["auroc"] == 1.0 and ops["nodule"]["enabled"]
    assert 0.1 < ops["nodule"]["threshold"] <= 0.9
