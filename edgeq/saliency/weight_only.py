"""Data-free saliency scores (no calibration data, no forward pass).

* ``svd`` (the seed paper, arXiv 2512.01343): with the thin SVD ``W = U Σ Vᵀ``, the rank-r
  principal reconstruction ``W_pri = U[:, :r] diag(Σ[:r]) Vᵀ[:r, :]`` and
  ``score_ij = |W_pri,ij|``.  Computed in float64 so selections do not depend on the BLAS
  build's fp32 rounding.  If rank(W) ≤ r then ``W_pri = W`` and the method is ``magnitude``.
* ``magnitude``: ``score_ij = |W_ij|`` (the baseline the SVD score must beat).
* ``random``: i.i.d. uniform scores from a generator seeded by (seed, layer name), so a run is
  reproducible and layers get independent draws.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from edgeq.saliency.registry import ScoreContext, register

if TYPE_CHECKING:
    import torch


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
