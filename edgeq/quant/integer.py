"""The integer kernel's arithmetic (``--kernel integer``): dynamic uint8 activations × int8 weights.

A Linear ``y = x Ŵᵀ + b`` with the plan's 8-bit codes ``c_ij = q_ij + 128`` (|q_ij| ≤ 63, one
scale ``s_i`` per output channel, ``edgeq.quant.int4`` with ``reduce_range``), the exact entries S
and the activation-outlier columns C (every entry of a column in C is in S) runs as::

    x'      = x ⊙ m,  m_j = 0 for j ∈ C else 1                         # outlier columns out of the int8 path
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

:func:`outlier_columns` picks C from the calibration statistics (max |x_j| per input column; the
c largest, optionally only those ≥ ratio × the median column's);
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


def integer_linear(x, q, scales, bias, exact, act_cols):
    """``y`` of the module docstring (torch): ``q [N, K]`` integer weights (float64 or int), ``scales [N]``,
    ``bias [N]`` or None, ``exact [N, K]`` the FP32 entries (zeros elsewhere), ``act_cols`` C (LongTensor)."""
    import torch

    xm = x
    if act_cols is not None and act_cols.numel():
        xm = x.clone()
        xm[..., act_cols] = 0
    xi, a = dynamic_quantize(xm)
    acc = (xi.to(torch.float64) @ q.to(torch.float64).T).to(torch.float32)  # exact: |acc| < 2^31, float64 holds it
    y = acc * (a * scales.to(torch.float32))
    if bias is not None:
        y = y + bias
    return y + x @ exact.T
