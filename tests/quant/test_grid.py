"""The grids of edgeq.quant.grid: the mse scale search and the asymmetric (zero point) grids.

Checked against slow per-group numpy references written from the module docstring, and on
grid-snapped weights (where the fit must reproduce W exactly).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.quant.grid import ALPHAS, GridSpec, fit
from edgeq.quant.int4 import Granularity, quantize_rtn


def _ref_group(wg, keep, a, spec, fp16):
    """One group's (s, z) by the docstring's formulas, α by brute force over ALPHAS (ties: larger α)."""
    src = wg[keep] if keep.any() else np.zeros(1, np.float32)
    best = None
    for alpha in ALPHAS if spec.search else (1.0,):
        if spec.asym:
            lo = np.float32(min(0.0, float(src.min()))) * np.float32(alpha)
            hi = np.float32(max(0.0, float(src.max()))) * np.float32(alpha)
            s = np.float32((hi - lo) / np.float32(2**spec.bits - 1))
        else:
            m = src[np.argmax(np.abs(src))]
            s = np.float32(m * np.float32(alpha) / np.float32(-(2 ** (spec.bits - 1))))
        if fp16:
            s = np.float32(np.float16(s))
        z = float(np.clip(np.rint(-lo / s), 0, 2**spec.bits - 1)) if spec.asym and s != 0 else 0.0
        lo_q, hi_q = spec.levels
        q = np.clip((np.rint(wg / s) if s != 0 else 0 * wg) + z, lo_q, hi_q)
        err = float(np.sum(a * keep * (wg - ((q - z) * s).astype(np.float32)).astype(np.float64) ** 2))
        if best is None or err < best[0]:
            best = (err, s, z)
    return best[1], best[2]


@pytest.mark.parametrize("bits,grid", [(2, "mse"), (3, "mse"), (4, "mse"), (2, "asym"), (3, "asym-mse"),
                                       (4, "asym")])
@pytest.mark.parametrize("fp16", [False, True])
def test_vectorised_fit_equals_per_group_reference(bits, grid, fp16):
    rng = np.random.default_rng(bits * 7 + len(grid))
    w = (rng.standard_normal((5, 64)) * rng.uniform(0.01, 2, size=(5, 1))).astype(np.float32)
    w[1, 3] = 9.0  # an outlier: the search clips it
    mask = rng.random(w.shape) < 0.05
    act = rng.uniform(0.1, 3.0, size=64)
    spec = GridSpec.make(bits, grid)
    s, z = fit(w, mask, Granularity("block", 16), spec, exclude_salient=True, fp16=fp16, act=act)
    for i in range(5):
        for g in range(4):
            sl = slice(16 * g, 16 * g + 16)
            rs, rz = _ref_group(w[i, sl], ~mask[i, sl], act[sl], spec, fp16)
            assert s[i, g] == rs, (i, g)
            assert (z is None and not spec.asym) or z[i, g] == rz


@pytest.mark.parametrize("gran", ["32", "per-channel", "per-tensor"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_never_worse_than_signed_max_and_weighted_by_activations(gran, bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((8, 96)).astype(np.float32)
    g = Granularity.parse(gran)
    act = rng.uniform(0.0, 4.0, size=96)
    base = quantize_rtn(w, [], g, bits=bits, grid="sym8")  # signed max (α = 1)
    plain = quantize_rtn(w, [], g, bits=bits, grid="mse")
    weighted = quantize_rtn(w, [], g, bits=bits, grid="mse", act=act)

    def err(q, a=None):
        e = (w - q.dequantize()).astype(np.float64) ** 2
        return float(np.sum(e if a is None else e * a))

    assert err(plain) <= err(base) and err(weighted, act) <= err(base, act)
    assert err(weighted, act) <= err(plain, act) and err(plain) <= err(weighted)  # each wins its own objective
    assert np.all(np.abs(plain.scales) <= np.abs(base.scales))  # α ≤ 1: scales only shrink
    if bits < 4:
        assert err(plain) < err(base)  # at 2/3 bits, clipping the max pays off on Gaussian weights


def test_mse_keeps_a_weight_already_on_the_signed_max_grid():
    rng = np.random.default_rng(0)
    q = rng.integers(-2, 2, size=(4, 32)).astype(np.float32)
    q[:, ::16] = -2  # every block's signed max lands on −2
    w = (q * 0.125).astype(np.float32)
    got = quantize_rtn(w, [], Granularity("block", 16), bits=2, grid="mse")
    np.testing.assert_array_equal(got.dequantize(), w)


def test_salient_entries_do_not_count_in_the_search():
    w = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    w[0, 4] = 50.0
    g = Granularity("block", 32)
    a = quantize_rtn(w, [4], g, exclude_salient_from_scale=True, bits=2, grid="mse")
    b = quantize_rtn(np.where(np.arange(64).reshape(2, 32) == 4, 0, w), [4], g, True, bits=2, grid="mse")
    np.testing.assert_array_equal(a.scales, b.scales)
    assert a.dequantize()[0, 4] == 50.0 and a.codes[0, 4] == 8


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("gran", ["16", "per-channel", "per-tensor"])
def test_asym_reproduces_snapped_weights_and_salient_codes_are_the_zero_point(bits, gran):
    """W = (q − z)·s with each group's q spanning 0 … 2^b − 1: the asym fit recovers s, z and W exactly."""
    rng = np.random.default_rng(bits)
    g = Granularity.parse(gran)
    n, k_in = 6, 64
    nb = k_in // 16 if g.kind == "block" else 1
    rows = n if g.kind != "tensor" else 1
    top = 2**bits - 1
    z = rng.integers(0, top + 1, size=(rows, nb))
    s = 2.0 ** -rng.integers(1, 6, size=(rows, nb))
    q = rng.integers(0, top + 1, size=(n, k_in))
    width = k_in // nb
    q[:, ::width] = 0
    q[:, 1::width] = top  # every group spans the whole grid
    zf = np.repeat(np.broadcast_to(z, (n, nb)), width, axis=1)
    sf = np.repeat(np.broadcast_to(s, (n, nb)), width, axis=1)
    w = ((q - zf) * sf).astype(np.float32)
    got = quantize_rtn(w, [], g, bits=bits, grid="asym", fp16_scales=True)
    np.testing.assert_array_equal(got.dequantize(), w)
    assert got.zero_points is not None and got.zero_points.max() <= 15
    step = 2 ** (4 - bits)
    assert np.all(got.codes % step == 0) and np.all(got.zero_points % step == 0)
    idx = np.array([3, 70, 200])
    sal = quantize_rtn(w, idx, g, bits=bits, grid="asym")
    np.testing.assert_array_equal(sal.codes.reshape(-1)[idx], sal.zero_point_full().reshape(-1)[idx])
    np.testing.assert_array_equal(sal.dequantize().reshape(-1)[idx], w.reshape(-1)[idx])


def test_asym_zero_group_and_error_bound():
    w = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    w[1, :32] = 0
    q = quantize_rtn(w, [], Granularity("block", 32), bits=3, grid="asym")
    assert q.scales[1, 0] == 0 and np.all(q.dequantize()[1, :32] == 0)
    step = np.repeat(q.scales * 2, 32, axis=1)  # the 3-bit step s = 2 · (4-bit scale)
    assert np.all(np.abs(q.dequantize() - w) <= step / 2 * (1 + 1e-6))  # min-max: nothing is clipped
    assert np.sum((quantize_rtn(w, [], Granularity("block", 32), bits=3, grid="asym-mse").dequantize() - w) ** 2) \
        <= np.sum((q.dequantize() - w) ** 2)


def test_grid_refusals():
    with pytest.raises(ValueError, match="grid must be one of"):
        GridSpec.make(4, "nf4")
    with pytest.raises(ValueError, match="8-bit codes use sym7"):
        GridSpec.make(8, "asym")
    with pytest.raises(ValueError, match="bits must be one of"):
        GridSpec.make(5, "sym7")
