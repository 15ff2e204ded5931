"""The one ONNX rewrite: Linear MatMul/Gemm → MatMulNBits (int4/int8) + sparse FP32 correction.

For a Linear ``y = x Wᵀ (+ b)`` with plan (codes, scales, S = {(i_t, j_t)}, v_t = W[i_t, j_t])::

    y_q = MatMulNBits(x, B=pack(codes), scales [, bias=b])        # Σ_j x_j (code_ij − z) s_ij
    y   = y_q + Σ_t x[..., j_t] v_t e_{i_t}                         # the correction

which equals ``x Ŵᵀ (+ b)`` with ``Ŵ = quantized part + Σ_t v_t e_{i_t} e_{j_t}ᵀ`` (salient codes
are the zero point z, so the quantized part is 0 there and the FP32 value is added exactly once).
The correction has interchangeable graph encodings (``CORRECTIONS``, ``--correction``):

* ``dense`` (default): with C the c distinct columns of S, ``y = y_q + Gather(x, C) @ D`` where
  ``D [c, N]`` holds v_t at (position of j_t in C, i_t) and zeros elsewhere.  The file stores only
  (positions, v); D is rebuilt by ``ScatterND(ConstantOfShape([c, N]), positions, v)``, a
  constant subgraph ONNX Runtime folds once at session creation.  3 run-time nodes.  Refused (the
  layer falls back to ``scatter``) when D would hold more than ``DENSE_MAX_FRACTION`` of N·K
  entries — its memory and FLOPs grow with c·N.
* ``rows``: with R the r distinct output rows of S, ``y = y_q + (x @ A) @ P`` where ``A [K, r]``
  holds v_t at (j_t, position of i_t in R) and ``P [r, N]`` is one-hot (P[p, R_p] = 1); both are
  rebuilt at load (ScatterND / OneHot, folded).  3 run-time nodes, no Gather: r·(K + N)
  multiply-adds per token.  Every product is a salient x_j·v_t or an exact zero, as in ``dense``.
* ``scatter``: ``ScatterElements(y_q, Expand(rows, Shape(u)), u = Gather(x, cols) ⊙ v, add)``;
  memory and FLOPs ∝ k, but 5 run-time nodes and an extra pass over y.
* ``auto`` (default): per layer the cheapest accepted encoding by its cost per token in
  multiply-add equivalents: dense ``c·(N + G)``, rows ``r·(K + N)``, scatter ``2·k·G``, where
  G = GATHER_COST is what one element gathered (or scattered) along the last axis costs ONNX
  Runtime's CPU kernels relative to one MatMul multiply-add (measured, docs/performance.md).

A MatMul whose only consumer is ``Add(·, b)`` with a private constant ``b [N]`` gets b as
MatMulNBits' bias input (the Add is removed and the correction writes its output), so the bias
never sits between the quantized product and the correction.  Activation × activation MatMuls
(attention) are never touched.

Each candidate is matched (pattern: MatMul or Gemm with a constant 2-D weight), checked (returns
a reason when it refuses) and rewritten.  Linears are mapped to graph weights by content (the
exporter's weight names are opaque), with the node name as tie-break.  The result's ``count``
must equal the number of planned Linears; the caller enforces that.  :func:`read_back` decodes
Ŵ from any encoding.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.plan import QuantPlan
from edgeq.quant.int4 import QuantizedLinear
from edgeq.quant.pack import pack_codes, unpack_codes

MS_DOMAIN = "com.microsoft"
LAYERS_KEY = "edgeq.layers"
DENSE_MAX_FRACTION = 0.5  # dense (rows) refused when c·N (r·(K+N)) > this · N·K: run-time memory
GATHER_COST = 500  # multiply-add equivalents of one element gathered along the last axis (ORT CPU)


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


@dataclass(frozen=True)
class Correction:
    """One graph encoding of the FP32 correction: ``check`` (reason or None), then ``build``."""

    name: str
    summary: str
    check: Callable[[QuantizedLinear], str | None]
    build: Callable[[str, str, str, str, QuantizedLinear], tuple[list, list]]


def _tensor(a: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(a, name)


def _split(q: QuantizedLinear) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.divmod(q.salient_index, q.shape[1])
    return rows, cols


def _scatter_check(q: QuantizedLinear) -> str | None:
    return None


def _scatter_build(layer: str, x: str, y_q: str, y: str, q: QuantizedLinear):
    p = f"/{layer}/correction"
    rows, cols = _split(q)
    nodes = [
        helper.make_node("Gather", [x, f"{layer}.corr_cols"], [f"{p}/x_sel"], name=f"{p}/Gather", axis=-1),
        helper.make_node("Mul", [f"{p}/x_sel", f"{layer}.corr_vals"], [f"{p}/updates"], name=f"{p}/Mul"),
        helper.make_node("Shape", [f"{p}/updates"], [f"{p}/shape"], name=f"{p}/Shape"),
        helper.make_node("Expand", [f"{layer}.corr_rows", f"{p}/shape"], [f"{p}/rows"], name=f"{p}/Expand"),
        helper.make_node(
            "ScatterElements", [y_q, f"{p}/rows", f"{p}/updates"], [y], name=f"{p}/ScatterElements",
            axis=-1, reduction="add",
        ),
    ]
    inits = [
        _tensor(cols.astype(np.int32), f"{layer}.corr_cols"),
        _tensor(rows.astype(np.int32), f"{layer}.corr_rows"),
        _tensor(q.salient_values.astype(np.float32), f"{layer}.corr_vals"),
    ]
    return nodes, inits


def _scattered_constant(layer: str, pos: str, out: str, name: str) -> list[onnx.NodeProto]:
    """``out = ScatterND(zeros(corr_shape), pos, corr_vals)``: a constant subgraph ONNX Runtime folds at load."""
    p = f"/{layer}/correction"
    return [
        helper.make_node("ConstantOfShape", [f"{layer}.corr_shape"], [f"{p}/zeros"], name=f"{p}/Zeros",
                         value=_tensor(np.zeros(1, np.float32), "zero")),
        helper.make_node("Cast", [pos], [f"{p}/pos64"], name=f"{p}/Cast", to=TensorProto.INT64),
        helper.make_node("ScatterND", [f"{p}/zeros", f"{p}/pos64", f"{layer}.corr_vals"], [out], name=name),
    ]


def _dense_check(q: QuantizedLinear) -> str | None:
    n_out, k_in = q.shape
    c = np.unique(q.salient_index % k_in).size
    if c * n_out > DENSE_MAX_FRACTION * n_out * k_in:
        return (f"{c} distinct input columns: a dense [{c} x {n_out}] block exceeds "
                f"{DENSE_MAX_FRACTION:g} of the weight")
    return None


def _dense_build(layer: str, x: str, y_q: str, y: str, q: QuantizedLinear):
    p = f"/{layer}/correction"
    n_out = q.shape[0]
    rows, cols = _split(q)
    distinct, pos = np.unique(cols, return_inverse=True)
    nodes = _scattered_constant(layer, f"{layer}.corr_pos", f"{p}/D", f"{p}/Dense") + [
        # run time: y = y_q + x[..., C] @ D
        helper.make_node("Gather", [x, f"{layer}.corr_cols"], [f"{p}/x_sel"], name=f"{p}/Gather", axis=-1),
        helper.make_node("MatMul", [f"{p}/x_sel", f"{p}/D"], [f"{p}/delta"], name=f"{p}/MatMul"),
        helper.make_node("Add", [y_q, f"{p}/delta"], [y], name=f"{p}/Add"),
    ]
    inits = [
        _tensor(distinct.astype(np.int64), f"{layer}.corr_cols"),
        _tensor(np.stack([pos, rows], axis=1).astype(np.int32), f"{layer}.corr_pos"),
        _tensor(q.salient_values.astype(np.float32), f"{layer}.corr_vals"),
        _tensor(np.array([distinct.size, n_out], np.int64), f"{layer}.corr_shape"),
    ]
    return nodes, inits


def _rows_check(q: QuantizedLinear) -> str | None:
    n_out, k_in = q.shape
    r = np.unique(q.salient_index // k_in).size
    if r * (k_in + n_out) > DENSE_MAX_FRACTION * n_out * k_in:
        return (f"{r} distinct output rows: [{k_in} x {r}] and [{r} x {n_out}] factors exceed "
                f"{DENSE_MAX_FRACTION:g} of the weight's multiply-adds")
    return None


def _rows_build(layer: str, x: str, y_q: str, y: str, q: QuantizedLinear):
    p = f"/{layer}/correction"
    n_out, k_in = q.shape
    rows, cols = _split(q)
    row_ids, row_pos = np.unique(rows, return_inverse=True)
    nodes = _scattered_constant(layer, f"{layer}.corr_colpos", f"{p}/A", f"{p}/Factor") + [
        helper.make_node("OneHot", [f"{layer}.corr_rowids", f"{layer}.corr_depth", f"{layer}.corr_onehot"], [f"{p}/P"],
                         name=f"{p}/OneHot", axis=-1),
        # run time: y = y_q + (x @ A) @ P
        helper.make_node("MatMul", [x, f"{p}/A"], [f"{p}/u"], name=f"{p}/MatMul"),
        helper.make_node("MatMul", [f"{p}/u", f"{p}/P"], [f"{p}/delta"], name=f"{p}/Spread"),
        helper.make_node("Add", [y_q, f"{p}/delta"], [y], name=f"{p}/Add"),
    ]
    inits = [
        _tensor(np.stack([cols, row_pos], axis=1).astype(np.int32), f"{layer}.corr_colpos"),
        _tensor(q.salient_values.astype(np.float32), f"{layer}.corr_vals"),
        _tensor(np.array([k_in, row_ids.size], np.int64), f"{layer}.corr_shape"),
        _tensor(row_ids.astype(np.int64), f"{layer}.corr_rowids"),
        _tensor(np.array([n_out], np.int64), f"{layer}.corr_depth"),
        _tensor(np.array([0, 1], np.float32), f"{layer}.corr_onehot"),
    ]
    return nodes, inits


def _cost(q: QuantizedLinear, encoding: str) -> float:
    """Multiply-add equivalents per token of the run-time correction (the ``auto`` choice)."""
    n_out, k_in = q.shape
    if encoding == "dense":
        return np.unique(q.salient_index % k_in).size * (n_out + GATHER_COST)
    if encoding == "rows":
        return np.unique(q.salient_index // k_in).size * (k_in + n_out)
    return 2 * q.k * GATHER_COST


def choose_correction(q: QuantizedLinear, requested: str) -> tuple[str, str | None]:
    """(encoding to build, refusal reason or None) for ``--correction requested``; scatter never refuses."""
    candidates = tuple(CORRECTIONS) if requested == "auto" else (requested,)
    reasons = {name: CORRECTIONS[name].check(q) for name in candidates}
    accepted = [name for name in candidates if reasons[name] is None]
    if accepted:
        return min(accepted, key=lambda name: _cost(q, name)), None
    return FALLBACK_CORRECTION, "; ".join(f"{n} refused ({r})" for n, r in reasons.items())


CORRECTIONS: dict[str, Correction] = {
    c.name: c
    for c in (
        Correction("dense", "Gather(x, distinct cols) @ D[c, N] + Add; D folded at load from (pos, v)",
                   _dense_check, _dense_build),
        Correction("rows", "(x @ A[K, r]) @ one-hot P[r, N] + Add; A and P folded at load",
                   _rows_check, _rows_build),
        Correction("scatter", "Gather(x, cols) * v → ScatterElements(add) into the output rows",
                   _scatter_check, _scatter_build),
    )
}
DEFAULT_CORRECTION = "auto"  # per layer: the cheapest accepted of dense, rows and scatter (choose_correction)
FALLBACK_CORRECTION = "scatter"  # never refuses
CORRECTION_CHOICES = ("auto", *CORRECTIONS)


def _bias_adds(graph: onnx.GraphProto, matches, inits, consumers) -> dict[int, tuple[onnx.NodeProto, str]]:
    """MatMul node id → (its only consumer ``Add(y, b)``, b) when b is a private constant ``[N]``."""
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            by_input.setdefault(i, []).append(n)
    out = {}
    for m in matches:
        if m.node.op_type != "MatMul" or consumers.get(m.node.output[0]) != 1:
            continue
        users = by_input.get(m.node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        other = [i for i in add.input if i != m.node.output[0]]
        if len(other) != 1 or other[0] not in inits or consumers.get(other[0]) != 1:
            continue
        n_out = inits[m.weight].dims[1]
        if list(inits[other[0]].dims) in ([n_out], [1, n_out]) and inits[other[0]].data_type == TensorProto.FLOAT:
            out[id(m.node)] = (add, other[0])
    return out


def rewrite_linears(
    model: onnx.ModelProto,
    plan: QuantPlan,
    weights: dict[str, np.ndarray],
    accuracy_level: int = 0,
    correction: str = DEFAULT_CORRECTION,
    fold_bias: bool = True,
) -> RewriteResult:
    """Rewrite, in place, every planned Linear of ``model``; raise if one cannot be mapped."""
    if correction not in CORRECTION_CHOICES:
        raise ValueError(f"unknown correction encoding {correction!r}; choose from {', '.join(CORRECTION_CHOICES)}")
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
    planned = [m for name, m in matches.items() if name in plan.layers]
    node_to_layer = {id(m.node): m for m in planned}
    inits = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    bias_adds = _bias_adds(graph, planned, inits, consumers) if fold_bias else {}
    skip = {id(add) for add, _ in bias_adds.values()}
    drop_inits: set[str] = set()
    new_inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in skip:
            continue
        match = node_to_layer.get(id(node))
        if match is None:
            new_nodes.append(node)
            continue
        layer, q = match.layer, plan.layers[match.layer].quant
        n_out, k_in = q.shape
        x, y = node.input[0], node.output[0]
        bias_name = match.bias
        if id(node) in bias_adds:
            add, bias_name = bias_adds[id(node)]
            y = add.output[0]
        y_q = f"/{layer}/MatMulNBits_output" if q.k else y
        inputs = [x, f"{layer}.qweight", f"{layer}.scales"]
        bias_add = None
        if bias_name:  # MatMulNBits' own bias input when it is a private vector, else an Add
            c = inits.get(bias_name)
            if c is not None and consumers.get(bias_name) == 1 and list(c.dims) in ([n_out], [1, n_out]):
                inputs += ["", "", f"{layer}.bias"]
                new_inits.append(_tensor(numpy_helper.to_array(c).reshape(-1).astype(np.float32), f"{layer}.bias"))
                drop_inits.add(bias_name)
            else:
                y_mm = f"/{layer}/MatMulNBits_nobias"
                bias_add = helper.make_node("Add", [y_mm, bias_name], [y_q], name=f"/{layer}/BiasAdd")
        new_nodes.append(helper.make_node(
            "MatMulNBits", inputs, [y_mm if bias_add else y_q], name=f"/{layer}/MatMulNBits",
            domain=MS_DOMAIN, K=k_in, N=n_out, bits=q.bits, block_size=q.block_size, accuracy_level=accuracy_level,
        ))
        if bias_add is not None:
            new_nodes.append(bias_add)
        new_inits += [
            _tensor(pack_codes(q.codes, q.block_size, q.bits), f"{layer}.qweight"),
            _tensor(q.scales.astype(np.float32), f"{layer}.scales"),
        ]
        used = None
        if q.k:
            used, reason = choose_correction(q, correction)
            if reason:
                result.fallbacks.append((layer, f"{reason}; used {FALLBACK_CORRECTION}"))
            nodes, tensors = CORRECTIONS[used].build(layer, x, y_q, y, q)
            new_nodes += nodes
            new_inits += tensors
        drop_inits.add(match.weight)
        result.layers[layer] = {"node": node.name, "k": q.k, "bits": q.bits, "correction": used}
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


def exact_arithmetic_copy(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy whose MatMulNBits use accuracy_level 0 (FP32 activations), or None if all already do.

    accuracy_level 4 quantizes activations to int8 at run time; plan parity (does the graph encode
    Ŵ?) is checked on this copy, fidelity on the file as written.
    """
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits" and _attr(n, "accuracy_level", 0) != 0]
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


def read_back(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Ŵ ``[N, K]`` of every rewritten Linear (and Ê of 4-bit embedding tables), decoded from the file."""
    meta = {p.key: p.value for p in model.metadata_props}
    if LAYERS_KEY not in meta:
        raise ValueError("this ONNX file was not written by edgeq convert (no edgeq.layers metadata)")
    inits = {t.name: t for t in model.graph.initializer}
    arr = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
    out = {}
    for layer in json.loads(meta[LAYERS_KEY]):
        node = next(n for n in model.graph.node if n.name == f"/{layer}/MatMulNBits")
        k_in, bs, bits = _attr(node, "K", 0), _attr(node, "block_size", 0), _attr(node, "bits", 4)
        codes = unpack_codes(arr(node.input[1]), k_in, bits).astype(np.float32)
        scales = np.repeat(arr(node.input[2]).reshape(codes.shape[0], -1), bs, axis=1)[:, :k_in]
        w = (codes - float(2 ** (bits - 1))) * scales
        if f"{layer}.corr_colpos" in inits:  # rows: (col, position in distinct rows)
            pos = arr(f"{layer}.corr_colpos").astype(np.int64)
            rows, cols = arr(f"{layer}.corr_rowids")[pos[:, 1]], pos[:, 0]
        elif f"{layer}.corr_pos" in inits:  # dense: (position in distinct cols, row)
            pos = arr(f"{layer}.corr_pos").astype(np.int64)
            rows, cols = pos[:, 1], arr(f"{layer}.corr_cols")[pos[:, 0]]
        elif f"{layer}.corr_rows" in inits:  # scatter
            rows, cols = arr(f"{layer}.corr_rows"), arr(f"{layer}.corr_cols")
        else:
            rows = cols = None
        if rows is not None:
            np.add.at(w, (rows, cols), arr(f"{layer}.corr_vals"))
        out[layer] = w.astype(np.float32)
    from edgeq.onnx.embeddings import read_embeddings

    out.update(read_embeddings(model))  # 4-bit word embeddings, keyed by module name
    return out
