"""Invariants of the calibrated quantizers (ALGORITHMS.md §12 items 5 and 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeq.quant.gptq import gptq_quantize, sarqc_gbs
from edgeq.quant.grid import GridSpec
from edgeq.quant.int4 import Granularity, quantize_rtn
from edgeq.quant.lsi import LSIWeight, masked_mse, reconstruct
from edgeq.quant.sarqc import column_saliency, element_saliency, sarqc_gs

GRANS = [Granularity("block", 16), Granularity("channel"), Granularity("tensor")]


def _layer(n=24, k_in=64, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k_in)) * 0.05).astype(np.float32)
    w[3, 5] = 0.9  # an outlier
    x = rng.standard_normal((512, k_in)) @ rng.standard_normal((k_in, k_in)) * 0.3  # correlated inputs
    h = 2.0 / x.shape[0] * (x.T @ x)
    return w, x, h


def _same(a, b):
    assert np.array_equal(a.codes, b.codes)
    assert np.array_equal(a.scales, b.scales)
    assert np.array_equal(a.salient_index, b.salient_index)
    assert a.block_size == b.block_size


@pytest.mark.parametrize("gran", GRANS, ids=str)
@pytest.mark.parametrize("exclude", [False, True])
def test_gptq_identity_hessian_is_rtn(gran, exclude):
    w, _, _ = _layer()
    idx = np.array([3 * 64 + 5, 7, 100, 1000])
    got = gptq_quantize(w, 3.7 * np.eye(64), idx, gran, exclude).quant
    ref = quantize_rtn(w, idx, gran, exclude)
    _same(got, ref)
    np.testing.assert_array_equal(got.salient_values, ref.salient_values)  # nothing propagated


@pytest.mark.parametrize("gran", GRANS, ids=str)
@pytest.mark.parametrize("bits,grid", [(2, "sym7"), (3, "sym7"), (2, "mse"), (3, "asym"), (2, "asym-mse"),
                                       (4, "mse"), (4, "asym"), (8, "sym7")])
def test_gptq_identity_hessian_is_rtn_on_every_grid(gran, bits, grid):
    """H ∝ I: GPTQ equals RTN at 2/3/4/8 bits on every grid, float16 scales included (the same grid code)."""
    w, _, _ = _layer()
    idx = np.array([3 * 64 + 5, 7, 100, 1000])
    fp16 = bits != 8
    got = gptq_quantize(w, 3.7 * np.eye(64), idx, gran, True, grid=GridSpec.make(bits, grid), fp16_scales=fp16).quant
    ref = quantize_rtn(w, idx, gran, True, bits=bits, grid=grid, fp16_scales=fp16, act=np.full(64, 3.7))
    _same(got, ref)
    assert (got.bits, got.storage_bits, got.fp16_scales) == (ref.bits, ref.storage_bits, fp16)
    assert (got.zero_points is None) == (ref.zero_points is None) == (not grid.startswith("asym"))
    if ref.zero_points is not None:
        np.testing.assert_array_equal(got.zero_points, ref.zero_points)
    np.testing.assert_array_equal(got.salient_values, ref.salient_values)


def test_gptq_at_2_bits_beats_rtn_on_its_calibration_data():
    w, x, h = _layer()
    gran = Granularity("block", 16)

    def out_err(q):
        return float(np.sum((x @ (w - q.dequantize()).T) ** 2))

    for grid in ("sym7", "mse", "asym"):
        spec = GridSpec.make(2, grid)
        g = gptq_quantize(w, h, [], gran, grid=spec, fp16_scales=True).quant
        assert g.storage_bits == 2 and np.all(g.codes % 4 == 0)  # on the 2-bit grid (codes u·4)
        assert out_err(g) < out_err(quantize_rtn(w, [], gran, bits=2, grid=grid, fp16_scales=True))


@pytest.mark.parametrize("gran", [Granularity("channel"), Granularity("tensor")], ids=str)
def test_sarqc_gbs_huge_lambda_is_rtn(gran):
    w, x, h = _layer()
    idx = np.array([3 * 64 + 5, 7])
    d = column_saliency(element_saliency(w, "svd"))
    got = sarqc_gbs(w, h, idx, gran, 1e6, d).quant
    _same(got, quantize_rtn(w, idx, gran))


def test_sarqc_gbs_huge_lambda_is_rtn_blocks():
    """With block scales fitted on the (negligibly) updated W, codes agree and scales to float32 ulps."""
    w, x, h = _layer()
    gran = Granularity("block", 16)
    got = sarqc_gbs(w, h, [7], gran, 1e6).quant
    ref = quantize_rtn(w, [7], gran)
    assert np.array_equal(got.codes, ref.codes)
    np.testing.assert_allclose(got.scales, ref.scales, rtol=1e-5)


def test_gptq_beats_rtn_on_its_calibration_data_and_lambda_interpolates():
    w, x, h = _layer()
    gran = Granularity("channel")

    def out_err(q):
        e = w.astype(np.float64) - q.dequantize()
        return float(np.sum((x @ e.T) ** 2))

    rtn = out_err(quantize_rtn(w, [], gran))
    g0 = out_err(sarqc_gbs(w, h, [], gran, 0.0).quant)
    g1 = out_err(sarqc_gbs(w, h, [], gran, 1.0).quant)
    assert g0 < g1 < rtn


def test_gptq_mask_keeps_compensated_values():
    w, x, h = _layer()
    idx = np.sort(np.array([3 * 64 + 5, 2 * 64 + 40, 10 * 64 + 63]))
    res = gptq_quantize(w, h, idx, Granularity("channel"))
    q = res.quant
    deq = q.dequantize()
    assert np.all(q.codes.reshape(-1)[idx] == 8)
    np.testing.assert_array_equal(deq.reshape(-1)[idx], q.salient_values)
    # the stored values are the error-compensated weights, not the originals (as SpQR)
    assert res.compensated_max_shift > 0
    assert not np.array_equal(q.salient_values, w.reshape(-1)[idx])
    # column 0 is quantized first: nothing was propagated into it yet
    assert q.salient_values.size and np.all(q.codes >= 1) and np.all(q.codes <= 15)


def test_sarqc_gs_single_clip_is_rtn_and_huge_lambda_ignores_data():
    w, x, h = _layer()
    idx = np.array([3 * 64 + 5])
    gran = Granularity("block", 16)
    sal = element_saliency(w, "magnitude")
    q, r = sarqc_gs(w, h, idx, gran, 0.3, sal, clip_grid=(1.0,))
    _same(q, quantize_rtn(w, idx, gran))
    a, _ = sarqc_gs(w, h, idx, gran, 1e9, sal)
    b, _ = sarqc_gs(w, np.eye(64), idx, gran, 1e9, sal)
    _same(a, b)
    c, rc = sarqc_gs(w, h, idx, gran, 0.0, sal)
    assert np.all(rc <= 1.0) and np.any(rc < 1.0)  # clipping helps some groups on the output error


def test_column_saliency_normalised_and_masked():
    w, _, h = _layer()
    mask = np.zeros_like(w, dtype=bool)
    mask[3, 5] = True
    for kind in ("svd", "magnitude", "hessian", "uniform"):
        s = element_saliency(w, kind, mask, hessian_diag=np.diag(h))
        assert s[3, 5] == 0
        d = column_saliency(s, mask)
        assert d.shape == (64,) and abs(d.mean() - 1) < 1e-12 and np.all(d >= 0)
    with pytest.raises(ValueError):
        element_saliency(w, "nope")


@pytest.mark.parametrize("gran", GRANS, ids=str)
def test_lsi_zero_increment_is_identity_and_lwc_infinity_is_rtn(gran):
    w, _, _ = _layer()
    mask = np.zeros_like(w, dtype=bool)
    mask[3, 5] = True
    full = LSIWeight(w, mask, gran, rank=64)
    wp = full.w_prime().detach().numpy()
    assert np.linalg.norm(wp - w) / np.linalg.norm(w) < 1e-5
    lwc = LSIWeight(w, mask, gran, rank=8, init_logit=40.0)
    _same(lwc.export(), quantize_rtn(w, [3 * 64 + 5], gran))
    fq = lwc().detach().numpy()
    np.testing.assert_allclose(fq, quantize_rtn(w, [3 * 64 + 5], gran).dequantize(), rtol=0, atol=1e-7)


def test_lsi_reconstruct_lowers_held_out_error_and_exports_what_it_trained():
    torch.manual_seed(0)
    w, x, _ = _layer()
    mask = np.zeros_like(w, dtype=bool)
    gran = Granularity("channel")
    lin = LSIWeight(w, mask, gran, rank=8)
    xt = torch.tensor(x, dtype=torch.float32)
    y = xt @ torch.from_numpy(w).T
    data = [(xt[i:i + 64], y[i:i + 64], None) for i in range(0, 512, 64)]

    def fwd(inp, ws):
        return inp @ ws["l"].T

    res = reconstruct(fwd, {"l": lin}, data[:6], data[6:], epochs=5, lwc_lr=1e-2, lsi_lr=1e-4)
    assert res.held_out_best <= res.held_out_init
    assert res.best_epoch > 0 and res.held_out_best < res.held_out_init
    exported = lin.export().dequantize()
    np.testing.assert_allclose(exported, lin().detach().numpy(), rtol=0, atol=1e-6)
    assert float(masked_mse(torch.zeros(2, 3, 4), torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]]))) == 1.0
