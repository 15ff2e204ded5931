"""Q4-sym-7 quantizer: grid, rounding, granularities, salient entries (ALGORITHMS.md §1, §12)."""

import numpy as np
import pytest

from edgeq.quant.int4 import Granularity, quantize_rtn


def snapped(n, k, block, seed=0, qmax=7, exponents=(2, 8)):
    """Weights exactly on the symmetric grid: q·2^-e per block of ``block`` inputs, ±qmax in every block."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-qmax, qmax + 1, size=(n, k))
    nb = -(-k // block)
    for b in range(nb):
        q[:, b * block] = rng.choice([-qmax, qmax], size=n)
    scale = 2.0 ** -rng.integers(*exponents, size=(n, nb))
    return (q * np.repeat(scale, block, axis=1)[:, :k]).astype(np.float32), q, scale


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("k_in", [64, 80, 48])
def test_snapped_weights_are_reproduced_exactly(block, k_in):
    w, q, scale = snapped(6, k_in, block)
    ql = quantize_rtn(w, np.empty(0, np.int64), Granularity("block", block))
    assert ql.block_size == block
    np.testing.assert_array_equal(ql.codes.astype(int) - 8, q)
    np.testing.assert_array_equal(ql.scales, scale.astype(np.float32))
    np.testing.assert_array_equal(ql.dequantize(), w)


def test_codes_range_and_half_to_even_rounding():
    # scale = 7/7 = 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> -0, -2.5 -> -2
    w = np.array([[7.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -7.0]], np.float32)
    ql = quantize_rtn(w, np.empty(0, np.int64), Granularity("tensor"))
    assert (ql.codes.astype(int) - 8).tolist() == [[7, 0, 2, 2, 0, -2, 4, -7]]
    rng = np.random.default_rng(1)
    ql = quantize_rtn(rng.normal(size=(16, 96)).astype(np.float32), np.empty(0, np.int64), Granularity("block", 32))
    assert ql.codes.min() >= 1 and ql.codes.max() <= 15


@pytest.mark.parametrize("gran", ["16", "32", "per-channel", "per-tensor"])
def test_k_zero_is_rtn_and_k_all_is_exact(gran):
    rng = np.random.default_rng(2)
    w = rng.normal(size=(12, 80)).astype(np.float32)
    g = Granularity.parse(gran)
    plain = quantize_rtn(w, np.empty(0, np.int64), g)
    everything = quantize_rtn(w, np.arange(w.size), g)
    np.testing.assert_array_equal(everything.dequantize(), w)
    assert (everything.codes == 8).all()
    assert plain.k == 0 and np.abs(plain.dequantize() - w).max() > 0


def test_salient_entries_exact_and_zero_in_int4_part():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 64)).astype(np.float32)
    idx = np.array([0, 5, 77, 300, 511])
    ql = quantize_rtn(w, idx, Granularity("block", 32))
    deq = ql.dequantize()
    np.testing.assert_array_equal(deq.reshape(-1)[idx], w.reshape(-1)[idx])
    assert (ql.codes.reshape(-1)[idx] == 8).all()
    assert (ql.dequantize_int4().reshape(-1)[idx] == 0).all()
    other = np.setdiff1d(np.arange(w.size), idx)
    np.testing.assert_array_equal(
        deq.reshape(-1)[other], quantize_rtn(w, idx[:0], Granularity("block", 32)).dequantize().reshape(-1)[other]
    )


def test_exclude_salient_from_scale_shrinks_the_scale():
    w = np.full((1, 32), 0.1, np.float32)
    w[0, 3] = 10.0  # one huge outlier
    inc = quantize_rtn(w, np.array([3]), Granularity("block", 32), exclude_salient_from_scale=False)
    exc = quantize_rtn(w, np.array([3]), Granularity("block", 32), exclude_salient_from_scale=True)
    assert inc.scales[0, 0] == pytest.approx(10 / 7)
    assert exc.scales[0, 0] == pytest.approx(0.1 / 7)
    assert np.abs(exc.dequantize() - w).max() < 1e-6 < np.abs(inc.dequantize() - w).max()


@pytest.mark.parametrize("gran,k_in,block", [("per-channel", 384, 128), ("per-channel", 1536, 256),
                                              ("per-tensor", 96, 32), ("per-channel", 50, 32)])
def test_channel_and_tensor_scales_repeat_across_blocks(gran, k_in, block):
    rng = np.random.default_rng(4)
    w = rng.normal(size=(5, k_in)).astype(np.float32)
    ql = quantize_rtn(w, np.empty(0, np.int64), Granularity.parse(gran))
    assert ql.block_size == block
    assert (ql.scales == ql.scales[:, :1]).all()
    expected = np.abs(w).max(axis=1) / 7 if gran == "per-channel" else np.full(5, np.abs(w).max() / 7)
    np.testing.assert_allclose(ql.scales[:, 0], expected, rtol=1e-7)


def test_zero_block_gets_zero_scale():
    w = np.zeros((2, 32), np.float32)
    ql = quantize_rtn(w, np.empty(0, np.int64), Granularity("block", 32))
    assert (ql.scales == 0).all() and (ql.codes == 8).all() and (ql.dequantize() == 0).all()


@pytest.mark.parametrize("bad", ["24", "512", "per-row-ish", "0", "-32"])
def test_invalid_block_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="invalid block size"):
        Granularity.parse(bad)


@pytest.mark.parametrize("gran", ["32", "per-channel", "per-tensor"])
def test_grid_sym8_invariants(gran):
    """sym8: the group's signed max is exact (code 0), step max/8 ≤ sym7's max/7, error ≤ step/2 except clipping."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=(6, 64)).astype(np.float32)
    g = Granularity.parse(gran)
    q8 = quantize_rtn(w, np.empty(0, np.int64), g, grid="sym8")
    q7 = quantize_rtn(w, np.empty(0, np.int64), g)
    assert q8.codes.min() >= 0 and q8.codes.max() <= 15
    err = np.abs(q8.dequantize() - w)
    step = np.repeat(np.abs(q8.scales), q8.block_size, axis=1)[:, :64]
    clipped = w / np.repeat(q8.scales, q8.block_size, axis=1)[:, :64] > 7.5
    assert np.all(err[~clipped] <= step[~clipped] / 2 + 1e-6) and np.all(err[clipped] <= step[clipped] + 1e-6)
    assert np.abs(q8.dequantize()).max() == np.abs(w).max()  # the largest entry is on the grid
    assert np.all(np.abs(q8.scales) <= q7.scales + 1e-9)
    assert np.sum((q8.dequantize() - w) ** 2) < np.sum((q7.dequantize() - w) ** 2)  # finer grid, lower error here
    idx = np.array([3, 70, 200])
    qs = quantize_rtn(w, idx, g, grid="sym8")
    np.testing.assert_array_equal(qs.dequantize().reshape(-1)[idx], w.reshape(-1)[idx])  # salient exact
    assert np.all(qs.codes.reshape(-1)[idx] == 8)


def test_grid_sym8_refusals():
    w = np.ones((2, 32), np.float32)
    with pytest.raises(ValueError, match="8-bit codes use sym7"):
        quantize_rtn(w, np.empty(0, np.int64), Granularity("block", 32), bits=8, grid="sym8")
    from edgeq.config import ConvertConfig

    with pytest.raises(ValueError, match="--grid"):
        ConvertConfig(grid="sym9")
    with pytest.raises(ValueError, match="--grid sym8 is not implemented for --quantizer lsi"):
        ConvertConfig(grid="sym8", quantizer="lsi", calib="rte")
