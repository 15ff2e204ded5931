"""The one ONNX rewrite: Linear MatMul/Gemm → MatMulNBits (int4) + sparse FP32 correction.

For a Linear ``y = x Wᵀ (+ b)`` with plan (codes, scales, S = {(i_t, j_t)}, v_t = W[i_t, j_t])::

    y_q = MatMulNBits(x, B=pack(codes), scales [, bias=b])        # Σ_j x_j (code_ij − 8) s_ij
    y   = ScatterElements(y_q, rows=i, updates=x[..., j] * v, axis=-1, reduction="add")

which equals ``x Ŵᵀ (+ b)`` with ``Ŵ = int4 part + Σ_t v_t e_{i_t} e_{j_t}ᵀ`` (salient codes are
the zero point, so the int4 part is 0 there and the FP32 value is added exactly once).  In the
graph: ``Gather(x, j, axis=-1) → Mul(v) → ScatterElements(add)`` with the row indices expanded
to the shape of the updates.  Activation × activation MatMuls (attention) are never touched.

Each candidate is matched (pattern: MatMul or Gemm with a constant 2-D weight), checked (returns
a reason when it refuses) and rewritten.  Linears are mapped to graph weights by content (the
exporter's weight names are opaque), with the node name as tie-break.  The result's ``count``
must equal the number of planned Linears; the caller enforces that.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.plan import QuantPlan
from edgeq.quant.pack import pack_int4

MS_DOMAIN = "com.microsoft"
LAYERS_KEY = "edgeq.layers"


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


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes() + str(a.shape).encode()).hexdigest()


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _consumers(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            counts[i] = counts.get(i, 0) + 1
    for o in graph.output:
        counts[o.name] = counts.get(o.name, 0) + 1
    return counts


def check_candidate(node, inits, consumers) -> tuple[str | None, bool, str | None]:
    """Return (reason it is refused or None, transposed, bias name) for a MatMul/Gemm node."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return "weight is not a constant initializer (activation x activation)", False, None
    w = inits[node.input[1]]
    if len(w.dims) != 2:
        return f"weight {node.input[1]} is not 2-D (shape {list(w.dims)})", False, None
    if w.data_type != TensorProto.FLOAT:
        return f"weight {node.input[1]} is not float32", False, None
    if consumers.get(node.input[1], 0) != 1:
        return f"weight {node.input[1]} is shared with other nodes", False, None
    if node.op_type == "MatMul":
        return None, True, None
    if _attr(node, "transA", 0) != 0:
        return "Gemm with transA=1", False, None
    if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
        return "Gemm with alpha or beta other than 1", False, None
    transposed = _attr(node, "transB", 0) == 0
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return None, transposed, bias


def match_linears(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> tuple[dict[str, LinearMatch], list]:
    """Find the MatMul/Gemm node of every Linear in ``weights`` (name → ``[N, K]``)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    by_digest: dict[str, list[str]] = {}
    for name, w in weights.items():
        by_digest.setdefault(_digest(w), []).append(name)

    matches: dict[str, LinearMatch] = {}
    refused: list[tuple[str, str]] = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        reason, transposed, bias = check_candidate(node, inits, consumers)
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


def _correction_nodes(layer: str, x: str, y_q: str, y: str, k: int) -> list[onnx.NodeProto]:
    p = f"/{layer}/correction"
    return [
        helper.make_node("Gather", [x, f"{layer}.corr_cols"], [f"{p}/x_sel"], name=f"{p}/Gather", axis=-1),
        helper.make_node("Mul", [f"{p}/x_sel", f"{layer}.corr_vals"], [f"{p}/updates"], name=f"{p}/Mul"),
        helper.make_node("Shape", [f"{p}/updates"], [f"{p}/shape"], name=f"{p}/Shape"),
        helper.make_node("Expand", [f"{layer}.corr_rows", f"{p}/shape"], [f"{p}/rows"], name=f"{p}/Expand"),
        helper.make_node(
            "ScatterElements", [y_q, f"{p}/rows", f"{p}/updates"], [y], name=f"{p}/ScatterElements",
            axis=-1, reduction="add",
        ),
    ]


def rewrite_linears(
    model: onnx.ModelProto,
    plan: QuantPlan,
    weights: dict[str, np.ndarray],
    accuracy_level: int = 0,
) -> RewriteResult:
    """Rewrite, in place, every planned Linear of ``model``; raise if one cannot be mapped."""
    matches, refused = match_linears(model, weights)
    missing = [n for n in plan.layers if n not in matches]
    if missing:
        why = "; ".join(f"{n}: {r}" for n, r in refused[:3])
        raise ValueError(
            f"{len(missing)} Linear(s) not found in the exported graph: {', '.join(missing[:5])}"
            + (f" (refused nodes: {why})" if why else "")
        )
    graph = model.graph
    result = RewriteResult(refused=[r for r in refused if "activation" not in r[1]])
    node_to_layer = {id(m.node): m for name, m in matches.items() if name in plan.layers}
    inits = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    drop_inits: set[str] = set()
    new_inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        match = node_to_layer.get(id(node))
        if match is None:
            new_nodes.append(node)
            continue
        layer, q = match.layer, plan.layers[match.layer].quant
        n_out, k_in = q.shape
        x, y = node.input[0], node.output[0]
        y_q = f"/{layer}/MatMulNBits_output" if q.k else y
        inputs = [x, f"{layer}.qweight", f"{layer}.scales"]
        bias_add = None
        if match.bias:  # Gemm's C: MatMulNBits' own bias input when it is a private vector, else an Add
            c = inits.get(match.bias)
            if c is not None and consumers.get(match.bias) == 1 and list(c.dims) in ([n_out], [1, n_out]):
                inputs += ["", "", f"{layer}.bias"]
                new_inits.append(numpy_helper.from_array(
                    numpy_helper.to_array(c).reshape(-1).astype(np.float32), f"{layer}.bias"))
                drop_inits.add(match.bias)
            else:
                y_mm = f"/{layer}/MatMulNBits_nobias"
                bias_add = helper.make_node("Add", [y_mm, match.bias], [y_q], name=f"/{layer}/BiasAdd")
        new_nodes.append(helper.make_node(
            "MatMulNBits", inputs, [y_mm if bias_add else y_q], name=f"/{layer}/MatMulNBits",
            domain=MS_DOMAIN, K=k_in, N=n_out, bits=4, block_size=q.block_size, accuracy_level=accuracy_level,
        ))
        if bias_add is not None:
            new_nodes.append(bias_add)
        new_inits += [
            numpy_helper.from_array(pack_int4(q.codes, q.block_size), f"{layer}.qweight"),
            numpy_helper.from_array(q.scales.astype(np.float32), f"{layer}.scales"),
        ]
        if q.k:
            rows, cols = np.divmod(q.salient_index, k_in)
            new_nodes += _correction_nodes(layer, x, y_q, y, q.k)
            new_inits += [
                numpy_helper.from_array(cols.astype(np.int32), f"{layer}.corr_cols"),
                numpy_helper.from_array(rows.astype(np.int32), f"{layer}.corr_rows"),
                numpy_helper.from_array(q.salient_values.astype(np.float32), f"{layer}.corr_vals"),
            ]
        drop_inits.add(match.weight)
        result.layers[layer] = {"node": node.name, "k": q.k}
        result.count += 1

    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [t for t in graph.initializer if t.name not in drop_inits]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _set_meta(model, LAYERS_KEY, json.dumps(sorted(result.layers)))
    return result


def _set_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def read_back(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Ŵ ``[N, K]`` of every rewritten Linear, decoded from the graph's own initializers."""
    from edgeq.quant.pack import unpack_int4

    meta = {p.key: p.value for p in model.metadata_props}
    if LAYERS_KEY not in meta:
        raise ValueError("this ONNX file was not written by edgeq convert (no edgeq.layers metadata)")
    inits = {t.name: t for t in model.graph.initializer}
    arr = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
    out = {}
    for layer in json.loads(meta[LAYERS_KEY]):
        node = next(n for n in model.graph.node if n.name == f"/{layer}/MatMulNBits")
        k_in, bs = _attr(node, "K", 0), _attr(node, "block_size", 0)
        codes = unpack_int4(arr(node.input[1]), k_in).astype(np.float32)
        scales = np.repeat(arr(node.input[2]).reshape(codes.shape[0], -1), bs, axis=1)[:, :k_in]
        w = (codes - 8.0) * scales
        if f"{layer}.corr_vals" in inits:
            np.add.at(w, (arr(f"{layer}.corr_rows"), arr(f"{layer}.corr_cols")), arr(f"{layer}.corr_vals"))
        out[layer] = w.astype(np.float32)
    return out
