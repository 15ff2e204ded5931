"""Read the quantized weights back from an edgeq ONNX file: Ŵ = dequantized MatMulNBits + FP32 entries.

For each rewritten Linear (listed in the ``edgeq.layers`` metadata)::

    Ŵ[i, j] = (code_ij − 2^(bits−1)) · s_{i, ⌊j / block⌋}  +  Σ_t [i = i_t, j = j_t] v_t

(``--kernel integer`` files: ``q_ij · s_i · m_j`` from DynamicQuantizeMatMul's int8 ``qᵀ``, its scales and
the input factors m of ``--smooth-alpha``, ``edgeq.onnx.integer``, plus the same FP32 entries)

with the codes and scales decoded from however they are stored (``edgeq.onnx.storage``: plain
MatMulNBits inputs, compact bit planes + float16 scales, or the native 2-bit layout), and
the FP32 entries (i_t, j_t, v_t) decoded by whichever correction encoding the layer uses
(:func:`edgeq.onnx.corrections.decode_correction`).  Linears fused by ``--fuse-qkv`` (listed in the
``edgeq.fused`` metadata, :mod:`edgeq.onnx.fuse_qkv`) are decoded as the one stacked Linear and
split back by rows.  4-bit embedding tables are decoded by
:func:`edgeq.onnx.embeddings.read_embeddings`.  The decode knows nothing of the plan that wrote the
file, which is what makes "the file equals the plan" a real check.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.onnx.corrections import decode_correction
from edgeq.onnx.embeddings import read_embeddings
from edgeq.onnx.fuse_qkv import FUSED_KEY
from edgeq.onnx.graph import metadata
from edgeq.onnx.integer import decode_integer, dequantize_integer, kernel_node
from edgeq.onnx.rewrite import LAYERS_KEY
from edgeq.onnx.storage import decode_weight


def read_back(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Ŵ ``[N, K]`` of every rewritten Linear (and Ê of 4-bit embedding tables), decoded from the file."""
    return dict(iter_read_back(model))


def iter_read_back(model: onnx.ModelProto) -> Iterator[tuple[str, np.ndarray]]:
    """(name, Ŵ) per rewritten Linear, then (module name, Ê) per 4-bit embedding table, one at a time
    (a caller comparing layer by layer never holds every decoded weight at once; a --fuse-qkv group's
    stacked weight is decoded once and kept until its parts are out)."""
    meta = metadata(model)
    if LAYERS_KEY not in meta:
        raise ValueError("this ONNX file was not written by edgeq convert (no edgeq.layers metadata)")
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}

    def arr(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    def add_correction(layer: str, w: np.ndarray) -> np.ndarray:
        entries = decode_correction(layer, inits, arr)
        if entries is not None:
            rows, cols, vals = entries
            np.add.at(w, (rows, cols), vals)
        return w.astype(np.float32, copy=False)

    def decode(layer: str) -> np.ndarray:
        integer = kernel_node(nodes, layer)
        if integer is not None:  # --kernel integer: int8 qᵀ and per-channel scales (edgeq.onnx.integer)
            q, scales, factors = decode_integer(layer, integer, inits, arr, producers)
            return add_correction(layer, dequantize_integer(q, scales, factors))
        node = nodes.get(f"/{layer}/MatMulNBits")
        if node is None:
            raise ValueError(f"the edgeq metadata names {layer}, but the graph has no /{layer}/MatMulNBits")
        return add_correction(layer, decode_weight(layer, node, inits, arr))  # plain, compact or native storage

    parts = {}  # part layer → (fused layer, first row, N): --fuse-qkv stacked these along N (edgeq.onnx.fuse_qkv)
    for fused, members in json.loads(meta.get(FUSED_KEY, "{}")).items():
        for (layer, n), start in zip(members, np.cumsum([0] + [n for _, n in members])):
            parts[layer] = (fused, int(start), int(n))
    stacked: dict[str, np.ndarray] = {}
    for layer in json.loads(meta[LAYERS_KEY]):
        if layer in parts:
            fused, start, n = parts[layer]
            if fused not in stacked:
                stacked.clear()  # a group's parts are consecutive in the layer list: one stacked weight at a time
                stacked[fused] = decode(fused)
            yield layer, add_correction(layer, stacked[fused][start:start + n].copy())  # a part's own correction
        else:
            yield layer, decode(layer)
    stacked.clear()
    yield from read_embeddings(model).items()  # 4-bit word/position embeddings, keyed by module name
