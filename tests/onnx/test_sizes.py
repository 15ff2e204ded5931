"""edgeq.onnx.sizes: initializer bytes by component, for edgeq's files and for peers' layouts."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgeq.onnx.sizes import size_by_component


def test_dequantize_linear_weights_count_as_codes_and_scales():
    """A peer's DQ-form weight (NNCF at opset 21: int4 codes + scales → DequantizeLinear → MatMul) is
    Linear data, not 'rest'; a FP32 MatMul weight is fp32_linear and an embedding table embeddings."""
    codes = helper.make_tensor("w.q", TensorProto.INT4, [8, 4], np.zeros(32, np.int8).tolist())
    inits = [codes, numpy_helper.from_array(np.ones((1, 4), np.float32), "w.s"),
             numpy_helper.from_array(np.ones((4, 4), np.float32), "w2"),
             numpy_helper.from_array(np.ones((10, 8), np.float32), "emb")]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h"]),
             helper.make_node("DequantizeLinear", ["w.q", "w.s"], ["w"], axis=0, block_size=8),
             helper.make_node("MatMul", ["h", "w"], ["y"]), helper.make_node("MatMul", ["y", "w2"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])], inits)
    sizes = size_by_component(helper.make_model(graph))
    assert sizes["int4_codes"] > 0 and sizes["scales"] == 16
    assert sizes["fp32_linear"] == 64 and sizes["embeddings"] == 320 and sizes["rest"] == 0
