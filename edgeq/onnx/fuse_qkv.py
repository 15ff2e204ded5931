"""Fuse the rewritten Linears that read one input (q, k, v of an attention block) into one
MatMulNBits (+ one merged FP32 correction when it is no dearer), then ``Split`` (``--fuse-qkv``).

For the parts ``Ŵ_1 … Ŵ_m`` (``[N_l, K]``) of one input x, each written by
:func:`edgeq.onnx.rewrite.rewrite_linears` as MatMulNBits + bias + correction::

    Ŵ   = [Ŵ_1; …; Ŵ_m]                          [ΣN_l, K]: codes, scales and biases stacked along N
    S   = ∪_l {(i + o_l, j) : (i, j) ∈ S_l}        o_l = N_1 + … + N_{l−1}, values unchanged
    y   = MatMulNBits(x, B, s, bias) + Σ_{t ∈ S} x[..., j_t] v_t e_{i_t}
    y_1, …, y_m = Split(y, [N_1, …, N_m], axis=−1)

i.e. the ordinary rewrite of one Linear, so its merged correction is chosen and built by
:mod:`edgeq.onnx.corrections` as for any layer: ``dense`` gathers the union C of the parts'
columns and multiplies by a block-structured ``D [|C|, ΣN]`` (v_t at (position of j_t, i_t + o_l),
exact zeros elsewhere), ``rows`` and ``scatter`` concatenate.  The merged branch is built only when
the ``auto`` cost model rates it no dearer than the parts' own branches together (scatter: equal;
dense: when the parts share columns; rows: never, the one-hot spread grows to ΣN); otherwise the
MatMulNBits is fused and each part keeps its own correction, which reads its slice of the Split
(``y_l = Split(y_q)_l + correction_l(x)``).  Either way every output element sums the same products
x_j · v_t as before, plus exact zeros, so the fused graph computes the same numbers up to float
summation order.  Codes are packed per row, so the fused ``B``/planes hold the parts' bytes.

Pattern → check → rewrite, as the other rewrites:

* **pattern**: a value read by two or more rewritten MatMulNBits (``/{layer}/MatMulNBits``);
* **check** (:func:`check_group`, a reason when it refuses): equal K, bits, block_size,
  accuracy_level, stored bits and storage kind (plain, compact planes, native 2-bit), biases that
  are MatMulNBits' own input, each part's nodes one subgraph from x to one output, and no FP32
  (excluded) Linear reading the same input;
* **rewrite**: the parts' nodes (named ``/{layer}/…``; their corrections stay when not merged) and
  their initializers go; the fused layer is named ``common prefix + "+".join(suffixes)``
  (``…attention.self.query+key+value``) and its parts, with N_l, are recorded in the
  ``edgeq.fused`` metadata, from which
  :func:`edgeq.onnx.readback.read_back` decodes the fused Ŵ, splits it back by rows and adds each
  part's own correction, if any.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeq.onnx.corrections import CORRECTIONS, FALLBACK_CORRECTION, choose_correction, correction_cost
from edgeq.onnx.graph import MS_DOMAIN, attr, consumers, group_name, set_meta
from edgeq.onnx.storage import weight_inputs
from edgeq.quant.int4 import QuantizedLinear

FUSED_KEY = "edgeq.fused"  # metadata: {fused layer: [[part layer, N_l], ...]}
ATTRS = ("K", "bits", "block_size", "accuracy_level")


@dataclass
class FuseResult:
    fused: dict[str, list[str]] = field(default_factory=dict)  # fused layer → its parts, in output order
    corrections: dict[str, str | None] = field(default_factory=dict)  # fused layer → encoding (None: k = 0)
    refused: list[tuple[list[str], str]] = field(default_factory=list)  # (parts, reason)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)  # (fused layer, why its encoding changed)


@dataclass(frozen=True)
class Part:
    layer: str
    node: onnx.NodeProto  # its MatMulNBits
    nodes: list  # every node named /{layer}/… (MatMulNBits, unpack, bias Add, correction)
    output: str  # the one value of those nodes read outside them: the Linear's output


fused_name = group_name  # the fused layer's name (re-exported; edgeq.onnx.graph.group_name)


def find_groups(model: onnx.ModelProto, layers) -> dict[str, list[Part]]:
    """Pattern: input value → the rewritten MatMulNBits reading it, when two or more do (graph order)."""
    graph = model.graph
    produced_by: dict[str, list] = {}
    for n in graph.node:
        for layer in layers:
            if n.name.startswith(f"/{layer}/"):
                produced_by.setdefault(layer, []).append(n)
                break
    uses = consumers(graph)
    groups: dict[str, list[Part]] = {}
    for n in graph.node:
        if n.op_type != "MatMulNBits" or n.domain != MS_DOMAIN or not n.name.endswith("/MatMulNBits"):
            continue
        layer = n.name[1:-len("/MatMulNBits")]
        if layer not in layers:
            continue
        own = produced_by[layer]
        inside = {n2.name for n2 in own}
        outs = [o for n2 in own for o in n2.output
                if any(u is None or u.name not in inside for u in uses.get(o, []))]
        groups.setdefault(n.input[0], []).append(Part(layer, n, own, outs[0] if len(outs) == 1 else ""))
    return {x: parts for x, parts in groups.items() if len(parts) > 1}


def check_group(x: str, parts: list[Part], quants: Mapping[str, QuantizedLinear], model: onnx.ModelProto) -> str | None:
    """Why the parts reading ``x`` cannot be fused, or None."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    fp32 = [n.name for n in consumers(graph).get(x, []) if n is not None and n.op_type in ("MatMul", "Gemm")
            and len(n.input) > 1 and n.input[1] in inits]
    if fp32:
        return f"the input is also read by FP32 Linear(s) {', '.join(fp32)} (--exclude); fusing only some is not done"
    for name in ATTRS:
        values = {attr(p.node, name, 0) for p in parts}
        if len(values) > 1:
            return f"different MatMulNBits {name}: {', '.join(f'{p.layer}={attr(p.node, name, 0)}' for p in parts)}"
    qs = [quants[p.layer] for p in parts]
    if len({q.stored_bits for q in qs}) > 1 or len({q.bits for q in qs}) > 1:
        return f"different bits per weight: {', '.join(f'{p.layer}={q.stored_bits}' for p, q in zip(parts, qs))}"
    if len({q.block_size for q in qs}) > 1 or len({q.fp16_scales for q in qs}) > 1:
        return "different block sizes or scale precision in the plan"
    kinds = {("compact" if p.node.input[1] not in inits else "plain") for p in parts}
    if len(kinds) > 1:
        return f"different storage kinds ({', '.join(sorted(kinds))})"
    for p in parts:
        external = {i for n in p.nodes for i in n.input if i} - {o for n in p.nodes for o in n.output} - inits
        if external != {x}:
            return f"{p.layer}: its rewritten nodes read {', '.join(sorted(external - {x}))} besides the input"
        if not p.output:
            return f"{p.layer}: its rewritten nodes do not end in one output"
        if any(n.name == f"/{p.layer}/BiasAdd" for n in p.nodes):
            return f"{p.layer}: its bias is a separate Add (shared or not a vector), not MatMulNBits' own input"
    return None


def stack(parts: list[Part], quants: Mapping[str, QuantizedLinear]) -> QuantizedLinear:
    """The one Linear ``[Ŵ_1; …; Ŵ_m]``: codes and scales stacked, FP32 entries with rows offset."""
    qs = [quants[p.layer] for p in parts]
    k_in = qs[0].shape[1]
    offsets = np.cumsum([0] + [q.shape[0] for q in qs[:-1]])
    index = np.concatenate([q.salient_index + o * k_in for q, o in zip(qs, offsets)]).astype(np.int64)
    return replace(qs[0], codes=np.concatenate([q.codes for q in qs]), scales=np.concatenate([q.scales for q in qs]),
                   salient_index=index, salient_values=np.concatenate([q.salient_values for q in qs]))


def _bias(part: Part, arr, n_out: int) -> np.ndarray:
    if len(part.node.input) > 5 and part.node.input[5]:
        return arr(part.node.input[5]).reshape(-1).astype(np.float32)
    return np.zeros(n_out, np.float32)  # a Linear without bias: + 0 is exact


def _fused_nodes(name, x, parts, q, quants, arr, correction, storage, kernel, result):
    """(nodes, initializers, merged encoding or None) of the fused layer ``name``.

    The merged correction is built when the cost model (:func:`edgeq.onnx.corrections.correction_cost`)
    rates it no dearer than the parts' own; otherwise the parts keep their corrections, which then
    read the Split outputs (named as their MatMulNBits outputs were).
    """
    n_out, k_in = q.shape
    any_bias = any(len(p.node.input) > 5 and p.node.input[5] for p in parts)
    used, why = choose_correction(q, correction) if q.k else (None, None)
    if used is not None:
        alone = sum(correction_cost(quants[p.layer], choose_correction(quants[p.layer], correction)[0])
                    for p in parts)
        if correction_cost(q, used) > alone:
            used, why = None, None
    y = f"/{name}/output"
    y_q = f"/{name}/MatMulNBits_output" if used else y
    b_name, s_name, bits, nodes, tensors = weight_inputs(name, q, storage, kernel)
    inputs = [x, b_name, s_name] + (["", "", f"{name}.bias"] if any_bias else [])
    if any_bias:
        bias = np.concatenate([_bias(p, arr, quants[p.layer].shape[0]) for p in parts])
        tensors.append(numpy_helper.from_array(bias, f"{name}.bias"))
    nodes.append(helper.make_node(
        "MatMulNBits", inputs, [y_q], name=f"/{name}/MatMulNBits", domain=MS_DOMAIN, K=k_in, N=n_out, bits=bits,
        block_size=q.block_size, accuracy_level=attr(parts[0].node, "accuracy_level", 0)))
    if used:
        if why:
            result.fallbacks.append((name, f"{why}; used {FALLBACK_CORRECTION}"))
        c_nodes, c_tensors = CORRECTIONS[used].build(name, x, y_q, y, q)
        nodes += c_nodes
        tensors += c_tensors
    sizes = [quants[p.layer].shape[0] for p in parts]
    tensors.append(numpy_helper.from_array(np.array(sizes, np.int64), f"{name}.split"))
    outs = [p.output if used else p.node.output[0] for p in parts]  # per part: what its correction reads
    nodes.append(helper.make_node("Split", [y, f"{name}.split"], outs, name=f"/{name}/Split", axis=-1))
    return nodes, tensors, used


def fuse_shared_inputs(model: onnx.ModelProto, quants: Mapping[str, QuantizedLinear], correction: str,
                       storage: str = "plain", kernel: str = "int4") -> FuseResult:
    """Fuse, in place, every group of rewritten Linears of ``quants`` that read one input."""
    graph = model.graph
    result = FuseResult()
    init_map = {t.name: t for t in graph.initializer}

    def arr(name: str) -> np.ndarray:
        return numpy_helper.to_array(init_map[name])

    groups = find_groups(model, quants)
    drop_nodes: set[str] = set()
    insert: dict[str, tuple[list, list]] = {}  # name of the group's first node → (new nodes, new initializers)
    for x, parts in groups.items():
        layers = [p.layer for p in parts]
        reason = check_group(x, parts, quants, model)
        name = fused_name(layers)
        if reason is None and (any(n.name.startswith(f"/{name}/") for n in graph.node) or name in quants):
            reason = f"the fused name {name} is taken"
        if reason:
            result.refused.append((layers, reason))
            continue
        q = stack(parts, quants)
        nodes, tensors, used = _fused_nodes(name, x, parts, q, quants, arr, correction, storage, kernel, result)
        kept = [] if used else [n.name for p in parts for n in p.nodes if n.name.startswith(f"/{p.layer}/correction/")]
        first = next(n.name for n in graph.node if n.name in {m.name for p in parts for m in p.nodes})
        insert[first] = (nodes, tensors)
        drop_nodes |= {n.name for p in parts for n in p.nodes} - set(kept)
        result.fused[name] = layers
        result.corrections[name] = used if used or not q.k else "per part: " + ", ".join(
            str(choose_correction(quants[p.layer], correction)[0] if quants[p.layer].k else None) for p in parts)
    if not result.fused:
        return result
    new_nodes, new_inits = [], []
    for n in graph.node:
        if n.name in insert:
            new_nodes += insert[n.name][0]
            new_inits += insert[n.name][1]
        if n.name not in drop_nodes:
            new_nodes.append(n)
    read = {i for n in new_nodes for i in n.input}
    dropped_reads = {i for n in graph.node if n.name in drop_nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name in read or t.name not in dropped_reads]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    parts_of = {name: [[layer, int(quants[layer].shape[0])] for layer in layers]
                for name, layers in result.fused.items()}
    set_meta(model, FUSED_KEY, json.dumps(parts_of, sort_keys=True))
    return result
