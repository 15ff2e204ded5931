"""Read the quantized weights back from an edgeq ONNX file: Ŵ = dequantized MatMulNBits + FP32 entries.

For each rewritten Linear (listed in the ``edgeq.layers`` metadata)::

    Ŵ[i, j] = (code_ij − 2^(bits−1)) · s_{i, ⌊j / block⌋}  +  Σ_t [i = i_t, j = j_t] v_t

with the codes and scales decoded from however they are stored (``edgeq.onnx.storage``: plain
MatMulNBits inputs, compact bit planes + float16 scales, or the native 2-bit layout), and
the FP32 entries (i_t, j_t, v_t) decoded by whichever correction encoding the layer uses
(:func:`edgeq.onnx.corrections.decode_correction`).  4-bit embedding tables are decoded by
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
from edgeq.onnx.graph import metadata
from edgeq.onnx.rewrite import LAYERS_KEY
from edgeq.onnx.storage import decode_weight


def read_back(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Ŵ ``[N, K]`` of every rewritten Linear (and Ê of 4-bit embedding tables), decoded from the file."""
    return dict(iter_read_back(model))


def iter_read_back(model: onnx.ModelProto) -> Iterator[tuple[str, np.ndarray]]:
    """(name, Ŵ) per rewritten Linear, then (module name, Ê) per 4-bit embedding table, one at a time
    (a caller comparing layer by layer never holds every decoded weight at once)."""
    meta = metadata(model)
    if LAYERS_KEY not in meta:
        raise ValueError("this ONNX file was not written by edgeq convert (no edgeq.layers metadata)")
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}

    def arr(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    for layer in json.loads(meta[LAYERS_KEY]):
        node = nodes.get(f"/{layer}/MatMulNBits")
        if node is None:
            raise ValueError(f"the edgeq.layers metadata names {layer}, but the graph has no /{layer}/MatMulNBits")
        w = decode_weight(layer, node, inits, arr)  # plain, compact or native storage (edgeq.onnx.storage)
        entries = decode_correction(layer, inits, arr)
        if entries is not None:
            rows, cols, vals = entries
            np.add.at(w, (rows, cols), vals)
        yield layer, w.astype(np.float32, copy=False)
    yield from read_embeddings(model).items()  # 4-bit word/position embeddings, keyed by module name
