"""The integer kernel's arithmetic (``--kernel integer``): dynamic uint8 activations × int8 weights.

A Linear ``y = x Ŵᵀ + b`` with the plan's 8-bit codes ``c_ij = q_ij + 128`` (|q_ij| ≤ 63, one
scale ``s_i`` per output channel, ``edgeq.quant.int4`` with ``reduce_range``), the exact entries S
and the activation-outlier columns C (every entry of a column in C is in S) runs as::

    x'      = x ⊙ m,  m_j = 0 for j ∈ C, 1/s_j when smoothed, else 1  # outlier columns out of the int8 path
    lo, hi  = min(0, min x'), max(0, max x')                            # over the whole tensor
    a       = (hi − lo) / 255   (1 when hi = lo)                        # float32
    z       = rint(clamp(0 − lo / a, 0, 255))                           # half to even
    u       = clamp(rint(x' / a) + z, 0, 255)                           # uint8
    acc_i   = Σ_j (u_j − z) · q_ij                                      # int32, exact
    y_i     = acc_i · (a · s_i) + b_i  +  Σ_{(i,j) ∈ S} x_j W_ij        # the FP32 correction sees x itself

— ONNX's DynamicQuantizeLinear (its spec's formula, which ONNX Runtime's ``DynamicQuantizeMatMul``
implements: ``GetQuantizationParameter`` then ``MlasQuantizeLinear``, a division) followed by an
exact integer product.  The per-tensor scale ``a`` follows the largest |x'_j|: one column 10×
the others makes every other column 10× coarser, which is why the columns of largest calibration
range are taken out (LLM.int8()'s decomposition): their products are exact FP32 instead.

**SmoothQuant** (Xiao et al. 2023, ``--smooth-alpha α``) migrates the activation range into the
weights: ``y = (x ⊙ s⁻¹)(W diag(s))ᵀ`` with, per input column j (C excluded)::

    s_j = max|x_j|^α / max_i |W_ij|^(1−α)       (1 when either max is 0; calibration max|x_j|)
    r_j = float32(1 / s_j)                       # the multiplier the graph applies: m_j = r_j
    W'  = W ⊙ (1 / r)   (column-wise),   q, s_i = the |q| ≤ 63 grid of W'
    Ŵ_ij = q_ij · s_i · r_j   (+ exact entries, in W's own coordinates)

so the plan's and the file's Ŵ are in the original coordinates (read-back, parity, reconstruction
error), while the int8 path sees x' with every column's range ≈ √(max|x_j| · max|W_j|) at α = ½.
Linears reading one input (q/k/v) share s (the max over all their rows), hence one m.

:func:`outlier_columns` picks C from the calibration statistics (max |x_j| per input column; the
c largest, optionally only those ≥ ratio × the median column's);
:func:`smoothing_factors` r; :func:`input_factors` the vector m of a planned layer;
:func:`dynamic_quantize` is the activation step in torch (the PyTorch reference of plan parity);
:func:`integer_linear` the whole layer.  Pure: arrays in, arrays out.
"""

from __future__ import annotations

import numpy as np

ACT_LEVELS = 255  # uint8 activations, asymmetric per tensor
WEIGHT_ZERO_POINT = 128  # codes c = q + 128 (edgeq.quant.int4, bits = 8)


def outlier_columns(abs_max: np.ndarray, n: int, ratio: float = 0.0) -> np.ndarray:
    """The ``n`` input columns of largest max|x_j| (ties → lower index), sorted; all of them if n ≥ K.

    ``ratio`` > 0 keeps only those whose max|x_j| ≥ ratio · median_j max|x_j| (a Linear without
    such a column keeps its plain int8 path and pays no FP32 branch)."""
    a = np.asarray(abs_max, dtype=np.float64).reshape(-1)
    n = min(int(n), a.size)
    if n <= 0:
        return np.empty(0, np.int64)
    order = np.argsort(-a, kind="stable")[:n]
    if ratio > 0:
        order = order[a[order] >= ratio * np.median(a)]
    return np.sort(order).astype(np.int64)


def smoothing_factors(abs_max: np.ndarray, w_abs_max: np.ndarray, alpha: float,
                      cols: np.ndarray | None = None) -> np.ndarray:
    """r = float32(1/s) per input column (module docstring): ``abs_max`` max|x_j|, ``w_abs_max`` max_i |W_ij|
    (over every Linear sharing the input), ``cols`` the outlier columns C (r = 1 there: they are masked)."""
    a = np.asarray(abs_max, dtype=np.float64).reshape(-1)
    w = np.asarray(w_abs_max, dtype=np.float64).reshape(-1)
    if a.shape != w.shape:
        raise ValueError(f"{a.size} activation columns but {w.size} weight columns")
    ok = (a > 0) & (w > 0) & np.isfinite(a) & np.isfinite(w)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    if cols is not None:
        s[np.asarray(cols, dtype=np.int64)] = 1.0
    return (1.0 / s).astype(np.float32)


def input_factors(q) -> np.ndarray | None:
    """m ``[K]`` float32 of a planned layer ``q`` (``QuantizedLinear``): 0 on ``act_cols``, ``smooth`` (r) or 1
    elsewhere; None when it is all ones (no Mul in the graph)."""
    cols = q.act_cols if q.act_cols is not None and q.act_cols.size else None
    if cols is None and q.smooth is None:
        return None
    m = np.ones(q.shape[1], np.float32) if q.smooth is None else np.asarray(q.smooth, np.float32).copy()
    if cols is not None:
        m[cols] = 0
    return m


def column_entries(cols: np.ndarray, n_out: int, k_in: int) -> np.ndarray:
    """Flat indices ``i·K + j`` of every entry of the columns ``cols`` of an ``[n_out, k_in]`` weight, sorted."""
    cols = np.asarray(cols, dtype=np.int64)
    return np.sort((np.arange(n_out, dtype=np.int64)[:, None] * k_in + cols[None, :]).reshape(-1))


def dynamic_quantize(x):
    """(u − z as float32 integers, a float32 scalar tensor) of DynamicQuantizeLinear over all of ``x`` (torch)."""
    import torch

    x = x.to(torch.float32)
    zero = torch.zeros((), dtype=torch.float32)
    lo, hi = torch.minimum(x.min(), zero), torch.maximum(x.max(), zero)
    a = torch.where(hi == lo, torch.ones((), dtype=torch.float32), (hi - lo) / ACT_LEVELS)
    z = torch.round(torch.clamp(zero - lo / a, 0, ACT_LEVELS))  # torch.round: half to even
    u = torch.clamp(torch.round(x / a) + z, 0, ACT_LEVELS)
    return u - z, a


def integer_linear(x, q, scales, bias, exact, factors):
    """``y`` of the module docstring (torch): ``q [N, K]`` integer weights (float64 or int), ``scales [N]``,
    ``bias [N]`` or None, ``exact [N, K]`` the FP32 entries (zeros elsewhere), ``factors`` m ``[K]`` (float32
    tensor; None: all ones)."""
    import torch

    xm = x if factors is None else x * factors.to(torch.float32)  # one float32 product, as ONNX's Mul
    xi, a = dynamic_quantize(xm)
    acc = (xi.to(torch.float64) @ q.to(torch.float64).T).to(torch.float32)  # exact: |acc| < 2^31, float64 holds it
    y = acc * (a * scales.to(torch.float32))
    if bias is not None:
        y = y + bias
    return y + x @ exact.T
