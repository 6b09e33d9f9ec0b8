"""INT8 Q/DQ graph: explicit quantization that TensorRT (strongly typed) and ONNX Runtime both run.

Placement (one rule set, chosen so that TensorRT fuses it and ONNX Runtime's CPU QDQ fusions
turn it into QLinearConv / QLinearAdd / QLinearConcat):

- *Weighted ops* (Conv, Gemm, MatMul with a constant weight): weights stored int8 (``weight_bits``
  7 by default: see :func:`cxrkit.quant.quantize_int8`), symmetric, per output channel (``axis=0`` for Conv and for Gemm with ``transB=1``), read through a
  DequantizeLinear; the activation input gets QuantizeLinear -> DequantizeLinear. Biases stay
  float32 (TensorRT wants them unquantized; ONNX Runtime quantizes them itself when it fuses).
- *Int8 pass-through ops* (Add, Relu, MaxPool, AveragePool, Resize, Concat) are quantized when
  every activation input comes from a quantized op, so chains stay int8 between convolutions.
- Outputs of quantized ops are int8 (ONNX Runtime fuses a conv only with a Q after it), except
  graph outputs: the heatmap head's output stays float32, as does everything computed from it.
  A pass-through op whose output feeds no int8 consumer is left in float32.
- Each quantized reader of a tensor gets its own QuantizeLinear -> DequantizeLinear pair, float
  readers share one more, so every reader sees the same int8 values, as in TensorRT. The CPU
  form (``uint8_activations``) has one pair per tensor instead (see :func:`apply_qdq`).
- A quantized Concat's inputs and output share one scale (the largest calibrated range among
  them), so an int8 concat copies bytes instead of requantizing (:attr:`QDQPlan.shared`).
- Activations are per-tensor, symmetric, int8, zero point 0 (TensorRT's only int8 mode).
  An op whose only consumer is a quantized Relu uses the Relu output's range, so Q -> DQ ->
  Relu -> Q is exact (negative values saturate and Relu zeroes them anyway); MaxPool and Resize
  outputs share their input's scale.

``keep_fp32`` leaves ops out by node name, glob pattern, op type, or the aliases ``:first`` /
``:last`` (the first / last weighted op in graph order: the stem and the head).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import ModelError
from .graph import QUANTIZABLE_OPS, all_names, check, consumers, load_model, prepare, producers, unique_name

__all__ = ["QDQPlan", "plan_qdq", "apply_qdq", "weighted_ops", "PASS_THROUGH_OPS"]

log = logging.getLogger(__name__)

PASS_THROUGH_OPS = ("Add", "Relu", "MaxPool", "AveragePool", "Resize", "Concat")
_SAME_SCALE_OPS = ("MaxPool", "Resize")  # output scale := input scale
_ACT_INPUTS = {"Conv": (0,), "Gemm": (0,), "MatMul": (0,), "Add": (0, 1), "Relu": (0,), "MaxPool": (0,),
               "AveragePool": (0,), "Resize": (0,)}  # Concat: every input


@dataclass
class QDQPlan:
    """What to quantize in a prepared fp32 graph; ``calib_tensors`` are the tensors to calibrate."""

    weighted: list[str]  # node names of weighted ops quantized
    pass_through: list[str]  # node names of pass-through ops quantized
    tensors: list[str]  # activation tensors that get a QuantizeLinear
    range_of: dict[str, str]  # tensor -> tensor whose calibrated range it uses
    kept_fp32: list[str] = field(default_factory=list)
    #: tensor -> the tensors that must share its scale (itself included): the members of a
    #: quantized Concat (inputs and output, so an int8 concat is a copy) and the range_of links
    shared: dict[str, list[str]] = field(default_factory=dict)

    def amax(self, t: str, ranges: Mapping[str, float]) -> float:
        """The calibrated range ``t`` is quantized with: the largest range in its scale group."""
        return max(float(ranges[self.range_of[m]]) for m in self.shared.get(t, [t]))

    @property
    def calib_tensors(self) -> list[str]:
        return sorted(set(self.range_of.values()))


def _act_inputs(node) -> list[int]:
    if node.op_type == "Concat":
        return list(range(len(node.input)))
    return list(_ACT_INPUTS.get(node.op_type, (0,)))


def weighted_ops(model) -> list[str]:
    """Names of the ops with a constant weight that can take int8 weights, in graph order."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    out = []
    for n in g.node:
        if n.op_type in QUANTIZABLE_OPS and len(n.input) > 1 and n.input[1] in inits and n.input[0] not in inits:
            out.append(n.name)
    return out


def _resolve_keep(patterns: Iterable[str], g, weighted: Sequence[str]) -> set[str]:
    names = set()
    pats = list(patterns)
    for p in pats:
        if p == ":first" and weighted:
            names.add(weighted[0])
        elif p == ":last" and weighted:
            names.add(weighted[-1])
    globs = [p for p in pats if not p.startswith(":")]
    for n in g.node:
        if any(fnmatch.fnmatchcase(n.name, p) or n.op_type == p for p in globs):
            names.add(n.name)
    unknown = [p for p in globs if not any(fnmatch.fnmatchcase(n.name, p) or n.op_type == p for n in g.node)]
    if unknown:
        raise ModelError(f"keep_fp32 names no node of the graph: {unknown} (node names look like {weighted[:3]})")
    return names


def slow_int8_convs(model, skip_depthwise: bool = True, min_reduction: int = 16) -> set[str]:
    """Convs whose int8 kernel is not faster than fp32 on CPUs without VNNI (ONNX Runtime, AVX2):
    depthwise convs (``group`` == input channels > 1) and convs that reduce over fewer than
    ``min_reduction`` values per output (``Cin/group * kh * kw``, e.g. a 1-channel 3x3 stem)."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    out = set()
    for n in g.node:
        if n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        dims = list(inits[n.input[1]].dims)  # (Cout, Cin/group, kh, kw)
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        red = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        if (skip_depthwise and group > 1 and dims[1] == 1) or red < min_reduction:
            out.add(n.name)
    return out


def plan_qdq(model, keep_fp32: Iterable[str] = (), only: Iterable[str] | None = None, *,
             skip_depthwise: bool = False, min_reduction: int = 0) -> QDQPlan:
    """Decide the Q/DQ placement for a *prepared* fp32 graph (see :func:`graph.prepare`).

    ``only``: quantize just these weighted ops (and no pass-through ops): used to measure the
    sensitivity of one layer at a time. ``skip_depthwise`` / ``min_reduction``: leave the convs
    :func:`slow_int8_convs` names in fp32 (selective quantization for CPU speed).
    """
    g = model.graph
    weighted_all = weighted_ops(model)
    keep = _resolve_keep(keep_fp32, g, weighted_all)
    if skip_depthwise or min_reduction > 0:
        keep |= slow_int8_convs(model, skip_depthwise, min_reduction)
    if only is not None:
        only = set(only)
        keep |= {w for w in weighted_all if w not in only}
    weighted = [w for w in weighted_all if w not in keep]
    inits = {i.name for i in g.initializer}
    graph_outputs = {o.name for o in g.output}
    prod = producers(g)
    cons = consumers(g)

    quantized: set[str] = set(weighted)
    pass_through: list[str] = []
    if only is None:
        for n in g.node:  # graph order is topological: a forward pass decides pass-through ops
            if n.op_type not in PASS_THROUGH_OPS or n.name in keep:
                continue
            acts = [n.input[k] for k in _act_inputs(n) if k < len(n.input) and n.input[k] and n.input[k] not in inits]
            if acts and all(a in prod and prod[a].name in quantized for a in acts):
                quantized.add(n.name)
                pass_through.append(n.name)

    # a pass-through op pays only if its output feeds int8 consumers: prune backwards
    changed = True
    while changed:
        changed = False
        for n in reversed(g.node):
            if n.name in quantized and n.name not in weighted:
                outs = [c for o in n.output for c, k in cons.get(o, []) if c.name in quantized and k in _act_inputs(c)]
                if not outs or any(o in graph_outputs for o in n.output):
                    quantized.discard(n.name)
                    changed = True
    pass_through = [p for p in pass_through if p in quantized]

    tensors: list[str] = []
    for n in g.node:
        if n.name not in quantized:
            continue
        for k in _act_inputs(n):
            if k < len(n.input) and n.input[k] and n.input[k] not in inits:
                tensors.append(n.input[k])
        # every output of a quantized op is int8 unless it leaves the graph (the heatmap head stays
        # fp32); ONNX Runtime needs the Q after a conv to fuse it into QLinearConv
        for o in n.output:
            if o and o not in graph_outputs and cons.get(o):
                tensors.append(o)
    tensors = list(dict.fromkeys(tensors))
    tset = set(tensors)

    range_of = {t: t for t in tensors}
    # an op whose only consumer is a quantized Relu takes the Relu output's range (exact)
    for t in tensors:
        cs = cons.get(t, [])
        if len(cs) == 1 and cs[0][0].op_type == "Relu" and cs[0][0].name in quantized and cs[0][0].output[0] in tset:
            range_of[t] = cs[0][0].output[0]
    # MaxPool / Resize outputs share their input's scale (TensorRT and ORT both want that)
    for n in g.node:
        if n.name in quantized and n.op_type in _SAME_SCALE_OPS and n.output[0] in tset and n.input[0] in tset:
            range_of[n.output[0]] = range_of[n.input[0]]
    # resolve chains (Relu -> MaxPool ...)
    for t in tensors:
        seen = {t}
        while range_of[t] != t and range_of[range_of[t]] != range_of[t] and range_of[t] not in seen:
            seen.add(range_of[t])
            range_of[t] = range_of[range_of[t]]
    # scale groups: a quantized Concat's inputs and output share one scale (the largest range among
    # them), so the int8 concat copies bytes instead of requantizing every input (ORT's
    # QLinearConcat and TensorRT both take that fast path), plus the range_of links above
    parent = {t: t for t in tensors}

    def find(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for t in tensors:
        if range_of[t] in parent:
            parent[find(t)] = find(range_of[t])
    for n in g.node:
        if n.name in quantized and n.op_type == "Concat" and n.output[0] in tset:
            for i in n.input:
                if i in tset:
                    parent[find(i)] = find(n.output[0])
    members: dict[str, list[str]] = {}
    for t in tensors:
        members.setdefault(find(t), []).append(t)
    shared = {t: members[find(t)] for t in tensors}
    kept = sorted(keep & set(weighted_all))
    return QDQPlan(weighted=weighted, pass_through=pass_through, tensors=tensors, range_of=range_of, kept_fp32=kept,
                   shared=shared)


def _weight_axis(node) -> int:
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return 1
    return 0  # Conv: (Cout, Cin/groups, kh, kw)


def _quantize_weight(w: np.ndarray, axis: int, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 in [-qmax, qmax] (TensorRT's range is 127); returns (q, scale)."""
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    amax = np.abs(moved).max(axis=1).astype(np.float32)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def apply_qdq(model, plan: QDQPlan, ranges: Mapping[str, float], out: "str | Path | None" = None, *,
              weight_bits: int = 8, uint8_activations: bool = False):
    """Write the Q/DQ graph for ``plan`` with activation ``ranges`` (tensor -> amax).

    ``uint8_activations``: an ONNX Runtime CPU-only variant (not for TensorRT, which takes only
    symmetric int8): tensors that are >= 0 (ReLU outputs, and convs whose range is their ReLU's)
    get uint8 with zero point 0 and scale amax/255, so ORT folds each ReLU into the
    QuantizeLinear before it and the conv + ReLU becomes one QLinearConv; the others get uint8
    with zero point 128 and scale amax/127 (the same grid as symmetric int8).
    """
    import onnx
    from onnx import helper, numpy_helper

    m = load_model(model)
    g = m.graph
    taken = all_names(g)
    inits = {i.name: i for i in g.initializer}
    weighted = set(plan.weighted)
    quantized = weighted | set(plan.pass_through)
    missing = [t for t in plan.calib_tensors if t not in ranges]
    if missing:
        raise ModelError(f"no calibration range for {len(missing)} tensors, e.g. {missing[:3]}")

    zp8 = unique_name("qdq_zero_point_int8", taken)
    g.initializer.append(numpy_helper.from_array(np.array(0, np.int8), zp8))
    nonneg: set[str] = set()
    if uint8_activations:  # ONNX Runtime CPU only: uint8, zero point 0 where x >= 0 (ReLU folds into Q)
        zpu0, zpu128 = unique_name("qdq_zero_point_u0", taken), unique_name("qdq_zero_point_u128", taken)
        g.initializer.append(numpy_helper.from_array(np.array(0, np.uint8), zpu0))
        g.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), zpu128))
        prod_ = producers(g)
        for t in plan.tensors:
            r = plan.range_of[t]
            if (r in prod_ and prod_[r].op_type == "Relu") or (t in prod_ and prod_[t].op_type == "Relu"):
                nonneg.add(t)
        planned = set(plan.tensors)
        for n in g.node:  # pooling / concat / resize of non-negative tensors
            if n.op_type in ("MaxPool", "AveragePool", "Concat", "Resize") and n.output[0] in planned:
                if all(i in nonneg for i in n.input[:1 if n.op_type != "Concat" else None]):
                    nonneg.add(n.output[0])
        # a scale group shares its zero point too: non-negative only if every member is
        nonneg = {t for t in nonneg if all(m in nonneg for m in plan.shared.get(t, [t]))}
    amax_of: dict[str, float] = {}
    for t in plan.tensors:
        amax = plan.amax(t, ranges)
        if not np.isfinite(amax) or amax < 0:
            raise ModelError(f"calibration range of {plan.range_of[t]!r} (scale group of {t!r}) is {amax}")
        amax_of[t] = max(amax, 1e-8)
    tensors = list(plan.tensors)
    if uint8_activations:
        # Q(x) == Q(relu(x)) with uint8 and zero point 0 (quantizing saturates at 0): a quantized
        # Relu that is its input's only reader and shares its scale is dropped, and its readers
        # read the input's uint8 copy (ORT would leave a DQ -> Q requantization there otherwise)
        cons_ = consumers(g)
        outs = {o.name for o in g.output}
        alias: dict[str, str] = {}
        for n in list(g.node):
            t, r = n.input[0] if n.input else "", n.output[0]
            if (n.op_type == "Relu" and n.name in quantized and t in nonneg and r in nonneg and r not in outs
                    and len(cons_.get(t, [])) == 1 and t not in outs and amax_of[t] == amax_of[r]):
                alias[r] = t
                g.node.remove(n)
                quantized.discard(n.name)
        for n in g.node:
            n.input[:] = [alias.get(i, i) for i in n.input]
        tensors = [t for t in tensors if t not in alias]
    tset = set(tensors)
    # Where the Q -> DQ pairs go. TensorRT form: one pair per quantized reader (TensorRT's input-side
    # placement; ONNX Runtime fuses a DQ -> op -> Q group only if its Q and DQ are its own), float
    # readers share one more. CPU form: one pair per tensor, read by all, so the op producing the
    # tensor owns its Q and fuses with it (ORT fuses conv -> Q only when the Q is the conv's one
    # reader) and ORT copies the DQ for each reader itself (EnsureUniqueDQForNodeUnit): measured,
    # that is what turns a DenseNet into one NHWC uint8 chain of QLinearConv / QLinearConcat.
    per_reader = not uint8_activations
    q_cons: dict[str, list[tuple[str, int] | None]] = {t: [] for t in tensors}  # None: shared pair
    for n in g.node:
        for k, t in enumerate(n.input):
            if t in tset:
                key = (n.name, k) if per_reader and n.name in quantized and k in _act_inputs(n) else None
                if key is not None or None not in q_cons[t]:
                    q_cons[t].append(key)
    dq_for: dict[tuple[str, int], str] = {}  # (reader node, input index) or (tensor, -1) -> its DQ output
    new_nodes = []

    def emit_qdq(t: str) -> None:
        # every reader sees the same int8 values (as in TensorRT); ORT's constant sharing and CSE
        # would merge identical per-reader pairs again, so pair j's scale is nudged by j float32
        # ulps (a relative change of ~1e-7 * j)
        s = np.float32(amax_of[t] / 127.0)
        zp = zp8
        if uint8_activations:
            s, zp = (np.float32(amax_of[t] / 255.0), zpu0) if t in nonneg else (s, zpu128)
        for j, key in enumerate(q_cons[t]):
            sj = s
            for _ in range(j):
                sj = np.nextafter(sj, np.float32(np.inf))
            sn = unique_name(f"{t}_scale" if j == 0 else f"{t}_scale_{j}", taken)
            g.initializer.append(numpy_helper.from_array(np.array(sj, np.float32), sn))
            qn, dqn = unique_name(f"{t}_q", taken), unique_name(f"{t}_dq", taken)
            new_nodes.append(helper.make_node("QuantizeLinear", [t, sn, zp], [qn],
                                              name=unique_name(f"QuantizeLinear_{t}", taken)))
            new_nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zp], [dqn],
                                              name=unique_name(f"DequantizeLinear_{t}", taken)))
            dq_for[key if key is not None else (t, -1)] = dqn

    for i in g.input:
        if i.name in tset:
            emit_qdq(i.name)
    for n in list(g.node):
        for k, t in enumerate(n.input):
            if t in tset:
                n.input[k] = dq_for.get((n.name, k)) or dq_for[(t, -1)]
        if n.name in weighted:
            w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            axis = _weight_axis(n)
            wq, ws = _quantize_weight(w, axis, (1 << (weight_bits - 1)) - 1)
            base = n.input[1]
            wq_n, ws_n, wz_n, wd_n = (unique_name(f"{base}_{s}", taken) for s in ("int8", "scale", "zero_point", "dq"))
            g.initializer.extend([numpy_helper.from_array(wq, wq_n), numpy_helper.from_array(ws, ws_n),
                                  numpy_helper.from_array(np.zeros(ws.shape, np.int8), wz_n)])
            new_nodes.append(helper.make_node("DequantizeLinear", [wq_n, ws_n, wz_n], [wd_n], axis=axis,
                                              name=unique_name(f"DequantizeLinear_{base}", taken)))
            n.input[1] = wd_n
        new_nodes.append(n)
        for o in n.output:
            if o in tset:
                emit_qdq(o)
    used = {i for x in new_nodes for i in x.input}
    kept_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    if not any(op.domain in ("", "ai.onnx") and op.version >= 13 for op in m.opset_import):
        raise ModelError("per-channel QuantizeLinear/DequantizeLinear needs opset >= 13; re-export the model")
    check(m, "int8 Q/DQ")
    if out is not None:
        onnx.save(m, str(out))
    log.info("int8 graph: %d weighted ops int8 (%d kept fp32), %d pass-through ops, %d quantized tensors",
             len(plan.weighted), len(plan.kept_fp32), len(plan.pass_through), len(plan.tensors))
    return m


def prepared(model):
    """A prepared copy of ``model`` (constants folded, nodes named) for planning and calibration."""
    return prepare(load_model(model))
