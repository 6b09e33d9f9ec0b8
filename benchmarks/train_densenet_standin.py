"""Train a CheXNet-style DenseNet-121 from scratch on nih14's train patients: a stand-in for the int8 check.

    nice -n 19 python benchmarks/train_densenet_standin.py --work /tmp/dn121-standin --minutes 65
    # resumable: rerun the same command and it continues from --work/last.pt

Why: real CheXNet weights are not reachable here, and the int8 accuracy guard needs a network whose
convolutions were trained (activation statistics, score spread), not random ones. This is not a
product and its weights are not committed: 751 radiographs from scratch on a 2-core CPU give a weak
classifier, which is what it is used for (the int8 vs fp32 comparison on the same weights).

What: cxrkit's ``densenet_cam`` (torchvision's DenseNet-121 key for key, tests/test_convert.py),
3 channels with ImageNet mean/std inside the net (as CheXNet feeds torchvision), 14 NIH labels in
CheXNet's order, trained on the ``train`` patients of models/cxr29-demo/split.json at 224²:
images from cxrkit's nih14 cache at 240² (the Detector's own antialiased resize; nih14 images are
all 1024² so this is a plain resize), random 224² crops and mild brightness/contrast jitter, no
flips (laterality matters). Targets: the NIH labels, mixed half and half with the CheXNet
probabilities that nih14 records for 405 of the train images (soft teacher targets, as
cxrkit.training.real does; never for val). AdamW, BCE, cosine learning rate over a WALL-CLOCK budget (the box is
shared: the schedule follows elapsed training time, not a step count). The val patients are scored
each epoch at 224² (the 224² cache: the full image, as the package's centre crop of a square
image) and the best epoch by mean AUROC is kept.

Writes ``--work/chexnet-standin.pth.tar``: ``{"epoch", "state_dict"}`` with DataParallel keys
(``module.features...``, ``module.classifier.0.weight``: arnoweng/CheXNet's layout), ready for
``cxrkit import-model ... --arch densenet121``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
NIH14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
         "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def log(msg: str) -> None:
    print(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), msg, flush=True)


def auroc(s: np.ndarray, y: np.ndarray) -> float | None:
    from cxrkit.eval import auroc as _a

    return _a(s, y)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/dn121-standin")
    ap.add_argument("--minutes", type=float, default=65.0, help="wall-clock training budget (all resumes together)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chexnet-weight", type=float, default=0.5,
                    help="weight of the recorded CheXNet probabilities in the train targets (0: labels only)")
    ap.add_argument("--split", default=str(REPO / "models" / "cxr29-demo" / "split.json"))
    a = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from cxrkit.nets import create_net
    from cxrkit.training.nih14 import image_cache, load_nih14, load_or_make_split

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    recs = load_nih14()
    split = load_or_make_split(recs, a.split)
    by_img = {r.image: i for i, r in enumerate(recs)}
    tr = np.array([by_img[i] for i in split["train"]["images"]])
    va = np.array([by_img[i] for i in split["val"]["images"]])
    y = np.array([[1.0 if n in r.names else 0.0 for n in NIH14] for r in recs], np.float32)  # (N, 14) NIH labels
    # training targets: (1 - w) label + w CheXNet probability where the image has one (405 of the
    # 751 train images; cxrkit.training.real does the same), the label elsewhere; val uses labels only
    w = a.chexnet_weight
    t = np.array([[(1 - w) * y[i, k] + w * r.chexnet[n] if r.chexnet else y[i, k] for k, n in enumerate(NIH14)]
                  for i, r in enumerate(recs)], np.float32)
    c240, c224 = image_cache(recs, None, 240), image_cache(recs, None, 224)  # (N, s, s) uint8
    log(f"train {len(tr)} images, val {len(va)} (patient split {a.split})")

    net = create_net("densenet_cam", num_classes=14, in_channels=3, channel_mean=MEAN, channel_std=STD)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=a.wd)
    state = {"epoch": 0, "elapsed_s": 0.0, "best": -1.0, "history": []}
    last = work / "last.pt"
    if last.is_file():
        ck = torch.load(last, weights_only=True)
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["opt"])
        state = json.loads(ck["state"])
        torch.set_rng_state(ck["rng"])
        log(f"resumed at epoch {state['epoch']}, {state['elapsed_s'] / 60:.1f} min trained")
    budget = a.minutes * 60.0
    rng = np.random.default_rng(1000 + state["epoch"])

    def lr_at(t: float) -> float:
        warm = 0.03 * budget
        if t < warm:
            return a.lr * max(t / warm, 0.05)
        return a.lr * 0.5 * (1 + np.cos(np.pi * min((t - warm) / (budget - warm), 1.0)))

    def evaluate() -> tuple[float, list]:
        net.eval()
        out = []
        with torch.no_grad():
            for s in range(0, len(va), 32):
                x = torch.from_numpy(np.asarray(c224[va[s:s + 32]], np.float32) / 255.0)[:, None]  # (B, 1, 224, 224)
                out.append(net(x)[0].numpy())
        p = np.concatenate(out)
        aucs = [auroc(p[:, k], y[va, k]) for k in range(14)]
        net.train()
        return float(np.nanmean([v for v in aucs if v is not None])), aucs

    net.train()
    while state["elapsed_s"] < budget:
        order = rng.permutation(tr)
        t_ep, n_img, losses = time.time(), 0, []
        for s in range(0, len(order) - a.batch + 1, a.batch):
            t0 = time.time()
            idx = np.sort(order[s:s + a.batch])
            raw = np.asarray(c240[idx], np.float32) / 255.0  # (B, 240, 240)
            ox, oy = rng.integers(0, 17, size=(2, len(idx)))
            x = np.stack([raw[i, oy[i]:oy[i] + 224, ox[i]:ox[i] + 224] for i in range(len(idx))])  # (B, 224, 224)
            g = rng.uniform(0.85, 1.15, (len(idx), 1, 1)).astype(np.float32)  # contrast
            b = rng.uniform(-0.06, 0.06, (len(idx), 1, 1)).astype(np.float32)  # brightness
            x = np.clip((x - 0.5) * g + 0.5 + b, 0.0, 1.0)
            xt, yt = torch.from_numpy(x)[:, None], torch.from_numpy(t[idx])
            for grp in opt.param_groups:
                grp["lr"] = lr_at(state["elapsed_s"])
            logits, _ = net(xt)
            loss = F.binary_cross_entropy_with_logits(logits, yt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            n_img += len(idx)
            state["elapsed_s"] += time.time() - t0
            if state["elapsed_s"] >= budget:
                break
        state["epoch"] += 1
        t_eval = time.time()
        m, aucs = evaluate()
        state["elapsed_s"] += time.time() - t_eval
        rate = n_img / max(time.time() - t_ep, 1e-9)
        state["history"].append({"epoch": state["epoch"], "loss": float(np.mean(losses)), "val_mean_auroc": m,
                                 "val_auroc": dict(zip(NIH14, aucs)), "min": state["elapsed_s"] / 60})
        log(f"epoch {state['epoch']}: loss {np.mean(losses):.4f}, {rate:.2f} img/s, lr {lr_at(state['elapsed_s']):.2e}, "
            f"{state['elapsed_s'] / 60:.1f}/{a.minutes:.0f} min; val mean AUROC {m:.3f} "
            + " ".join(f"{n[:5]} {v:.2f}" for n, v in zip(NIH14, aucs) if v is not None))
        if m > state["best"]:
            state["best"] = m
            sd = {("module." + k.replace("classifier.", "classifier.0.")): v.clone()
                  for k, v in net.state_dict().items()}
            torch.save({"epoch": state["epoch"], "state_dict": sd}, work / "chexnet-standin.pth.tar.tmp")
            os.replace(work / "chexnet-standin.pth.tar.tmp", work / "chexnet-standin.pth.tar")
            log(f"  kept as best (epoch {state['epoch']})")
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "state": json.dumps(state),
                    "rng": torch.get_rng_state()}, work / "last.pt.tmp")
        os.replace(work / "last.pt.tmp", last)
        rng = np.random.default_rng(1000 + state["epoch"])
    (work / "history.json").write_text(json.dumps(state, indent=1) + "\n")
    log(f"done: best val mean AUROC {state['best']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
