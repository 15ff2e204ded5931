"""A model-wide FP32 budget: how many exact entries each Linear gets (``--budget F``).

With quantized Linears l of n_l weights, the budget is ``T = round(F · Σ_l n_l)`` entries in all.
Each layer offers its selection order o_l (the configured ``--method``, the first
``L_l = min(n_l, T)`` entries) and the marginal reductions of its quantization error as the next
entry of o_l is kept exact, on the layer's own grid (``edgeq.quant.grid_error.order_gains``;
weighted by E[x_j²] when calibration statistics are available)::

    δ_l(t) = E_l(t − 1) − E_l(t),     C_l(k) = Σ_{t ≤ k} δ_l(t) = E_l(0) − E_l(k).

We want ``max Σ_l C_l(k_l)`` subject to ``Σ_l k_l = T``, each layer keeping a prefix of its order.
The δ_l are not monotone in general (e.g. by magnitude, a group maximum that already sits on the
grid gains nothing at once but shrinks the scale), so each is replaced by the slopes γ_l of the
least concave majorant of C_l: the decreasing isotonic regression of δ_l (pool adjacent violators,
:func:`concave_slopes`), non-increasing in t and with the same total.  (A running minimum would also
be monotone, but one zero-gain entry early in the order would cap every later gain of the layer.)
Then the T largest γ over all layers are taken (ties: earlier layer, then earlier t): because every
γ_l is non-increasing this takes a prefix of every order, and k_l is that prefix's length.  Where the
C_l are concave (γ = δ) this greedy is the exact optimum of the problem; otherwise it is optimal
for the majorants, whose value matches C_l at the hull vertices.

Pure numpy; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def budget_total(sizes: Mapping[str, int], fraction: float) -> int:
    """``T = round(F · Σ n_l)`` (round half to even), at most ``Σ n_l``."""
    n = int(sum(int(s) for s in sizes.values()))
    return min(n, int(round(float(fraction) * n)))


def concave_slopes(delta: np.ndarray) -> np.ndarray:
    """The non-increasing sequence closest to ``delta`` in least squares (pool adjacent violators).

    Equivalently the slopes of the least concave majorant of the cumulative sums of ``delta``;
    the total is preserved.
    """
    d = np.asarray(delta, dtype=np.float64).reshape(-1)
    if d.size == 0:
        return d.copy()
    sums: list[float] = []  # the pooled blocks, as (sum, count)
    counts: list[int] = []
    for x in d.tolist():
        s, c = x, 1
        while sums and sums[-1] * c < s * counts[-1]:  # previous block's mean < this one's: pool
            s += sums.pop()
            c += counts.pop()
        sums.append(s)
        counts.append(c)
    return np.repeat(np.asarray(sums) / np.asarray(counts), counts)


def allocate(gains: Mapping[str, np.ndarray], total: int) -> dict[str, int]:
    """k per layer: the ``total`` largest concave-majorant slopes over all layers (see the module docstring).

    ``gains``: layer → δ_l along its order (any length L_l; the layer gets at most L_l).
    """
    names = list(gains)
    slopes = [concave_slopes(gains[n]) for n in names]
    avail = sum(s.size for s in slopes)
    if not 0 <= total <= avail:
        raise ValueError(f"a budget of {total} entries does not fit the {avail} the layers offer")
    if total == 0 or not names:
        return {n: 0 for n in names}
    layer = np.concatenate([np.full(s.size, i, np.int64) for i, s in enumerate(slopes)])
    allg = np.concatenate(slopes)
    # layer-major, then t: a stable sort by −γ breaks ties by (layer, t)
    picked = np.argsort(-allg, kind="stable")[:total]
    counts = np.bincount(layer[picked], minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts)}
