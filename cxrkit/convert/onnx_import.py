"""Any ONNX classifier whose last spatial feature map feeds a global pool and a linear layer.

The head is found by walking back from the graph output:

    output <- [Sigmoid | Softmax | Identity]* <- Gemm | MatMul [+ Add]       (the linear layer)
           <- [Flatten | Reshape | Squeeze | Identity]* <- GlobalAveragePool | ReduceMean(H, W)
              | AveragePool over the whole map                                (the global pool)
           <- F (B, C, h, w)                                                  (the feature map)

and the graph is rewritten to the cxrkit contract:

    image (batch, 1, H, W) -> [Expand to C_in channels] -> [Sub mean_c, Div std_c] -> the source's input
    logits   = the linear layer's output, before any Sigmoid / Softmax          (batch, K)
    heatmaps = Conv1x1(F, W[:, :, None, None], b)  (class activation maps)   (batch, K, h, w)

Nodes that only fed the old outputs (the final Sigmoid) are dropped; everything else is the
source's own graph, so its logits are the source's numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ModelError

__all__ = ["OnnxHead", "find_head", "convert_onnx"]

log = logging.getLogger(__name__)

_PASS_AFTER = ("Sigmoid", "Softmax", "Identity", "LogSoftmax")
_PASS_BEFORE = ("Flatten", "Reshape", "Squeeze", "Identity")


@dataclass
class OnnxHead:
    feature: str  # the feature map tensor F
    logits: str  # the linear layer's output
    weight: np.ndarray  # (K, C) float32, alpha folded in
    bias: np.ndarray  # (K,) float32, beta folded in
    pool: str  # op type of the global pool
    activation: list[str] = field(default_factory=list)  # ops after the linear layer, dropped
    source_output: str = ""


def _const_values(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    vals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = numpy_helper.to_array(a.t)
    return vals


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def find_head(model: Any) -> OnnxHead:
    """Locate the global pool + linear head of ``model`` (an onnx ModelProto). Raises ModelError."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consts = _const_values(model)
    if len(g.output) != 1:
        raise ModelError(f"the ONNX graph has {len(g.output)} outputs ({[o.name for o in g.output]}); "
                         "a classifier with one output (B, K) is expected")
    t = g.output[0].name
    activation: list[str] = []
    node = producer.get(t)
    while node is not None and node.op_type in _PASS_AFTER:
        activation.append(node.op_type)
        t = node.input[0]
        node = producer.get(t)
    if node is None:
        raise ModelError(f"the ONNX output {g.output[0].name!r} is not computed by a linear layer")
    logits = t
    bias = None
    if node.op_type == "Add":
        a, b = node.input[0], node.input[1]
        if b in consts and a in producer:
            x_node, bias = producer[a], consts[b]
        elif a in consts and b in producer:
            x_node, bias = producer[b], consts[a]
        else:
            raise ModelError("the last Add before the output does not add a constant bias to a MatMul")
        node = x_node
        if node.op_type != "MatMul":
            raise ModelError(f"expected MatMul before the bias Add, found {node.op_type}")
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            raise ModelError("Gemm with transA=1 is not a classifier on pooled features")
        if node.input[1] not in consts:
            raise ModelError("the classifier Gemm's weight is not a constant (initializer)")
        w = consts[node.input[1]].astype(np.float64)
        w = w if _attr(node, "transB", 0) else w.T  # (K, C)
        w = w * float(_attr(node, "alpha", 1.0))
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in consts:
                raise ModelError("the classifier Gemm's bias is not a constant (initializer)")
            bias = np.broadcast_to(consts[node.input[2]].astype(np.float64).reshape(-1), (w.shape[0],)) * float(_attr(node, "beta", 1.0))
    elif node.op_type == "MatMul":
        if node.input[1] not in consts:
            raise ModelError("the classifier MatMul's weight is not a constant (initializer)")
        w = consts[node.input[1]].astype(np.float64).T  # (C, K) -> (K, C)
    else:
        raise ModelError(f"the graph output is computed by {node.op_type}, not a linear layer (Gemm or MatMul); "
                         "cxrkit imports classifiers ending in global pool + linear")
    if w.ndim != 2:
        raise ModelError(f"classifier weight has shape {w.shape}, expected (K, C)")
    K = w.shape[0]
    b = np.zeros(K) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    if b.shape != (K,):
        raise ModelError(f"classifier bias has shape {b.shape}, expected ({K},)")
    t = node.input[0]
    pnode = producer.get(t)
    while pnode is not None and pnode.op_type in _PASS_BEFORE:
        t = pnode.input[0]
        pnode = producer.get(t)
    if pnode is None:
        raise ModelError("the classifier's input is not computed by a pooling op")
    op = pnode.op_type
    if op == "ReduceMean":
        axes = _attr(pnode, "axes", None)
        if axes is None and len(pnode.input) > 1 and pnode.input[1] in consts:
            axes = consts[pnode.input[1]].tolist()
        if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
            raise ModelError(f"ReduceMean over axes {axes} before the classifier is not a global pool over (H, W)")
    elif op == "AveragePool":
        pass  # checked against the feature map's size after shape inference (convert_onnx)
    elif op != "GlobalAveragePool":
        raise ModelError(f"the classifier is fed by {op}, not a global average pool (GlobalAveragePool, "
                         "ReduceMean over H, W): class activation maps need a linear map of an average")
    return OnnxHead(pnode.input[0], logits, w.astype(np.float32), b.astype(np.float32), op, activation,
                    g.output[0].name)


def _real_inputs(model: Any) -> list[Any]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(vi: Any) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


def source_input(model: Any) -> tuple[str, int, tuple[int | None, int | None]]:
    """(name, channels, (H, W) or None where dynamic) of the one image input; NCHW float."""
    ins = _real_inputs(model)
    if len(ins) != 1:
        raise ModelError(f"the ONNX graph has {len(ins)} inputs ({[i.name for i in ins]}); one image input is expected")
    dims = _dims(ins[0])
    if len(dims) != 4:
        raise ModelError(f"input {ins[0].name!r} has shape {dims}; an image batch (N, C, H, W) is expected")
    c = dims[1]
    if not isinstance(c, int) or c not in (1, 3):
        hint = " (NHWC? export the model channels-first)" if isinstance(dims[3], int) and dims[3] in (1, 3) else ""
        raise ModelError(f"input {ins[0].name!r} has shape {dims}: channel dimension {c!r} is not 1 or 3{hint}")
    h = dims[2] if isinstance(dims[2], int) and dims[2] > 0 else None
    w = dims[3] if isinstance(dims[3], int) and dims[3] > 0 else None
    return ins[0].name, int(c), (h, w)


def convert_onnx(model: Any, head: OnnxHead, *, input_hw: tuple[int, int], channels: int,
                 channel_mean: tuple[float, ...] | None, channel_std: tuple[float, ...] | None) -> Any:
    """The rewritten ModelProto (see module doc). ``model`` is modified in place and returned."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    src_name = source_input(model)[0]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 8:
        raise ModelError(f"the ONNX graph uses opset {opset}; re-export it with opset >= 8 (13 or later advised)")
    K = head.weight.shape[0]
    new_nodes = []
    x = "image"
    taken = {n for node in g.node for n in list(node.input) + list(node.output)} | {t.name for t in g.initializer}

    def fresh(base: str) -> str:
        name, i = f"cxrkit_{base}", 0
        while name in taken:
            i += 1
            name = f"cxrkit_{base}_{i}"
        taken.add(name)
        return name

    inits = []
    if channels != 1:
        shape = fresh("expand_shape")
        inits.append(numpy_helper.from_array(np.array([1, channels, 1, 1], np.int64), shape))
        y = fresh("replicated")
        new_nodes.append(helper.make_node("Expand", [x, shape], [y], name=fresh("Expand")))
        x = y
    if channel_mean is not None:
        m, s = fresh("channel_mean"), fresh("channel_std")
        inits.append(numpy_helper.from_array(np.array(channel_mean, np.float32).reshape(1, -1, 1, 1), m))
        inits.append(numpy_helper.from_array(np.array(channel_std, np.float32).reshape(1, -1, 1, 1), s))
        y = fresh("centered")
        new_nodes.append(helper.make_node("Sub", [x, m], [y], name=fresh("Sub")))
        x = y
        new_nodes.append(helper.make_node("Div", [x, s], [src_name], name=fresh("Div")))
    else:
        new_nodes.append(helper.make_node("Identity", [x], [src_name], name=fresh("Identity")))
    wname, bname = fresh("cam_weight"), fresh("cam_bias")
    inits.append(numpy_helper.from_array(head.weight.reshape(K, -1, 1, 1).astype(np.float32), wname))
    inits.append(numpy_helper.from_array(head.bias.astype(np.float32), bname))
    tail = [helper.make_node("Conv", [head.feature, wname, bname], ["heatmaps"], name=fresh("CAM"), kernel_shape=[1, 1]),
            helper.make_node("Identity", [head.logits], ["logits"], name=fresh("logits"))]

    producer = {o: n for n in g.node for o in n.output}
    lin = producer.get(head.logits)  # the linear layer: a stable name to keep it fp32 when quantizing
    if lin is not None:
        if lin.op_type == "Add" and lin.input[0] in producer and producer[lin.input[0]].op_type == "MatMul":
            producer[lin.input[0]].name, lin.name = "cxrkit/classifier", "cxrkit/classifier_bias"
        else:
            lin.name = "cxrkit/classifier"
    for name in ("image", "logits", "heatmaps"):
        if name in {n for node in g.node for n in node.output} or name == src_name:
            raise ModelError(f"the source graph already has a tensor named {name!r}; rename it before importing")
    # rebuild: adapter + the source's nodes + CAM; drop nodes that fed only the old output
    nodes = new_nodes + list(g.node) + tail
    needed = {"logits", "heatmaps"}
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    dropped = [n.op_type for n in nodes if n not in keep]
    if dropped:
        log.info("dropped %d nodes that fed only the old output: %s", len(dropped), dropped)
    H, W = input_hw
    del g.node[:]
    g.node.extend(keep)
    old_inputs = [i for i in g.input if i.name != src_name]
    del g.input[:]
    g.input.extend([helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, H, W])] + old_inputs)
    g.initializer.extend(inits)
    used = {i for n in g.node for i in n.input}
    kept_inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    # initializers listed as inputs by old exporters: keep only those still used
    still = [i for i in g.input if i.name == "image" or i.name in used]
    del g.input[:]
    g.input.extend(still)
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K]),
                     helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, ["batch", K, None, None])])
    del g.value_info[:]  # the source's intermediate shapes may name a fixed batch or input size
    onnx.checker.check_model(model)
    return model
