"""Small ONNX graph helpers shared by the fp16 and Q/DQ rewriters (onnx only, no ORT)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
import numpy as np

from ..errors import ModelError

__all__ = ["load_model", "prepare", "consumers", "producers", "unique_name", "float_tensor_types",
           "check", "QUANTIZABLE_OPS"]

#: ops with a constant weight that get per-channel int8 weights
QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")


def load_model(model: "str | Path | object") -> "onnx.ModelProto":  # noqa: F821
    """An independent copy of ``model`` (a path or a ModelProto)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        return m
    return onnx.load(str(model))


def prepare(model: "onnx.ModelProto") -> "onnx.ModelProto":  # noqa: F821
    """Constant nodes to initializers and Identity-of-initializer removed (in place; returned).

    The TorchScript exporter leaves ``Identity(weight)`` for shared parameters and ``Constant``
    nodes for scalars; the rewriters want every constant to be an initializer they can see.
    """
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    keep = []
    taken = {n.name for n in g.node if n.name}
    for k, n in enumerate(g.node):
        if not n.name:
            n.name = unique_name(f"{n.op_type}_{k}", taken)
        n.input[:] = [rename.get(i, i) for i in n.input]
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value" \
                and n.output[0] not in outputs:
            t = numpy_helper.to_array(n.attribute[0].t)
            g.initializer.append(numpy_helper.from_array(t, n.output[0]))
            inits.add(n.output[0])
            continue
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs:
            rename[n.output[0]] = n.input[0]
            continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    for o in g.output:  # an output renamed away would be a bug above; keep the check cheap
        if o.name in rename:
            raise ModelError(f"graph output {o.name!r} was folded away")
    return model


def consumers(graph: "onnx.GraphProto") -> dict[str, list[tuple["onnx.NodeProto", int]]]:  # noqa: F821
    out: dict[str, list] = defaultdict(list)
    for n in graph.node:
        for k, i in enumerate(n.input):
            if i:
                out[i].append((n, k))
    return out


def producers(graph: "onnx.GraphProto") -> dict[str, "onnx.NodeProto"]:  # noqa: F821
    return {o: n for n in graph.node for o in n.output if o}


def unique_name(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def all_names(graph: "onnx.GraphProto") -> set[str]:  # noqa: F821
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    names |= {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
    return names


def float_tensor_types(model: "onnx.ModelProto") -> dict[str, int]:  # noqa: F821
    """Tensor name -> ONNX elem_type for every tensor whose type shape inference can tell."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {i.name: i.data_type for i in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def check(model: "onnx.ModelProto", what: str) -> None:  # noqa: F821
    """onnx.checker plus strict type inference; a rewriter bug becomes a ModelError, not a bad file."""
    import onnx

    try:
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        raise ModelError(f"the {what} graph cxrkit wrote does not validate: {e}") from e


def initializer_arrays(graph: "onnx.GraphProto") -> dict[str, np.ndarray]:  # noqa: F821
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}




def batchnorm_to_depthwise(model: "onnx.ModelProto") -> list[str]:  # noqa: F821
    """Each inference BatchNormalization on a 4-D tensor that no conv absorbed (pre-activation
    nets: ``BN -> ReLU -> Conv`` as in DenseNet) becomes the equal 1x1 depthwise Conv
    (``W[c] = gamma[c] / sqrt(var[c] + eps)``, ``B[c] = beta[c] - mean[c] W[c]``), in place.

    Exact in fp32 up to rounding. It lets a Q/DQ graph quantize the BN as a weighted op: its
    per-channel int8 weight holds ``W[c]`` exactly (``+-qmax`` at scale ``|W[c]| / qmax``), its
    input (a DenseNet concat) stays int8, and ONNX Runtime runs ``BN -> ReLU -> Q`` as one
    depthwise QLinearConv instead of dequantize, BatchNormalization, quantize and two layout
    transposes over the whole concat. Returns the names of the nodes rewritten.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    taken = all_names(g)
    done = []
    for k, n in enumerate(g.node):
        if n.op_type != "BatchNormalization" or len(n.output) != 1 or len(n.input) != 5:
            continue
        if any(i not in inits for i in n.input[1:]):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in n.input[1:])
        if gamma.ndim != 1:
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        w = gamma / np.sqrt(var + eps)
        b = beta - mean * w
        c = len(w)
        wn, bn = unique_name(f"{n.name}_dw_weight", taken), unique_name(f"{n.name}_dw_bias", taken)
        g.initializer.extend([numpy_helper.from_array(w.astype(np.float32).reshape(c, 1, 1, 1), wn),
                              numpy_helper.from_array(b.astype(np.float32), bn)])
        conv = helper.make_node("Conv", [n.input[0], wn, bn], list(n.output), name=n.name,
                                group=c, kernel_shape=[1, 1])
        g.node.remove(n)
        g.node.insert(k, conv)
        done.append(n.name)
    return done
