"""The integer-kernel rewrite (``--kernel integer``): Linear → DynamicQuantizeMatMul + FP32 correction.

For a Linear ``y = x Wᵀ (+ b)`` planned with 8-bit codes ``c = q + 128`` (|q| ≤ 63, per-output-
channel scales s, exact entries S, activation-outlier columns C ⊆ columns of S;
:mod:`edgeq.quant.integer` gives the arithmetic)::

    x'  = Mul(x, m)                       # only when C ≠ ∅ or smoothed: m_j = 0 for j ∈ C, r_j = 1/s_j
                                          # (--smooth-alpha; codes of W diag(s)), else 1: input_factors(q)
    y_q = com.microsoft.DynamicQuantizeMatMul(x', B = int8 qᵀ [K, N], b_scale = s [N], -, bias = b)
    y   = y_q + correction(x)             # edgeq.onnx.corrections, on x itself (C's columns are in S)

**Shared activation quantization.**  Linears that read one x (q, k and v of an attention block) with
the same columns C quantize x' once, as ONNX Runtime's own ``quantize_dynamic`` writes them::

    x'          = Mul(x, m)                                   # /{group}/ActMask, once
    u, a, z     = DynamicQuantizeLinear(x')                   # /{group}/DynamicQuantizeLinear, once
    y_q,l       = com.microsoft.MatMulIntegerToFloat(u, B_l, a, s_l, z, -, b_l)   # /{layer}/…, per part

(``group`` = :func:`edgeq.onnx.graph.group_name` of the parts, e.g. ``…self.query+key+value``).
DynamicQuantizeMatMul is DynamicQuantizeLinear + MatMulIntegerToFloat in one node, so every y_q,l is
the number the unshared node would compute; the parts keep their own weights, scales and corrections.

ONNX Runtime's CPU EP fuses DynamicQuantizeLinear → MatMulInteger → Cast → Mul → Add into this very
node (``tools/integer_kernels.py`` prints the optimized graphs); writing it directly keeps the
file small and the graph explicit.  int8 (not uint8) weights run MLAS' U8S8 kernel, the fastest
here; on x86 without VNNI it sums pairs of u8·s8 products in int16, so the plan keeps |q| ≤ 63.

Pattern → check → rewrite: the Linears are matched as for MatMulNBits
(:func:`edgeq.onnx.rewrite.match_linears`, bias Adds folded the same way); :func:`check_integer`
returns why a planned layer cannot be written (codes beyond ±63, scales that vary along K,
activation columns not wholly exact, smoothing factors not positive); :func:`rewrite_integer`
writes them.  :func:`decode_integer` and :func:`integer_layers` read the file back
(``edgeq.onnx.readback``, plan parity): Ŵ = q · s_i · m_j + exact entries, in W's own coordinates.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeq.onnx.corrections import (
    CORRECTION_CHOICES,
    correction_branch,
    decode_correction,
)
from edgeq.onnx.graph import MS_DOMAIN, consumers, group_name, metadata, unique_names
from edgeq.onnx.lossless import float_constant
from edgeq.onnx.rewrite import LAYERS_KEY, RewriteResult, _bias_adds, commit_rewrite, match_linears
from edgeq.onnx.storage import decode_integer_weight, integer_weight
from edgeq.quant.int4 import QMAX_REDUCED, QuantizedLinear
from edgeq.quant.integer import WEIGHT_ZERO_POINT, input_factors

OP = "DynamicQuantizeMatMul"
SHARED_OP = "MatMulIntegerToFloat"  # a part of a group that quantizes its input once
KERNEL_INPUTS = {OP: (1, 2), SHARED_OP: (1, 3)}  # kernel op → input index of B (int8 qᵀ) and of b_scale
MASK = "act_mask"  # initializer suffix of the column factors m (0: outlier column, 1/s_j: smoothed; else absent)

_tensor = numpy_helper.from_array


def check_integer(q: QuantizedLinear) -> str | None:
    """Why ``q`` cannot run on the integer kernel, or None."""
    if q.bits != 8 or q.stored_bits != 8:
        return f"the integer kernel runs 8-bit codes; this layer has {q.stored_bits}-bit codes"
    if np.any(np.abs(q.codes.astype(np.int16) - WEIGHT_ZERO_POINT) > QMAX_REDUCED):
        return f"codes beyond |q| <= {QMAX_REDUCED} (plan with reduce_range): u8 x s8 pairs would saturate int16"
    if q.scales.shape[1] > 1 and np.any(q.scales != q.scales[:, :1]):
        return "scales vary along the input (block scales); the integer kernel has one scale per output channel"
    if q.act_cols is not None and q.act_cols.size:
        n_out, k_in = q.shape
        need = (np.arange(n_out)[:, None] * k_in + q.act_cols[None, :]).reshape(-1)
        if not np.all(np.isin(need, q.salient_index)):
            return "an activation-outlier column is not wholly in the FP32 correction"
    if q.smooth is not None and (q.smooth.shape != (q.shape[1],) or not np.all(np.isfinite(q.smooth))
                                 or not np.all(q.smooth > 0)):
        return "smoothing factors must be one positive finite number per input column"
    return None


def _weights(layer: str, q: QuantizedLinear, storage: str) -> tuple[str, list, list]:
    """(B name, nodes, initializers): int8 qᵀ stored ``storage`` (plain, or 7 bits a weight unpacked at load),
    and the per-channel scales ``{layer}.scales``."""
    b_name, nodes, inits = integer_weight(layer, (q.codes.astype(np.int16) - WEIGHT_ZERO_POINT).astype(np.int8).T,
                                          storage)
    inits.append(_tensor(q.scales[:, 0].astype(np.float32).copy(), f"{layer}.scales"))
    return b_name, nodes, inits


def _mask_nodes(owner: str, x: str, q: QuantizedLinear):
    """``x ⊙ m`` (:func:`edgeq.quant.integer.input_factors`: 0 on the activation-outlier columns, 1/s_j on
    smoothed ones) as ``/{owner}/ActMask``, or x itself; m is stored float16 behind a folded Cast when that
    is lossless (0/1 always is; edgeq.onnx.lossless)."""
    mask = input_factors(q)
    if mask is None:
        return x, [], []
    m, nodes, inits = float_constant(f"{owner}.{MASK}", mask, f"/{owner}/{MASK}")
    x_in = f"/{owner}/act_masked"
    return x_in, nodes + [helper.make_node("Mul", [x, m], [x_in], name=f"/{owner}/ActMask")], inits


def _layer_nodes(layer: str, x: str, y_q: str, q: QuantizedLinear, bias: str | None, storage: str):
    x_in, nodes, inits = _mask_nodes(layer, x, q)
    b_name, w_nodes, w_inits = _weights(layer, q, storage)
    nodes += w_nodes
    nodes.append(helper.make_node(OP, [x_in, b_name, f"{layer}.scales", "", bias or ""], [y_q],
                                  name=f"/{layer}/{OP}", domain=MS_DOMAIN))
    return nodes, inits + w_inits


def _shared_front(group: str, x: str, q: QuantizedLinear):
    """The group's one mask and one DynamicQuantizeLinear: (u, a, z) value names, nodes, initializers."""
    x_in, nodes, inits = _mask_nodes(group, x, q)
    u, a, z = (f"/{group}/DynamicQuantizeLinear_{v}" for v in ("output", "scale", "zero_point"))
    nodes.append(helper.make_node("DynamicQuantizeLinear", [x_in], [u, a, z], name=f"/{group}/DynamicQuantizeLinear"))
    return (u, a, z), nodes, inits


def _part_nodes(layer: str, front: tuple[str, str, str], y_q: str, q: QuantizedLinear, bias: str | None,
                storage: str):
    u, a, z = front
    b_name, nodes, inits = _weights(layer, q, storage)
    nodes.append(helper.make_node(SHARED_OP, [u, b_name, a, f"{layer}.scales", z, "", bias or ""], [y_q],
                                  name=f"/{layer}/{SHARED_OP}", domain=MS_DOMAIN))
    return nodes, inits


def _own_bias(bias: str | None, inits, uses, n_out: int) -> bool:
    """Whether ``bias`` (None: no bias) can be the kernel's own input: a [N] or [1, N] initializer read once."""
    if bias is None:
        return True
    c = inits.get(bias)
    return c is not None and len(uses[bias]) == 1 and list(c.dims) in ([n_out], [1, n_out])


def share_groups(inputs: Mapping[str, str], layers: Mapping[str, QuantizedLinear],
                 own_bias: Mapping[str, bool]) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """Pattern → check for the shared activation quantization: {x: its parts} where two or more planned
    Linears read x, and (layer, reason) for the ones that read a shared x but keep their own node.

    ``inputs``: layer → the value it reads; ``own_bias``: whether its bias is the kernel's own input.
    A part must have its bias inside (a separate bias Add stays with DynamicQuantizeMatMul) and the
    same input factors m (outlier columns, smoothing: :func:`edgeq.quant.integer.input_factors`) as the
    group's first part.
    """
    readers: dict[str, list[str]] = {}
    for layer, x in inputs.items():
        readers.setdefault(x, []).append(layer)
    groups, refused = {}, []
    for x, names in readers.items():
        if len(names) < 2:
            continue
        first = layers[names[0]].act_cols
        cols = np.empty(0, np.int64) if first is None else np.sort(first)
        m0 = input_factors(layers[names[0]])
        ok = []
        for name in names:
            c, m = layers[name].act_cols, input_factors(layers[name])
            if not own_bias[name]:
                refused.append((name, "its bias is a separate Add; it keeps its own activation quantization"))
            elif not np.array_equal(cols, np.empty(0, np.int64) if c is None else np.sort(c)):
                refused.append((name, "its activation-outlier columns differ from the other readers of its input"))
            elif not (m is None and m0 is None or m is not None and m0 is not None and np.array_equal(m, m0)):
                refused.append((name, "its smoothing factors differ from the other readers of its input"))
            else:
                ok.append(name)
        if len(ok) > 1:
            groups[x] = ok
        else:
            refused += [(name, "no other reader of its input can share the quantization") for name in ok]
    return groups, refused


def rewrite_integer(model: onnx.ModelProto, layers: Mapping[str, QuantizedLinear], weights: dict[str, np.ndarray],
                    correction: str = "auto", fold_bias: bool = True, storage: str = "plain") -> RewriteResult:
    """Rewrite, in place, every Linear of ``layers`` to DynamicQuantizeMatMul + correction (the readers of one
    input that :func:`share_groups` accepts: one shared quantization + MatMulIntegerToFloat each); raise if
    one cannot be mapped or is refused by :func:`check_integer`."""
    if correction not in CORRECTION_CHOICES:
        raise ValueError(f"unknown correction encoding {correction!r}; choose from {', '.join(CORRECTION_CHOICES)}")
    refusals = [(n, r) for n, q in layers.items() if (r := check_integer(q))]
    if refusals:
        raise ValueError("; ".join(f"{n}: {r}" for n, r in refusals[:3]))
    matches, refused = match_linears(model, weights)
    missing = [n for n in layers if n not in matches]
    if missing:
        why = "; ".join(f"{n}: {r}" for n, r in refused[:3])
        raise ValueError(f"{len(missing)} Linear(s) not found in the exported graph: {', '.join(missing[:5])}"
                         + (f" (refused nodes: {why})" if why else ""))
    graph = model.graph
    result = RewriteResult(refused=[r for r in refused if "activation" not in r[1]])
    planned = {m.node.name: m for name, m in matches.items() if name in layers}
    inits = {t.name: t for t in graph.initializer}
    uses = consumers(graph)
    bias_adds = _bias_adds(list(planned.values()), inits, uses, unique_names(graph)) if fold_bias else {}
    skip = {add.name for add, _ in bias_adds.values()}
    bias_of = {m.layer: bias_adds[n][1] if n in bias_adds else m.bias for n, m in planned.items()}
    own_bias = {name: _own_bias(bias_of[name], inits, uses, layers[name].shape[0]) for name in bias_of}
    groups, not_shared = share_groups({m.layer: m.node.input[0] for m in planned.values()}, layers, own_bias)
    group_of = {layer: group_name(parts) for parts in groups.values() for layer in parts}
    fronts: dict[str, tuple[str, str, str]] = {}  # group → its (u, a, z), once its nodes are written
    drop, new_inits, new_nodes = set(), [], []
    for node in graph.node:
        if node.name in skip:
            continue
        match = planned.get(node.name)
        if match is None:
            new_nodes.append(node)
            continue
        layer, q = match.layer, layers[match.layer]
        x, y, bias = node.input[0], node.output[0], bias_of[match.layer]
        if node.name in bias_adds:
            y = bias_adds[node.name][0].output[0]
        y_q = f"/{layer}/{SHARED_OP if layer in group_of else OP}_output" if q.k else y
        tail = []
        if bias and own_bias[layer]:
            b = numpy_helper.to_array(inits[bias]).reshape(-1).astype(np.float32)
            new_inits.append(_tensor(b, f"{layer}.bias"))
            drop.add(bias)
            bias = f"{layer}.bias"
        elif bias:  # a shared or broadcast bias stays a separate Add after the product
            tail.append(helper.make_node("Add", [f"/{layer}/{OP}_nobias", bias], [y_q], name=f"/{layer}/BiasAdd"))
            bias = None
        if layer in group_of:
            group = group_of[layer]
            if group not in fronts:
                fronts[group], nodes, tensors = _shared_front(group, x, q)
                new_nodes += nodes
                new_inits += tensors
            nodes, tensors = _part_nodes(layer, fronts[group], y_q, q, bias, storage)
        else:
            nodes, tensors = _layer_nodes(layer, x, f"/{layer}/{OP}_nobias" if tail else y_q, q, bias, storage)
        new_nodes += nodes + tail
        new_inits += tensors
        used, nodes, tensors = correction_branch(layer, x, y_q, y, q, correction, result.fallbacks)
        new_nodes += nodes
        new_inits += tensors
        drop.add(match.weight)
        result.layers[layer] = {"node": node.name, "k": q.k, "bits": 8, "correction": used, "kernel": "integer",
                                "act_cols": [] if q.act_cols is None else q.act_cols.tolist(),
                                "input_quantized_by": group_of.get(layer, layer)}
        result.count += 1
    for layer, reason in not_shared:
        result.layers[layer]["input_not_shared"] = reason
    commit_rewrite(model, new_nodes, new_inits, drop, result)
    return result


def kernel_node(nodes: Mapping[str, onnx.NodeProto], layer: str) -> onnx.NodeProto | None:
    """``layer``'s integer-kernel node (DynamicQuantizeMatMul, or MatMulIntegerToFloat in a group), or None."""
    for op in KERNEL_INPUTS:
        node = nodes.get(f"/{layer}/{op}")
        if node is not None:
            return node
    return None


def float_input(node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto]) -> tuple[str, str | None]:
    """(the float x a kernel node quantizes, the initializer of its column factors m or None), walking back
    over the group's DynamicQuantizeLinear, the ActMask Mul and the factors' float16 Cast."""
    value = node.input[0]
    prev = producers.get(value)
    if prev is not None and prev.op_type == "DynamicQuantizeLinear":
        value = prev.input[0]
        prev = producers.get(value)
    if prev is not None and prev.op_type == "Mul" and prev.name.endswith("/ActMask"):
        mask = prev.input[1]
        cast = producers.get(mask)
        return prev.input[0], cast.input[0] if cast is not None and cast.op_type == "Cast" else mask
    return value, None


def decode_integer(layer: str, node: onnx.NodeProto, names, arr,
                   producers: Mapping[str, onnx.NodeProto]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(q ``[N, K]`` int8 as int32, scales ``[N]``, factors m ``[K]`` or None) of ``layer``'s integer-kernel
    ``node``, from either storage.

    ``names``: the graph's initializer names; ``arr(name)``: that initializer as a numpy array.
    """
    b, s = KERNEL_INPUTS[node.op_type]
    q = decode_integer_weight(layer, node.input[b], names, arr).astype(np.int32).T
    scales = arr(node.input[s]).astype(np.float32).reshape(-1)
    if scales.size == 1:
        scales = np.full(q.shape[0], scales[0], np.float32)
    mask = float_input(node, producers)[1]
    factors = None if mask is None else arr(mask).astype(np.float32).reshape(-1)
    return q, scales, factors


def dequantize_integer(q: np.ndarray, scales: np.ndarray, factors: np.ndarray | None = None) -> np.ndarray:
    """The int8 part of Ŵ, ``q · s_i (· m_j)`` (float32, as ``QuantizedLinear.dequantize_int4``; q is 0 where m is)."""
    w = (q.astype(np.float32) * scales[:, None]).astype(np.float32)
    return w if factors is None else (w * factors[None, :]).astype(np.float32)


@dataclass(frozen=True)
class IntegerLayer:
    """What plan parity needs of one integer-kernel Linear, decoded from the file."""

    q: np.ndarray  # int32 [N, K], |q| <= 63 (0 at exact entries)
    scales: np.ndarray  # float32 [N]
    exact: np.ndarray  # float32 [N, K]: the FP32 correction's entries, zeros elsewhere
    factors: np.ndarray | None  # float32 [K]: m, x's multiplier before the activation quantization (None: ones)

    @property
    def act_cols(self) -> np.ndarray:
        """int64: the input columns zeroed before the activation quantization (m_j = 0)."""
        return np.empty(0, np.int64) if self.factors is None else np.flatnonzero(self.factors == 0).astype(np.int64)


def integer_layers(model: onnx.ModelProto) -> dict[str, IntegerLayer]:
    """Every DynamicQuantizeMatMul Linear of an edgeq file (empty for a MatMulNBits file)."""
    meta = metadata(model)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}

    def arr(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for layer in json.loads(meta.get(LAYERS_KEY, "[]")):
        node = kernel_node(nodes, layer)
        if node is None:
            continue
        q, scales, factors = decode_integer(layer, node, inits, arr, producers)
        exact = np.zeros(q.shape, np.float32)
        entries = decode_correction(layer, inits, arr)
        if entries is not None:
            rows, ecols, vals = entries
            np.add.at(exact, (rows, ecols), vals)
        out[layer] = IntegerLayer(q, scales, exact, factors)
    return out
