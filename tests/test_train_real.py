"""Real-data training: targets and masks from NIH-style records, the patient subset, resumable fit."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cxrkit.labels import FINDING_KEYS  # noqa: E402
from cxrkit.training.fit import fit, masked_bce, masked_heatmap_focal_loss  # noqa: E402
from cxrkit.training.nih14 import TRAINED_KEYS, Nih14Record  # noqa: E402
from cxrkit.training.real import RealSamples  # noqa: E402

S = 64
LABELS = list(FINDING_KEYS)
K = len(LABELS)


def _recs():
    box = ("Effusion", 600.0, 500.0, 900.0, 800.0)  # 1024^2 pixels
    return [
        Nih14Record("a.jpg", "1", "PA", ("Effusion", "Nodule"), [box], {"Effusion": 0.8, "Pneumonia": 0.2, "Consolidation": 0.6}, 0.4),
        Nih14Record("b.jpg", "2", "PA", (), [], None, 0.4),
        Nih14Record("c.jpg", "3", "AP", ("Cardiomegaly",), [], None, 0.4),
        Nih14Record("d.jpg", "3", "AP", ("Pneumothorax",), [("Pneumothorax", 100.0, 100.0, 400.0, 500.0)], None, 0.4),
    ]


@pytest.fixture(scope="module")
def cache():
    rng = np.random.default_rng(0)
    return (rng.random((4, S, S)) * 120 + 40).astype(np.uint8)


def test_targets_and_masks(cache):
    rs = RealSamples(cache, _recs(), LABELS, TRAINED_KEYS, 8, 0.5, 0.25, augment=False, chexnet_weight=0.5)
    x, heat, hmask, present, pmask = rs.sample(0, np.random.default_rng(0))
    i = {k: j for j, k in enumerate(LABELS)}
    assert x.shape == (1, S, S) and heat.shape == (K, 8, 8)
    np.testing.assert_allclose(x[0], (cache[0] / 255.0 - 0.5) / 0.25, atol=1e-6)  # the inference input
    assert present[i["pleural_effusion"]] == pytest.approx(0.5 * 1 + 0.5 * 0.8)
    assert present[i["consolidation"]] == pytest.approx(0.5 * 0.6)  # max of Pneumonia / Consolidation probs
    assert present[i["nodule"]] == 1.0 and present[i["mass"]] == 0.0
    assert set(np.flatnonzero(pmask)) == {i[k] for k in TRAINED_KEYS}  # 13 supervised, 16 untrained
    # boxed effusion: supervised heatmap with its peak at the box centre (750, 650)/1024*64/8 -> cell (5, 5)
    assert hmask[i["pleural_effusion"]] == 1 and heat[i["pleural_effusion"], 5, 5] == 1.0
    # nodule positive without a box: its heatmap is not supervised; absent findings are (all zero)
    assert hmask[i["nodule"]] == 0 and hmask[i["atelectasis"]] == 1 and heat[i["atelectasis"]].max() == 0
    assert hmask[i["tuberculosis"]] == 0  # not an NIH label


def test_augmented_boxes_follow_the_image(cache):
    rs = RealSamples(cache, _recs(), LABELS, TRAINED_KEYS, 8, 0.5, 0.25, p_synth=1.0, renderers=["gaussian"])
    rng = np.random.default_rng(1)
    i = {k: j for j, k in enumerate(LABELS)}
    for _ in range(6):
        x, heat, hmask, present, pmask = rs.sample(3, rng)
        assert np.isfinite(x).all() and x.shape == (1, S, S)
        assert present[i["nodule"]] + present[i["mass"]] >= 1  # the synthetic lesion(s)
        if hmask[i["pneumothorax"]]:
            peak = np.unravel_index(np.argmax(heat[i["pneumothorax"]]), (8, 8))
            # the box (100..400, 100..500 of 1024) moves by at most ~10 % scale / 6 deg / 5 % shift
            assert 0 <= peak[1] <= 4 and 0 <= peak[0] <= 5
            assert heat[i["pneumothorax"]].max() == 1.0


def test_masked_losses_ignore_masked_maps():
    z = torch.zeros(2, 3, 4, 4)
    t = torch.zeros(2, 3, 4, 4)
    t[0, 0, 1, 1] = 1.0
    m = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    base = masked_heatmap_focal_loss(z, t, m)
    z2 = z.clone()
    z2[:, 2] = 10.0  # masked maps: any value, same loss
    z2[1] = -10.0
    assert masked_heatmap_focal_loss(z2, t, m) == pytest.approx(base.item())
    lg = torch.tensor([[2.0, -1.0], [0.5, 9.0]])
    tg = torch.tensor([[1.0, 0.0], [0.3, 0.0]])
    mk = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    want = torch.nn.functional.binary_cross_entropy_with_logits(lg[mk > 0], tg[mk > 0])
    assert masked_bce(lg, tg, mk) == pytest.approx(want.item(), rel=1e-6)


def test_fit_resumes_to_the_same_weights(cache, tmp_path):
    from cxrkit.nets import create_net

    torch.set_num_threads(1)
    rs = RealSamples(cache, _recs(), LABELS, TRAINED_KEYS, 8, 0.5, 0.25, p_synth=0.5)

    def run(ckpt, stop_after=None):
        torch.manual_seed(0)
        net = create_net("cxrnet", num_classes=K, width=0.25)
        kw = dict(steps=6, batch_size=2, lr=1e-3, seed=0, ckpt_dir=ckpt, ckpt_every=2, warmup=2, log_every=100)
        if stop_after is not None:  # a first sitting that stops early (checkpointed)
            ema, r = fit(net, rs, [0, 1, 2, 3], **kw, max_minutes=0.0)
            assert not r["done"] and r["steps"] == 1
            torch.manual_seed(0)
            net = create_net("cxrnet", num_classes=K, width=0.25)
        return fit(net, rs, [0, 1, 2, 3], **kw)

    straight, r1 = run(tmp_path / "a")
    resumed, r2 = run(tmp_path / "b", stop_after=1)
    assert r1["done"] and r2["done"] and r1["steps"] == r2["steps"] == 6
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    with pytest.raises(ValueError, match="another configuration"):
        fit(create_net("cxrnet", num_classes=K, width=0.25), rs, [0, 1, 2, 3], steps=7, batch_size=2,
            ckpt_dir=tmp_path / "a")
