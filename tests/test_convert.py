"""Parity of imported models with the REAL source libraries, on real radiographs.

The outputs of torchvision's densenet121 / resnet50 and torchxrayvision's DenseNet were recorded
by tests/fixtures/convert/make_fixtures.py in a venv that has those libraries (torch 2.14.1,
torchvision 0.29.1, torchxrayvision 1.5.7; see versions.json), with the sources' own
preprocessing, on four real radiographs from ../shared/data. The weights are rebuilt here,
bit for bit, by weights_gen.fill_state (numpy, seeded by key name), written as the checkpoint
file a user would have (CheXNet's DataParallel + {"state_dict"} layout, a plain state dict,
torchxrayvision's exported state dict), and converted by cxrkit. Nothing is mocked: a wrong
architecture, key mapping, normalisation or CAM fails these comparisons.

Stated tolerances:
- converted graph (ONNX Runtime) vs the source model (torch), same input: |logit| diff <= 1e-4,
  CAM heatmaps vs numpy CAMs of the source's own feature maps <= 1e-4;
- the whole Detector from the image file vs the source's own preprocessing + forward:
  |probability| diff <= DETECTOR_TOL_* below (the resize filters differ: PIL's uint8 output
  and skimage's Gaussian pre-filter vs cxrkit's float antialiased triangle filter).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from cxrkit.convert import import_model  # noqa: E402
from cxrkit.convert.reference import cam_reference  # noqa: E402

FIX = Path(__file__).resolve().parent / "fixtures" / "convert"
NIH14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
         "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
LOGIT_TOL = 1e-4
CAM_TOL = 1e-4
# Detector from the files vs the source's own pipeline, max |probability diff| (measured 2026-11-30
# on these images: 3.2e-4 torchvision, 1.5e-4 torchxrayvision), and the mean |input diff| after
# preprocessing, in unit range (measured 0.0011-0.0014 torchvision: PIL rounds its resize to uint8;
# 0.0007-0.0013 torchxrayvision: skimage's Gaussian pre-filter; the max is at sharp edges, 0.05-0.09)
DETECTOR_TOL_TV = 2e-3
DETECTOR_TOL_XRV = 2e-3
INPUT_MEAN_TOL = 2e-3
XRV_STEM = 1.0 / 1024


def _gen():
    spec = importlib.util.spec_from_file_location("cxrkit_test_weights_gen", FIX / "weights_gen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIX / "parity.npz"))


@pytest.fixture(scope="module")
def layouts():
    return json.loads((FIX / "layouts.json").read_text())


def state_for(layouts, name: str, seed: int = 0, first_conv_scale: float = 1.0) -> dict:
    vals = _gen().fill_state(layouts[name], seed, first_conv_scale)
    return {k: torch.from_numpy(v) for k, v in vals.items()}


def ort_run(pkg, x: np.ndarray):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(pkg.verified("onnx")), providers=["CPUExecutionProvider"])
    lg, hm = sess.run(["logits", "heatmaps"], {"image": np.ascontiguousarray(x, np.float32)})
    return lg.astype(np.float64), hm.astype(np.float64)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


# -- CheXNet-style torchvision DenseNet-121 (ImageNet normalisation, 3 channels) --------------

@pytest.fixture(scope="module")
def chexnet_pkg(tmp_path_factory, layouts):
    d = tmp_path_factory.mktemp("chexnet")
    ckpt = d / "model.pth.tar"  # arnoweng/CheXNet: DataParallel keys, Sequential(Linear, Sigmoid), a wrapper dict
    torch.save({"epoch": 3, "state_dict": state_for(layouts, "chexnet_arnoweng"), "best_loss": 0.1}, ckpt)
    res = import_model(ckpt, d / "pkg", arch="densenet121", labels=",".join(NIH14), input_size=224,
                       normalize="imagenet")
    return res.package


def test_chexnet_checkpoint_logits_and_cams_equal_torchvision(chexnet_pkg, ref):
    x = ref["tv_input_u8"][:, None].astype(np.float32) / np.float32(255)  # what ToTensor gave the source
    lg, hm = ort_run(chexnet_pkg, x)
    assert np.abs(lg - ref["chexnet_logits"]).max() <= LOGIT_TOL
    assert np.abs(sigmoid(lg) - ref["chexnet_probs"]).max() <= LOGIT_TOL  # the source's Sigmoid output
    assert hm.shape == (4, 14, 7, 7)
    assert np.abs(hm - ref["chexnet_cam"]).max() <= CAM_TOL  # numpy CAMs of torchvision's own feature maps
    assert np.abs(hm.mean(axis=(2, 3)) - lg).max() <= 1e-5  # a score is the mean of its CAM


def test_chexnet_card(chexnet_pkg):
    card = chexnet_pkg.card
    raw = card.raw
    assert card.labels[:4] == ("atelectasis", "cardiomegaly", "pleural_effusion", "infiltration")
    assert "pneumonia" in card.labels and "hiatal_hernia" in card.labels
    assert raw["label_names"]["pleural_effusion"] == "Effusion"
    assert raw["source"]["labels_outside_ontology"] == ["infiltration", "pneumonia"]
    assert raw["input"] == {"fit": "center_crop", "channels": 3, "convention": "imagenet",
                            "channel_mean": [0.485, 0.456, 0.406], "channel_std": [0.229, 0.224, 0.225],
                            "source_preprocessing": raw["input"]["source_preprocessing"]}
    assert raw["normalization"] == {"mean": 0.0, "std": 1.0}
    assert card.heatmap_stride == 32 and card.input_hw == (224, 224)
    assert set(raw["sha256"]) == set(raw["files"].values()) == {"model.onnx", "weights.safetensors"}
    assert all(t == 0.5 for t in raw["thresholds"].values())
    assert raw["heatmap_thresholds"] == raw["thresholds"]
    src = raw["source"]
    assert src["arch"] == "densenet121" and src["state_dict_at"] == "['state_dict']"
    assert any("module.densenet121." in n for n in src["key_changes"])
    assert any("Sequential" in n for n in src["key_changes"])
    assert src["conversion_check"]["max_abs_logit_diff"] <= LOGIT_TOL


def test_chexnet_heatmaps_equal_numpy_cam_of_the_torch_net(chexnet_pkg, ref):
    """The in-graph CAM against the numpy reference on the torch net's own feature map."""
    from safetensors.torch import load_file

    from cxrkit.nets import create_net, load_weights

    net = load_weights(create_net(chexnet_pkg.card.arch, **chexnet_pkg.card.arch_kwargs), chexnet_pkg.verified("weights"))
    x = ref["tv_input_u8"][:2, None].astype(np.float32) / np.float32(255)
    with torch.no_grad():
        feats = net.feature_map(torch.from_numpy(x)).numpy()
    w = load_file(str(chexnet_pkg.verified("weights")))
    cam = cam_reference(feats, w["classifier.weight"].numpy(), w["classifier.bias"].numpy())
    _, hm = ort_run(chexnet_pkg, x)
    assert np.abs(hm - cam).max() <= CAM_TOL


def test_chexnet_torch_backend_equals_onnxruntime(chexnet_pkg, ref):
    from cxrkit.backends import create_runner

    x = ref["tv_input_u8"][:2, None].astype(np.float32) / np.float32(255)
    with create_runner(chexnet_pkg, "torch", "cpu", "fp32") as r:
        out = r.infer(x)
    assert np.abs(out["logits"] - ref["chexnet_logits"][:2]).max() <= LOGIT_TOL
    assert np.abs(out["heatmaps"] - ref["chexnet_cam"][:2]).max() <= CAM_TOL


def test_detector_from_files_equals_torchvision_pipeline(chexnet_pkg, ref, shared_data):
    """Decode + center-crop resize + normalise + infer, from the image files, against torchvision's
    PIL Resize(224) + CenterCrop(224) + ToTensor + Normalize + forward."""
    import cxrkit

    files = [str(shared_data / f) for f in ref["images"]]
    with cxrkit.Detector(chexnet_pkg, boxes="all") as det:
        preds = det.predict(files)
    assert all(p.ok for p in preds)
    got = np.array([[p.findings[k].score for k in chexnet_pkg.card.labels] for p in preds])
    diff = np.abs(got - ref["chexnet_probs"])
    assert diff.max() <= DETECTOR_TOL_TV, diff.max()


@pytest.mark.parametrize("which", ["tv", "xrv"])
def test_preprocessing_equals_the_sources_within_the_resize_tolerance(ref, shared_data, which):
    from cxrkit.io import load_item
    from cxrkit.preprocess import Preprocessor

    if which == "tv":
        files, want, (mean, std) = ref["images"], ref["tv_input_u8"][:, None] / 255.0, (0.0, 1.0)
    else:  # torchxrayvision's input, back to the unit range
        files, want, (mean, std) = ref["xrv_images"], ref["xrv_input"] / 2048.0 + 0.5, (0.5, 1 / 2048)
    for backend in ("numpy", "native"):
        pre = Preprocessor((224, 224), mean, std, fit="center_crop", backend=backend)
        got = pre.run([load_item(str(shared_data / f), i) for i, f in enumerate(files)]).batch * std + mean
        err = np.abs(got - want).mean(axis=(1, 2, 3))
        assert err.max() <= INPUT_MEAN_TOL, (backend, err)


# -- torchvision ResNet-50 ---------------------------------------------------------------------

def test_resnet50_state_dict_parity(tmp_path, layouts, ref):
    ckpt = tmp_path / "resnet50.pth"
    torch.save(state_for(layouts, "tv_resnet50"), ckpt)
    pkg = import_model(ckpt, tmp_path / "pkg", labels=NIH14, input_size=224).package  # arch auto, imagenet default
    assert pkg.card.raw["source"]["arch"] == "resnet50" and pkg.card.arch == "resnet_cam"
    x = ref["tv_input_u8"][:, None].astype(np.float32) / np.float32(255)
    lg, hm = ort_run(pkg, x)
    assert np.abs(lg - ref["tv_resnet50_logits"]).max() <= LOGIT_TOL
    assert np.abs(hm - ref["tv_resnet50_cam"]).max() <= CAM_TOL


# -- torchxrayvision ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xrv_pkg(tmp_path_factory, layouts):
    d = tmp_path_factory.mktemp("xrv")
    state = state_for(layouts, "xrv_densenet121", first_conv_scale=XRV_STEM)
    info = json.loads((FIX / "xrv_model_urls.json").read_text())["densenet121-res224-all"]
    state["op_threshs"] = torch.tensor(info["op_threshs"])  # xrv.models.get_model(...).state_dict() has it
    torch.save(state, d / "xrv-all.pth")
    return import_model("xrv:densenet121-res224-all", d / "pkg", weights=d / "xrv-all.pth").package


def test_xrv_densenet_logits_cams_and_operating_points(xrv_pkg, ref):
    card = xrv_pkg.card
    assert card.num_classes == 18 and card.input_hw == (224, 224) and card.fit == "center_crop"
    assert card.raw["normalization"] == {"mean": 0.5, "std": 1 / 2048}
    lg, hm = ort_run(xrv_pkg, ref["xrv_input"])  # torchxrayvision's own [-1024, 1024] input
    assert np.abs(lg - ref["xrv_densenet121_logits"]).max() <= LOGIT_TOL
    assert np.abs(hm - ref["xrv_densenet121_cam"]).max() <= CAM_TOL
    # the card's thresholds are xrv's op_threshs: cxrkit's decisions are op_norm(sigmoid) >= 0.5
    pos = sigmoid(lg) >= card.thresholds[None, :]
    assert np.array_equal(pos, ref["xrv_densenet121_opnorm"] >= 0.5)
    assert card.labels[-2:] == ("opacity", "enlarged_cardiomediastinum")


def test_detector_from_files_equals_xrv_pipeline(xrv_pkg, ref, shared_data):
    """Detector from the files vs skimage imread + xrv.datasets.normalize + XRayCenterCrop +
    XRayResizer(224) + forward."""
    import cxrkit

    files = [str(shared_data / f) for f in ref["xrv_images"]]
    with cxrkit.Detector(xrv_pkg) as det:
        preds = det.predict(files)
    got = np.array([[p.findings[k].score for k in xrv_pkg.card.labels] for p in preds])
    diff = np.abs(got - sigmoid(ref["xrv_densenet121_logits"]))
    assert diff.max() <= DETECTOR_TOL_XRV, diff.max()


def test_xrv_resnet50_state_dict(tmp_path, layouts, ref):
    torch.save(state_for(layouts, "xrv_resnet50", first_conv_scale=XRV_STEM), tmp_path / "r50.pt")
    # the fixture ran torchvision's resnet50 (xrv.models.ResNet's self.model) at 224
    pkg = import_model("xrv:resnet50-res512-all", tmp_path / "pkg", weights=tmp_path / "r50.pt", input_size=224).package
    lg, _ = ort_run(pkg, ref["xrv_input"])
    assert np.abs(lg - ref["xrv_resnet50_logits"]).max() <= LOGIT_TOL
    en = pkg.card.raw["enabled"]
    assert en["lung_lesion"] is False and en["enlarged_cardiomediastinum"] is False and en["nodule"] is True


def test_xrv_whole_module_pickle_is_read_without_running_it(tmp_path, ref, caplog):
    """torchxrayvision ships DenseNet weights as torch.save(model): read through weights_only=True
    with inert stand-ins for its classes."""
    res = import_model("xrv:densenet121-res224-all", tmp_path / "pkg", weights=FIX / "xrv_tiny_zip.pt")
    src = res.package.card.raw["source"]
    assert "torchxrayvision.models.DenseNet" in src["pickled_classes_read_as_inert_stand_ins"]
    assert src["arch"].startswith("densenet(growth 8")
    lg, hm = ort_run(res.package, ref["xrv_input"])
    assert np.abs(lg - ref["xrv_tiny_logits"]).max() <= LOGIT_TOL
    assert np.abs(hm - ref["xrv_tiny_cam"]).max() <= CAM_TOL


def test_xrv_legacy_module_pickle_is_refused_with_the_export_recipe(tmp_path):
    from cxrkit.errors import ModelError

    with pytest.raises(ModelError, match=r"legacy \(pre-1.6\) format.*get_model\('densenet121-res224-all'\)\.state_dict\(\)"):
        import_model("xrv:densenet121-res224-all", tmp_path / "pkg", weights=FIX / "xrv_tiny_legacy.pt")
    assert not (tmp_path / "pkg").exists()


def test_onnx_exported_by_another_torch_with_sigmoid_head(tmp_path, ref):
    """xrv_tiny.onnx: torchxrayvision's DenseNet with apply_sigmoid, exported by torch 2.14."""
    names = json.loads((FIX / "xrv_model_urls.json").read_text())["densenet121-res224-all"]["labels"]
    res = import_model(FIX / "xrv_tiny.onnx", tmp_path / "pkg", labels=names, normalize="xrv", fit="center_crop")
    src = res.package.card.raw["source"]
    assert src["dropped_after_linear"] == ["Sigmoid"] and src["pool"] == "GlobalAveragePool"
    assert res.package.card.input_hw == (224, 224) and res.package.card.heatmap_stride == 32
    lg, hm = ort_run(res.package, ref["xrv_input"])
    assert np.abs(lg - ref["xrv_tiny_logits"]).max() <= LOGIT_TOL
    assert np.abs(sigmoid(lg) - ref["xrv_tiny_probs"]).max() <= LOGIT_TOL
    assert np.abs(hm - ref["xrv_tiny_cam"]).max() <= CAM_TOL


def test_xrv_table_matches_the_library_snapshot():
    from cxrkit.convert.xrv import XRV_WEIGHTS

    snap = json.loads((FIX / "xrv_model_urls.json").read_text())
    assert set(snap) == set(XRV_WEIGHTS)
    for k, v in snap.items():
        mine = XRV_WEIGHTS[k]
        assert mine["labels"] == v["labels"] and mine["input_resolution"] == v["input_resolution"]
        assert mine["file"] == v["file"] and mine["op_threshs"] == v["op_threshs"]


@pytest.mark.parametrize("layout, net, kw", [
    ("tv_densenet121", "densenet_cam", dict(num_classes=1000)),
    ("tv_resnet50", "resnet_cam", dict(num_classes=14)),
    ("xrv_densenet121", "densenet_cam", dict(num_classes=18, in_channels=1)),
    ("xrv_resnet50", "resnet_cam", dict(num_classes=18, in_channels=1)),
])
def test_cxrkit_nets_have_the_real_libraries_state_dict_layout(layouts, layout, net, kw):
    from cxrkit.nets import create_net

    mine = {k: list(v.shape) for k, v in create_net(net, **kw).state_dict().items()}
    assert mine == layouts[layout]
