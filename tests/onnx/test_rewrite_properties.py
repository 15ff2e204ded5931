"""Property-based tests (hypothesis) of quantize → pack → MatMulNBits (+ FP32 correction).

For random shapes (K below, equal to and not a multiple of the block size), random k (0 … N·K),
every scale granularity (blocks of 16…256, per-channel, per-tensor) with and without
``exclude_salient_from_scale``, a one-Linear graph (MatMul, or Gemm with bias) is rewritten by
``edgeq.onnx.rewrite.rewrite_linears`` and run by ONNX Runtime; the output must equal the numpy
reference ``x Ŵᵀ (+ b)`` within the float32 summation bound

    |y_ort − y_ref| ≤ 2·K·2⁻²⁴ · (|x| |Ŵ|ᵀ + |b|) + 1e-6

(twice the worst-case error of a K-term float32 dot product), and the weights decoded back from
the graph must equal Ŵ bit for bit.  The salient set is the top-k by |W| plus noise, so a wrong
FP32 correction would miss by far more than the bound.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgeq.onnx import rewrite
from edgeq.onnx.readback import read_back
from edgeq.onnx.rewrite import rewrite_linears
from edgeq.quant.int4 import BLOCK_SIZES, QMAX, ZERO_POINT, Granularity, quantize_rtn
from edgeq.quant.pack import pack_int4, unpack_int4
from edgeq.quant.plan import LayerPlan, QuantPlan

# the correction-branch layouts rewrite_linears offers (none to choose from in older versions)
CORRECTION_KINDS = sorted(getattr(rewrite, "CORRECTIONS", {})) or [None]
GRANULARITIES = [str(b) for b in BLOCK_SIZES] + ["per-channel", "per-tensor"]
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def problems(draw):
    n = draw(st.integers(1, 40))
    k_in = draw(st.one_of(st.integers(1, 80), st.integers(81, 300), st.sampled_from([16, 32, 64, 100, 257])))
    seed = draw(st.integers(0, 2**31 - 1))
    k = draw(st.one_of(st.just(0), st.integers(0, n * k_in), st.just(n * k_in)))
    gran = draw(st.sampled_from(GRANULARITIES))
    exclude = draw(st.booleans())
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k_in)).astype(np.float32)
    if draw(st.booleans()):  # a few large outliers, as in trained Linears
        w.reshape(-1)[rng.integers(0, w.size, size=max(1, w.size // 50))] *= 20
    score = np.abs(w).reshape(-1) + 0.5 * rng.random(w.size)
    idx = np.sort(np.argsort(-score, kind="stable")[:k])
    return w, idx, Granularity.parse(gran), exclude, rng


def _graph(w: np.ndarray, op: str, bias: np.ndarray | None, x_shape: list[int]) -> onnx.ModelProto:
    n, k_in = w.shape
    inits = [numpy_helper.from_array(w.T.copy() if op == "MatMul" else w.copy(), "W")]
    if op == "MatMul":
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="lin/MatMul")
    else:
        inits.append(numpy_helper.from_array(bias, "b"))
        node = helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="lin/Gemm", transB=1)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape[:-1] + [n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _plan(q) -> QuantPlan:
    return QuantPlan(layers={"lin": LayerPlan("lin", q, 0.0, 0.0, 0, 0)}, excluded=())


@SETTINGS
@given(problems(), st.sampled_from(["MatMul", "Gemm"]), st.integers(1, 4), st.sampled_from(CORRECTION_KINDS))
def test_matmulnbits_with_correction_equals_reference(problem, op, rows, correction):
    w, idx, gran, exclude, rng = problem
    n, k_in = w.shape
    q = quantize_rtn(w, idx, gran, exclude)
    w_hat = q.dequantize()
    bias = rng.standard_normal(n).astype(np.float32) if op == "Gemm" else None
    x_shape = [rows, k_in] if op == "Gemm" else [2, rows, k_in]
    x = rng.standard_normal(x_shape).astype(np.float32)

    model = _graph(w, op, bias, x_shape)
    kwargs = {"correction": correction} if correction else {}
    result = rewrite_linears(model, _plan(q).quants, {"lin": w}, **kwargs)
    assert result.count == 1
    assert {nd.op_type for nd in model.graph.node} >= {"MatMulNBits"}
    assert not any("W" in nd.input for nd in model.graph.node)  # the FP32 weight is gone
    assert "W" not in {t.name for t in model.graph.initializer}
    np.testing.assert_array_equal(read_back(model)["lin"], w_hat)  # the graph encodes Ŵ exactly

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0].astype(np.float64)
    xd, wd = x.astype(np.float64), w_hat.astype(np.float64)
    ref = xd @ wd.T + (bias if bias is not None else 0.0)
    bound = 2 * k_in * 2.0**-24 * (np.abs(xd) @ np.abs(wd).T + (np.abs(bias) if bias is not None else 0.0)) + 1e-6
    err = np.abs(got - ref)
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g} (max err {err.max():.3g})"


@SETTINGS
@given(problems())
def test_quantizer_invariants(problem):
    w, idx, gran, exclude, _ = problem
    q = quantize_rtn(w, idx, gran, exclude)
    n, k_in = w.shape
    mask = np.zeros(w.size, bool)
    mask[idx] = True
    mask = mask.reshape(n, k_in)
    assert q.codes.min(initial=ZERO_POINT) >= ZERO_POINT - QMAX and q.codes.max(initial=ZERO_POINT) <= ZERO_POINT + QMAX
    assert np.all(q.codes[mask] == ZERO_POINT)  # salient entries add nothing to the int4 part
    w_hat = q.dequantize()
    np.testing.assert_array_equal(w_hat[mask], w[mask])  # ...and are exact in the correction
    scale = np.repeat(q.scales, q.block_size, axis=1)[:, :k_in]
    err = np.abs(w_hat - w)[~mask]
    assert np.all(err <= scale[~mask] * (0.5 + 1e-6) + 1e-30)  # round to nearest, never clipped
    assert q.scales.shape == (n, -(-k_in // q.block_size))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.integers(1, 20), st.integers(1, 300), st.sampled_from(BLOCK_SIZES), st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(n, k_in, block, seed):
    codes = np.random.default_rng(seed).integers(0, 16, size=(n, k_in), dtype=np.uint8)
    packed = pack_int4(codes, block)
    assert packed.shape == (n, -(-k_in // block), block // 2) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_int4(packed, k_in), codes)
