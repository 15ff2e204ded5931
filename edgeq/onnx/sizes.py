"""Size accounting of a converted model, by component."""

from __future__ import annotations

import onnx

COMPONENTS = ("int4_codes", "scales", "fp32_correction", "embeddings", "fp32_linear", "rest")


def _component(name: str, gather_data: set[str], linear_weights: set[str], nbits: dict[str, str]) -> str:
    if name.endswith((".qweight", ".qplanes", ".q7")) or ".unpack_" in name or nbits.get(name) == "int4_codes":
        return "int4_codes"
    if name.endswith((".scales", ".scales16")) or nbits.get(name) == "scales":
        return "scales"
    if ".corr_" in name:
        return "fp32_correction"
    if name in gather_data or name.endswith(".emb_scales"):  # float16 scales reach the op through a Cast
        return "embeddings"
    if name in linear_weights:
        return "fp32_linear"
    return "rest"


def _nbytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    return t.ByteSize()


def size_by_component(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of initializer data per component (embedding tables are Gather data inputs)."""
    gather_data = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    gather_data |= {i for n in model.graph.node if n.op_type == "GatherBlockQuantized" for i in n.input[2:]}
    nbits = {}  # MatMulNBits inputs of any producer (e.g. ONNX Runtime's own quantizer): codes, scales, zero points
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            for i, role in zip(n.input[1:4], ("int4_codes", "scales", "scales")):
                nbits[i] = role
        elif n.op_type == "DequantizeLinear" and n.input[0] not in gather_data:  # DQ-form weights (e.g. NNCF's)
            for i, role in zip(n.input[:3], ("int4_codes", "scales", "scales")):
                nbits[i] = role
    linear_weights = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1}
    sizes = dict.fromkeys(COMPONENTS, 0)
    for t in model.graph.initializer:
        sizes[_component(t.name, gather_data, linear_weights, nbits)] += _nbytes(t)
    sizes["total_initializers"] = sum(sizes[c] for c in COMPONENTS)
    return sizes
