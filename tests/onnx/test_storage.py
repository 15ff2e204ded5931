"""Compact N-bit storage (edgeq.onnx.storage): pack → unpack → ONNX Runtime, folding, refusals.

Three ways, on grid-snapped weights where any mismatch is a format bug:
* structure: what the file holds (bit planes of b bits per weight, float16 scales, the unpack
  subgraph) and that ONNX Runtime folds the subgraph away at session creation;
* numerics: ONNX Runtime on a compact file == the same plan stored plain, bit for bit, and == the
  numpy reference ``x Ŵᵀ`` within the float32 bound; ``read_back`` == the plan;
* refusals: one-line reasons for what cannot be stored.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeq.config import ConvertConfig
from edgeq.onnx.readback import read_back
from edgeq.onnx.rewrite import rewrite_linears
from edgeq.onnx.storage import check_storage
from edgeq.quant.int4 import BLOCK_SIZES, Granularity, quantize_rtn
from edgeq.quant.pack import pack_planes, unpack_planes
from tests.onnx.test_rewrite_properties import _graph

GRANULARITIES = [str(b) for b in BLOCK_SIZES] + ["per-channel", "per-tensor"]
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _session(model: onnx.ModelProto, optimized: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _rewritten(w, q, storage, kernel="int4", op="MatMul", x_shape=None):
    model = _graph(w, op, np.zeros(w.shape[0], np.float32) if op == "Gemm" else None, x_shape or [3, w.shape[1]])
    assert rewrite_linears(model, {"lin": q}, {"lin": w}, storage=storage, kernel=kernel).count == 1
    return model


@st.composite
def problems(draw):
    n = draw(st.integers(1, 24))
    k_in = draw(st.one_of(st.integers(1, 70), st.sampled_from([16, 32, 100, 257])))
    bits = draw(st.sampled_from([2, 3, 4]))
    gran = Granularity.parse(draw(st.sampled_from(GRANULARITIES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    w = rng.standard_normal((n, k_in)).astype(np.float32)
    k = draw(st.one_of(st.just(0), st.integers(0, n * k_in)))
    idx = np.sort(rng.permutation(n * k_in)[:k])
    return w, idx, gran, bits, rng


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.integers(1, 20), st.integers(1, 300), st.sampled_from(BLOCK_SIZES), st.sampled_from([2, 3, 4]),
       st.integers(0, 2**31 - 1))
def test_planes_roundtrip(n, k_in, block, bits, seed):
    u = np.random.default_rng(seed).integers(0, 2**bits, size=(n, k_in), dtype=np.uint8)
    codes = (u << (4 - bits)).astype(np.uint8)
    planes = pack_planes(codes, block, bits)
    k_pad = -(-k_in // block) * block
    assert planes.shape == (bits, n * k_pad // 8) and planes.dtype == np.uint8  # exactly b bits per weight
    np.testing.assert_array_equal(unpack_planes(planes, n, k_in, block), codes)


@SETTINGS
@given(problems(), st.sampled_from(["MatMul", "Gemm"]))
def test_compact_file_equals_plain_file_and_reference(problem, op):
    w, idx, gran, bits, rng = problem
    q = quantize_rtn(w, idx, gran, bits=bits, fp16_scales=True)
    assert q.stored_bits == bits and q.bits == 4
    x = rng.standard_normal((3, w.shape[1])).astype(np.float32)
    compact, plain = _rewritten(w, q, "compact", op=op), _rewritten(w, q, "plain", op=op) if bits == 4 else None
    np.testing.assert_array_equal(read_back(compact)["lin"], q.dequantize())  # the file encodes the plan
    got = _session(compact).run(None, {"x": x})[0]
    if plain is not None:  # the same plan stored the old way: bit-identical outputs
        np.testing.assert_array_equal(got, _session(plain).run(None, {"x": x})[0])
    xd, wd = x.astype(np.float64), q.dequantize().astype(np.float64)
    bound = 2 * w.shape[1] * 2.0**-24 * (np.abs(xd) @ np.abs(wd).T) + 1e-6
    assert np.all(np.abs(got - xd @ wd.T) <= bound)


def test_2_and_3_bit_levels_are_4_bit_levels():
    """A b-bit level times its scale is a 4-bit level times scale/2^(4-b): codes are multiples of 2^(4-b)."""
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    for bits, levels in ((2, {0, 4, 8, 12}), (3, {0, 2, 4, 6, 8, 10, 12, 14})):
        q = quantize_rtn(w, np.empty(0, np.int64), Granularity("block", 32), bits=bits)
        assert set(np.unique(q.codes)) <= levels and len(np.unique(q.codes)) == len(levels)
        # per entry: |Ŵ − W| ≤ s_b (half a step, or one step where the signed-max grid clips the
        # opposite sign at 2^(b−1) − 1), with s_b = 2^(4−b) · the 4-bit scale of its block
        step = np.repeat(np.abs(q.scales) * 2 ** (4 - bits), 32, axis=1)
        assert np.all(np.abs(q.dequantize() - w) <= step * (1 + 1e-6))


def test_onnxruntime_folds_the_unpacking(tmp_path):
    """Structure: the file has bit planes + fp16 scales + an unpack subgraph; ORT's optimized graph has none of it."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    for bits in (2, 3, 4):
        q = quantize_rtn(w, np.array([5, 700]), Granularity("block", 32), bits=bits, fp16_scales=True)
        model = _rewritten(w, q, "compact")
        inits = {t.name: t for t in model.graph.initializer}
        assert (
            inits["lin.qplanes"].dims == [bits, 48 * 96 // 8]
            and inits["lin.scales16"].data_type == onnx.TensorProto.FLOAT16
        )
        assert "lin.qweight" not in inits and any("/unpack/" in n.name for n in model.graph.node)
        optimized = tmp_path / f"opt{bits}.onnx"
        _session(model, str(optimized))
        left = [n.op_type for n in onnx.load(str(optimized)).graph.node if "/unpack/" in n.name]
        assert left == [], f"{bits}-bit: ONNX Runtime left {left} unfolded"
        assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(optimized)).graph.node) == 1


def test_native_2bit_kernel_matches_reference():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((40, 100)).astype(np.float32)
    q = quantize_rtn(w, np.array([3, 77, 1999]), Granularity("block", 32), bits=2)
    model = _rewritten(w, q, "plain", kernel="native")
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["bits"] == 2
    np.testing.assert_array_equal(read_back(model)["lin"], q.dequantize())
    x = rng.standard_normal((3, 100)).astype(np.float32)
    ref = x.astype(np.float64) @ q.dequantize().astype(np.float64).T
    np.testing.assert_allclose(_session(model).run(None, {"x": x})[0], ref, rtol=1e-4, atol=1e-4)


@SETTINGS
@given(problems())
def test_native_2bit_kernel_any_granularity_and_shape(problem):
    """ONNX Runtime's own 2-bit kernel carries every --block-size (per-channel/per-tensor as repeated
    block scales) and any K (padding to the block): the file == the plan == the numpy reference."""
    w, idx, gran, _, rng = problem
    q = quantize_rtn(w, idx, gran, bits=2)
    model = _rewritten(w, q, "plain", kernel="native")
    np.testing.assert_array_equal(read_back(model)["lin"], q.dequantize())
    x = rng.standard_normal((3, w.shape[1])).astype(np.float32)
    xd, wd = x.astype(np.float64), q.dequantize().astype(np.float64)
    bound = 2 * w.shape[1] * 2.0**-24 * (np.abs(xd) @ np.abs(wd).T) + 1e-6
    assert np.all(np.abs(_session(model).run(None, {"x": x})[0] - xd @ wd.T) <= bound)


def test_refusals():
    w = np.random.default_rng(3).standard_normal((4, 24)).astype(np.float32)
    q3 = quantize_rtn(w, np.empty(0, np.int64), Granularity("block", 16), bits=3, fp16_scales=True)
    assert "2 bits only" in check_storage(q3, "plain", "native")
    assert "compact storage or the native kernel" in check_storage(q3, "plain", "int4")
    q4 = quantize_rtn(w, np.empty(0, np.int64), Granularity("block", 16))
    assert "float16 scales" in check_storage(q4, "compact", "int4")
    odd = type(q3)(q3.codes, q3.scales, 12, q3.salient_index, q3.salient_values, 4, 3, True)
    assert "not a multiple of 8" in check_storage(odd, "compact", "int4")
    with pytest.raises(ValueError, match="not on the 3-bit grid"):
        pack_planes(np.full((2, 16), 9, np.uint8), 16, 3)
    for kwargs, message in [
        ({"bits": 3, "kernel": "native"}, "there is no 3-bit native kernel"),
        ({"bits": 4, "kernel": "native"}, "needs --bits 2"),
        ({"bits": 2, "storage": "plain"}, "use --storage compact"),
        ({"bits": 8, "storage": "compact"}, "holds 2, 3 or 4 bits"),
        ({"bits": 2, "quantizer": "lsi", "calib": "rte"}, "--quantizer lsi produces int4 codes only"),
        ({"storage": "compact", "quantizer": "sarqc-gs", "calib": "rte"}, "does not plan; use --quantizer rtn/gptq"),
        ({"bits": 2, "kernel": "native", "grid": "asym"}, "--grid asym needs zero points"),
    ]:
        with pytest.raises(ValueError, match=message):
            ConvertConfig(**kwargs)
    assert ConvertConfig(bits=2).storage == "compact" and ConvertConfig().storage == "plain"
    assert ConvertConfig(bits=2, kernel="native").storage == "plain"
    assert ConvertConfig(bits=2, quantizer="gptq", calib="rte", grid="asym").fp16_scales  # no longer refused
