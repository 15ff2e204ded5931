"""Asymmetric grids in the file: MatMulNBits ``zero_points`` (edgeq.onnx.storage, edgeq.quant.pack).

Three ways: structure (the input, its packing, against ONNX Runtime's own asymmetric quantizer),
numerics (ONNX Runtime == x Ŵᵀ on grid-snapped weights, read_back == the plan, plain == compact),
refusals.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import quantize_matmul_4bits

from edgeq.onnx.readback import read_back
from edgeq.onnx.storage import check_storage
from edgeq.quant.int4 import Granularity, QuantizedLinear, quantize_rtn
from edgeq.quant.pack import pack_zero_points, unpack_int4, unpack_zero_points
from tests.onnx.test_storage import _rewritten, _session


def _bound(x, wd):
    xd = x.astype(np.float64)
    return xd @ wd.T, 2 * x.shape[1] * 2.0**-24 * (np.abs(xd) @ np.abs(wd).T) + 1e-6


@pytest.mark.parametrize("k_in,n,block", [(64, 5, 32), (96, 3, 32), (80, 4, 16), (256, 2, 64)])
def test_zero_point_packing_is_onnxruntimes(k_in, n, block):
    """ORT's asymmetric RTN tensors, decoded with our unpackers and run by ORT's kernel, give our Ŵ."""
    rng = np.random.default_rng(k_in + n)
    w = rng.standard_normal((k_in, n)).astype(np.float32)  # ORT's [K, N]
    nb = -(-k_in // block)
    packed = np.zeros((n, nb, block // 2), np.uint8)
    scales = np.zeros(n * nb, np.float32)
    zp = np.zeros((n, (nb + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, w, scales, zp, block, n, k_in, False)
    z = unpack_zero_points(zp, n, nb)
    assert len(np.unique(z)) > 1  # really per group
    np.testing.assert_array_equal(pack_zero_points(z)[:, : nb // 2], zp[:, : nb // 2])
    np.testing.assert_array_equal(unpack_zero_points(pack_zero_points(z), n, nb), z)
    q = QuantizedLinear(unpack_int4(packed, k_in), scales.reshape(n, nb), block, np.empty(0, np.int64),
                        np.empty(0, np.float32), zero_points=z)
    model = _rewritten(w.T.copy(), q, "plain")
    x = rng.standard_normal((3, k_in)).astype(np.float32)
    ref, bound = _bound(x, q.dequantize().astype(np.float64))
    assert np.all(np.abs(_session(model).run(None, {"x": x})[0] - ref) <= bound)
    # and ORT's own tensors in an ORT-built node compute the same: replace ours by theirs
    inits = {t.name: t for t in model.graph.initializer}
    inits["lin.qweight"].CopyFrom(numpy_helper.from_array(packed, "lin.qweight"))
    inits["lin.zero_points"].CopyFrom(numpy_helper.from_array(zp, "lin.zero_points"))
    assert np.all(np.abs(_session(model).run(None, {"x": x})[0] - ref) <= bound)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_asym_file_structure_and_numerics_on_snapped_weights(bits, op):
    rng = np.random.default_rng(bits)
    n, k_in, block = 6, 80, 16  # 5 blocks: an odd count, one padding nibble per row
    top = 2**bits - 1
    q = rng.integers(0, top + 1, size=(n, k_in))
    q[:, ::block], q[:, 1::block] = 0, top
    z = np.repeat(rng.integers(0, top + 1, size=(n, 5)), block, axis=1)
    s = np.repeat(2.0 ** -rng.integers(1, 6, size=(n, 5)), block, axis=1)
    w = ((q - z) * s).astype(np.float32)
    idx = np.array([0, 17, 333])
    plan = quantize_rtn(w, idx, Granularity("block", block), bits=bits, grid="asym", fp16_scales=True)
    np.testing.assert_array_equal(plan.dequantize(), w)
    x = rng.standard_normal((3, k_in)).astype(np.float32)
    outs = []
    for storage in ("compact", "plain") if bits == 4 else ("compact",):
        model = _rewritten(w, plan, storage, op=op)
        node = next(nd for nd in model.graph.node if nd.op_type == "MatMulNBits")
        assert node.input[3] == "lin.zero_points"
        if op == "Gemm":
            assert node.input[4] == "" and node.input[5] == "lin.bias"
        zt = next(t for t in model.graph.initializer if t.name == "lin.zero_points")
        assert zt.data_type == onnx.TensorProto.UINT8 and list(zt.dims) == [n, 3]  # ⌈5/2⌉ bytes a row
        np.testing.assert_array_equal(read_back(model)["lin"], plan.dequantize())
        got = _session(model).run(None, {"x": x})[0]
        ref, bound = _bound(x, w.astype(np.float64))
        assert np.all(np.abs(got - ref) <= bound)
        outs.append(got)
    if len(outs) == 2:
        np.testing.assert_array_equal(outs[0], outs[1])  # compact and plain: bit-identical


def test_refusals():
    w = np.random.default_rng(3).standard_normal((4, 32)).astype(np.float32)
    q = quantize_rtn(w, [], Granularity("block", 16), bits=2, grid="asym", fp16_scales=True)
    assert "without zero points" in check_storage(q, "plain", "native")
    with pytest.raises(ValueError, match="0..15"):
        pack_zero_points(np.full((2, 2), 16, np.uint8))
