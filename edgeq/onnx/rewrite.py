"""The one ONNX rewrite: Linear MatMul/Gemm → MatMulNBits (int4/int8) + sparse FP32 correction.

For a Linear ``y = x Wᵀ (+ b)`` with plan (codes, scales, S = {(i_t, j_t)}, v_t = W[i_t, j_t])::

    y_q = MatMulNBits(x, B=pack(codes), scales [, bias=b])        # Σ_j x_j (code_ij − z) s_ij
    y   = y_q + Σ_t x[..., j_t] v_t e_{i_t}                         # the correction

which equals ``x Ŵᵀ (+ b)`` with ``Ŵ = quantized part + Σ_t v_t e_{i_t} e_{j_t}ᵀ`` (salient codes
are the zero point z, so the quantized part is 0 there and the FP32 value is added exactly once).
The correction's graph encodings, one registry (``--correction``): :mod:`edgeq.onnx.corrections`.

A MatMul whose only consumer is ``Add(·, b)`` with a private constant ``b [N]`` gets b as
MatMulNBits' bias input (the Add is removed and the correction writes its output), so the bias
never sits between the quantized product and the correction.  Activation × activation MatMuls
(attention) are never touched.

Each candidate is matched (pattern: MatMul or Gemm with a constant 2-D weight), checked (returns
a reason when it refuses) and rewritten.  Linears are mapped to graph weights by content (the
exporter's weight names are opaque), with the node name as tie-break.  The result's ``count``
must equal the number of planned Linears; the caller enforces that.  :func:`edgeq.onnx.readback.read_back` decodes
Ŵ from any encoding.  Nodes are keyed by name (the exporter's names are unique; a candidate whose
name is empty or shared is refused, with that reason); the shared bookkeeping is :mod:`edgeq.onnx.graph`.

Why not onnx-ir (edgeq does not import it; it stays only in the test extra, because
onnxruntime.quantization, the packing tests' reference, imports it): its serializer changes the
bytes.  A round trip of the unchanged FP32 export grows it from 90,969,566 to 90,975,282 bytes (a
value_info per initializer, an explicit ``domain: ""`` opset, metadata sorted by key); the same
rewrite done on ``ir.Model`` matched the sha256 only after undoing those three on the proto, and
needed a name → Value table to wire in the NodeProtos of the correction builders.  Speed was not
the issue (0.04 s in, 0.08 s out).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.onnx.corrections import (
    CORRECTION_CHOICES,
    DEFAULT_CORRECTION,
    correction_branch,
)
from edgeq.onnx.graph import MS_DOMAIN, attr, consumers, ensure_opset, set_meta, unique_names
from edgeq.onnx.storage import weight_inputs, zero_point_input
from edgeq.quant.int4 import QuantizedLinear

LAYERS_KEY = "edgeq.layers"
_tensor = numpy_helper.from_array  # (array, name) → TensorProto


@dataclass(frozen=True)
class LinearMatch:
    layer: str
    node: onnx.NodeProto
    weight: str  # initializer name of the Linear weight
    transposed: bool  # True when the initializer is [K, N] (MatMul, or Gemm transB=0)
    bias: str | None  # Gemm's C input (MatMul biases are a separate Add node, kept as is)


@dataclass
class RewriteResult:
    count: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)  # (node name, reason)
    layers: dict[str, dict] = field(default_factory=dict)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)  # (layer, why its encoding changed)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes() + str(a.shape).encode()).hexdigest()


def check_candidate(node, inits, uses, names) -> tuple[str | None, bool, str | None]:
    """Return (reason it is refused or None, transposed, bias name) for a MatMul/Gemm node.

    ``uses``: :func:`edgeq.onnx.graph.consumers`; ``names``: :func:`edgeq.onnx.graph.unique_names`.
    """
    if len(node.input) < 2 or node.input[1] not in inits:
        return "weight is not a constant initializer (activation x activation)", False, None
    w = inits[node.input[1]]
    if len(w.dims) != 2:
        return f"weight {node.input[1]} is not 2-D (shape {list(w.dims)})", False, None
    if w.data_type != TensorProto.FLOAT:
        return f"weight {node.input[1]} is not float32", False, None
    if len(uses.get(node.input[1], ())) != 1:
        return f"weight {node.input[1]} is shared with other nodes", False, None
    if node.name not in names:
        return f"node name {node.name!r} is empty or not unique (the rewrite keys nodes by name)", False, None
    if node.op_type == "MatMul":
        return None, True, None
    if attr(node, "transA", 0) != 0:
        return "Gemm with transA=1", False, None
    if attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
        return "Gemm with alpha or beta other than 1", False, None
    transposed = attr(node, "transB", 0) == 0
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return None, transposed, bias


def match_linears(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> tuple[dict[str, LinearMatch], list]:
    """Find the MatMul/Gemm node of every Linear in ``weights`` (name → ``[N, K]``)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses, named = consumers(graph), unique_names(graph)
    by_digest: dict[str, list[str]] = {}
    for name, w in weights.items():
        by_digest.setdefault(_digest(w), []).append(name)

    matches: dict[str, LinearMatch] = {}
    refused: list[tuple[str, str]] = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        reason, transposed, bias = check_candidate(node, inits, uses, named)
        if reason:
            refused.append((node.name, reason))
            continue
        b = numpy_helper.to_array(inits[node.input[1]])
        names = by_digest.get(_digest(b.T if transposed else b), [])
        if len(names) > 1:  # identical weights: the node name carries the module path
            dotted = node.name.replace("/", ".") + "."
            names = [n for n in names if f".{n}." in dotted]
        names = [n for n in names if n not in matches]
        if len(names) != 1:
            refused.append((node.name, "weight matches no Linear of the model" if not names else
                            f"weight matches several Linears: {', '.join(names)}"))
            continue
        matches[names[0]] = LinearMatch(names[0], node, node.input[1], transposed, bias)
    return matches, refused


def _bias_adds(matches, inits, uses, names) -> dict[str, tuple[onnx.NodeProto, str]]:
    """MatMul node name → (its only consumer ``Add(y, b)``, b) when b is a private constant ``[N]``.

    An Add without a unique name is left in the graph (after the correction: still exact).
    """
    out = {}
    for m in matches:
        users = uses.get(m.node.output[0], [])
        if m.node.op_type != "MatMul" or len(users) != 1 or users[0] is None or users[0].op_type != "Add":
            continue
        add = users[0]
        other = [i for i in add.input if i != m.node.output[0]]
        if add.name not in names or len(other) != 1 or other[0] not in inits or len(uses[other[0]]) != 1:
            continue
        n_out = inits[m.weight].dims[1]
        if list(inits[other[0]].dims) in ([n_out], [1, n_out]) and inits[other[0]].data_type == TensorProto.FLOAT:
            out[m.node.name] = (add, other[0])
    return out


def rewrite_linears(
    model: onnx.ModelProto,
    layers: Mapping[str, QuantizedLinear],
    weights: dict[str, np.ndarray],
    accuracy_level: int = 0,
    correction: str = DEFAULT_CORRECTION,
    fold_bias: bool = True,
    storage: str = "plain",
    kernel: str = "int4",
) -> RewriteResult:
    """Rewrite, in place, every Linear of ``layers`` (name → its quantization) in ``model``;
    raise if one cannot be mapped."""
    if correction not in CORRECTION_CHOICES:
        raise ValueError(f"unknown correction encoding {correction!r}; choose from {', '.join(CORRECTION_CHOICES)}")
    matches, refused = match_linears(model, weights)
    missing = [n for n in layers if n not in matches]
    if missing:
        why = "; ".join(f"{n}: {r}" for n, r in refused[:3])
        raise ValueError(
            f"{len(missing)} Linear(s) not found in the exported graph: {', '.join(missing[:5])}"
            + (f" (refused nodes: {why})" if why else "")
        )
    graph = model.graph
    result = RewriteResult(refused=[r for r in refused if "activation" not in r[1]])
    planned = [m for name, m in matches.items() if name in layers]
    node_to_layer = {m.node.name: m for m in planned}  # names checked unique (check_candidate)
    inits = {t.name: t for t in graph.initializer}
    uses = consumers(graph)
    bias_adds = _bias_adds(planned, inits, uses, unique_names(graph)) if fold_bias else {}
    skip = {add.name for add, _ in bias_adds.values()}
    drop_inits: set[str] = set()
    new_inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name in skip:
            continue
        match = node_to_layer.get(node.name)
        if match is None:
            new_nodes.append(node)
            continue
        layer, q = match.layer, layers[match.layer]
        n_out, k_in = q.shape
        x, y = node.input[0], node.output[0]
        bias_name = match.bias
        if node.name in bias_adds:
            add, bias_name = bias_adds[node.name]
            y = add.output[0]
        y_q = f"/{layer}/MatMulNBits_output" if q.k else y
        b_name, s_name, bits, unpack_nodes, weight_inits = weight_inputs(layer, q, storage, kernel)
        inputs = [x, b_name, s_name]
        zp = zero_point_input(layer, q)  # asymmetric grids: MatMulNBits' zero_points input
        if zp is not None:
            inputs.append(zp[0])
            weight_inits = [*weight_inits, zp[1]]
        bias_add = None
        if bias_name:  # MatMulNBits' own bias input when it is a private vector, else an Add
            c = inits.get(bias_name)
            if c is not None and len(uses[bias_name]) == 1 and list(c.dims) in ([n_out], [1, n_out]):
                inputs += [""] * (5 - len(inputs)) + [f"{layer}.bias"]
                new_inits.append(_tensor(numpy_helper.to_array(c).reshape(-1).astype(np.float32), f"{layer}.bias"))
                drop_inits.add(bias_name)
            else:
                y_mm = f"/{layer}/MatMulNBits_nobias"
                bias_add = helper.make_node("Add", [y_mm, bias_name], [y_q], name=f"/{layer}/BiasAdd")
        new_nodes += unpack_nodes  # compact storage: constant subgraph folded at load (edgeq.onnx.storage)
        new_nodes.append(helper.make_node(
            "MatMulNBits", inputs, [y_mm if bias_add else y_q], name=f"/{layer}/MatMulNBits",
            domain=MS_DOMAIN, K=k_in, N=n_out, bits=bits, block_size=q.block_size, accuracy_level=accuracy_level,
        ))
        if bias_add is not None:
            new_nodes.append(bias_add)
        new_inits += weight_inits
        used, nodes, tensors = correction_branch(layer, x, y_q, y, q, correction, result.fallbacks)
        new_nodes += nodes
        new_inits += tensors
        drop_inits.add(match.weight)
        result.layers[layer] = {"node": node.name, "k": q.k, "bits": q.stored_bits, "correction": used}
        result.count += 1

    commit_rewrite(model, new_nodes, new_inits, drop_inits, result)
    return result


def commit_rewrite(model: onnx.ModelProto, new_nodes: list, new_inits: list, drop: set, result: RewriteResult) -> None:
    """Install a rewrite in place: the new node list, the initializers minus ``drop`` plus ``new_inits``, the
    com.microsoft opset and the ``edgeq.layers`` metadata (what read_back decodes)."""
    graph = model.graph
    del graph.node[:]
    graph.node.extend(new_nodes)
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name in drop]):
        del graph.initializer[i]  # in place: re-adding the kept ones would copy them (results/memory.md)
    graph.initializer.extend(new_inits)
    ensure_opset(model, MS_DOMAIN)
    set_meta(model, LAYERS_KEY, json.dumps(sorted(result.layers)))


def exact_arithmetic_copy(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy whose MatMulNBits use accuracy_level 0 (FP32 activations), or None if all already do.

    accuracy_level 4 quantizes activations to int8 at run time; plan parity (does the graph encode
    Ŵ?) is checked on this copy, fidelity on the file as written.
    """
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits" and attr(n, "accuracy_level", 0) != 0]
    if not nodes:
        return None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for n in copy.graph.node:
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
    return copy
