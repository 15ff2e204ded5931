"""The low-bit ``error`` / ``error-act`` saliency methods: registry contract, the plan's grid, E[x²] weighting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeq.config import ConvertConfig
from edgeq.quant.grid_error import GridSpec, greedy_order
from edgeq.quant.int4 import Granularity
from edgeq.quant.plan import build_plan, selection_order
from edgeq.saliency import SALIENCY_METHODS, ScoreContext, descending_order, get_method


class Stats:
    """The part of edgeq.model.calib.InputStats the methods read: H = 2 diag(E[x²])."""

    def __init__(self, msq):
        self.n_features = len(msq)
        self.msq = np.asarray(msq, dtype=np.float64)

    def hessian(self):
        return torch.diag(torch.from_numpy(2.0 * self.msq))


def _w(seed=0, shape=(8, 64)):
    return np.random.default_rng(seed).standard_t(3, size=shape).astype(np.float32)


def test_registered_with_the_scale_exclusion_the_config_turns_on():
    assert SALIENCY_METHODS["error"].exclude_salient_from_scale and not SALIENCY_METHODS["error"].needs_calibration
    assert SALIENCY_METHODS["error-act"].exclude_salient_from_scale and SALIENCY_METHODS["error-act"].needs_calibration
    assert not any(SALIENCY_METHODS[m].exclude_salient_from_scale for m in ("svd", "magnitude", "awq", "spqr"))
    assert ConvertConfig(method="error").exclude_salient_from_scale
    assert ConvertConfig(method="error").to_dict()["exclude_salient_from_scale"]  # visible in the report
    assert ConvertConfig(method="error-act", calib="rte").exclude_salient_from_scale
    assert not ConvertConfig(method="magnitude").exclude_salient_from_scale


@pytest.mark.parametrize("bits,grid,block", [(2, "sym7", "32"), (3, "sym7", "per-channel"), (4, "sym8", "16"),
                                             (8, "sym7", "32")])
def test_the_order_is_the_greedy_on_the_plans_grid(bits, grid, block):
    w = _w(bits)
    config = ConvertConfig(method="error", bits=bits, grid=grid, block_size=block)
    got = selection_order("l", w, config)
    ref, _ = greedy_order(w, GridSpec(bits, grid if bits == 4 else "sym7", Granularity.parse(block), bits in (2, 3)))
    np.testing.assert_array_equal(got, ref)


def test_the_grid_matters():
    w = _w(1)
    orders = [selection_order("l", w, ConvertConfig(method="error", bits=b), limit=64) for b in (2, 8)]
    assert not np.array_equal(*orders)


def test_every_k_is_the_greedy_prefix_and_the_plan_excludes_the_kept_entries_from_the_scale():
    w = _w(2, (4, 32))
    config = ConvertConfig(method="error", k=6, bits=2, block_size="32")
    plan = build_plan({"l": w}, config)
    order, _ = greedy_order(w, GridSpec(2, "sym7", Granularity.parse("32"), True))
    q = plan.layers["l"].quant
    np.testing.assert_array_equal(q.salient_index, np.sort(order[:6]))
    # the scales ignore the kept entries: each row's scale comes from its largest non-kept entry
    kept = np.zeros(w.size, bool)
    kept[order[:6]] = True
    rest = np.where(kept.reshape(w.shape), 0, w)
    m = rest[np.arange(4), np.argmax(np.abs(rest), axis=1)]
    s = (m / np.float32(-2)).astype(np.float16).astype(np.float32) / np.float32(4)  # 2-bit step, as 4-bit codes
    np.testing.assert_array_equal(q.scales[:, 0], s)


def test_error_act_weights_by_the_second_moment_of_each_input():
    w = np.random.default_rng(3).uniform(-1, 1, size=(1, 32)).astype(np.float32)
    ctx = ScoreContext(layer="l", bits=2, fp16_scales=True)
    plain = descending_order(get_method("error").score(torch.from_numpy(w), ctx))
    col = int(plain[7])
    msq = np.ones(32)
    msq[col] = 1e4  # a planted high-E[x²] input
    weighted = descending_order(get_method("error-act").score(torch.from_numpy(w), ScoreContext(
        layer="l", bits=2, fp16_scales=True, stats=Stats(msq))))
    assert weighted[0] == col != plain[0]
    # uniform E[x²] is the data-free method
    same = descending_order(get_method("error-act").score(torch.from_numpy(w), ScoreContext(
        layer="l", bits=2, fp16_scales=True, stats=Stats(np.full(32, 3.0)))))
    np.testing.assert_array_equal(same, plain)


def test_error_act_without_statistics_names_calib():
    with pytest.raises(ValueError, match="--calib"):
        get_method("error-act").score(torch.from_numpy(_w()), ScoreContext(layer="l"))
    with pytest.raises(ValueError, match="needs calibration data"):
        ConvertConfig(method="error-act")


def test_cli_method_choices_include_them():
    from edgeq.cli.convert import convert

    choices = next(p for p in convert.params if p.name == "method").type.choices
    assert {"error", "error-act"} <= set(choices)
