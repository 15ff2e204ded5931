"""MatMulNBits packing, checked bit for bit against ONNX Runtime's own packer."""

import numpy as np
import pytest
from onnxruntime.quantization.matmul_nbits_quantizer import quantize_matmul_4bits

from edgeq.quant.pack import pack_int4, unpack_int4


def ort_grid_weights(k_in, n, block, seed):
    """[K, N] weights on ORT's symmetric grid: per block the largest |w| is -8·s (ORT: s = w_max/-8)."""
    rng = np.random.default_rng(seed)
    nb = -(-k_in // block)
    q = rng.integers(-7, 8, size=(k_in, n))
    for b in range(nb):
        q[b * block, :] = -8
    s = 2.0 ** -rng.integers(2, 8, size=(nb, n))
    return (q * np.repeat(s, block, axis=0)[:k_in]).astype(np.float32), q, s


@pytest.mark.parametrize(
    "k_in,n,block", [(64, 3, 32), (128, 5, 16), (96, 4, 64), (80, 7, 32), (48, 2, 32), (256, 3, 256)]
)
def test_pack_matches_onnxruntime(k_in, n, block):
    w, q, s = ort_grid_weights(k_in, n, block, seed=k_in + n)
    nb = -(-k_in // block)
    ort_packed = np.zeros((n, nb, block // 2), np.uint8)
    ort_scales = np.zeros(n * nb, np.float32)
    zp = np.zeros((n, (nb + 1) // 2), np.uint8)
    quantize_matmul_4bits(ort_packed, w, ort_scales, zp, block, n, k_in, True)
    np.testing.assert_array_equal(ort_scales.reshape(n, nb), s.T.astype(np.float32))
    codes = (q.T + 8).astype(np.uint8)  # our [N, K] layout
    ours = pack_int4(codes, block)
    if k_in % block == 0:
        np.testing.assert_array_equal(ours, ort_packed)
    else:  # ORT leaves padding bytes as they were (zero); compare the real entries
        np.testing.assert_array_equal(unpack_int4(ours, k_in), unpack_int4(ort_packed, k_in))
        assert ours.shape == ort_packed.shape


@pytest.mark.parametrize("shape,block", [((3, 64), 32), ((2, 50), 16), ((4, 7), 16), ((1, 256), 256)])
def test_pack_round_trip(shape, block):
    codes = np.random.default_rng(0).integers(0, 16, size=shape).astype(np.uint8)
    packed = pack_int4(codes, block)
    assert packed.shape == (shape[0], -(-shape[1] // block), block // 2)
    np.testing.assert_array_equal(unpack_int4(packed, shape[1]), codes)


def test_nibble_order_low_first():
    codes = np.array([[1, 2, 3, 4] + [8] * 12], np.uint8)
    assert pack_int4(codes, 16)[0, 0, :2].tolist() == [0x21, 0x43]


@pytest.mark.parametrize("k_in,n,block", [(64, 5, 32), (96, 3, 16), (128, 4, 64), (80, 6, 32)])
def test_grid_sym8_is_onnxruntimes_rtn_bit_for_bit(k_in, n, block):
    """--grid sym8 on arbitrary (off-grid) weights: codes and scales equal ORT's symmetric RTN."""
    from edgeq.quant.int4 import Granularity, quantize_rtn

    w = np.random.default_rng(k_in * n).normal(size=(n, k_in)).astype(np.float32)  # our [N, K]
    nb = -(-k_in // block)
    ort_packed = np.zeros((n, nb, block // 2), np.uint8)
    ort_scales = np.zeros(n * nb, np.float32)
    zp = np.zeros((n, (nb + 1) // 2), np.uint8)
    quantize_matmul_4bits(ort_packed, np.ascontiguousarray(w.T), ort_scales, zp, block, n, k_in, True)
    q = quantize_rtn(w, np.empty(0, np.int64), Granularity("block", block), grid="sym8")
    np.testing.assert_array_equal(q.scales, ort_scales.reshape(n, nb))
    np.testing.assert_array_equal(q.codes, unpack_int4(ort_packed, k_in))
    assert q.codes.min() == 0  # the -8 level is used: the signed max of every block
