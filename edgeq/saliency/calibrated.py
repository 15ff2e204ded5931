"""Saliency scores that need calibration statistics (``edgeq.model.calib.InputStats`` of the layer input).

With ``X ∈ R^{N×n}`` the non-padding calibration inputs of a Linear ``W [m, n]``:

* ``awq`` (activation-scaled magnitude, ALGORITHMS.md §3.1):
  ``s_j = mean_t |X_tj|``, ``score_ij = |W_ij| · s_j``.  Uniform ``s`` ⇒ ranks by ``|W|``.
* ``spqr`` (OBD/OBS-style Hessian saliency, ALGORITHMS.md §4.1):
  ``H = (2/N) XᵀX``; dead inputs (``H_jj = 0``) get ``H_jj = 1``;
  ``H ← H + percdamp · mean(diag H) · I``; ``score_ij = W_ij² / [H⁻¹]_jj``; dead columns score 0.
  ``H ∝ I`` ⇒ ranks by ``|W|``.  Larger ``percdamp`` drifts toward ``|W_ij|·‖X_j‖`` (≈ awq).

* ``error-act``: the ``error`` greedy (``edgeq.saliency.weight_only``) with each entry's squared
  error weighted by ``E[x_j²] = diag(H)_j / 2`` of its input column j (the expected output error it
  causes); also turns on ``--exclude-salient-from-scale``.

All are computed in float64.  Without statistics they raise ``ValueError`` naming ``--calib``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeq.saliency.registry import ScoreContext, register

if TYPE_CHECKING:
    import torch


def _stats(weight: torch.Tensor, ctx: ScoreContext, method: str):
    s = ctx.stats
    if s is None:
        raise ValueError(f"--method {method} needs calibration data for {ctx.layer}; pass --calib TASK_OR_FILE")
    if s.n_features != weight.shape[1]:
        raise ValueError(f"calibration statistics of {ctx.layer} have {s.n_features} inputs, "
                         f"the weight {weight.shape[1]}")
    return s


def awq_score_from(weight: torch.Tensor, mean_abs: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · s_j`` in float64."""
    import torch

    return weight.detach().to(torch.float64).abs() * mean_abs.to(torch.float64)[None, :]


def spqr_score_from(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """``W_ij² / [H⁻¹]_jj`` with dead inputs handled and relative damping (float64)."""
    import torch

    if percdamp < 0:
        raise ValueError(f"--percdamp must be >= 0, got {percdamp}")
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    torch.diagonal(h).add_(percdamp * torch.diagonal(h).mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError("the calibration Hessian is not positive definite; raise --percdamp (e.g. 0.1)")
    hinv_diag = torch.diagonal(torch.cholesky_inverse(chol))
    score = weight.detach().to(torch.float64) ** 2 / hinv_diag[None, :]
    score[:, dead] = 0.0
    return score


def mean_square(stats) -> torch.Tensor:
    """``E[x_j²]`` over the calibration tokens (float64 [n]): ``diag(H) / 2``."""
    import torch

    return torch.diagonal(stats.hessian()).to(torch.float64) / 2.0


@register("awq", "|W_ij|·mean|x_j| (activation-scaled magnitude; needs --calib)", needs_calibration=True)
def awq_score(weight: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    return awq_score_from(weight, _stats(weight, ctx, "awq").mean_abs)


@register("spqr", "W_ij²/[H⁻¹]_jj, H = 2/N XᵀX damped by --percdamp (needs --calib)", needs_calibration=True)
def spqr_score(weight: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    return spqr_score_from(weight, _stats(weight, ctx, "spqr").hessian(), ctx.percdamp)


@register("error-act", "the error greedy with each squared error weighted by E[x_j^2] of its input (needs "
          "--calib; turns on --exclude-salient-from-scale)", needs_calibration=True, exclude_salient_from_scale=True)
def error_act_score(weight: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    from edgeq.saliency.weight_only import greedy_error_score

    return greedy_error_score(weight, ctx, mean_square(_stats(weight, ctx, "error-act")).numpy())
