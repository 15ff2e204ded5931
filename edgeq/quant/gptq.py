"""GPTQ with a salient mask inside the loop, and SARQC-GBS as GPTQ on a regularised Hessian.

For a Linear ``W [N, K]`` with calibration inputs ``X [T, K]`` (non-padding tokens) and the proxy
Hessian ``H = (2/T) XᵀX`` (ALGORITHMS.md §5; IST-DASLab/gptq ``fasterquant``)::

    dead = diag(H) == 0  →  H[dead, dead] = 1           (W is left as it is there)
    md   = mean(diag H)
    H'   = H + reg_diag + percdamp · md · I              reg_diag = 0 for GPTQ
    U    = chol(H'^{-1}, upper)
    for each column c (lazy batches of ``blocksize`` columns):
        q_c = s_c ⊙ clamp(rint(w_c / s_c), lo, hi)       the grid's levels (Q4-sym-7: −7..7), scales s
        q_c[M_c] = w_c[M_c]                              salient entries: exact, zero error (SpQR)
        e_c = (w_c − q_c) / U[c, c]
        W[:, c+1:] −= e_c ⊗ U[c, c+1:]                   error compensation of the later columns

Scales (and zero points) are fitted by the very function ``quantize_rtn`` uses,
``edgeq.quant.grid.fit`` (any ``--grid`` and bits 2/3/4/8, fp16 rounding, the salient inclusion
rule, the mse search weighted by ``a_j = H_jj``), and the codes are built by
``edgeq.quant.int4.assemble``: per-tensor and per-channel once on the original W before the loop,
a block of ``b`` inputs when the loop reaches the block's first column, on the *updated* W (GPTQ's
groups).  Asymmetric grids: ``q_c = (clamp(rint(w_c/s_c) + z_c, 0, 2^b − 1) − z_c) ⊙ s_c``.
The FP32 value stored for a salient weight is its **error-compensated** value (SpQR stores the
same), not the original weight.  With ``H ∝ I``, U is diagonal, nothing is propagated and the
result is RTN exactly.

**SARQC-GBS** (ALGORITHMS.md §10.2, inferred form).  The objective per row
``(w−ŵ)(H/2)(w−ŵ)ᵀ + λ Σ_j d_j (ŵ_j − w_j)² · md`` is GPTQ's on

    H' = H + 2λ · md · diag(d),      d = column saliency normalised to mean 1

so ``sarqc_gbs`` is ``gptq_quantize`` with ``reg_diag = 2λ·md·d``; λ → ∞ gives RTN, λ = 0 GPTQ.
Pure torch/numpy; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.quant.grid import Granularity, GridSpec, fit
from edgeq.quant.int4 import QuantizedLinear, assemble, salient_mask

PERCDAMP = 0.01
BLOCKSIZE = 128


def fit_scales(w: np.ndarray, mask: np.ndarray, granularity: Granularity, exclude_salient: bool) -> np.ndarray:
    """The Q4-sym-7 RTN scales of ``w`` (``[N, n_blocks]`` float32, MatMulNBits layout), as ``quantize_rtn``."""
    return fit(w, mask, granularity, GridSpec.make(4, "sym7"), exclude_salient)[0]


def _mask_of(shape: tuple[int, int], salient_index) -> tuple[np.ndarray, np.ndarray]:
    return salient_mask(shape, salient_index)


@dataclass(frozen=True)
class GPTQResult:
    quant: QuantizedLinear
    compensated_max_shift: float  # max |W_salient(compensated) − W_salient(original)|


def gptq_quantize(
    weight: np.ndarray,
    hessian,
    salient_index,
    granularity: Granularity,
    exclude_salient_from_scale: bool = False,
    percdamp: float = PERCDAMP,
    reg_diag=None,
    blocksize: int = BLOCKSIZE,
    grid: GridSpec | None = None,
    fp16_scales: bool = False,
) -> GPTQResult:
    """GPTQ of ``weight [N, K]`` on ``hessian [K, K]`` keeping ``salient_index`` exact (compensated);
    ``grid``: the bits/grid of the codes (default Q4-sym-7), ``fp16_scales``: float16 scales."""
    import torch

    spec = grid or GridSpec.make(4, "sym7")
    lo, hi = spec.levels
    w_np = np.ascontiguousarray(weight, dtype=np.float32)
    if w_np.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w_np.shape}")
    n, k_in = w_np.shape
    idx, mask_np = salient_mask(w_np.shape, salient_index)
    H = torch.as_tensor(np.asarray(hessian), dtype=torch.float64).clone()
    if H.shape != (k_in, k_in):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not match a weight with {k_in} inputs")
    act = torch.diagonal(H).numpy().copy()  # a_j = H_jj ∝ E[x_j²]: the mse grids' error weights
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    md = torch.diagonal(H).mean()
    if reg_diag is not None:
        H.diagonal().add_(torch.as_tensor(np.asarray(reg_diag), dtype=torch.float64))
    H.diagonal().add_(percdamp * md)
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(torch.float32)

    def fit_on(w, m, gran, a):
        s, z = fit(w, m, gran, spec, exclude_salient_from_scale, fp16_scales, a)
        return s, (z if z is not None else np.zeros_like(s))

    b = granularity.export_block(k_in)
    n_blocks = -(-k_in // b)
    if granularity.kind == "block":
        blocksize = max(blocksize, b) // b * b  # a scale group never straddles a lazy batch
        scales, zeros = np.zeros((n, n_blocks), dtype=np.float32), np.zeros((n, n_blocks), dtype=np.float32)
    else:
        scales, zeros = fit_on(w_np, mask_np, granularity, act)
    s_full = torch.from_numpy(np.repeat(scales, b, axis=1)[:, :k_in].copy())
    z_full = torch.from_numpy(np.repeat(zeros, b, axis=1)[:, :k_in].copy())

    W = torch.from_numpy(w_np.copy())
    M = torch.from_numpy(mask_np)
    Qv = torch.zeros_like(W)  # dequantized value, or the compensated weight at salient entries
    levels = torch.zeros_like(W)  # the grid levels q
    for i1 in range(0, k_in, blocksize):
        i2 = min(i1 + blocksize, k_in)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        for j in range(i2 - i1):
            c = i1 + j
            if granularity.kind == "block" and c % b == 0:
                g, width = c // b, min(b, k_in - c)
                sg, zg = fit_on(W1[:, j : j + b].numpy(), mask_np[:, c : c + b], granularity, act[c : c + b])
                scales[:, g], zeros[:, g] = sg[:, 0], zg[:, 0]
                s_full[:, c : c + b] = torch.from_numpy(sg[:, :1]).expand(-1, width)
                z_full[:, c : c + b] = torch.from_numpy(zg[:, :1]).expand(-1, width)
            w = W1[:, j]
            s, z = s_full[:, c], z_full[:, c]
            q = (torch.where(s != 0, torch.round(w / s), torch.zeros_like(w)) + z).clamp(lo, hi)
            qv = torch.where(M[:, c], w, (q - z) * s)
            Qv[:, c] = qv
            levels[:, c] = q
            e = (w - qv) / U[c, c]
            W1[:, j:] -= e[:, None] * U[c, c:i2][None, :]
            E1[:, j] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    values = Qv.numpy().reshape(-1)[idx].astype(np.float32)
    shift = float(np.max(np.abs(values - w_np.reshape(-1)[idx]))) if idx.size else 0.0
    quant = assemble(levels.numpy(), scales, zeros if spec.asym else None, mask_np, b, spec, idx, values,
                     fp16_scales)
    return GPTQResult(quant, shift)


def sarqc_gbs(
    weight: np.ndarray,
    hessian,
    salient_index,
    granularity: Granularity,
    lam: float,
    col_saliency=None,
    exclude_salient_from_scale: bool = False,
    percdamp: float = PERCDAMP,
    grid: GridSpec | None = None,
    fp16_scales: bool = False,
) -> GPTQResult:
    """SARQC-GBS: GPTQ on ``H + 2λ·mean(diag H)·diag(d)`` (d: column saliency, mean 1; None = uniform)."""
    H = np.asarray(hessian, dtype=np.float64)
    k_in = H.shape[0]
    diag = np.diag(H).copy()
    diag[diag == 0] = 1.0
    md = float(diag.mean())
    d = np.ones(k_in) if col_saliency is None else np.asarray(col_saliency, dtype=np.float64)
    reg = 2.0 * float(lam) * md * d if lam > 0 else None
    return gptq_quantize(weight, H, salient_index, granularity, exclude_salient_from_scale, percdamp, reg,
                         grid=grid, fp16_scales=fp16_scales)
