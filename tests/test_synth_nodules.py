"""cxrkit.synth.nodules: five different renderers, deterministic, boxed, and excludable by name."""

from __future__ import annotations

import numpy as np
import pytest

from cxrkit.synth.nodules import NODULE_RENDERERS, insert_nodule, nodule_attenuation

LUNGS = np.array([[30, 40, 150, 200], [170, 40, 290, 200]], np.float32)


def _bg(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(0.3 + 0.02 * rng.standard_normal((256, 320)), 0, 1).astype(np.float32)


def test_five_renderers():
    assert set(NODULE_RENDERERS) == {"sphere", "gaussian", "lobulated", "spiculated", "calcified"}


@pytest.mark.parametrize("name", sorted(NODULE_RENDERERS))
def test_renderer_is_deterministic_boxed_and_local(name):
    outs = []
    for _ in range(2):
        img = _bg()
        les = insert_nodule(img, LUNGS, 0.8, np.random.default_rng(7), renderers=[name], d_mm=(10, 20))
        outs.append((img, les))
    (a, la), (b, lb) = outs
    np.testing.assert_array_equal(a, b)
    assert la == lb and la.renderer == name and la.label == "nodule" and 10 <= la.size_mm <= 20
    x0, y0, x1, y1 = la.box_xyxy
    cx, cy = la.center_xy
    assert x0 <= cx <= x1 and y0 <= cy <= y1
    # box about the nodule's diameter in pixels (0.8 mm/px), never the whole image
    d_px = la.size_mm / 0.8
    assert 0.4 * d_px <= x1 - x0 <= 1.6 * d_px and 0.4 * d_px <= y1 - y0 <= 1.6 * d_px
    diff = a - _bg()
    assert diff.min() >= -1e-6, "a nodule only adds density"
    assert diff[int(cy), int(cx)] > 0.02, "visible at its centre"
    far = np.ones_like(diff, bool)
    far[max(0, int(y0 - 3 * d_px)):int(y1 + 3 * d_px), max(0, int(x0 - 3 * d_px)):int(x1 + 3 * d_px)] = False
    assert np.abs(diff[far]).max() == 0, "drawn only near its box"


def test_renderers_differ_in_profile():
    """Same size and seed, different renderers: the attenuation maps are not the same shape."""
    maps = {}
    for name in NODULE_RENDERERS:
        a, _ = nodule_attenuation(name, 20.0, 0.5, np.random.default_rng(3))
        maps[name] = a / a.max()
    names = sorted(maps)
    for i, p in enumerate(names):
        for q in names[i + 1:]:
            assert np.abs(maps[p] - maps[q]).max() > 0.1, (p, q)
    # the spiculated one reaches beyond its body; the Gaussian has no plateau
    sp = maps["spiculated"]
    c = sp.shape[0] // 2
    R = 20.0 / 0.5 / 2
    ring = np.hypot(*np.mgrid[-c:c + 1, -c:c + 1]) > 1.2 * R
    assert sp[ring].max() > 0.1
    g = maps["gaussian"]
    assert (g > 0.95).sum() < (maps["sphere"] > 0.95).sum()


def test_excluded_renderer_is_never_used_and_unknown_is_refused():
    rng = np.random.default_rng(0)
    used = {insert_nodule(_bg(), LUNGS, 0.8, rng, renderers=["gaussian", "calcified"]).renderer for _ in range(20)}
    assert used == {"gaussian", "calcified"}
    with pytest.raises(ValueError, match="unknown nodule renderers"):
        insert_nodule(_bg(), LUNGS, 0.8, rng, renderers=["cube"])


def test_big_ones_are_masses_and_border_is_safe():
    rng = np.random.default_rng(1)
    les = insert_nodule(_bg(), LUNGS, 0.8, rng, d_mm=(35, 40))
    assert les.label == "mass"
    img = _bg()
    les = insert_nodule(img, LUNGS, 0.8, rng, d_mm=(20, 25), center_xy=(2.0, 3.0))  # clipped at the corner
    assert les.box_xyxy[0] >= 0 and les.box_xyxy[1] >= 0
