"""SARQC (Saliency-Aware Regularized Quantization Calibration): saliency and the GS clip search.

ALGORITHMS.md §10.2 (inferred form; the paper's equations could not be read).  The calibration
objective over the int4 grid, for ``W [N, K]``, inputs ``X [T, K]`` and ``H = (2/T) XᵀX``::

    min_Ŵ  ‖(W − Ŵ) Xᵀ‖² / T  +  λ · Σ_ij S_ij (Ŵ_ij − W_ij)²

Saliency ``S`` (``--sarqc-saliency``), zero on the k FP32 entries (their deviation is 0):

    svd        |W_pri|, W_pri = U_r Σ_r V_rᵀ (rank r; data-free, the SVD paper's criterion)
    magnitude  W²
    hessian    W_ij² · H_jj (data-dependent)
    uniform    1 (plain RQC)

GBS (Gram-based, see ``edgeq.quant.gptq.sarqc_gbs``) needs one column saliency shared by all rows:
``d_j = mean_i S_ij`` over non-salient entries, normalised to mean 1.

**GS (clip search).**  For each scale group G (a block of one row, a row, or the tensor) and
clip ratio ``r ∈ {1, 0.95, …, 0.55}`` (``1 − i/20``, i < 10), ``s_G(r) = r · s_G^RTN`` and

    E_G(r) = e_G H_GG e_Gᵀ / w_G H_GG w_Gᵀ  +  λ · Σ_G S (Ŵ − W)² / Σ_G S W²,   e = W − Ŵ(r)

(H_GG: the diagonal block of H over the group's inputs; cross-group terms are ignored), with the
salient entries exact in Ŵ.  ``r*`` = argmin, ties to the larger r; r = 1 is RTN exactly.  As
λ → ∞ the choice no longer depends on the data (a saliency-weighted weight-error clip search).
Pure numpy/torch; no I/O.
"""

from __future__ import annotations

import numpy as np

from edgeq.quant.gptq import _mask_of, fit_scales
from edgeq.quant.int4 import QMAX, ZERO_POINT, Granularity, QuantizedLinear

SALIENCY_KINDS = ("svd", "magnitude", "hessian", "uniform")
LAMBDA_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
CLIP_GRID = tuple(1.0 - i / 20 for i in range(10))


def element_saliency(weight: np.ndarray, kind: str, mask: np.ndarray | None = None, rank: int = 8,
                     hessian_diag=None) -> np.ndarray:
    """``S [N, K]`` (float64, ≥ 0) of the given kind, zero on ``mask``."""
    w = np.asarray(weight, dtype=np.float64)
    if kind == "svd":
        import torch

        u, s, vh = torch.linalg.svd(torch.from_numpy(w), full_matrices=False)
        r = min(rank, s.numel())
        sal = np.abs(((u[:, :r] * s[:r]) @ vh[:r]).numpy())
    elif kind == "magnitude":
        sal = w**2
    elif kind == "hessian":
        if hessian_diag is None:
            raise ValueError("hessian saliency needs the Hessian diagonal")
        sal = w**2 * np.asarray(hessian_diag, dtype=np.float64)[None, :]
    elif kind == "uniform":
        sal = np.ones_like(w)
    else:
        raise ValueError(f"unknown SARQC saliency {kind!r}; choose from {', '.join(SALIENCY_KINDS)}")
    if mask is not None:
        sal = np.where(mask, 0.0, sal)
    return sal


def column_saliency(sal: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``d_j`` = mean over the non-salient rows of column j of ``sal``, normalised to mean 1."""
    keep = np.ones_like(sal, dtype=bool) if mask is None else ~mask
    cnt = keep.sum(0)
    d = np.where(cnt > 0, (sal * keep).sum(0) / np.maximum(cnt, 1), 0.0)
    mean = d.mean()
    return np.ones_like(d) if not mean > 0 else d / mean


def _group_sums(a, gran: Granularity, k_in: int):
    """Σ of ``a [N, K]`` per scale group → ``[N, G]`` (G = blocks, 1 per row, or [1, 1] per tensor)."""
    n = a.shape[0]
    if gran.kind == "tensor":
        return a.sum().reshape(1, 1)
    if gran.kind == "channel":
        return a.sum(1, keepdims=True)
    b = gran.block_size
    nb = -(-k_in // b)
    pad = np.zeros((n, nb * b))
    pad[:, :k_in] = a
    return pad.reshape(n, nb, b).sum(2)


def _quad(e: np.ndarray, H: np.ndarray, gran: Granularity) -> np.ndarray:
    """e_G H_GG e_Gᵀ per scale group (block-diagonal approximation for blocks)."""
    import torch

    n, k_in = e.shape
    et = torch.from_numpy(e)
    Ht = torch.from_numpy(H)
    if gran.kind != "block":
        per_row = ((et @ Ht) * et).sum(1).numpy()
        return per_row.sum().reshape(1, 1) if gran.kind == "tensor" else per_row[:, None]
    b = gran.block_size
    nb = -(-k_in // b)
    ep = torch.zeros(n, nb * b, dtype=et.dtype)
    ep[:, :k_in] = et
    Hp = torch.zeros(nb * b, nb * b, dtype=Ht.dtype)
    Hp[:k_in, :k_in] = Ht
    Hb = torch.stack([Hp[g * b:(g + 1) * b, g * b:(g + 1) * b] for g in range(nb)])
    eg = ep.reshape(n, nb, b)
    return torch.einsum("ngb,gbc,ngc->ng", eg, Hb, eg).numpy()


def _expand(v: np.ndarray, gran: Granularity, shape: tuple[int, int], b: int) -> np.ndarray:
    """Per-group values ``[N|1, G]`` → the MatMulNBits layout ``[N, n_blocks]``."""
    n, k_in = shape
    nb = -(-k_in // b)
    if gran.kind == "tensor":
        return np.full((n, nb), v.item())
    if gran.kind == "channel":
        return np.repeat(v, nb, axis=1)
    return v


def _rtn_with_scales(w: np.ndarray, scales: np.ndarray, b: int, mask: np.ndarray):
    k_in = w.shape[1]
    s_full = np.repeat(scales, b, axis=1)[:, :k_in]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s_full > 0, np.rint(w / s_full), 0.0)
    q = np.clip(q, -QMAX, QMAX)
    deq = np.where(mask, w, (q * s_full).astype(np.float32))
    return q, deq


def sarqc_gs(
    weight: np.ndarray,
    hessian,
    salient_index,
    granularity: Granularity,
    lam: float,
    saliency: np.ndarray,
    exclude_salient_from_scale: bool = False,
    clip_grid=CLIP_GRID,
) -> tuple[QuantizedLinear, np.ndarray]:
    """SARQC-GS clip search; returns the quantized layer and the chosen ratio per scale group."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    n, k_in = w.shape
    idx, mask = _mask_of(w.shape, salient_index)
    H = np.asarray(hessian, dtype=np.float32)
    b = granularity.export_block(k_in)
    base = fit_scales(w, mask, granularity, exclude_salient_from_scale)
    sal = np.asarray(saliency, dtype=np.float64)
    w64 = w.astype(np.float64)
    yn = np.maximum(_quad(w, H, granularity).astype(np.float64), 1e-30)
    wn = np.maximum(_group_sums(sal * w64**2, granularity, k_in), 1e-30)
    best = None
    best_r = None
    for r in clip_grid:
        scales = (base * np.float32(r)).astype(np.float32)
        _, deq = _rtn_with_scales(w, scales, b, mask)
        e = (w - deq).astype(np.float32)
        obj = _quad(e, H, granularity).astype(np.float64) / yn
        if lam > 0:
            obj = obj + lam * _group_sums(sal * e.astype(np.float64) ** 2, granularity, k_in) / wn
        if best is None:
            best, best_r = obj, np.full(obj.shape, float(r))
        else:
            upd = obj < best
            best = np.where(upd, obj, best)
            best_r = np.where(upd, float(r), best_r)
    ratio = _expand(best_r, granularity, (n, k_in), b)
    scales = (base * ratio.astype(np.float32)).astype(np.float32)
    q, _ = _rtn_with_scales(w, scales, b, mask)
    codes = (q + ZERO_POINT).astype(np.uint8)
    codes[mask] = ZERO_POINT
    quant = QuantizedLinear(codes=codes, scales=scales, block_size=b, salient_index=idx,
                            salient_values=w.reshape(-1)[idx].copy())
    return quant, best_r
