"""edgeq.quant.grid_error: the greedy error order and the marginal gains, against quantize_rtn itself."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.quant.grid_error import GREEDY_DEPTH, GridSpec, greedy_order, order_gains
from edgeq.quant.int4 import Granularity, quantize_rtn

GRIDS = [  # (bits, grid, granularity, fp16 scales): every grid a plan can use
    (2, "sym7", "16", True),
    (3, "sym7", "32", True),
    (4, "sym7", "16", False),
    (4, "sym8", "per-channel", False),
    (8, "sym7", "16", False),
    (2, "sym7", "per-tensor", True),
]


def _spec(bits, grid, gran, fp16):
    return GridSpec(bits, grid, Granularity.parse(gran), fp16)


def _error(w, kept, spec, exclude=True, a=None):
    """Σ a_j (W − Ŵ)² of the plan's own quantizer keeping ``kept`` exact."""
    q = quantize_rtn(w, np.asarray(kept, dtype=np.int64), spec.granularity, exclude, bits=spec.bits,
                     grid=spec.grid, fp16_scales=spec.fp16_scales)
    d = (w.astype(np.float64) - q.dequantize().astype(np.float64)) ** 2
    return float(np.sum(d if a is None else d * a[None, :]))


def _brute_greedy(w, spec, steps, a=None):
    kept: list[int] = []
    for _ in range(steps):
        errs = [(_error(w, kept + [j], spec, a=a), j) for j in range(w.size) if j not in kept]
        kept.append(min(errs)[1])  # ties → lower index
    return kept


def test_an_outlier_is_kept_first_because_the_scale_shrinks():
    # one group of 16 at 2 bits: the outlier sits exactly on the grid (own error 0) but sets the scale
    w = np.array([[0.30, -0.22, 0.15, 0.41, -0.35, 0.05, 0.27, -0.12,
                   8.00, 0.33, -0.29, 0.18, -0.07, 0.38, 0.21, -0.26]], dtype=np.float32)
    spec = _spec(2, "sym7", "16", False)
    order, gains = greedy_order(w, spec)
    assert order[0] == 8
    assert gains[0] == pytest.approx(_error(w, [], spec) - _error(w, [8], spec))
    # kept exact *without* recomputing the scale, the outlier would gain nothing: it is on the grid
    assert _error(w, [8], spec, exclude=False) == pytest.approx(_error(w, [], spec))
    # and the data-free error method agrees with the brute-force greedy for every step taken
    assert order[:4].tolist() == _brute_greedy(w, spec, 4)


@pytest.mark.parametrize("bits,grid,gran,fp16", GRIDS)
def test_greedy_is_the_brute_force_greedy_in_every_group_and_a_prefix_order(bits, grid, gran, fp16):
    rng = np.random.default_rng(bits)
    spec = _spec(bits, grid, gran, fp16)
    w = rng.standard_t(3, size=(2, 32)).astype(np.float32)
    order, gains = greedy_order(w, spec)
    assert sorted(order.tolist()) == list(range(w.size))  # every entry once
    assert np.all(np.diff(gains) <= 0)  # one descending order
    size = {"16": 16, "per-tensor": w.size}.get(gran, w.shape[1])  # scale-group size (groups are contiguous)
    for g in range(w.size // size):  # in each group, the order's entries come in greedy order
        mine = [int(i) for i in order if i // size == g][:3]
        ref = _brute_greedy(w.reshape(-1, size)[g:g + 1], spec, 3)
        assert mine == [g * size + j for j in ref]


@pytest.mark.parametrize("bits,grid,gran,fp16", GRIDS)
@pytest.mark.parametrize("exclude", [True, False])
def test_order_gains_are_the_error_differences_of_quantize_rtn(bits, grid, gran, fp16, exclude):
    rng = np.random.default_rng(7)
    spec = _spec(bits, grid, gran, fp16)
    w = rng.standard_t(3, size=(3, 40)).astype(np.float32)  # 40: a padded last block
    a = rng.uniform(0.1, 3.0, size=40)
    order = np.argsort(-np.abs(w).reshape(-1), kind="stable")[:25]  # magnitude: many scale changes
    got = order_gains(w, order, spec, exclude, a)
    cum = [_error(w, order[:t], spec, exclude, a) for t in range(26)]
    np.testing.assert_allclose(got, -np.diff(cum), rtol=1e-9, atol=1e-12)


def test_activation_weighting_changes_the_choice():
    rng = np.random.default_rng(3)
    w = rng.uniform(-1, 1, size=(1, 16)).astype(np.float32)
    spec = _spec(2, "sym7", "16", True)
    plain, _ = greedy_order(w, spec)
    col = int(plain[5])  # an entry the plain greedy keeps only sixth
    a = np.ones(16)
    a[col] = 1e4  # a planted high-E[x²] input column
    weighted, _ = greedy_order(w, spec, a)
    assert weighted[0] == col != plain[0]
    assert weighted[:3].tolist() == _brute_greedy(w, spec, 3, a)


def test_depth_caps_the_greedy_then_own_errors_at_the_frozen_scale_follow():
    rng = np.random.default_rng(5)
    w = rng.standard_t(2, size=(1, 32)).astype(np.float32)
    spec = _spec(2, "sym7", "32", False)
    order, gains = greedy_order(w, spec, depth=2)
    assert order[:2].tolist() == _brute_greedy(w, spec, 2)
    q = quantize_rtn(w, np.sort(order[:2]), spec.granularity, True, bits=2)
    own = ((w.astype(np.float64) - q.dequantize()) ** 2).reshape(-1)
    assert np.all(np.diff(own[order[2:]]) <= 0)
    assert np.all(np.diff(gains) <= 0) and GREEDY_DEPTH == 8  # the documented default depth
