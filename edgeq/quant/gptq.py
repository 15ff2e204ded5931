"""GPTQ with a salient mask inside the loop, and SARQC-GBS as GPTQ on a regularised Hessian.

For a Linear ``W [N, K]`` with calibration inputs ``X [T, K]`` (non-padding tokens) and the proxy
Hessian ``H = (2/T) XᵀX`` (ALGORITHMS.md §5; IST-DASLab/gptq ``fasterquant``)::

    dead = diag(H) == 0  →  H[dead, dead] = 1           (W is left as it is there)
    md   = mean(diag H)
    H'   = H + reg_diag + percdamp · md · I              reg_diag = 0 for GPTQ
    U    = chol(H'^{-1}, upper)
    for each column c (lazy batches of ``blocksize`` columns):
        q_c = s_c ⊙ clamp(rint(w_c / s_c), −7, 7)        Q4-sym-7, scales s of the configured granularity
        q_c[M_c] = w_c[M_c]                              salient entries: exact, zero error (SpQR)
        e_c = (w_c − q_c) / U[c, c]
        W[:, c+1:] −= e_c ⊗ U[c, c+1:]                   error compensation of the later columns

Scales are fitted exactly as ``quantize_rtn`` fits them (same max|·|/7 formula, same salient
inclusion rule): per-tensor and per-channel once on the original W before the loop, a block of
``b`` inputs when the loop reaches the block's first column, on the *updated* W (GPTQ's groups).
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

from edgeq.quant.int4 import QMAX, ZERO_POINT, Granularity, QuantizedLinear, _group_amax

PERCDAMP = 0.01
BLOCKSIZE = 128


def fit_scales(w: np.ndarray, mask: np.ndarray, granularity: Granularity, exclude_salient: bool) -> np.ndarray:
    """The RTN scales of ``w`` (``[N, n_blocks]`` float32, MatMulNBits layout), as ``quantize_rtn``."""
    absw = np.abs(w)
    if exclude_salient:
        absw = np.where(mask, np.float32(0), absw)
    return (_group_amax(absw, granularity) / np.float32(QMAX)).astype(np.float32)


def _mask_of(shape: tuple[int, int], salient_index) -> tuple[np.ndarray, np.ndarray]:
    n, k_in = shape
    idx = np.unique(np.asarray(salient_index, dtype=np.int64))
    if idx.size and (idx[0] < 0 or idx[-1] >= n * k_in):
        raise ValueError(f"salient index out of range for a {n}x{k_in} weight")
    mask = np.zeros(n * k_in, dtype=bool)
    mask[idx] = True
    return idx, mask.reshape(n, k_in)


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
) -> GPTQResult:
    """GPTQ of ``weight [N, K]`` on ``hessian [K, K]`` keeping ``salient_index`` exact (compensated)."""
    import torch

    w_np = np.ascontiguousarray(weight, dtype=np.float32)
    if w_np.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w_np.shape}")
    n, k_in = w_np.shape
    idx, mask_np = _mask_of(w_np.shape, salient_index)
    H = torch.as_tensor(np.asarray(hessian), dtype=torch.float64).clone()
    if H.shape != (k_in, k_in):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not match a weight with {k_in} inputs")
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    md = torch.diagonal(H).mean()
    if reg_diag is not None:
        H.diagonal().add_(torch.as_tensor(np.asarray(reg_diag), dtype=torch.float64))
    H.diagonal().add_(percdamp * md)
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(torch.float32)

    b = granularity.export_block(k_in)
    if granularity.kind == "block":
        blocksize = max(blocksize, b) // b * b  # a scale group never straddles a lazy batch
        scales = np.zeros((n, -(-k_in // b)), dtype=np.float32)
    else:
        scales = fit_scales(w_np, mask_np, granularity, exclude_salient_from_scale)
    s_full = torch.from_numpy(np.repeat(scales, b, axis=1)[:, :k_in].copy())

    W = torch.from_numpy(w_np.copy())
    M = torch.from_numpy(mask_np)
    Qv = torch.zeros_like(W)  # dequantized int4 value, or the compensated weight at salient entries
    codes = torch.full((n, k_in), ZERO_POINT, dtype=torch.int64)
    for i1 in range(0, k_in, blocksize):
        i2 = min(i1 + blocksize, k_in)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        for j in range(i2 - i1):
            c = i1 + j
            if granularity.kind == "block" and c % b == 0:
                g = c // b
                blk = W1[:, j : j + b].numpy()
                sg = fit_scales(blk, mask_np[:, c : c + b], Granularity("block", b), exclude_salient_from_scale)
                scales[:, g] = sg[:, 0]
                s_full[:, c : c + b] = torch.from_numpy(sg[:, :1]).expand(-1, min(b, k_in - c))
            w = W1[:, j]
            s = s_full[:, c]
            q = torch.where(s > 0, torch.round(w / s), torch.zeros_like(w)).clamp(-QMAX, QMAX)
            qv = q * s
            m = M[:, c]
            qv = torch.where(m, w, qv)
            Qv[:, c] = qv
            codes[:, c] = torch.where(m, torch.full_like(q, ZERO_POINT), q + ZERO_POINT).to(torch.int64)
            e = (w - qv) / U[c, c]
            W1[:, j:] -= e[:, None] * U[c, c:i2][None, :]
            E1[:, j] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    values = Qv.numpy().reshape(-1)[idx].astype(np.float32)
    shift = float(np.max(np.abs(values - w_np.reshape(-1)[idx]))) if idx.size else 0.0
    quant = QuantizedLinear(
        codes=codes.numpy().astype(np.uint8),
        scales=scales,
        block_size=b,
        salient_index=idx,
        salient_values=values,
    )
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
) -> GPTQResult:
    """SARQC-GBS: GPTQ on ``H + 2λ·mean(diag H)·diag(d)`` (d: column saliency, mean 1; None = uniform)."""
    H = np.asarray(hessian, dtype=np.float64)
    k_in = H.shape[0]
    diag = np.diag(H).copy()
    diag[diag == 0] = 1.0
    md = float(diag.mean())
    d = np.ones(k_in) if col_saliency is None else np.asarray(col_saliency, dtype=np.float64)
    reg = 2.0 * float(lam) * md * d if lam > 0 else None
    return gptq_quantize(weight, H, salient_index, granularity, exclude_salient_from_scale, percdamp, reg)
