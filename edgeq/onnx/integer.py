"""The integer-kernel rewrite (``--kernel integer``): Linear → DynamicQuantizeMatMul + FP32 correction.

For a Linear ``y = x Wᵀ (+ b)`` planned with 8-bit codes ``c = q + 128`` (|q| ≤ 63, per-output-
channel scales s, exact entries S, activation-outlier columns C ⊆ columns of S;
:mod:`edgeq.quant.integer` gives the arithmetic)::

    x'  = Mul(x, m)                       # only when C ≠ ∅ or smoothed: m_j = 0 for j ∈ C, r_j = 1/s_j
                                          # (--smooth-alpha; codes of W diag(s)), else 1: input_factors(q)
    y_q = com.microsoft.DynamicQuantizeMatMul(x', B = int8 qᵀ [K, N], b_scale = s [N], -, bias = b)
    y   = y_q + correction(x)             # edgeq.onnx.corrections, on x itself (C's columns are in S)

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
from edgeq.onnx.graph import MS_DOMAIN, consumers, metadata, unique_names
from edgeq.onnx.rewrite import LAYERS_KEY, RewriteResult, _bias_adds, commit_rewrite, match_linears
from edgeq.quant.int4 import QMAX_REDUCED, QuantizedLinear
from edgeq.quant.integer import WEIGHT_ZERO_POINT, input_factors

OP = "DynamicQuantizeMatMul"
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


def _layer_nodes(layer: str, x: str, y_q: str, q: QuantizedLinear, bias: str | None):
    n_out, k_in = q.shape
    inits = [_tensor((q.codes.astype(np.int16) - WEIGHT_ZERO_POINT).astype(np.int8).T.copy(), f"{layer}.qweight"),
             _tensor(q.scales[:, 0].astype(np.float32).copy(), f"{layer}.scales")]
    nodes = []
    x_in = x
    mask = input_factors(q)
    if mask is not None:
        inits.append(_tensor(mask, f"{layer}.{MASK}"))
        x_in = f"/{layer}/act_masked"
        nodes.append(helper.make_node("Mul", [x, f"{layer}.{MASK}"], [x_in], name=f"/{layer}/ActMask"))
    nodes.append(helper.make_node(OP, [x_in, f"{layer}.qweight", f"{layer}.scales", "", bias or ""], [y_q],
                                  name=f"/{layer}/{OP}", domain=MS_DOMAIN))
    return nodes, inits


def rewrite_integer(model: onnx.ModelProto, layers: Mapping[str, QuantizedLinear], weights: dict[str, np.ndarray],
                    correction: str = "auto", fold_bias: bool = True) -> RewriteResult:
    """Rewrite, in place, every Linear of ``layers`` to DynamicQuantizeMatMul + correction; raise if one
    cannot be mapped or is refused by :func:`check_integer`."""
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
    drop, new_inits, new_nodes = set(), [], []
    for node in graph.node:
        if node.name in skip:
            continue
        match = planned.get(node.name)
        if match is None:
            new_nodes.append(node)
            continue
        layer, q = match.layer, layers[match.layer]
        n_out = q.shape[0]
        x, y, bias = node.input[0], node.output[0], match.bias
        if node.name in bias_adds:
            add, bias = bias_adds[node.name]
            y = add.output[0]
        y_q = f"/{layer}/{OP}_output" if q.k else y
        tail = []
        if bias:
            c = inits.get(bias)
            if c is not None and len(uses[bias]) == 1 and list(c.dims) in ([n_out], [1, n_out]):
                new_inits.append(_tensor(numpy_helper.to_array(c).reshape(-1).astype(np.float32), f"{layer}.bias"))
                drop.add(bias)
                bias = f"{layer}.bias"
            else:  # a shared or broadcast bias stays a separate Add after the product
                tail.append(helper.make_node("Add", [f"/{layer}/{OP}_nobias", bias], [y_q], name=f"/{layer}/BiasAdd"))
                bias = None
        nodes, tensors = _layer_nodes(layer, x, f"/{layer}/{OP}_nobias" if tail else y_q, q, bias)
        new_nodes += nodes + tail
        new_inits += tensors
        used, nodes, tensors = correction_branch(layer, x, y_q, y, q, correction, result.fallbacks)
        new_nodes += nodes
        new_inits += tensors
        drop.add(match.weight)
        result.layers[layer] = {"node": node.name, "k": q.k, "bits": 8, "correction": used, "kernel": "integer",
                                "act_cols": [] if q.act_cols is None else q.act_cols.tolist()}
        result.count += 1
    commit_rewrite(model, new_nodes, new_inits, drop, result)
    return result


def decode_integer(layer: str, node: onnx.NodeProto, names, arr) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(q ``[N, K]`` int8 as int32, scales ``[N]``, factors m ``[K]`` or None) of ``layer``'s DynamicQuantizeMatMul
    ``node``.

    ``names``: the graph's initializer names; ``arr(name)``: that initializer as a numpy array.
    """
    q = arr(node.input[1]).astype(np.int32).T
    scales = arr(node.input[2]).astype(np.float32).reshape(-1)
    if scales.size == 1:
        scales = np.full(q.shape[0], scales[0], np.float32)
    factors = None
    if f"{layer}.{MASK}" in names:
        factors = arr(f"{layer}.{MASK}").astype(np.float32).reshape(-1)
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

    out = {}
    for layer in json.loads(meta.get(LAYERS_KEY, "[]")):
        node = nodes.get(f"/{layer}/{OP}")
        if node is None:
            continue
        q, scales, factors = decode_integer(layer, node, inits, arr)
        exact = np.zeros(q.shape, np.float32)
        entries = decode_correction(layer, inits, arr)
        if entries is not None:
            rows, ecols, vals = entries
            np.add.at(exact, (rows, ecols), vals)
        out[layer] = IntegerLayer(q, scales, exact, factors)
    return out
