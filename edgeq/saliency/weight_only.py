"""Data-free saliency scores (no calibration data, no forward pass).

* ``svd`` (the seed paper, arXiv 2512.01343): with the thin SVD ``W = U Σ Vᵀ``, the rank-r
  principal reconstruction ``W_pri = U[:, :r] diag(Σ[:r]) Vᵀ[:r, :]`` and
  ``score_ij = |W_pri,ij|``.  Computed in float64 so selections do not depend on the BLAS
  build's fp32 rounding.  If rank(W) ≤ r then ``W_pri = W`` and the method is ``magnitude``.
* ``magnitude``: ``score_ij = |W_ij|`` (the baseline the SVD score must beat).
* ``random``: i.i.d. uniform scores from a generator seeded by (seed, layer name), so a run is
  reproducible and layers get independent draws.
* ``error`` (low-bit): per scale group, greedily keep exact the entries whose removal most reduces
  the group's squared RTN error on the plan's own grid (bits, sym7/sym8, granularity, fp16 scales
  from the ScoreContext), the scale recomputed without them (``edgeq.quant.grid_error.greedy_order``:
  up to 8 greedy removals per group, then the rest by own error at the frozen scale).  The score is
  the rank in that order (``n − position``), so the registry's descending order *is* the greedy order
  and every top-k is the greedy solution.  Registered with ``exclude_salient_from_scale``: the plan
  quantizes with the salient entries out of the scales, as the selection assumed.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from edgeq.saliency.registry import ScoreContext, register

if TYPE_CHECKING:
    import torch


def grid_spec(ctx: ScoreContext):
    """The ``edgeq.quant.grid_error.GridSpec`` of the layer's grid as the context describes it."""
    from edgeq.quant.grid_error import GridSpec
    from edgeq.quant.int4 import Granularity

    gran = ctx.granularity if ctx.granularity is not None else Granularity("block", 32)
    return GridSpec(ctx.bits, ctx.grid, gran, ctx.fp16_scales)


def greedy_error_score(weight: torch.Tensor, ctx: ScoreContext, col_weight=None) -> torch.Tensor:
    """``n − position`` in the greedy error order (float64), see ``edgeq.quant.grid_error``."""
    import numpy as np
    import torch

    from edgeq.quant.grid_error import greedy_order

    w = weight.detach().to(torch.float32).numpy()
    order, _ = greedy_order(w, grid_spec(ctx), col_weight)
    score = np.empty(w.size, dtype=np.float64)
    score[order] = np.arange(w.size, 0, -1, dtype=np.float64)
    return torch.from_numpy(score.reshape(w.shape))


@register("svd", "|rank-r principal reconstruction of W| (data-free; --rank, default 8)")
def svd_score(weight: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    import torch

    w64 = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    r = min(ctx.rank, s.numel())
    return ((u[:, :r] * s[:r]) @ vh[:r, :]).abs()


@register("magnitude", "|W| (data-free baseline)")
def magnitude_score(weight: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    return weight.detach().abs().double()


@register("random", "uniform random, seeded by --seed and the layer name (baseline)")
def random_score(weight: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    import torch

    gen = torch.Generator().manual_seed((ctx.seed * 1_000_003 + zlib.crc32(ctx.layer.encode())) % 2**63)
    return torch.rand(weight.shape, generator=gen, dtype=torch.float64)


@register("error", "greedy per scale group: the entries whose removal most cuts the group's RTN error on the "
          "plan's grid, scales recomputed without them (data-free; turns on --exclude-salient-from-scale)",
          exclude_salient_from_scale=True)
def error_score(weight: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    return greedy_error_score(weight, ctx)
