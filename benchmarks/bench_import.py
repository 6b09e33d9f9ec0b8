"""An imported CheXNet-style DenseNet-121 through cxrkit vs the same model in torch eager, same run.

    python benchmarks/bench_import.py --prepare-only            # import + quantize (slow; cached in --work)
    /work/bin/quiet-run python benchmarks/bench_import.py        # the timings (uses the cache)

The model: torchvision's DenseNet-121 in arnoweng/CheXNet's checkpoint layout (DataParallel keys,
``Sequential(Linear, Sigmoid)`` classifier, ``{"state_dict": ...}``), 14 NIH labels, ImageNet
normalisation on 3 channels, converted by ``cxrkit.convert.import_model`` at 224² and 512².
Real CheXNet weights are not reachable here, so the benchmark builds a stand-in (``checkpoint``):
tests/fixtures/convert/weights_gen.py's random convolutions, BatchNorm statistics recalibrated on
the calibration radiographs, and a classifier fitted to the NIH labels of the images outside the
held-out set. Speed does not depend on the weights; int8 accuracy does (on the activations' ranges
and on how far apart the scores of different images are), which is why the stand-in is not plain
noise: with purely random weights every image scores within ~0.05 logit of the others and any
threshold sits inside int8's noise. Its accuracy is measured as agreement with fp32, below.

int8: ``cxrkit.quant.quantize`` (what ``cxrkit quantize`` runs), calibrated on ``--calib`` real
NIH ChestX-ray14 radiographs and guarded on ``--holdout`` others from different patients
(../shared/data/nih14), with the accuracy guard ON: per label, >= 99 % of the int8 decisions must
agree with fp32 at the card's thresholds. Random weights have no meaningful operating point, so
each label's threshold is set to the median fp32 score on the calibration images: half the
decisions are positive, the hardest case for agreement.

Timed (best of ``--repeat`` per cell, interleaved rounds, process CPU time alongside):
- model only, preprocessed nih14 batches of 1 and 16: torch eager (the torchvision forward:
  replicate, normalise, features, pool, classifier; torch's default threads), ONNX Runtime fp32 and
  int8 (the CPU form, ``Detector(precision="int8")``'s graph; intra-op threads = cores). cxrkit's
  graphs also compute the 14 CAM heatmaps; the torch baseline does not.
- end to end at 512², from ``--e2e-images`` 1024² JPEG files to scores: cxrkit
  ``Detector(batch_size=16)`` fp32 and int8 (decode, centre-crop resize, normalise, infer, CAM
  localization) vs the fair torch-eager baseline: a ``torch.utils.data.DataLoader`` with one
  worker per core doing torchvision's preprocessing (PIL decode, RGB, Resize(512) bilinear
  antialiased, CenterCrop, ToTensor, Normalize; written with PIL + numpy, torchvision does not
  import beside this torch), batches of 16, then the forward with torch's default threads.

Floors printed: the JPEG decode rate on all cores (Pillow), and the model-only rate of each variant
at batch 16 (end to end cannot beat its model).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from run_report import cpu_model  # benchmarks/ is this script's folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("CXRKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
FIX = REPO / "tests" / "fixtures" / "convert"
NIH14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
         "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
HEAD = ("cxrkit/classifier", "cxrkit/cam")  # cxrkit.convert.HEAD_NODES
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)




def nih14_split(n_calib: int, n_hold: int, n_e2e: int) -> tuple[list[str], list[str], list[str], list[str], dict]:
    """Image paths: calibration, held-out (disjoint patients), the rest (other patients, for fitting
    the benchmark model's classifier), the end-to-end set; and image name -> its NIH labels."""
    recs = json.loads((DATA / "nih14" / "labels.json").read_text())
    by_patient: dict[str, list[str]] = {}
    for r in sorted(recs, key=lambda r: r["image"]):
        by_patient.setdefault(str(r["patient"]), []).append(str(DATA / "nih14" / "images" / r["image"]))
    patients = sorted(by_patient)
    rng = np.random.default_rng(0)
    rng.shuffle(patients)
    calib, hold = [], []
    for p in patients:
        (calib if len(calib) < n_calib else hold).extend(by_patient[p])
    rest, hold = hold[n_hold:], hold[:n_hold]
    labels_of = {r["image"]: str(r["labels"]).split("|") for r in recs}
    e2e = sorted(str(p) for p in (DATA / "nih14" / "images").glob("*.jpg"))[:n_e2e]
    return calib[:n_calib], hold, rest, e2e, labels_of


def _weights_gen():
    spec = importlib.util.spec_from_file_location("weights_gen", FIX / "weights_gen.py")
    wg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wg)
    return wg


def checkpoint(work: Path, bn_images: list[str], fit_images: list[str], labels_of: dict[str, list[str]]) -> Path:
    """A CheXNet checkpoint in arnoweng's layout (written once): DenseNet-121 convolutions with
    weights_gen's random weights, BatchNorm running statistics recalibrated on ``bn_images`` (so
    activations have the statistics a trained network's have, which is what int8 calibration
    sees), and the classifier fitted (L2 logistic regression) to the NIH labels of ``fit_images``
    on those features, so scores spread across images the way a trained model's do."""
    import torch

    from cxrkit.io import load_item
    from cxrkit.nets import create_net
    from cxrkit.preprocess import Preprocessor

    p = work / "chexnet-bench.pth.tar"
    if p.is_file():
        return p
    work.mkdir(parents=True, exist_ok=True)
    net = create_net("densenet_cam", num_classes=len(NIH14), in_channels=3, channel_mean=MEAN.tolist(),
                     channel_std=STD.tolist())
    sd = net.state_dict()
    vals = _weights_gen().fill_state({k: list(v.shape) for k, v in sd.items()})
    net.load_state_dict({k: torch.from_numpy(v).reshape(sd[k].shape) for k, v in vals.items()})
    pre = Preprocessor((224, 224), 0.0, 1.0, fit="center_crop")

    def batches(paths, n=16):
        for i in range(0, len(paths), n):
            yield torch.from_numpy(pre.run([load_item(q, j) for j, q in enumerate(paths[i:i + n])]).batch)

    cache = work / "bench-features.npz"  # the slow part (hundreds of forwards), kept for reruns
    if cache.is_file():
        z = np.load(cache)
        net.load_state_dict({k: torch.from_numpy(z["bn:" + k]) for k in sd if "bn:" + k in z.files}, strict=False)
        feats = z["features"]
    else:
        net.eval()
        for m in net.modules():  # BN recalibration: cumulative batch statistics over bn_images
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
                m.train()
        with torch.no_grad():
            for x in batches(bn_images):
                net.feature_map(x)
        net.eval()
        with torch.no_grad():
            feats = torch.cat([net.feature_map(x).mean((2, 3)) for x in batches(fit_images)]).double().numpy()
        bn = {"bn:" + k: v.numpy() for k, v in net.state_dict().items() if "running" in k}
        np.savez(cache, features=feats, **bn)
    y = np.array([[1.0 if n in labels_of[Path(q).name] else 0.0 for n in NIH14] for q in fit_images])
    # logistic regression on the raw pooled features (one global scale, L2): per-feature
    # standardisation would give near-constant features huge weights, which no trained network has
    mu, scale = feats.mean(0), feats.std()
    z = (feats - mu) / scale
    w, b = np.zeros((z.shape[1], len(NIH14))), np.log((y.mean(0) + 1e-3) / (1 - y.mean(0) + 1e-3))
    for _ in range(1000):  # gradient descent on the mean BCE + L2
        pr = 1 / (1 + np.exp(-(z @ w + b)))
        w -= 1.0 * (z.T @ (pr - y) / len(z) + 1e-2 * w)
        b -= 1.0 * (pr - y).mean(0)
    # a trained classifier's logits spread over a few units across images: rescale to a median
    # per-label std of 1.5 (the fit's own scale depends on the L2 weight, not on the data)
    c = 1.5 / float(np.median((z @ w).std(axis=0)))
    w, b = w * c, b * c
    net.classifier.weight.data = torch.from_numpy((w / scale).T.astype(np.float32))
    net.classifier.bias.data = torch.from_numpy((b - (mu / scale) @ w).astype(np.float32))
    state = {("module.densenet121." + k.replace("classifier.", "classifier.0.")): v
             for k, v in net.state_dict().items()}
    torch.save({"epoch": 0, "state_dict": state}, p)
    return p


def prepare(size: int, work: Path, calib: list[str], hold: list[str], auto_keep: int, ckpt: Path,
            keep: list[str]) -> dict:
    """Import at ``size``², set median thresholds, quantize with the guard on; cached in work/."""
    from cxrkit import Detector
    from cxrkit.convert import import_model
    from cxrkit.models import load_model_package
    from cxrkit.quant import quantize

    root = work / f"chexnet-{size}"
    done = root / "prepared.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    pkg = import_model(ckpt, root, arch="densenet121", labels=NIH14, input_size=size,
                       normalize="imagenet", overwrite=True).package
    t_import = time.perf_counter() - t0
    with Detector(pkg, batch_size=16) as det:
        scores = np.array([[p.findings[k].score for k in pkg.card.labels] for p in det.predict(calib)])
    card = json.loads((root / "card.json").read_text())
    med = np.median(scores, axis=0)
    logit = np.log(np.clip(scores, 1e-7, 1 - 1e-7) / np.clip(1 - scores, 1e-7, 1))
    logit_std = float(np.median(logit.std(axis=0)))  # how far apart images score, per label
    card["thresholds"] = {k: float(np.clip(m, 1e-4, 1 - 1e-4)) for k, m in zip(pkg.card.labels, med)}
    card["heatmap_thresholds"] = dict(card["thresholds"])
    card["source"]["thresholds_from"] = f"median fp32 score on {len(calib)} nih14 calibration images (benchmark)"
    (root / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    t1 = time.perf_counter()
    res = quantize(load_model_package(root), calib, holdout=hold, precisions=("int8",), auto_keep_fp32=auto_keep,
                   keep_fp32=list(keep),
                   allow_accuracy_drop=True)
    rep = res.reports["int8_cpu"]
    agree = [v["decision_agreement"] for v in rep.per_finding.values() if v.get("decision_agreement") is not None]
    info = {"size": size, "root": str(root), "import_s": round(t_import, 1), "quantize_s": round(time.perf_counter() - t1, 1),
            "n_calib": len(calib), "n_holdout": len(hold), "median_logit_std": round(logit_std, 3),
            "guard_passed": bool(rep.passed),
            "guard_min_agreement": float(min(agree)) if agree else None,
            "guard_max_abs_score_diff": float(rep.max_abs_score_diff),
            "kept_fp32": rep.extra.get("settings", {}).get("kept_fp32_layers", []),
            "trt_form_passed": bool(res.reports["int8"].passed)}
    done.write_text(json.dumps(info, indent=2) + "\n")
    return info


# -- timing ---------------------------------------------------------------------------------------

def torch_classifier(pkg):
    """The source model's own forward (torchvision DenseNet.forward on a replicated, normalised gray
    image) from the package's safetensors: no CAM."""
    import torch
    import torch.nn.functional as F

    from cxrkit.nets import create_net, load_weights

    net = load_weights(create_net(pkg.card.arch, **pkg.card.arch_kwargs), pkg.verified("weights")).eval()

    def fwd(x: "torch.Tensor") -> "torch.Tensor":  # x: (B, 3, H, W) normalised, as torchvision gives it
        f = F.relu(net.features(x), inplace=True)
        return net.classifier(torch.flatten(F.adaptive_avg_pool2d(f, (1, 1)), 1))

    return fwd


def _ort(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def model_only(pkg, x: np.ndarray, batches: list[int], repeat: int, threads: int) -> dict:
    """img/s (best of repeat) and CPU ms/img for torch eager, ORT fp32, ORT int8 at each batch."""
    import torch

    fwd = torch_classifier(pkg)
    s32, s8 = _ort(pkg.verified("onnx"), threads), _ort(pkg.verified("onnx_int8_cpu"), threads)
    out = {}
    for b in batches:
        xb = x[:b]  # (b, 1, H, W) preprocessed, unit range
        x3 = torch.from_numpy(((np.repeat(xb, 3, 1) - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1)).astype(np.float32))
        runs = {
            "torch eager fp32": lambda: fwd(x3),
            "cxrkit ORT fp32": lambda: s32.run(None, {"image": xb}),
            "cxrkit ORT int8": lambda: s8.run(None, {"image": xb}),
        }
        best = {k: [] for k in runs}
        with torch.inference_mode():
            for f in runs.values():
                f()  # warm-up
            for _ in range(repeat):  # interleaved: background load hits all alike
                for k, f in runs.items():
                    t, c = time.perf_counter(), time.process_time()
                    f()
                    best[k].append((time.perf_counter() - t, time.process_time() - c))
        out[b] = {k: {"img_s": b / min(w for w, _ in v), "cpu_ms_per_img": 1e3 * float(np.median([c for _, c in v])) / b}
                  for k, v in best.items()}
    return out


class _TvDataset:
    """torchvision's CheXNet preprocessing, written with PIL + numpy (torchvision does not import
    beside this torch): RGB, Resize(size) (PIL bilinear, antialiased), CenterCrop, ToTensor, Normalize."""

    def __init__(self, paths: list[str], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        s = self.size
        with Image.open(self.paths[i]) as im:
            im = im.convert("RGB")
            w, h = im.size
            nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)  # torchvision's Resize(int)
            im = im.resize((nw, nh), Image.BILINEAR)
            top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
            a = np.asarray(im.crop((left, top, left + s, top + s)), np.float32) / 255.0  # (s, s, 3)
        return torch.from_numpy(((a - MEAN) / STD).transpose(2, 0, 1).copy())  # (3, s, s)


def end_to_end(pkg, files: list[str], repeat: int, batch: int = 16) -> dict:
    """img/s from JPEG files to scores: cxrkit Detector fp32 / int8 vs the DataLoader + eager baseline."""
    import torch

    from cxrkit import Detector

    size = pkg.card.input_hw[0]
    fwd = torch_classifier(pkg)
    workers = os.cpu_count() or 1

    def baseline() -> int:
        dl = torch.utils.data.DataLoader(_TvDataset(files, size), batch_size=batch, num_workers=workers)
        n = 0
        with torch.inference_mode():
            for x in dl:
                n += len(torch.sigmoid(fwd(x)))
        return n

    dets = {p: Detector(pkg, precision=p, batch_size=batch) for p in ("fp32", "int8")}

    def cx(p: str):
        return lambda: sum(1 for q in dets[p].predict_iter(files) if q.ok)

    runs = {"torch eager fp32 (DataLoader)": baseline, "cxrkit Detector fp32": cx("fp32"), "cxrkit Detector int8": cx("int8")}
    res: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for k, f in runs.items():
            t = time.perf_counter()
            n = f()
            res[k].append(time.perf_counter() - t)
            assert n == len(files), (k, n)
    for d in dets.values():
        d.close()
    return {k: len(files) / min(v) for k, v in res.items()}


def decode_floor(files: list[str]) -> float:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def dec(p):
        with Image.open(p) as im:
            im.load()

    t = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 1) as ex:
        list(ex.map(dec, files))
    return len(files) / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="224,512")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--calib", type=int, default=64, help="nih14 calibration images")
    ap.add_argument("--holdout", type=int, default=192, help="nih14 held-out images for the guard (other patients)")
    ap.add_argument("--e2e-images", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--auto-keep-fp32", type=int, default=0)
    ap.add_argument("--keep-fp32", nargs="*", default=list(HEAD),
                    help="nodes left in fp32 (default: the classifier and CAM head, cxrkit.convert.HEAD_NODES)")
    ap.add_argument("--work", default=os.environ.get("CXRKIT_BENCH_WORK", "/tmp/cxrkit-bench-import"))
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--report", help="also write benchmarks/reports/NAME.json (run_report: date, machine, commit)")
    a = ap.parse_args(argv)
    import torch

    from cxrkit.io import load_item
    from cxrkit.models import load_model_package
    from cxrkit.preprocess import Preprocessor

    work = Path(a.work)
    sizes = [int(s) for s in a.sizes.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    calib, hold, rest, e2e, labels_of = nih14_split(a.calib, a.holdout, a.e2e_images)
    threads = os.cpu_count() or 1
    ckpt = checkpoint(work, calib, calib + rest[:256], labels_of)
    prepared = {s: prepare(s, work, calib, hold, a.auto_keep_fp32, ckpt, a.keep_fp32) for s in sizes}
    for s, info in prepared.items():
        print(f"{s}²: guard {'passed' if info['guard_passed'] else 'FAILED'} on {info['n_holdout']} held-out nih14 "
              f"images (min agreement {info['guard_min_agreement']:.3f}, max |score diff| "
              f"{info['guard_max_abs_score_diff']:.3g}, kept fp32: {info['kept_fp32'] or 'none'}); "
              f"import {info['import_s']} s, quantize {info['quantize_s']} s")
    if a.prepare_only:
        return 0
    print(f"# {cpu_model()}, {threads} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.2f}")
    results: dict = {"cpu": cpu_model(), "cores": threads, "prepared": prepared, "model": {}, "e2e": {}}
    for s in sizes:
        pkg = load_model_package(prepared[s]["root"])
        pre = Preprocessor(pkg.card.input_hw, pkg.card.mean, pkg.card.std, fit=pkg.card.fit)
        x = pre.run([load_item(p, i) for i, p in enumerate(hold[:max(batches)])]).batch  # (B, 1, s, s)
        mo = model_only(pkg, x, batches, a.repeat, threads)
        results["model"][s] = mo
        for b, row in mo.items():
            base = row["torch eager fp32"]["img_s"]
            cells = ", ".join(f"{k} {v['img_s']:.2f} img/s ({v['img_s'] / base:.2f}x, {v['cpu_ms_per_img']:.0f} CPU ms/img)"
                              for k, v in row.items())
            print(f"model {s}² batch {b}: {cells}; int8/fp32 {row['cxrkit ORT int8']['img_s'] / row['cxrkit ORT fp32']['img_s']:.2f}x")
        if s == max(sizes) and not a.no_e2e:
            floor = decode_floor(e2e)
            e = end_to_end(pkg, e2e, a.repeat)
            results["e2e"][s] = {**e, "decode_floor_img_s": floor}
            base = e["torch eager fp32 (DataLoader)"]
            print(f"end to end {s}², {len(e2e)} JPEG files (1024²), batch 16: "
                  + ", ".join(f"{k} {v:.2f} img/s ({v / base:.2f}x)" for k, v in e.items())
                  + f"; floors: JPEG decode {floor:.0f} img/s, int8 model {mo[max(batches)]['cxrkit ORT int8']['img_s']:.2f} img/s")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    if a.report:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from run_report import write_report

        print("report:", write_report(a.report, json.loads(json.dumps(results, default=str))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
