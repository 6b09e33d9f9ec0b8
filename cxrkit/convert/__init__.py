"""Bring your own model: torchxrayvision, CheXNet-style torchvision classifiers, any ONNX classifier.

    from cxrkit.convert import import_model
    pkg = import_model("chexnet.pth", out="my-model", arch="densenet121",
                       labels=["atelectasis", "cardiomegaly", ...], input_size=512, normalize="imagenet")
    pkg = import_model("xrv:densenet121-res224-all", weights="~/.torchxrayvision/....pt", out="xrv-all")
    pkg = import_model("model.onnx", labels=[...], out="onnx-model")
    cxrkit.Detector.from_pretrained(pkg.root)

or ``cxrkit import-model SOURCE --out DIR [--arch A] [--labels L1,L2,..] [--input-size N]
[--normalize imagenet|xrv|none] [--weights FILE]``.

Each writes a model package (card.json, model.onnx with ``image`` -> ``logits``, ``heatmaps``, and
for torch sources weights.safetensors in torchvision's key layout) whose heatmaps are class
activation maps computed inside the graph (see :mod:`cxrkit.nets.cam`), with the source's input
convention in the card (``input``: fit, channels, per-channel normalisation; ``normalization``:
what cxrkit's preprocessing does). Before the package is put in place the written ONNX graph is
run in ONNX Runtime against the source (the torch net, or the source ONNX graph) on probe images,
and the import fails if logits differ by more than ``LOGIT_TOL`` or the heatmaps are not the CAM
of the logits; the figures go in ``card["source"]["conversion_check"]``.

Labels: a source name that the ontology has (``cxrkit.labels.source_label_key``: "Effusion" ->
``pleural_effusion``) takes the ontology key; any other keeps its own name as a key
("Lung Lesion" -> ``lung_lesion``); ``card["label_names"]`` keeps every source name.
Thresholds: the source's operating points where it has them (torchxrayvision's ``op_threshs``),
else ``DEFAULT_THRESHOLD`` (0.5); heatmap thresholds default to the label's threshold, which
guarantees a positive image at least one peak (a score is the mean of its CAM).

Checkpoints are read by ``torch.load(weights_only=True)`` only (see :mod:`.checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ModelError
from ..models import ModelPackage, sha256_file
from .package import DEFAULT_THRESHOLD, NORMALIZATIONS, build_card, input_convention, probe_inputs, write_package

__all__ = ["import_model", "ImportResult", "LOGIT_TOL", "DEFAULT_THRESHOLD", "ARCHS", "HEAD_NODES", "add_parser", "main"]

log = logging.getLogger(__name__)

#: the largest |logit difference| between the written graph and the source allowed on probe images
LOGIT_TOL = 1e-4
ARCHS = ("auto", "densenet121", "densenet169", "densenet201", "resnet50", "resnet101")
_FITS = ("center_crop", "letterbox", "stretch")


@dataclass
class ImportResult:
    package: ModelPackage
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.package.root


def _parse_labels(labels: "str | Sequence[str] | None") -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str):
        if labels.startswith("@"):
            text = Path(labels[1:]).expanduser().read_text()
            items = json.loads(text) if text.lstrip().startswith("[") else text.splitlines()
        else:
            items = labels.split(",")
        labels = [str(s).strip() for s in items if str(s).strip()]
    return [str(s) for s in labels]


def _parse_probs(spec: "str | Mapping[str, float] | None", what: str) -> dict[str, float]:
    """{label: probability} from a mapping, a JSON file, or "a=0.3,b=0.4"."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {str(k): float(v) for k, v in spec.items()}
    p = Path(str(spec)).expanduser()
    if p.is_file():
        return {str(k): float(v) for k, v in json.loads(p.read_text()).items()}
    out = {}
    for part in str(spec).split(","):
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        if not sep:
            raise ModelError(f"{what}: expected label=probability pairs or a JSON file, got {part!r}")
        out[k.strip()] = float(v)
    return out


def _keys_for(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    from ..labels import source_label_key

    keys = []
    for n in names:
        try:
            keys.append(source_label_key(n))
        except ValueError as e:
            raise ModelError(str(e)) from None
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        which = {k: [n for n, kk in zip(names, keys) if kk == k] for k in dup}
        raise ModelError(f"labels {which} map to the same key; rename one (labels are kept by their own names "
                         "unless the ontology has them, see cxrkit.labels.source_label_key)")
    return keys, dict(zip(keys, names))


def _rekey(d: Mapping[str, float], names: Mapping[str, str], what: str) -> dict[str, float]:
    """Thresholds given by source name or by key -> by key."""
    by_name = {v: k for k, v in names.items()}
    out = {}
    for k, v in d.items():
        key = k if k in names else by_name.get(k)
        if key is None:
            raise ModelError(f"{what} names {k!r}, which is not a label of the model ({', '.join(names)})")
        out[key] = float(v)
    return out


def _input_hw(input_size: Any, default: "tuple[int, int] | None", stride: int) -> tuple[int, int]:
    if input_size is None:
        if default is None:
            raise ModelError("--input-size is needed: the source does not fix its input size")
        hw = default
    elif isinstance(input_size, (int, np.integer)):
        hw = (int(input_size), int(input_size))
    else:
        vals = [int(v) for v in input_size]
        hw = (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])
    if hw[0] % stride or hw[1] % stride or min(hw) < stride:
        raise ModelError(f"input size {hw} must be a multiple of the heatmap stride {stride} (e.g. 224, 256, 512)")
    return hw


# -- checks -------------------------------------------------------------------------------------

def _ort(graph: Any, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or min(8, os.cpu_count() or 1))
    src = graph if isinstance(graph, (str, os.PathLike)) else graph.SerializeToString()
    return ort.InferenceSession(str(src) if isinstance(src, os.PathLike) else src, sess_options=so,
                                providers=["CPUExecutionProvider"])


def _check(onnx_path: Path, x: np.ndarray, ref_logits: np.ndarray, what: str) -> dict[str, Any]:
    """Run the written graph on x (N, 1, H, W); compare its logits with the source's, and its heatmaps'
    mean with its logits (the CAM identity). Raises ModelError beyond LOGIT_TOL."""
    sess = _ort(str(onnx_path))
    lg, hm = sess.run(["logits", "heatmaps"], {"image": x})
    d_src = float(np.abs(lg.astype(np.float64) - ref_logits).max())
    d_cam = float(np.abs(hm.astype(np.float64).mean(axis=(2, 3)) - lg).max())
    scale = float(np.abs(ref_logits).max())
    rep = {"images": int(len(x)), "against": what, "max_abs_logit_diff": d_src,
           "max_abs_logit_minus_cam_mean": d_cam, "max_abs_logit": scale, "tolerance": LOGIT_TOL}
    tol = LOGIT_TOL * max(1.0, scale / 10.0)  # float32 rounding grows with the logits' magnitude
    if not d_src <= tol:
        raise ModelError(f"conversion check failed: the written graph's logits differ from {what} by {d_src:.3g} "
                         f"(tolerance {tol:.3g}); please report this with the source model")
    if not d_cam <= max(tol, 1e-5 * scale) * 10:
        raise ModelError(f"conversion check failed: mean(heatmaps) differs from logits by {d_cam:.3g}: the pool "
                         "before the classifier is not a global average of the feature map the heatmaps use")
    return rep


#: node names of the head in every imported graph: what to keep in fp32 when quantizing
#: (``cxrkit quantize DIR --keep-fp32 cxrkit/classifier cxrkit/cam``; see models/chexnet-densenet121)
HEAD_NODES = ("cxrkit/classifier", "cxrkit/cam")


def _name_head(path: Path) -> Path:
    """Give the nodes producing ``logits`` and ``heatmaps`` the stable names HEAD_NODES."""
    import onnx

    m = onnx.load(str(path))
    for n in m.graph.node:
        if "logits" in n.output and n.op_type != "Identity":  # ONNX imports: convert_onnx named it
            n.name = HEAD_NODES[0]
        elif "heatmaps" in n.output:
            n.name = HEAD_NODES[1]
    onnx.save(m, str(path))
    return path


# -- torch sources ------------------------------------------------------------------------------

def _is_module(obj: Any) -> bool:
    try:
        import torch

        return isinstance(obj, torch.nn.Module)
    except ImportError:
        return False


def _load_into(net: Any, state: Mapping[str, Any]) -> None:
    import torch

    own = net.state_dict()
    state = dict(state)
    state.pop("op_threshs", None)  # torchxrayvision's operating points, a buffer; they go to the card
    for k, v in own.items():  # checkpoints older than torch 0.4.1 have no BN step counters
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        few = lambda ks: ", ".join(sorted(ks)[:6]) + (f" ... ({len(ks)} in all)" if len(ks) > 6 else "")  # noqa: E731
        parts = ([f"missing {few(missing)}"] if missing else []) + ([f"unexpected {few(unexpected)}"] if unexpected else [])
        raise ModelError("the checkpoint does not match the detected architecture: " + "; ".join(parts))
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ModelError(f"tensor shapes differ from the architecture (checkpoint vs net): {'; '.join(bad[:4])}")
    net.load_state_dict({k: v.detach().to(torch.float32) if v.is_floating_point() else v for k, v in state.items()},
                        strict=True)


def _import_torch(source: Any, *, arch: str, labels: list[str] | None, input_size: Any, normalize: str | None,
                  weights: Any, fit: str | None, thresholds: dict[str, float], heatmap_thresholds: dict[str, float],
                  name: str, out: Path, overwrite: bool) -> ImportResult:
    import torch

    from ..nets import create_net, export_onnx, save_weights
    from .checkpoint import canonical_state, detect_arch, find_state_dict, read_checkpoint
    from .xrv import xrv_weights_info

    src: dict[str, Any] = {}
    xrv = None
    if isinstance(source, str) and source.startswith("xrv:"):
        wname = source[4:]
        try:
            xrv = xrv_weights_info(wname)
        except KeyError as e:
            raise ModelError(str(e.args[0])) from None
        if weights is None:
            raise ModelError(f"{source}: pass the weights file you downloaded with torchxrayvision: --weights "
                             f"~/.torchxrayvision/{xrv['file']} (cxrkit downloads nothing)")
        src.update(kind="torchxrayvision", weights_name=wname)
        source = weights
        if Path(str(weights)).name != xrv["file"]:
            log.warning("%s: torchxrayvision publishes these weights as %s; converting %s as %s", wname,
                        xrv["file"], Path(str(weights)).name, wname)
    if _is_module(source):
        cls = type(source)
        src.update(kind=src.get("kind", "module"), object=f"{cls.__module__}.{cls.__qualname__}")
        if cls.__module__.startswith("torchxrayvision"):
            src["kind"] = "torchxrayvision"
            th = getattr(source, "op_threshs", None)
            xrv = {"labels": list(getattr(source, "targets", None) or getattr(source, "pathologies")),
                   "op_threshs": None if th is None else [None if math.isnan(float(t)) else float(t) for t in th],
                   "input_resolution": int(getattr(source, "input_resolution", 224)),
                   "arch": "densenet121" if "DenseNet" in cls.__name__ else "resnet50"}
        obj, where = {k: v for k, v in source.state_dict().items()}, "model.state_dict()"
    elif isinstance(source, Mapping):
        obj, where = dict(source), "the given mapping"
    else:
        p = Path(str(source)).expanduser()
        hint = None
        if "weights_name" in src:
            wn = src["weights_name"]
            hint = ("export a plain state dict where torchxrayvision is installed: python -c \"import torch, "
                    f"torchxrayvision as xrv; torch.save(xrv.models.get_model('{wn}').state_dict(), 'xrv.pth')\" "
                    f"and run: cxrkit import-model xrv:{wn} --weights xrv.pth ... (or pass the model object to "
                    "cxrkit.convert.import_model)")
        obj, info = read_checkpoint(p, export_hint=hint)
        src.setdefault("kind", "torch-checkpoint")
        src.update(file=p.name, sha256=sha256_file(p), format=info.format)
        if info.stand_ins:
            src["pickled_classes_read_as_inert_stand_ins"] = info.stand_ins
        where = ""
    state, where = find_state_dict(obj, where)
    state, family, notes = canonical_state(state)
    spec = detect_arch(state, family)
    if arch not in ("auto", spec.name):
        raise ModelError(f"--arch {arch}, but the checkpoint is a {spec.name} ({family} keys, "
                         f"{spec.in_channels} input channel(s), {spec.num_classes} outputs); use --arch auto")
    src.update(arch=spec.name, state_dict_at=where, key_changes=notes, outputs=spec.num_classes,
               input_channels=spec.in_channels)

    # labels: the source's own list for torchxrayvision, else the user's
    if xrv is not None:
        names = list(xrv["labels"])
        if labels is not None and [n for n in names if n] != labels:
            log.warning("--labels ignored: torchxrayvision weights carry their own labels")
        op = list(xrv.get("op_threshs") or [None] * len(names))
    else:
        if labels is None:
            raise ModelError(f"--labels is needed: the checkpoint has {spec.num_classes} outputs and no names "
                             f"(give {spec.num_classes} comma-separated names in output order)")
        names, op = labels, [None] * len(labels)
    if len(names) != spec.num_classes:
        raise ModelError(f"{len(names)} labels for a classifier with {spec.num_classes} outputs")
    keep = [i for i, n in enumerate(names) if n.strip()]
    if len(keep) < len(names):
        src["dropped_unnamed_outputs"] = [i for i in range(len(names)) if i not in keep]
        notes.append(f"dropped {len(names) - len(keep)} unnamed (untrained) outputs")
    src["output_index"] = keep
    keys, label_names = _keys_for([names[i] for i in keep])
    head = "classifier" if family == "densenet" else "fc"
    idx = torch.tensor(keep)
    state[f"{head}.weight"] = state[f"{head}.weight"].index_select(0, idx)
    if f"{head}.bias" in state:
        state[f"{head}.bias"] = state[f"{head}.bias"].index_select(0, idx)
    else:
        state[f"{head}.bias"] = torch.zeros(len(keep))

    if normalize is None:
        normalize = "xrv" if xrv is not None else "imagenet" if spec.in_channels == 3 else None
        if normalize is None:
            raise ModelError("--normalize is needed for a 1-channel network: imagenet, xrv or none")
    conv = input_convention(normalize, spec.in_channels, fit or "center_crop")
    default_hw = (xrv["input_resolution"],) * 2 if xrv is not None else (224, 224)
    hw = _input_hw(input_size, default_hw, 32)
    if xrv is not None and hw != default_hw:
        log.warning("torchxrayvision resizes every input to %s itself; this package runs at %s instead",
                    default_hw, hw)

    kwargs = {**spec.kwargs, **conv.arch_kwargs(), "num_classes": len(keep)}
    net = create_net(spec.net, **kwargs)
    _load_into(net, state)
    net.eval()

    ths = {keys[j]: op[i] for j, i in enumerate(keep) if op[i] is not None}
    enabled = {keys[j]: not (xrv is not None and op[i] is None) for j, i in enumerate(keep)}
    ths.update(_rekey(thresholds, label_names, "--thresholds"))
    hths = _rekey(heatmap_thresholds, label_names, "--heatmap-thresholds")
    if xrv is not None and xrv.get("op_threshs"):
        src["thresholds_from"] = "torchxrayvision op_threshs (op_norm maps them to 0.5)"

    with tempfile.TemporaryDirectory(prefix="cxrkit-import-") as td:
        td_p = Path(td)
        w_path = save_weights(net, td_p / "weights.safetensors",
                              metadata={"source": json.dumps({k: src[k] for k in ("kind", "arch") if k in src})})
        o_path = _name_head(export_onnx(net, td_p / "model.onnx", hw))
        x = probe_inputs(hw)
        xn = (x - np.float32(conv.mean)) / np.float32(conv.std)  # (N, 1, H, W) normalized
        with torch.inference_mode():
            ref = net(torch.from_numpy(xn))[0].double().numpy()
        check = _check(o_path, xn, ref, f"the torch net ({spec.name}, torch {torch.__version__})")
        src["conversion_check"] = check
        desc = (f"{spec.name} imported from {src.get('file') or src.get('object') or 'a state dict'}"
                f"{' (torchxrayvision ' + src['weights_name'] + ')' if 'weights_name' in src else ''}; "
                f"{len(keys)} labels; heatmaps are class activation maps (stride 32) of its classifier.")
        card = build_card(
            name=name, labels=keys, label_names=label_names, input_hw=hw, conv=conv, heatmap_stride=32,
            arch=spec.net, arch_kwargs=kwargs, thresholds=ths, heatmap_thresholds=hths, enabled=enabled,
            source=src, heatmap={"kind": "cam", "feature_map": "relu(features.norm5)" if family == "densenet" else "layer4",
                                 "classifier": head}, description=desc)
        pkg = write_package(out, card, {"onnx": o_path, "weights": w_path}, overwrite=overwrite)
    return ImportResult(pkg, {"source": src, "labels": keys})


# -- ONNX sources -------------------------------------------------------------------------------

def _import_onnx(path: Path, *, labels: list[str] | None, input_size: Any, normalize: str | None, fit: str | None,
                 thresholds: dict[str, float], heatmap_thresholds: dict[str, float], name: str, out: Path,
                 overwrite: bool) -> ImportResult:
    import onnx

    from .onnx_import import convert_onnx, find_head, source_input

    if not path.is_file():
        raise ModelError(f"{str(path)!r}: ONNX file does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError / ValueError on a bad file
        raise ModelError(f"{str(path)!r}: not a readable ONNX model: {e}") from e
    head = find_head(model)
    in_name, channels, (h0, w0) = source_input(model)
    K = head.weight.shape[0]
    if labels is None or len(labels) != K:
        raise ModelError(f"--labels: the classifier has {K} outputs; give {K} comma-separated names in output order"
                         + (f" (got {len(labels)})" if labels else ""))
    keys, label_names = _keys_for(labels)
    if normalize is None:
        raise ModelError("--normalize is needed for an ONNX source: imagenet, xrv or none")
    conv = input_convention(normalize, channels, fit or "letterbox")
    src_hw = (h0, w0) if h0 and w0 else None
    hw = (int(input_size), int(input_size)) if isinstance(input_size, int) else (
        tuple(int(v) for v in (input_size if len(input_size) == 2 else list(input_size) * 2)) if input_size else src_hw)
    if hw is None:
        raise ModelError("--input-size is needed: the ONNX input has no fixed height and width")
    src = {"kind": "onnx", "file": path.name, "sha256": sha256_file(path), "input": in_name,
           "input_channels": channels, "outputs": K, "pool": head.pool, "dropped_after_linear": head.activation,
           "source_output": head.source_output}
    source_bytes = path.read_bytes()
    conv_model = convert_onnx(model, head, input_hw=hw, channels=channels,
                              channel_mean=conv.channel_mean, channel_std=conv.channel_std)
    with tempfile.TemporaryDirectory(prefix="cxrkit-import-") as td:
        o_path = Path(td) / "model.onnx"
        onnx.save(conv_model, str(o_path))
        _name_head(o_path)
        x = probe_inputs(hw)
        xn = (x - np.float32(conv.mean)) / np.float32(conv.std)  # (N, 1, H, W)
        try:
            sess = _ort(str(o_path))
            _, hm = sess.run(["logits", "heatmaps"], {"image": xn})
        except Exception as e:
            raise ModelError(f"the converted graph does not run at input {hw} with batch {len(xn)} in ONNX Runtime "
                             f"({str(e).splitlines()[0][:300]}); re-export the source with a dynamic batch "
                             "dimension, or choose the --input-size it was exported for") from e
        stride = hw[0] // hm.shape[2]
        if stride * hm.shape[2] != hw[0] or stride * hm.shape[3] != hw[1]:
            raise ModelError(f"heatmaps {hm.shape[2:]} at input {hw}: not an integer stride; choose an --input-size "
                             "that the network divides evenly (a multiple of 32 usually is)")
        # the source's own logits on the same images: its graph with the classifier output exposed
        ref_model = onnx.load_from_string(source_bytes)
        ref_model.graph.output.append(onnx.helper.make_tensor_value_info(head.logits, onnx.TensorProto.FLOAT, None))
        ref_sess = _ort(ref_model)
        xs = np.repeat(x, channels, axis=1)
        if conv.channel_mean is not None:
            xs = (xs - np.array(conv.channel_mean, np.float32).reshape(1, -1, 1, 1)) / np.array(conv.channel_std, np.float32).reshape(1, -1, 1, 1)
        else:
            xs = (xs - np.float32(conv.mean)) / np.float32(conv.std)
        try:
            ref = np.concatenate([ref_sess.run([head.logits], {in_name: xs[i:i + 1]})[0] for i in range(len(xs))])
        except Exception as e:
            raise ModelError(f"the source graph does not run at input {hw} ({str(e).splitlines()[0][:200]}); "
                             "pass the --input-size it was exported for") from e
        src["conversion_check"] = _check(o_path, xn, ref.astype(np.float64), "the source ONNX graph in ONNX Runtime")
        ths = _rekey(thresholds, label_names, "--thresholds")
        hths = _rekey(heatmap_thresholds, label_names, "--heatmap-thresholds")
        card = build_card(
            name=name, labels=keys, label_names=label_names, input_hw=hw, conv=conv, heatmap_stride=stride,
            arch=None, arch_kwargs=None, thresholds=ths, heatmap_thresholds=hths, enabled={}, source=src,
            heatmap={"kind": "cam", "feature_map": head.feature, "classifier": head.logits},
            description=f"ONNX classifier imported from {path.name}; {K} labels; heatmaps are class activation "
                        f"maps (stride {stride}) of its final linear layer.")
        pkg = write_package(out, card, {"onnx": o_path}, overwrite=overwrite)
    return ImportResult(pkg, {"source": src, "labels": keys})


# -- entry points -------------------------------------------------------------------------------

def import_model(source: Any, out: "str | Path", *, arch: str = "auto", labels: "str | Sequence[str] | None" = None,
                 input_size: "int | Sequence[int] | None" = None, normalize: str | None = None,
                 weights: "str | Path | None" = None, fit: str | None = None, name: str | None = None,
                 thresholds: "str | Mapping[str, float] | None" = None,
                 heatmap_thresholds: "str | Mapping[str, float] | None" = None, overwrite: bool = False) -> ImportResult:
    """Convert ``source`` into a cxrkit model package in ``out``; returns the loaded package and a report.

    ``source``: a torch checkpoint (state dict, wrapper dict or pickled module; read with
    ``weights_only=True``), a .safetensors file, ``"xrv:<weights name>"`` with ``weights=`` the file
    torchxrayvision downloaded, a torch ``nn.Module`` (torchvision or torchxrayvision model, or any
    module whose state dict has torchvision's DenseNet/ResNet layout), or an ``.onnx`` file.
    ``arch``: one of ARCHS ("auto" reads it from the keys). ``labels``: names in output order
    (comma-separated string, list, or "@file"); torchxrayvision sources carry their own.
    ``input_size``: H (square) or (H, W), a multiple of the heatmap stride; default the source's
    (torchxrayvision: its resolution; torchvision: 224; ONNX: its fixed input size).
    ``normalize``: "imagenet" (3 channels, ImageNet mean/std), "xrv" ([-1024, 1024]) or "none"
    (unit range); default xrv for torchxrayvision, imagenet for 3-channel torch nets.
    ``fit``: "center_crop" (torch sources' default: torchvision Resize + CenterCrop,
    torchxrayvision XRayCenterCrop), "letterbox" (ONNX default) or "stretch".
    ``thresholds`` / ``heatmap_thresholds``: {label: probability}, a JSON file or "a=0.3,b=0.2".
    """
    if arch not in ARCHS:
        raise ModelError(f"--arch must be one of {ARCHS}, got {arch!r}")
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise ModelError(f"--normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if fit is not None and fit not in _FITS:
        raise ModelError(f"--fit must be one of {_FITS}, got {fit!r}")
    out = Path(out).expanduser()
    name = name or out.name
    labs = _parse_labels(labels)
    th, hth = _parse_probs(thresholds, "--thresholds"), _parse_probs(heatmap_thresholds, "--heatmap-thresholds")
    t0 = time.perf_counter()
    if isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".onnx"):
        if arch != "auto":
            log.warning("--arch %s ignored for an ONNX source", arch)
        res = _import_onnx(Path(source).expanduser(), labels=labs, input_size=input_size, normalize=normalize, fit=fit,
                           thresholds=th, heatmap_thresholds=hth, name=name, out=out, overwrite=overwrite)
    else:
        res = _import_torch(str(source) if isinstance(source, os.PathLike) else source, arch=arch, labels=labs,
                            input_size=input_size, normalize=normalize, weights=weights, fit=fit, thresholds=th,
                            heatmap_thresholds=hth, name=name, out=out, overwrite=overwrite)
    res.report["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``import-model`` on a subparsers object (cxrkit.cli)."""
    p = sub.add_parser("import-model", help="convert a torchxrayvision, CheXNet-style or ONNX classifier into a "
                       "cxrkit model package with CAM heatmaps")
    p.add_argument("source", help="checkpoint (.pth/.pt/.tar/.safetensors), model.onnx, or xrv:<weights name>")
    p.add_argument("--out", required=True, help="package folder to write")
    p.add_argument("--arch", default="auto", choices=ARCHS)
    p.add_argument("--labels", help="output names in order, comma-separated (or @file); torchxrayvision: not needed")
    p.add_argument("--input-size", type=int, nargs="+", metavar="N", help="H [W]; default: the source's")
    p.add_argument("--normalize", choices=NORMALIZATIONS, help="imagenet | xrv | none (default: xrv for "
                   "torchxrayvision, imagenet for 3-channel torch nets)")
    p.add_argument("--weights", help="for xrv:NAME, the weights file torchxrayvision downloaded")
    p.add_argument("--fit", choices=_FITS, help="how an image is fitted to the input (default: center_crop for "
                   "torch sources, letterbox for ONNX)")
    p.add_argument("--name", help="model name in the card (default: the --out folder's name)")
    p.add_argument("--thresholds", help="operating thresholds: label=prob,... or a JSON file (default: the source's, else 0.5)")
    p.add_argument("--heatmap-thresholds", help="CAM peak thresholds: label=prob,... or a JSON file (default: the label's threshold)")
    p.add_argument("--force", action="store_true", help="replace an existing package in --out")
    p.set_defaults(fn=main)
    return p


def main(a: argparse.Namespace) -> int:
    res = import_model(a.source, a.out, arch=a.arch, labels=a.labels,
                       input_size=None if a.input_size is None else list(a.input_size), normalize=a.normalize,
                       weights=a.weights, fit=a.fit, name=a.name, thresholds=a.thresholds,
                       heatmap_thresholds=a.heatmap_thresholds, overwrite=a.force)
    card = res.package.card
    chk = card.raw["source"]["conversion_check"]
    print(f"wrote {res.root} ({card.raw['source'].get('arch') or 'onnx'}, {card.num_classes} labels, input "
          f"{card.input_hw[0]}x{card.input_hw[1]} {card.fit}, heatmaps {card.heatmap_hw[0]}x{card.heatmap_hw[1]}); "
          f"check vs {chk['against']}: max |logit diff| {chk['max_abs_logit_diff']:.2g}")
    outside = card.raw["source"].get("labels_outside_ontology")
    if outside:
        print(f"labels kept by their own names (not in the cxrkit ontology): {', '.join(outside)}")
    return 0
