"""FP32 -> FP16 ONNX graph with the precision written into the graph (for strongly typed TensorRT).

Weights and activations become float16; the graph keeps float32 at its boundary (``image`` in,
``logits`` / ``heatmaps`` out) through Cast nodes, and a few numerically sensitive ops stay in
float32 with Casts around them (``FP32_OPS``: the exp / log / sum of the smooth-max image pooling,
softmax, powers and roots). A strongly typed TensorRT network runs each layer in the type the
graph gives it, so this file *is* the fp16 engine's precision plan; ONNX Runtime runs the same
graph on the CPU (it casts ops it has no fp16 kernel for), which is how it is checked here.

Written here rather than taken from onnxconverter-common: the rewrite is one pass over the nodes
(one producer type per tensor, a Cast wherever a consumer wants the other type) and it keeps the
dependency list short.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .graph import all_names, check, load_model, prepare, unique_name

__all__ = ["convert_fp16", "FP32_OPS"]

log = logging.getLogger(__name__)

#: op types kept in float32 by default (overflow / cancellation in fp16)
FP32_OPS = frozenset({
    "Exp", "Log", "ReduceSum", "ReduceLogSumExp", "ReduceSumSquare", "ReduceL2", "ReduceLogSum",
    "Softmax", "LogSoftmax", "Pow", "Sqrt", "Reciprocal", "Div", "Erf",
})

#: (op type, input index) that must stay float32 whatever the node's precision
_FP32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}

_FLOAT, _HALF = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16
_FP16_MAX = float(np.finfo(np.float16).max)


def _matches(name: str, op: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or p == op for p in patterns)


def convert_fp16(model: "str | Path | object", out: "str | Path | None" = None, *,
                 keep_fp32: Iterable[str] = (), fp32_ops: Iterable[str] = FP32_OPS) -> "onnx.ModelProto":  # noqa: F821
    """Return (and write to ``out`` if given) the fp16 version of an fp32 ONNX graph.

    ``keep_fp32``: node names, glob patterns or op types to leave in float32 as well as
    ``fp32_ops``. Inputs and outputs keep their float32 type.
    """
    import onnx
    from onnx import helper, numpy_helper

    m = prepare(load_model(model))
    g = m.graph
    keep = list(keep_fp32)
    fp32_ops = frozenset(fp32_ops)
    taken = all_names(g)
    inits = {i.name: i for i in g.initializer}
    float_inits = {n for n, i in inits.items() if i.data_type == _FLOAT}
    # which tensors are float: inputs, initializers, and every output of a node with a float input
    # or a float-typed attribute (shape inference tells us the rest)
    from .graph import float_tensor_types

    types = float_tensor_types(m)

    def is_float(name: str) -> bool:
        return types.get(name) == _FLOAT

    half_node = {n.name: not (n.op_type in fp32_ops or _matches(n.name, n.op_type, keep)) for n in g.node}
    # the type each float tensor is produced in
    produced: dict[str, int] = {i.name: _FLOAT for i in g.input}
    new_nodes: list = []
    cast_cache: dict[tuple[str, int], str] = {}
    half_init_cache: dict[str, str] = {}
    clipped: list[str] = []

    def half_init(name: str) -> str:
        if name not in half_init_cache:
            a = numpy_helper.to_array(inits[name])
            if a.size and np.abs(a).max() > _FP16_MAX:
                clipped.append(name)
            h = np.clip(a, -_FP16_MAX, _FP16_MAX).astype(np.float16)
            nm = unique_name(f"{name}_fp16", taken)
            g.initializer.append(numpy_helper.from_array(h, nm))
            half_init_cache[name] = nm
        return half_init_cache[name]

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in cast_cache:
            nm = unique_name(f"{name}_to_{'fp16' if to == _HALF else 'fp32'}", taken)
            new_nodes.append(helper.make_node("Cast", [name], [nm], name=unique_name(f"Cast_{nm}", taken), to=to))
            cast_cache[key] = nm
        return cast_cache[key]

    for n in list(g.node):
        want = _HALF if half_node[n.name] else _FLOAT
        for k, i in enumerate(n.input):
            if not i or not is_float(i):
                continue
            w = _FLOAT if (n.op_type, k) in _FP32_INPUTS else want
            if i in float_inits:
                if w == _HALF:
                    n.input[k] = half_init(i)
                continue
            have = produced.get(i, _FLOAT)
            if have != w:
                n.input[k] = cast(i, w)
        if want == _HALF:
            if n.op_type == "Cast":
                for a in n.attribute:
                    if a.name == "to" and a.i == _FLOAT:
                        a.i = _HALF
            if n.op_type == "ConstantOfShape":
                for a in n.attribute:
                    if a.name == "value" and a.t.data_type == _FLOAT:
                        a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        new_nodes.append(n)
        for o in n.output:
            if is_float(o):
                produced[o] = want

    # outputs stay float32: rename a half producer's output and cast back under the original name
    out_names = {o.name for o in g.output}
    for o in g.output:
        if produced.get(o.name) == _HALF:
            inner = unique_name(f"{o.name}_fp16", taken)
            for n in new_nodes:
                n.output[:] = [inner if x == o.name else x for x in n.output]
                n.input[:] = [inner if x == o.name else x for x in n.input]
            new_nodes.append(helper.make_node("Cast", [inner], [o.name], name=unique_name(f"Cast_{o.name}", taken), to=_FLOAT))
    assert out_names == {o.name for o in g.output}

    # drop float32 initializers nobody reads any more
    used = {i for n in new_nodes for i in n.input}
    kept_inits = [i for i in g.initializer if i.name in used or i.name in {x.name for x in g.input}]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    if clipped:
        log.warning("fp16: %d initializers had values beyond the fp16 range and were clipped: %s",
                    len(clipped), clipped[:5])
    check(m, "fp16")
    if out is not None:
        onnx.save(m, str(out))
    n_fp32 = sum(1 for v in half_node.values() if not v)
    log.info("fp16 graph: %d nodes in fp16, %d kept in fp32, %d casts", len(half_node) - n_fp32, n_fp32, len(cast_cache))
    return m
