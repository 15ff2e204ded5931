"""edgeq.quant.budget (the allocation math) and its orchestration in edgeq.quant.plan (``--budget F``)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgeq.config import ConvertConfig
from edgeq.quant.budget import allocate, budget_total, concave_slopes
from edgeq.quant.plan import budget_allocation, build_plan


def test_concave_slopes_pool_violators_keep_the_total_and_leave_monotone_input_alone():
    np.testing.assert_allclose(concave_slopes([0, 1, 3, 0.5, 0.5, 2]), [4 / 3] * 3 + [1.0] * 3)
    d = np.random.default_rng(0).random(500)
    g = concave_slopes(d)
    assert np.all(np.diff(g) <= 1e-12) and g.sum() == pytest.approx(d.sum())
    down = np.sort(d)[::-1]
    np.testing.assert_array_equal(concave_slopes(down), down)
    # the cumulative sums of the slopes majorise those of the input (a concave majorant)
    assert np.all(np.cumsum(g) >= np.cumsum(d) - 1e-9)


def test_allocate_is_the_exact_optimum_for_concave_layers():
    rng = np.random.default_rng(1)
    gains = {n: np.sort(rng.random(6))[::-1] for n in "abc"}  # non-increasing δ: concave C_l
    for total in range(0, 19):
        ks = allocate(gains, total)
        assert sum(ks.values()) == total
        best = max(sum(gains[n][:k].sum() for n, k in zip("abc", c))
                   for c in itertools.product(range(7), repeat=3) if sum(c) == total)
        assert sum(gains[n][:ks[n]].sum() for n in "abc") == pytest.approx(best)


def test_allocate_ties_go_to_the_earlier_layer_and_a_late_large_gain_pulls_its_prefix():
    assert allocate({"a": np.zeros(3), "b": np.zeros(3)}, 2) == {"a": 2, "b": 0}
    # b's second entry gains 10 after a zero: the majorant (5, 5) beats a's 4
    assert allocate({"a": np.array([4.0, 3.0]), "b": np.array([0.0, 10.0])}, 2) == {"a": 0, "b": 2}
    with pytest.raises(ValueError, match="does not fit"):
        allocate({"a": np.zeros(2)}, 3)


@pytest.mark.parametrize("fraction", [0.0, 0.003, 0.01, 0.0125, 0.5])
def test_the_total_kept_is_round_f_times_the_quantized_weights(fraction):
    rng = np.random.default_rng(2)
    weights = {"l0": rng.standard_normal((24, 32)).astype(np.float32),
               "l1": rng.standard_normal((40, 48)).astype(np.float32),
               "head": rng.standard_normal((2, 32)).astype(np.float32)}
    config = ConvertConfig(method="error", budget=fraction, bits=2, block_size="16", exclude=("head",))
    plan = build_plan(weights, config)
    n = 24 * 32 + 40 * 48  # the excluded head does not count
    assert budget_total({"l0": 24 * 32, "l1": 40 * 48}, fraction) == round(fraction * n)
    assert sum(lp.quant.k for lp in plan.layers.values()) == round(fraction * n)
    assert plan.budget["kept_total"] == round(fraction * n) and plan.budget["weights_total"] == n
    assert plan.budget["k_per_layer"] == {name: lp.quant.k for name, lp in plan.layers.items()}
    assert "head" not in plan.budget["k_per_layer"]


@pytest.mark.parametrize("method", ["error", "magnitude"])
def test_a_layer_with_much_larger_error_gets_more_k(method):
    rng = np.random.default_rng(3)
    base = rng.standard_t(3, size=(32, 64)).astype(np.float32)
    weights = {"quiet": 0.01 * base, "loud": 10.0 * base[::-1].copy(), "quiet2": 0.01 * base[:, ::-1].copy()}
    config = ConvertConfig(method=method, budget=0.02, bits=2, block_size="32")
    alloc = budget_allocation(weights, config)
    assert alloc.ks["loud"] > alloc.ks["quiet"] + alloc.ks["quiet2"]
    assert sum(alloc.ks.values()) == round(0.02 * 3 * base.size)
    assert alloc.report["exclude_salient_from_scale"] == (method == "error")
    assert alloc.report["weighting"] == "none"


def test_budget_weighs_errors_by_the_calibration_second_moment():
    import torch

    class Stats:  # the part of edgeq.model.calib.InputStats the plan reads
        def __init__(self, msq, count=10):
            self.n_features = msq.size
            self.count = count
            self.xtx = torch.diag(torch.from_numpy(count * msq))  # XᵀX of `count` rows with E[x_j²] = msq

    rng = np.random.default_rng(4)
    w = rng.standard_t(3, size=(32, 64)).astype(np.float32)
    weights = {"a": w, "b": w[::-1].copy()}
    config = ConvertConfig(method="magnitude", budget=0.02, bits=2)
    plain = budget_allocation(weights, config).ks
    stats = {"a": Stats(np.full(64, 1e-3)), "b": Stats(np.full(64, 1e3))}  # b's inputs are far larger
    weighted = budget_allocation(weights, config, stats)
    assert weighted.report["weighting"] == "E[x_j^2]"
    assert weighted.ks["b"] > plain["b"] and weighted.ks["a"] < plain["a"]


@pytest.mark.parametrize("kwargs,message", [
    ({"budget": 1.0}, r"--budget must be a fraction in \[0, 1\)"),
    ({"budget": -0.01}, r"--budget must be a fraction in \[0, 1\)"),
    ({"budget": 0.01, "k": 16}, "--budget and --k are mutually exclusive"),
])
def test_budget_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvertConfig(**kwargs)
