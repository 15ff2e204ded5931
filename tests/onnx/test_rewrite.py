"""The ONNX rewrite, three ways: structure (op counts), numerics (ORT vs reference), refusals.

Weights are snapped to the int4 grid (power-of-two scales), so the int4 part reproduces them
exactly and any mismatch beyond float summation noise is a format bug.
"""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.config import ConvertConfig
from edgeq.onnx.readback import read_back
from edgeq.onnx.rewrite import match_linears, rewrite_linears
from edgeq.quant.plan import build_plan
from tests.quant.test_int4 import snapped

K, N, N2 = 80, 24, 6  # K = 80 is not a multiple of 32: exercises padding


def linear_graph(w1, b1, w2, b2, share=False):
    """x[B,T,K] → MatMul(W1ᵀ)+b1 → Relu → Gather CLS → Gemm(W2, b2, transB=1) → y[B,N2]."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="/lin1/MatMul"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="/lin1/Add"),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "h2t"], ["att"], name="att/MatMul"),  # activation x activation
        helper.make_node("Transpose", ["h2"], ["h2t"], perm=[0, 2, 1]),
        helper.make_node("Gather", ["h2", "zero"], ["cls"], axis=1),
        helper.make_node("Gemm", ["cls", "w2", "b2"], ["y"], name="/lin2/Gemm", transB=1),
    ]
    nodes.insert(4, nodes.pop(3))  # Transpose before the attention MatMul
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(w1.T), "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(b2, "b2"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N2]),
               helper.make_tensor_value_info("att", TensorProto.FLOAT, ["B", "T", "T"])]
    if share:  # a second consumer of w1 makes it unsafe to rewrite in place
        nodes.append(helper.make_node("MatMul", ["x", "w1"], ["y2"], name="shared/MatMul"))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["B", "T", N]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", K])],
                          outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def reference(x, w1, b1, w2, b2):
    h = np.maximum(x @ w1.T + b1, 0)
    return h[:, 0, :] @ w2.T + b2


@pytest.fixture
def weights():
    w1, _, _ = snapped(N, K, 32, seed=1)
    w2, _, _ = snapped(N2, N, 32, seed=2)
    rng = np.random.default_rng(3)
    return {"lin1": w1, "lin2": w2}, rng.normal(size=N).astype(np.float32), rng.normal(size=N2).astype(np.float32)


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("k", [0, 1, 7, 50, 10_000])
def test_rewrite_structure_and_numerics(weights, k):
    ws, b1, b2 = weights
    model = linear_graph(ws["lin1"], b1, ws["lin2"], b2)
    plan = build_plan(ws, ConvertConfig(k=k, block_size="32"))
    result = rewrite_linears(model, plan.quants, ws, correction="scatter")  # dense: tests/onnx/test_corrections.py
    onnx.checker.check_model(model)
    ops = Counter(n.op_type for n in model.graph.node)
    assert result.count == 2 == ops["MatMulNBits"]
    assert ops["MatMul"] == 1  # only the activation x activation MatMul is left
    assert ops["Gemm"] == 0
    assert ops["ScatterElements"] == (2 if k else 0)
    names = {t.name for t in model.graph.initializer}
    assert "w1" not in names and "w2" not in names  # no FP32 Linear weight left
    for layer, w in ws.items():
        kk = min(k, w.size)
        if kk:
            assert (
                numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == f"{layer}.corr_vals")).size
                == kk
            )
    # the file decodes to the plan, and (snapped weights) the plan is W itself
    decoded = read_back(model)
    for layer, w in ws.items():
        np.testing.assert_array_equal(decoded[layer], plan.layers[layer].quant.dequantize())
        np.testing.assert_array_equal(decoded[layer], w)
    x = np.random.default_rng(4).normal(size=(3, 5, K)).astype(np.float32)
    np.testing.assert_allclose(run(model, x), reference(x, ws["lin1"], b1, ws["lin2"], b2), rtol=1e-5, atol=1e-5)


def test_correction_is_exact_for_off_grid_weights():
    """Random (off-grid) weights: ORT equals x @ Ŵᵀ where Ŵ holds the exact FP32 entries."""
    rng = np.random.default_rng(5)
    ws = {"lin1": rng.normal(size=(N, K)).astype(np.float32), "lin2": rng.normal(size=(N2, N)).astype(np.float32)}
    ws["lin1"][3, 7] = 40.0  # a planted outlier
    b1, b2 = np.zeros(N, np.float32), np.zeros(N2, np.float32)
    model = linear_graph(ws["lin1"], b1, ws["lin2"], b2)
    plan = build_plan(ws, ConvertConfig(k=16, method="magnitude"))
    assert 3 * K + 7 in plan.layers["lin1"].quant.salient_index
    rewrite_linears(model, plan.quants, ws)
    w_hat = {n: lp.quant.dequantize() for n, lp in plan.layers.items()}
    assert w_hat["lin1"][3, 7] == 40.0
    x = rng.normal(size=(2, 4, K)).astype(np.float32)
    np.testing.assert_allclose(run(model, x), reference(x, w_hat["lin1"], b1, w_hat["lin2"], b2), rtol=1e-4, atol=1e-4)


def test_accuracy_level_attribute(weights):
    ws, b1, b2 = weights
    model = linear_graph(ws["lin1"], b1, ws["lin2"], b2)
    rewrite_linears(model, build_plan(ws, ConvertConfig(k=4)).quants, ws, accuracy_level=4)
    levels = {
        a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"
    }
    assert levels == {4}


def test_excluded_linear_stays_fp32(weights):
    ws, b1, b2 = weights
    model = linear_graph(ws["lin1"], b1, ws["lin2"], b2)
    plan = build_plan(ws, ConvertConfig(k=4, exclude=("lin2",)))
    assert plan.excluded == ("lin2",)
    assert rewrite_linears(model, plan.quants, ws).count == 1
    assert Counter(n.op_type for n in model.graph.node)["Gemm"] == 1


def test_refuses_shared_weight_and_names_the_linear(weights):
    ws, b1, b2 = weights
    model = linear_graph(ws["lin1"], b1, ws["lin2"], b2, share=True)
    matches, refused = match_linears(model, ws)
    assert "lin1" not in matches and any("shared" in r for _, r in refused)
    with pytest.raises(ValueError, match="lin1"):
        rewrite_linears(model, build_plan(ws, ConvertConfig(k=4)).quants, ws)


def test_refuses_activation_matmul_and_gemm_variants(weights):
    ws, b1, b2 = weights
    model = linear_graph(ws["lin1"], b1, ws["lin2"], b2)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    gemm.attribute.append(helper.make_attribute("alpha", 0.5))
    matches, refused = match_linears(model, ws)
    reasons = dict(refused)
    assert "activation" in reasons["att/MatMul"]
    assert "alpha" in reasons["/lin2/Gemm"]
    assert set(matches) == {"lin1"}


def test_unknown_weight_is_not_mapped(weights):
    ws, b1, b2 = weights
    model = linear_graph(ws["lin1"], b1, ws["lin2"], b2)
    other = {"lin1": ws["lin1"] + 1.0, "lin2": ws["lin2"]}  # lin1 differs from the graph's weight
    matches, refused = match_linears(model, other)
    assert "lin1" not in matches
    assert any("matches no Linear" in r for _, r in refused)


def test_refuses_a_linear_whose_node_name_is_not_unique(weights):
    """Nodes are keyed by name: a MatMul sharing its name with another node is refused, with the reason."""
    ws, b1, b2 = weights
    model = linear_graph(ws["lin1"], b1, ws["lin2"], b2)
    next(n for n in model.graph.node if n.op_type == "Relu").name = "/lin1/MatMul"
    matches, refused = match_linears(model, ws)
    assert set(matches) == {"lin2"}
    assert "not unique" in dict(refused)["/lin1/MatMul"]
    with pytest.raises(ValueError, match="lin1.*not unique"):
        rewrite_linears(model, build_plan(ws, ConvertConfig(k=4)).quants, ws)


def test_bias_add_without_a_unique_name_stays_and_stays_exact(weights):
    """The bias Add is folded into MatMulNBits only when its name is unique; otherwise it follows the correction."""
    ws, b1, b2 = weights
    model = linear_graph(ws["lin1"], b1, ws["lin2"], b2)
    next(n for n in model.graph.node if n.op_type == "Relu").name = "/lin1/Add"
    plan = build_plan(ws, ConvertConfig(k=7, block_size="32"))
    assert rewrite_linears(model, plan.quants, ws, correction="scatter").count == 2
    next(n for n in model.graph.node if n.op_type == "Relu").name = "relu"  # ORT refuses two nodes of one name
    onnx.checker.check_model(model)
    add = next(n for n in model.graph.node if n.op_type == "Add" and "b1" in n.input)
    assert add.input[0] == "h0"  # reads the corrected output: y = (y_q + correction) + b1
    assert len(next(n for n in model.graph.node if n.name == "/lin1/MatMulNBits").input) == 3  # no bias input
    x = np.random.default_rng(6).normal(size=(2, 3, K)).astype(np.float32)
    np.testing.assert_allclose(run(model, x), reference(x, ws["lin1"], b1, ws["lin2"], b2), rtol=1e-5, atol=1e-5)
