"""The in-memory core (`edgeq.pipeline.core`): structure, numerics against numpy, and its refusals.

Hand-built graphs (tests/onnx/test_rewrite.py) with grid-snapped weights, so the int4 part
reproduces W exactly and ONNX Runtime must equal the numpy reference up to float summation.
"""

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeq.config import ConvertConfig
from edgeq.errors import EdgeqError, UsageError
from edgeq.pipeline import core
from edgeq.pipeline.core import QuantizedGraph, needs_calibration_pass, plan_weights, quantize_graph
from edgeq.quant.plan import build_plan
from tests.onnx.test_rewrite import N2, K, N, linear_graph, reference, run
from tests.quant.test_int4 import snapped


@pytest.fixture
def graph():
    w1, _, _ = snapped(N, K, 32, seed=1)
    w2, _, _ = snapped(N2, N, 32, seed=2)
    rng = np.random.default_rng(3)
    b1, b2 = rng.normal(size=N).astype(np.float32), rng.normal(size=N2).astype(np.float32)
    ws = {"lin1": w1, "lin2": w2}
    return linear_graph(w1, b1, w2, b2), ws, b1, b2


def ops(model):
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("k", [0, 7, 10_000])
@pytest.mark.parametrize("correction", ["auto", "scatter", "dense"])
def test_structure_and_numerics_on_a_copy(graph, k, correction):
    model, ws, b1, b2 = graph
    before = model.SerializeToString()
    qg = quantize_graph(model, ws, ConvertConfig(k=k, correction=correction))
    assert isinstance(qg, QuantizedGraph)
    assert model.SerializeToString() == before  # the caller's FP32 graph is not modified
    onnx.checker.check_model(qg.model)
    counts = ops(qg.model)
    assert counts["MatMulNBits"] == 2 == qg.rewrite.count == len(qg.plan.layers)
    assert counts["Gemm"] == 0 and "att/MatMul" in {n.name for n in qg.model.graph.node}  # attention untouched
    assert {t.name for t in qg.model.graph.initializer}.isdisjoint({"w1", "w2"})
    assert qg.embeddings is None and set(qg.timings_s) == {"rewrite"}
    for name, w in ws.items():  # snapped weights: the plan is W itself, whatever k
        np.testing.assert_array_equal(qg.planned[name], w)
        assert qg.plan.layers[name].quant.k == min(k, w.size)
    x = np.random.default_rng(4).normal(size=(3, 5, K)).astype(np.float32)
    np.testing.assert_allclose(run(qg.model, x), reference(x, ws["lin1"], b1, ws["lin2"], b2), rtol=1e-5, atol=1e-5)


def test_off_grid_weights_compute_the_planned_w_hat():
    rng = np.random.default_rng(5)
    ws = {"lin1": rng.normal(size=(N, K)).astype(np.float32), "lin2": rng.normal(size=(N2, N)).astype(np.float32)}
    ws["lin1"][3, 7] = 40.0  # a planted outlier, kept exact
    b1, b2 = np.zeros(N, np.float32), np.zeros(N2, np.float32)
    qg = quantize_graph(linear_graph(ws["lin1"], b1, ws["lin2"], b2), ws, ConvertConfig(k=16, method="magnitude"))
    assert qg.planned["lin1"][3, 7] == 40.0
    assert not np.array_equal(qg.planned["lin2"], ws["lin2"])  # int4 error elsewhere
    x = rng.normal(size=(2, 4, K)).astype(np.float32)
    np.testing.assert_allclose(run(qg.model, x), reference(x, qg.planned["lin1"], b1, qg.planned["lin2"], b2),
                               rtol=1e-4, atol=1e-4)


def test_a_given_plan_is_what_is_written(graph):
    model, ws, _, _ = graph
    config = ConvertConfig(k=3, block_size="per-channel", accuracy_level=4)
    plan = build_plan(ws, ConvertConfig(k=5, block_size="16", method="random"))  # not the config's own plan
    qg = quantize_graph(model, ws, config, plan=plan)
    assert qg.plan is plan
    for name, lp in plan.layers.items():
        np.testing.assert_array_equal(qg.planned[name], lp.quant.dequantize())
        assert lp.quant.k == 5
    levels = {a.i for n in qg.model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {4}


def test_count_mismatch_is_refused(graph, monkeypatch):
    model, ws, _, _ = graph
    real = core.rewrite_linears

    def drops_one(m, layers, weights, *a, **kw):
        return real(m, {n: q for n, q in layers.items() if n != "lin2"}, weights, *a, **kw)

    monkeypatch.setattr(core, "rewrite_linears", drops_one)
    with pytest.raises(EdgeqError, match="rewrote 1 Linears but the plan has 2"):
        quantize_graph(model, ws, ConvertConfig(k=4))


def test_read_back_mismatch_is_refused(graph, monkeypatch):
    model, ws, _, _ = graph
    real = core.rewrite_linears

    def corrupts_a_scale(m, *a, **kw):
        res = real(m, *a, **kw)
        t = next(t for t in m.graph.initializer if t.name == "lin1.scales")
        s = numpy_helper.to_array(t).copy()
        s.flat[0] *= 2
        t.CopyFrom(numpy_helper.from_array(s, t.name))
        return res

    monkeypatch.setattr(core, "rewrite_linears", corrupts_a_scale)
    with pytest.raises(EdgeqError, match="does not encode the plan for lin1;"):
        quantize_graph(model, ws, ConvertConfig(k=4))


def test_unmapped_linear_and_empty_plan_are_refused(graph):
    model, ws, _, _ = graph
    other = {**ws, "lin3": np.ones((4, 4), np.float32)}
    with pytest.raises(EdgeqError, match="lin3.*exclude them with --exclude REGEX"):
        quantize_graph(model, other, ConvertConfig(k=4))
    with pytest.raises(UsageError, match="no Linear left to quantize"):
        quantize_graph(model, ws, ConvertConfig(k=4, exclude=("lin",)))
    with pytest.raises(EdgeqError, match="found no word-embedding Gather"):
        quantize_graph(model, ws, ConvertConfig(k=4, quantize_embeddings=True))


def test_needs_calibration_pass():
    assert not needs_calibration_pass(ConvertConfig())
    assert needs_calibration_pass(ConvertConfig(calib="rte"))  # rtn: one-pass statistics for the saliency
    assert needs_calibration_pass(ConvertConfig(method="awq", calib="rte", quantizer="gptq"))
    assert not needs_calibration_pass(ConvertConfig(calib="rte", quantizer="gptq"))  # gptq calibrates itself


def test_tiny_model_with_4bit_embeddings(tiny_model):
    from edgeq.model.load import load_model
    from edgeq.onnx.embeddings import module_names
    from edgeq.onnx.export import export_fp32

    loaded = load_model(tiny_model(hidden=64))  # hidden a multiple of the block (32)
    fp32 = export_fp32(loaded)
    weights = loaded.linear_weights()
    config = ConvertConfig(k=4, quantize_embeddings=True)
    plan, report = plan_weights(loaded, weights, config)
    assert report == {"name": "rtn", "hyperparameters": {}, "calibration": None}
    qg = quantize_graph(fp32, weights, config, plan, module_names(fp32, loaded.model))
    counts = ops(qg.model)
    assert counts["MatMulNBits"] == len(weights) == qg.rewrite.count
    assert counts["GatherBlockQuantized"] == len(qg.embeddings["int4"]) >= 1
    assert "bert.embeddings.word_embeddings" in qg.embeddings["int4"]
    assert set(qg.planned) == set(weights) | set(qg.embeddings["int4"])
    assert set(qg.timings_s) == {"rewrite", "embeddings"}
    assert ops(fp32)["MatMulNBits"] == 0  # the export itself is untouched


def test_planned_weights_are_decoded_on_first_access_and_kept(graph):
    model, ws, _, _ = graph
    qg = quantize_graph(model, ws, ConvertConfig(k=3, method="random"))
    planned = qg.planned
    assert list(planned) == list(qg.plan.layers) and len(planned) == 2 and "nope" not in planned
    assert planned._done == {}  # nothing decoded yet: convert releases each FP32 weight as its Ŵ comes
    first = planned["lin1"]
    assert planned["lin1"] is first and set(planned._done) == {"lin1"}
    np.testing.assert_array_equal(first, qg.plan.layers["lin1"].quant.dequantize())
    with pytest.raises(KeyError):
        planned["nope"]
