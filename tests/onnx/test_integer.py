"""The integer-kernel rewrite (`edgeq.onnx.integer`, ``--kernel integer``): structure, numerics, refusals,
and the activation-outlier columns (``--act-outliers``) on a planted outlier.

Weights are snapped to the per-channel |q| ≤ 63 grid, so the plan is W itself and any difference
between ONNX Runtime and the numpy reference of the same uint8 × int8 arithmetic is a format bug.
"""

from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from edgeq.config import ConvertConfig
from edgeq.errors import EdgeqError
from edgeq.model.calib import InputStats, accumulate
from edgeq.onnx.integer import OP, SHARED_OP, check_integer, integer_layers
from edgeq.onnx.readback import read_back
from edgeq.pipeline.core import quantize_graph
from edgeq.quant.int4 import Granularity, quantize_rtn
from edgeq.quant.integer import dynamic_quantize, integer_linear, outlier_columns
from edgeq.quant.plan import build_plan
from tests.onnx.test_fuse_qkv import SIZES, qkv_graph
from tests.onnx.test_fuse_qkv import K as QK
from tests.onnx.test_fuse_qkv import run as run_named
from tests.onnx.test_rewrite import N2, K, N, linear_graph, reference, run
from tests.quant.test_int4 import snapped

INTEGER = dict(bits=8, kernel="integer", block_size="per-channel")


def np_dynamic_quantize(x):
    """ONNX DynamicQuantizeLinear, in numpy (float32): (u − z, a)."""
    x = x.astype(np.float32)
    lo, hi = np.float32(min(0.0, x.min())), np.float32(max(0.0, x.max()))
    a = np.float32(1) if hi == lo else np.float32((hi - lo) / np.float32(255))
    z = np.rint(np.clip(np.float32(0) - lo / a, 0, 255))
    u = np.clip(np.rint(x / a) + z, 0, 255)
    return (u - z).astype(np.float64), a


def np_linear(x, w, b, cols=()):
    """Integer-kernel Linear of snapped ``w`` (per-row scale max|w|/63): int8 path on x with ``cols`` zeroed,
    FP32 path on those columns."""
    s = (np.abs(w).max(axis=1) / np.float32(63)).astype(np.float32)
    q = np.rint(w / s[:, None])
    cols = list(cols)
    xm = x.copy()
    xm[..., cols] = 0
    xi, a = np_dynamic_quantize(xm)
    y = (xi @ q.T).astype(np.float32) * (a * s) + b
    return y + x[..., cols] @ w[:, cols].T


def np_graph(x, w1, b1, w2, b2, cols1=(), cols2=()):
    h = np.maximum(np_linear(x, w1, b1, cols1), 0)
    return np_linear(h[:, 0, :], w2, b2, cols2)


@pytest.fixture
def weights():
    w1, _, _ = snapped(N, K, K, seed=1, qmax=63)  # one block per row: the per-channel grid
    w2, _, _ = snapped(N2, N, N, seed=2, qmax=63)
    rng = np.random.default_rng(3)
    return {"lin1": w1, "lin2": w2}, rng.normal(size=N).astype(np.float32), rng.normal(size=N2).astype(np.float32)


def ops(model):
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("k", [0, 7])
def test_structure_numerics_and_read_back(weights, k):
    ws, b1, b2 = weights
    qg = quantize_graph(linear_graph(ws["lin1"], b1, ws["lin2"], b2), ws,
                        ConvertConfig(k=k, correction="dense", **INTEGER))
    onnx.checker.check_model(qg.model)
    counts = ops(qg.model)
    assert counts[OP] == 2 == qg.rewrite.count and counts["MatMulNBits"] == 0 and counts["Gemm"] == 0
    assert counts["MatMul"] == 1 + (2 if k else 0)  # attention + one dense correction MatMul a layer
    inits = {t.name: t for t in qg.model.graph.initializer}
    assert inits["lin1.qweight"].data_type == onnx.TensorProto.INT8 and list(inits["lin1.qweight"].dims) == [K, N]
    assert list(inits["lin1.scales"].dims) == [N] and "lin1.bias" in inits and "lin2.bias" in inits
    for name, w in ws.items():  # snapped: Ŵ = W, decoded from the file alone
        np.testing.assert_array_equal(read_back(qg.model)[name], w)
        assert np.abs(qg.plan.layers[name].quant.codes.astype(int) - 128).max() == 63
    x = np.random.default_rng(4).normal(size=(3, 5, K)).astype(np.float32)
    got = run(qg.model, x)
    if k == 0:  # the int8 path alone: the numpy reference of the same arithmetic
        np.testing.assert_allclose(got, np_graph(x, ws["lin1"], b1, ws["lin2"], b2), rtol=1e-5, atol=1e-5)
    fp32 = reference(x, ws["lin1"], b1, ws["lin2"], b2)
    assert np.abs(got - fp32).max() < 0.05 * np.abs(fp32).max()  # activation quantization only


def test_torch_reference_equals_onnx_runtime(weights):
    """The plan-parity reference (edgeq.quant.integer.integer_linear) computes what the file computes."""
    ws, b1, b2 = weights
    cfg = ConvertConfig(k=5, **INTEGER)
    qg = quantize_graph(linear_graph(ws["lin1"], b1, ws["lin2"], b2), ws, cfg)
    lay = integer_layers(qg.model)
    assert set(lay) == {"lin1", "lin2"} and lay["lin1"].act_cols.size == 0
    x = np.random.default_rng(6).normal(size=(2, 4, K)).astype(np.float32)

    def layer(name, inp, b):
        lt = lay[name]
        return integer_linear(torch.from_numpy(inp), torch.from_numpy(lt.q.astype(np.float64)),
                              torch.from_numpy(lt.scales), torch.from_numpy(b), torch.from_numpy(lt.exact),
                              None if lt.factors is None else torch.from_numpy(lt.factors)).numpy()

    h = np.maximum(layer("lin1", x, b1), 0)
    np.testing.assert_allclose(run(qg.model, x), layer("lin2", np.ascontiguousarray(h[:, 0, :]), b2),
                               rtol=1e-5, atol=1e-5)


def test_dynamic_quantize_matches_the_onnx_formula():
    x = np.random.default_rng(7).normal(size=(3, 11)).astype(np.float32) * 3
    x[0, 0] = 0.5  # and an exact tie case below
    xi, a = dynamic_quantize(torch.from_numpy(x))
    ref, ra = np_dynamic_quantize(x)
    assert float(a) == ra
    np.testing.assert_array_equal(xi.numpy(), ref)
    assert dynamic_quantize(torch.zeros(4))[1] == 1  # constant input: scale 1
    pos = dynamic_quantize(torch.tensor([0.0, 2.5, 255.0]))  # range [0, 255]: a = 1, z = 0; 2.5 → 2 (half to even)
    assert float(pos[1]) == 1 and pos[0].tolist() == [0, 2, 255]


def _stats(x):
    st = InputStats(n_features=x.shape[-1])
    accumulate(st, torch.from_numpy(x.reshape(-1, x.shape[-1])))
    return st


def test_planted_outlier_column_is_picked_and_helps(weights):
    ws, b1, b2 = weights
    rng = np.random.default_rng(8)
    j = 13
    x = rng.normal(size=(4, 6, K)).astype(np.float32)
    x[..., j] *= 50  # one input dimension ~50x the others (as BERT's FFN inputs)
    assert outlier_columns(_stats(x).abs_max.numpy(), 1).tolist() == [j]
    h = np.maximum(x @ ws["lin1"].T + b1, 0)[:, 0, :]
    stats = {"lin1": _stats(x), "lin2": _stats(h)}
    fp32 = reference(x, ws["lin1"], b1, ws["lin2"], b2)
    errs = {}
    for c in (0, 1):
        cfg = ConvertConfig(k=0, act_outliers=c, calib="planted", **INTEGER) if c else ConvertConfig(k=0, **INTEGER)
        plan = build_plan(ws, cfg, stats)
        qg = quantize_graph(linear_graph(ws["lin1"], b1, ws["lin2"], b2), ws, cfg, plan)
        got = run(qg.model, x)
        errs[c] = float(np.abs(got - fp32).max())
        if c:
            assert plan.layers["lin1"].quant.act_cols.tolist() == [j]
            assert plan.layers["lin1"].quant.k == N  # the whole column is exact
            assert ops(qg.model)["Mul"] == 2 and integer_layers(qg.model)["lin1"].act_cols.tolist() == [j]
            cols2 = plan.layers["lin2"].quant.act_cols.tolist()
            np.testing.assert_allclose(got, np_graph(x, ws["lin1"], b1, ws["lin2"], b2, [j], cols2),
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(read_back(qg.model)["lin1"], ws["lin1"])
    assert errs[1] < errs[0] / 3, errs


def test_refusals(weights):
    ws, _, _ = weights
    w = ws["lin1"]
    ok = quantize_rtn(w, np.empty(0, np.int64), Granularity("channel"), bits=8, reduce_range=True)
    assert check_integer(ok) is None
    assert "8-bit" in check_integer(quantize_rtn(w, np.empty(0, np.int64), Granularity("channel")))
    full = quantize_rtn(w, np.empty(0, np.int64), Granularity("channel"), bits=8)  # |q| up to 127
    assert "63" in check_integer(full)
    block = quantize_rtn(w, np.empty(0, np.int64), Granularity("block", 16), bits=8, reduce_range=True)
    assert "per output channel" in check_integer(block)
    assert "wholly" in check_integer(replace(ok, act_cols=np.array([3])))
    with pytest.raises(ValueError, match="8-bit grid"):
        quantize_rtn(w, np.empty(0, np.int64), Granularity("channel"), reduce_range=True)
    b1, b2 = np.zeros(N, np.float32), np.zeros(N2, np.float32)
    from edgeq.pipeline import core

    plan = build_plan(ws, ConvertConfig(bits=8, block_size="per-channel"))  # full-range 8-bit codes
    with pytest.raises(EdgeqError, match="63"):
        core.quantize_graph(linear_graph(ws["lin1"], b1, ws["lin2"], b2), ws, ConvertConfig(k=0, **INTEGER), plan)


@pytest.mark.parametrize("kw, match", [
    (dict(bits=4, kernel="integer", block_size="per-channel"), "--bits 8"),
    (dict(bits=8, kernel="integer"), "per-channel"),
    (dict(bits=8, kernel="integer", block_size="per-channel", accuracy_level=4), "accuracy-level"),
    (dict(bits=8, kernel="integer", block_size="per-channel", quantizer="gptq", calib="rte"), "rtn"),
    (dict(bits=8, kernel="integer", block_size="per-channel", act_outliers=2), "--calib"),
    (dict(bits=8, act_outliers=2, calib="rte"), "--kernel integer"),
    (dict(bits=8, kernel="integer", block_size="per-channel", act_outliers=-1), "non-negative"),
])
def test_config_refusals(kw, match):
    with pytest.raises(ValueError, match=match):
        ConvertConfig(**kw)


def test_integer_kernel_keeps_defaults():
    assert ConvertConfig().kernel == "int4" and ConvertConfig().act_outliers == 0
    assert ConvertConfig(**INTEGER).storage == "plain"


def test_outlier_columns_ratio_and_ties():
    a = np.array([1.0, 9.0, 1.2, 0.8, 9.0, 3.0])
    assert outlier_columns(a, 2).tolist() == [1, 4]  # tie: both, sorted
    assert outlier_columns(a, 3).tolist() == [1, 4, 5]
    assert outlier_columns(a, 3, ratio=4.0).tolist() == [1, 4]  # median 2.1: 3.0 is not 4x it
    assert outlier_columns(a, 3, ratio=10.0).size == 0
    assert outlier_columns(a, 0).size == 0 and outlier_columns(a, 99).size == a.size


@pytest.mark.parametrize("storage", ["plain", "compact"])
def test_readers_of_one_input_share_one_activation_quantization(storage):
    """q, k, v reading one x: one ActMask and one DynamicQuantizeLinear feed three MatMulIntegerToFloat, each
    computing what its own DynamicQuantizeMatMul would (numpy), decoded back exactly; parts whose columns
    differ keep their own node, with the reason in the result."""
    ws = {name: snapped(n, QK, QK, seed=i, qmax=63)[0] for i, (name, n) in enumerate(SIZES.items())}
    rng = np.random.default_rng(9)
    bs = {name: rng.normal(size=n).astype(np.float32) for name, n in SIZES.items()}
    x = rng.normal(size=(2, 5, QK)).astype(np.float32)
    j = 11
    x[..., j] *= 40
    stats = {name: _stats(x) for name in ws}
    cfg = ConvertConfig(k=0, act_outliers=1, calib="planted", storage=storage, **INTEGER)
    plan = build_plan(ws, cfg, stats)
    qg = quantize_graph(qkv_graph(ws, bs), ws, cfg, plan)
    onnx.checker.check_model(qg.model)
    counts = ops(qg.model)
    assert counts[SHARED_OP] == 3 and counts[OP] == 0 and counts["DynamicQuantizeLinear"] == 1 and counts["Mul"] == 1
    group = "attn.query+key+value"
    assert {info["input_quantized_by"] for info in qg.rewrite.layers.values()} == {group}
    layers = integer_layers(qg.model)
    outs = run_named(qg.model, x)
    for name, w in ws.items():
        assert layers[name].act_cols.tolist() == [j]
        np.testing.assert_array_equal(read_back(qg.model)[name], w)
        np.testing.assert_allclose(outs[f"{name}.y"], np_linear(x, w, bs[name], [j]), rtol=1e-5, atol=1e-5)
    # a part whose columns differ keeps its own DynamicQuantizeMatMul (and says why)
    other = {**stats, "attn.value": _stats(np.flip(x, -1).copy())}
    plan = build_plan(ws, cfg, other)
    qg = quantize_graph(qkv_graph(ws, bs), ws, cfg, plan)
    counts = ops(qg.model)
    assert counts[SHARED_OP] == 2 and counts[OP] == 1 and counts["DynamicQuantizeLinear"] == 1
    assert "columns differ" in qg.rewrite.layers["attn.value"]["input_not_shared"]
