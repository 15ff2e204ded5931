"""Data-free saliency: SVD, magnitude, random; deterministic top-k (ALGORITHMS.md §2, §12)."""

import numpy as np
import pytest
import torch

from edgeq.config import ConvertConfig
from edgeq.quant.plan import build_plan
from edgeq.saliency import SALIENCY_METHODS, ScoreContext, get_method, topk_flat


def score(name, w, layer="layer", **kw):
    return get_method(name).score(torch.as_tensor(w), ScoreContext(layer=layer, **kw))


def test_registry_has_the_core_methods():
    assert {"svd", "magnitude", "random"} <= set(SALIENCY_METHODS)
    with pytest.raises(ValueError, match="unknown saliency method"):
        get_method("nope")


def test_low_rank_svd_selection_equals_magnitude():
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(40, 5)) @ rng.normal(size=(5, 60))).astype(np.float32)  # rank 5 <= r = 8
    for k in (1, 16, 300):
        np.testing.assert_array_equal(topk_flat(score("svd", w, rank=8), k), topk_flat(score("magnitude", w), k))


def test_svd_differs_from_magnitude_on_full_rank_weights():
    w = np.random.default_rng(1).normal(size=(64, 96)).astype(np.float32)
    a, b = topk_flat(score("svd", w, rank=8), 256), topk_flat(score("magnitude", w), 256)
    assert len(np.intersect1d(a, b)) < 256


@pytest.mark.parametrize("method", ["svd", "magnitude"])
def test_planted_outlier_is_selected(method):
    rng = np.random.default_rng(2)
    w = rng.normal(scale=0.05, size=(48, 64)).astype(np.float32)
    w[13, 29] = 20 * np.abs(w).max()
    assert 13 * 64 + 29 in topk_flat(score(method, w), 1).tolist()


def test_topk_ties_go_to_lower_index_and_output_is_sorted():
    s = torch.tensor([[1.0, 3.0, 3.0], [3.0, 0.0, 2.0]])
    assert topk_flat(s, 2).tolist() == [1, 2]
    assert topk_flat(s, 4).tolist() == [1, 2, 3, 5]
    assert topk_flat(s, 0).numel() == 0 and topk_flat(s, 99).tolist() == list(range(6))


def test_random_is_seeded_per_layer():
    w = np.zeros((8, 8), np.float32)
    a = score("random", w, layer="a", seed=1)
    assert torch.equal(a, score("random", w, layer="a", seed=1))
    assert not torch.equal(a, score("random", w, layer="b", seed=1))
    assert not torch.equal(a, score("random", w, layer="a", seed=2))


@pytest.mark.parametrize("k", [0, 1, 256, 10_000])
def test_plan_k_and_reconstruction_error(k):
    rng = np.random.default_rng(3)
    ws = {"a": rng.normal(size=(32, 64)).astype(np.float32), "b": rng.normal(size=(16, 32)).astype(np.float32)}
    plan = build_plan(ws, ConvertConfig(k=k))
    for name, w in ws.items():
        lp = plan.layers[name]
        assert lp.quant.k == min(k, w.size)
        assert lp.recon_error <= lp.recon_error_int4
        if k >= w.size:
            assert lp.recon_error == 0.0


def test_reconstruction_error_does_not_increase_with_k():
    w = {"a": np.random.default_rng(4).normal(size=(48, 96)).astype(np.float32)}
    for method in ("svd", "magnitude", "random"):
        errs = [build_plan(w, ConvertConfig(k=k, method=method)).total_recon_error for k in (0, 1, 16, 256, 1024, 4608)]
        assert all(b <= a for a, b in zip(errs, errs[1:])), (method, errs)
