"""4-bit word embeddings: ``Gather(E, ids)`` → ``com.microsoft.GatherBlockQuantized``.

The table ``E [V, H]`` is quantized like a Linear weight with one scale per block of
``block_size`` consecutive hidden units of a row (Q4-sym-7, ``edgeq.quant.int4``)::

    s_vb = max_{h in block b} |E_vh| / 7,   code_vh = clamp(rint(E_vh / s_vb), -7, 7) + 8
    Ê_vh = (code_vh − 8) · s_vb

(``bits=8``, ``--embedding-bits 8``: Q8-sym-127, one uint8 code ``q + 128`` a byte, ``data [V, H]``,
blocks of 128 where H allows (else 64, else ``block_size``): 8 bits need fewer scales, and the
scales are 10% of an 8-bit table at block 32; ONNX Runtime refuses blocks that are not a power of
two, so a 384-wide row cannot be one block.  The 8-bit tables' scales are rounded to float16 before
the codes are computed and stored float16, read through a ``Cast`` to float32 (the op's scales have
the output's type) that ONNX Runtime folds at load: half the scale bytes, the same Ê as the plan)
and stored as ONNX Runtime's GatherBlockQuantized expects for ``uint8`` data with ``bits=4``:
``data [V, H/2]`` two codes per byte along the last axis (even h in the low nibble), ``scales
[V, H/block_size]``, no ``zero_points`` input (default 2^(bits−1) = 8), ``gather_axis=0``,
``quantize_axis=1``.  The op gathers rows and dequantizes them: ``out[..., h] = Ê[ids[...], h]``.

Pattern: a ``Gather`` on axis 0 of a constant float32 2-D initializer that is indexed by the graph
input ``input_ids`` (the word embeddings) or, when the source model's ``nn.Embedding`` tables are
known (``modules``), is one of them (position embeddings, indexed by a sliced constant).  Checks (a
reason when refused): the table has no other consumer, a non-word table has at least ``MIN_ROWS``
rows (token-type tables have 1–2 and MPNet's relative position bias 32 buckets: quantizing them
saves nothing), and H is a multiple of ``block_size`` (no padding in the op's layout).
:func:`read_embeddings` decodes Ê.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.onnx.graph import MS_DOMAIN, attr, consumers, ensure_opset, metadata, set_meta
from edgeq.onnx.lossless import float_constant
from edgeq.quant.int4 import Granularity, QuantizedLinear, quantize_rtn
from edgeq.quant.pack import pack_int4, unpack_int4

EMBEDDINGS_KEY = "edgeq.embeddings"
IDS_INPUT = "input_ids"
MIN_ROWS = 64  # smaller non-word tables (token types) are left FP32


@dataclass
class EmbeddingResult:
    rewritten: dict[str, str] = field(default_factory=dict)  # table initializer → module name (or itself)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (node name, reason)
    tables: dict[str, np.ndarray] = field(default_factory=dict)  # module name → Ê (what ORT computes)


def quantize_table(table: np.ndarray, block_size: int = 32, bits: int = 4,
                   fp16_scales: bool = False) -> QuantizedLinear:
    """Q4-sym-7 (Q8-sym-127 with ``bits=8``) of ``table [V, H]`` with blocks of ``block_size`` along H
    (``fp16_scales``: scales rounded to float16 before the codes)."""
    return quantize_rtn(table, np.empty(0, np.int64), Granularity("block", block_size), bits=bits,
                        fp16_scales=fp16_scales)


def pack_table(q: QuantizedLinear) -> np.ndarray:
    """GatherBlockQuantized ``data``: uint8 ``[V, H/2]`` (same nibble order as MatMulNBits); 8 bits: the codes."""
    v, h = q.shape
    if q.bits == 8:
        return q.codes.copy()
    return pack_int4(q.codes, q.block_size).reshape(v, -1)[:, : h // 2]


def check_gather(node: onnx.NodeProto, inits, uses, block_size: int, known_table: bool = False) -> str | None:
    """Why this Gather cannot become GatherBlockQuantized, or None (``known_table``: an nn.Embedding weight).

    ``uses``: :func:`edgeq.onnx.graph.consumers` of the graph.
    """
    if len(node.input) < 2 or (node.input[1] != IDS_INPUT and not known_table):
        return f"indices are not the graph input {IDS_INPUT}"
    axis = attr(node, "axis", 0)
    if axis != 0:
        return f"Gather on axis {axis}, not 0"
    t = inits.get(node.input[0])
    if t is None:
        return "table is not a constant initializer"
    if len(t.dims) != 2 or t.data_type != TensorProto.FLOAT:
        return f"table {t.name} is not a 2-D float32 tensor"
    if len(uses.get(t.name, ())) != 1:
        return f"table {t.name} is shared with other nodes (tied weights)"
    if node.input[1] != IDS_INPUT and t.dims[0] < MIN_ROWS:  # token types, MPNet's relative position bias
        return f"table {t.name} has {t.dims[0]} rows (< {MIN_ROWS}): quantizing it saves nothing"
    if t.dims[1] % block_size:
        return f"hidden size {t.dims[1]} is not a multiple of block size {block_size}"
    return None


def module_names(model: onnx.ModelProto, torch_model) -> dict[str, str]:
    """Table initializer → name of the ``nn.Embedding`` holding the same values (matched by content)."""
    import torch

    inits = {t.name: t for t in model.graph.initializer}
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits}
    out = {}
    for name, mod in torch_model.named_modules():
        if not isinstance(mod, torch.nn.Embedding):
            continue
        w = mod.weight.detach().float().numpy()
        for t in tables:
            if t in inits and tuple(inits[t].dims) == w.shape and np.array_equal(numpy_helper.to_array(inits[t]), w):
                out[t] = name
    return out


def quantize_embeddings(model: onnx.ModelProto, block_size: int = 32,
                        modules: dict[str, str] | None = None, bits: int = 4) -> EmbeddingResult:
    """Rewrite, in place, the embedding Gathers of ``model``; return what was done and refused.

    ``modules`` (table initializer → module name, see :func:`module_names`) is recorded in the
    file so that :func:`read_embeddings` can name the tables after the source model's modules.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = consumers(graph)
    result = EmbeddingResult()
    new_nodes, drop, new_inits = [], set(), []
    for node in graph.node:
        known = modules is not None and node.op_type == "Gather" and node.input[0] in modules
        if node.op_type != "Gather" or (IDS_INPUT not in node.input[1:] and not known):
            new_nodes.append(node)
            continue
        reason = check_gather(node, inits, uses, block_size, known)
        if reason is None and modules is not None and not known:
            reason = "table matches no nn.Embedding of the source model"
        if reason:
            result.refused.append((node.name, reason))
            new_nodes.append(node)
            continue
        name = node.input[0]
        table = numpy_helper.to_array(inits[name])
        bs = block_size if bits == 4 else next(b for b in (128, 64, block_size) if table.shape[1] % b == 0)
        q = quantize_table(table, bs, bits, fp16_scales=bits == 8)
        new_name = f"{node.name or name}/GatherBlockQuantized"
        scales, cast, tensors = float_constant(f"{name}.emb_scales", q.scales, f"{new_name}/scales")  # fp16 if exact
        new_inits += [numpy_helper.from_array(pack_table(q), f"{name}.emb_q{bits}"), *tensors]
        new_nodes += cast
        new_nodes.append(helper.make_node(
            "GatherBlockQuantized", [f"{name}.emb_q{bits}", node.input[1], scales], list(node.output),
            name=new_name, domain=MS_DOMAIN, bits=bits, block_size=bs, gather_axis=0, quantize_axis=1,
        ))
        drop.add(name)
        result.rewritten[name] = (modules or {}).get(name, name)
        result.tables[result.rewritten[name]] = q.dequantize_int4()
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if result.rewritten:
        ensure_opset(model, MS_DOMAIN)
        set_meta(model, EMBEDDINGS_KEY, json.dumps(result.rewritten, sort_keys=True))
    return result


def read_embeddings(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Ê ``[V, H]`` of every rewritten table, keyed by module name (initializer name if unknown)."""
    meta = metadata(model)
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for name, key in json.loads(meta.get(EMBEDDINGS_KEY, "{}")).items():
        node = next(n for n in model.graph.node
                    if n.op_type == "GatherBlockQuantized" and n.input[0] in (f"{name}.emb_q4", f"{name}.emb_q8"))
        bs, bits = attr(node, "block_size", None), attr(node, "bits", 4)
        data = numpy_helper.to_array(inits[node.input[0]])
        scales = numpy_helper.to_array(inits[f"{name}.emb_scales"]).astype(np.float32)  # float16 when lossless
        if bits == 8:
            h, codes = data.shape[1], data.astype(np.float32)
        else:
            h = data.shape[1] * 2
            codes = unpack_int4(data.reshape(data.shape[0], -1, bs // 2), h).astype(np.float32)
        zp = np.float32(2 ** (bits - 1))
        out[key] = ((codes - zp) * np.repeat(scales, bs, axis=1)[:, :h]).astype(np.float32)
    return out
