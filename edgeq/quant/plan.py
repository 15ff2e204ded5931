"""The quantization plan: which entries of each Linear stay FP32 and the int4 codes of the rest.

For every targeted Linear ``W [N, K]``: score with the configured saliency method, order the flat
indices by decreasing score (one stable sort, ties → lower index: ``selection_order``), take
S = sort(order[:k]) (``k`` clipped to N·K), then ``quantize_rtn(W, S)`` (see ``edgeq.quant.int4``).
One path, ``plan_layer_from_order``: ``plan_layer`` scores and calls it; a sweep calls it with
one order per layer for every k.  The plan is pure data: numpy/torch in, dataclasses out; the ONNX rewrite
and the PyTorch reference both consume it, which is what makes their comparison meaningful.

``--budget F`` (:func:`budget_allocation`, the math in ``edgeq.quant.budget``): instead of one k,
each layer offers its selection order (the first min(N·K, T) entries) with the marginal error
reduction of each next entry on its own grid (``edgeq.quant.grid_error.order_gains``, weighted by
E[x_j²] when calibration statistics are given), and the T = round(F · Σ N·K) best entries model-wide
decide k per layer; the plan's ``budget`` section records them.

``--kernel integer`` plans 8-bit codes on the reduced grid |q| ≤ 63 (``edgeq.quant.int4``,
``reduce_range``); with ``--act-outliers c`` the c input columns of largest calibration max|x_j|
(:func:`edgeq.quant.integer.outlier_columns`) join S whole (S ∪ {(i, j): j ∈ C}) and are recorded
as ``act_cols``: the graph zeroes them before quantizing x and carries them in the FP32 correction.
``--smooth-alpha α`` (:func:`activation_smoothing`): the SmoothQuant factors r = 1/s of each input
(:func:`edgeq.quant.integer.smoothing_factors`; one r for the Linears sharing an input, s from the max
over all their rows); the codes are those of W / r (column-wise), the exact entries W's own, so
``quant.dequantize()`` is Ŵ in the original coordinates.

Per-layer statistics recorded: k, the reconstruction error ``‖W − Ŵ‖²_F`` and that of plain
int4 (k = 0) on the same quantizer, and the number of distinct rows/columns the selection
touches (how concentrated it is).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from edgeq.config import ConvertConfig
from edgeq.quant.budget import allocate, budget_total
from edgeq.quant.grid_error import GridSpec, order_gains
from edgeq.quant.int4 import QuantizedLinear, quantize_rtn
from edgeq.quant.integer import column_entries, outlier_columns, smoothing_factors
from edgeq.saliency import ScoreContext, descending_order, get_method, topk_from_order


@dataclass(frozen=True)
class LayerPlan:
    name: str
    quant: QuantizedLinear
    recon_error: float  # ‖W − Ŵ‖²_F
    recon_error_int4: float  # same quantizer with k = 0
    rows_touched: int
    cols_touched: int

    def stats(self) -> dict:
        n, k_in = self.quant.shape
        return {
            "shape": [n, k_in],
            "k": self.quant.k,
            "block_size": self.quant.block_size,
            "recon_error": self.recon_error,
            "recon_error_int4": self.recon_error_int4,
            "rows_touched": self.rows_touched,
            "cols_touched": self.cols_touched,
        }


@dataclass(frozen=True)
class QuantPlan:
    layers: dict[str, LayerPlan]
    excluded: tuple[str, ...]  # Linears kept FP32 by --exclude
    budget: dict | None = None  # --budget: fraction, totals, k per layer (the report's "budget")

    @property
    def quants(self) -> dict[str, QuantizedLinear]:
        """Layer name → its quantization: what the ONNX rewrite needs of the plan."""
        return {name: lp.quant for name, lp in self.layers.items()}

    @property
    def total_recon_error(self) -> float:
        return float(sum(p.recon_error for p in self.layers.values()))


def grid_spec(name: str, config: ConvertConfig) -> GridSpec:
    """The grid :func:`plan_layer_from_order` quantizes layer ``name`` on (RTN)."""
    bits = config.layer_bits(name)
    return GridSpec(bits, config.grid if bits == 4 else "sym7", config.granularity,
                    config.fp16_scales and bits != 8)


def selection_order(name: str, weight: np.ndarray, config: ConvertConfig, stats=None,
                    limit: int | None = None) -> np.ndarray:
    """Flat indices of ``weight`` by decreasing ``config.method`` score (ties → lower index), the first ``limit``."""
    import torch

    w = np.ascontiguousarray(weight, dtype=np.float32)
    spec = grid_spec(name, config)
    ctx = ScoreContext(layer=name, rank=config.rank, seed=config.seed, stats=stats, percdamp=config.percdamp,
                       bits=spec.bits, grid=spec.grid, granularity=spec.granularity, fp16_scales=spec.fp16_scales)
    return descending_order(get_method(config.method).score(torch.from_numpy(w), ctx), limit)


def activation_weights(stats) -> np.ndarray | None:
    """``a_j = E[x_j²]`` of a Linear's input statistics (``edgeq.model.calib.InputStats``), or None.

    The mse grids weight each weight's squared error by it (``edgeq.quant.grid``); None without
    statistics (or without XᵀX) gives the plain weight error.
    """
    xtx = getattr(stats, "xtx", None)
    if xtx is None or not getattr(stats, "count", 0):
        return None
    return np.asarray(np.diagonal(np.asarray(xtx)), dtype=np.float64) / float(stats.count)


@dataclass(frozen=True)
class Allocation:
    """``--budget``: k per layer, the orders it was computed from, and the report section."""

    ks: dict[str, int]
    orders: dict[str, np.ndarray] = field(repr=False)
    report: dict


def budget_allocation(weights: Mapping[str, np.ndarray], config: ConvertConfig,
                      stats: Mapping[str, object] | None = None) -> Allocation:
    """k per non-excluded Linear for ``config.budget`` (see the module docstring and ``edgeq.quant.budget``)."""
    names = [n for n in weights if not config.is_excluded(n)]
    total = budget_total({n: np.size(weights[n]) for n in names}, config.budget)
    weighted = bool(stats) and all(stats.get(n) is not None for n in names)
    orders, gains, t_score, t_gain = {}, {}, 0.0, 0.0
    for name in names:
        w = np.ascontiguousarray(weights[name], dtype=np.float32)
        st = stats.get(name) if weighted else None
        t0 = time.perf_counter()
        orders[name] = selection_order(name, w, config, st, limit=min(w.size, total)) if total else \
            np.empty(0, np.int64)
        t1 = time.perf_counter()
        a = activation_weights(st) if st is not None else None
        gains[name] = order_gains(w, orders[name], grid_spec(name, config), config.exclude_salient_from_scale, a)
        t_score, t_gain = t_score + t1 - t0, t_gain + time.perf_counter() - t1
    t0 = time.perf_counter()
    ks = allocate(gains, total)
    t_alloc = time.perf_counter() - t0
    report = {"fraction": config.budget, "weights_total": int(sum(np.size(weights[n]) for n in names)),
              "kept_total": int(sum(ks.values())), "weighting": "E[x_j^2]" if weighted else "none",
              "method": config.method, "exclude_salient_from_scale": config.exclude_salient_from_scale,
              "score_s": round(t_score, 3), "gains_s": round(t_gain, 3), "allocate_s": round(t_alloc, 3),
              "k_per_layer": ks}
    return Allocation(ks, orders, report)


def activation_outliers(name: str, n_in: int, config: ConvertConfig, stats=None) -> np.ndarray | None:
    """``--act-outliers`` columns of one Linear from its calibration ``stats`` (None without the option)."""
    if not config.act_outliers:
        return None
    abs_max = getattr(stats, "abs_max", None)
    if abs_max is None:
        raise ValueError(f"{name}: --act-outliers needs calibration statistics with max|x| (--calib)")
    cols = outlier_columns(np.asarray(abs_max, dtype=np.float64), config.act_outliers, config.act_outlier_ratio)
    if cols.size and cols[-1] >= n_in:
        raise ValueError(f"{name}: calibration statistics have {len(abs_max)} columns, the weight {n_in}")
    return cols


def activation_smoothing(weights: Mapping[str, np.ndarray], config: ConvertConfig,
                         stats: Mapping[str, object] | None) -> dict[str, np.ndarray]:
    """``--smooth-alpha``: r per non-excluded Linear (empty without the option); Linears whose calibration
    statistics are one object (they read one tensor: q/k/v) get one r, from the max of all their rows;
    ``--smooth-layers`` leaves the Linears it does not match out."""
    if config.smooth_alpha is None:
        return {}
    groups: dict[int, list[str]] = {}
    for name in weights:
        if config.is_excluded(name) or not config.is_smoothed(name):
            continue
        st = (stats or {}).get(name)
        if getattr(st, "abs_max", None) is None:
            raise ValueError(f"{name}: --smooth-alpha needs calibration statistics with max|x| (--calib)")
        groups.setdefault(id(st), []).append(name)
    out = {}
    for names in groups.values():
        st = stats[names[0]]
        w_max = np.max([np.abs(np.asarray(weights[n], np.float64)).max(axis=0) for n in names], axis=0)
        if w_max.size != len(st.abs_max):
            raise ValueError(f"{names[0]}: calibration statistics have {len(st.abs_max)} columns, "
                             f"the weight {w_max.size}")
        cols = activation_outliers(names[0], w_max.size, config, st)
        r = smoothing_factors(np.asarray(st.abs_max, np.float64), w_max, config.smooth_alpha, cols)
        out.update(dict.fromkeys(names, r))
    return out


def plan_layer_from_order(name: str, weight: np.ndarray, order: np.ndarray, config: ConvertConfig,
                          quantize: Callable[[np.ndarray, np.ndarray], QuantizedLinear] | None = None,
                          k: int | None = None, act: np.ndarray | None = None,
                          act_cols: np.ndarray | None = None, smooth: np.ndarray | None = None) -> LayerPlan:
    """Plan one Linear whose salient set is ``sort(order[:k])``, k (default ``config.k``) clipped to N·K.

    ``order``: a descending selection order of at least k entries (:func:`selection_order`), so one
    order serves every k.  ``quantize(w, idx)`` defaults to RTN (see edgeq.quant.registry) on the
    layer's grid (``ConvertConfig.layer_grid``).  ``k``: this layer's own k (``--budget``:
    :func:`budget_allocation`); ``act``: the mse grids' activation weights; ``act_cols``
    (:func:`activation_outliers`): input columns kept exact whole (integer kernel); ``smooth``
    (:func:`activation_smoothing`): r, the codes quantize W / r and Ŵ = (their part) · r + exact W entries.
    """
    w = np.ascontiguousarray(weight, dtype=np.float32)
    wq = w if smooth is None else (w.astype(np.float64) / smooth.astype(np.float64)[None, :]).astype(np.float32)
    if smooth is not None and act is not None:
        act = act * smooth.astype(np.float64) ** 2  # E[(x_j r_j)²]: what the smoothed columns see
    k = min(config.k if k is None else k, w.size)
    if len(order) < k:
        raise ValueError(f"{name}: the selection order holds {len(order)} entries, fewer than k = {k}")
    idx = topk_from_order(np.asarray(order, dtype=np.int64), k)
    if act_cols is not None:
        idx = np.union1d(idx, column_entries(act_cols, *w.shape)).astype(np.int64)
    bits, grid, fp16 = config.layer_grid(name)
    integer = config.kernel == "integer"  # the reduced 8-bit grid (edgeq.quant.int4 reduce_range)
    if quantize is None:
        quant = quantize_rtn(wq, idx, config.granularity, config.exclude_salient_from_scale,
                             bits=bits, grid=grid, fp16_scales=fp16, act=act, reduce_range=integer)
    else:
        quant = quantize(wq, idx)
    if act_cols is not None:
        quant = replace(quant, act_cols=np.asarray(act_cols, dtype=np.int64))
    base = quantize_rtn(wq, idx[:0], config.granularity, bits=bits, grid=grid, fp16_scales=fp16, act=act,
                        reduce_range=integer)
    if smooth is not None:  # exact entries in W's own coordinates; Ŵ = dequantize() multiplies the codes by r
        r = np.asarray(smooth, np.float32)
        quant = replace(quant, smooth=r, salient_values=w.reshape(-1)[quant.salient_index].copy())
        base = replace(base, smooth=r)
    k_in = w.shape[1]
    return LayerPlan(
        name=name,
        quant=quant,
        recon_error=float(np.sum((w.astype(np.float64) - quant.dequantize()) ** 2)),
        recon_error_int4=float(np.sum((w.astype(np.float64) - base.dequantize()) ** 2)),
        rows_touched=int(np.unique(idx // k_in).size),
        cols_touched=int(np.unique(idx % k_in).size),
    )


def plan_layer(name: str, weight: np.ndarray, config: ConvertConfig, stats=None,
               quantize: Callable[[np.ndarray, np.ndarray], QuantizedLinear] | None = None,
               k: int | None = None, smooth: np.ndarray | None = None) -> LayerPlan:
    """Select the salient entries (scored only when 0 < k < N·K), then :func:`plan_layer_from_order`.

    ``k``: this layer's own k instead of ``config.k`` (``--budget``); ``smooth``: r of the layer's input
    group (:func:`activation_smoothing`; by default, with ``--smooth-alpha``, from this Linear alone)."""
    size = int(np.prod(np.shape(weight)))
    act_cols = activation_outliers(name, int(np.shape(weight)[1]), config, stats)
    k = min(config.k if k is None else k, size)
    if k == 0:
        order = np.empty(0, dtype=np.int64)
    elif k == size:
        order = np.arange(k, dtype=np.int64)
    else:
        order = selection_order(name, weight, config, stats, limit=k)
    if smooth is None and config.is_smoothed(name):
        smooth = activation_smoothing({name: weight}, config, {name: stats})[name]
    return plan_layer_from_order(name, weight, order, config, quantize, k, activation_weights(stats), act_cols,
                                 smooth)


def build_plan(
    weights: Mapping[str, np.ndarray],
    config: ConvertConfig,
    stats: Mapping[str, object] | None = None,
    progress: Callable[[str], None] | None = None,
    orders: Mapping[str, np.ndarray] | None = None,
) -> QuantPlan:
    """Plan every Linear in ``weights`` (name → ``[N, K]``) except those ``--exclude`` keeps FP32.

    ``orders`` (name → :func:`selection_order` of at least k entries) skips the scoring: a sweep
    scores each layer once and plans every k from the same order.  With ``config.budget`` the k of
    each layer comes from :func:`budget_allocation` (and its orders; ``orders`` is then not used).
    """
    method = get_method(config.method)
    if orders is None and method.needs_calibration and not stats:
        raise ValueError(f"--method {config.method} needs calibration data (--calib)")
    layers: dict[str, LayerPlan] = {}
    excluded = []
    alloc = budget_allocation(weights, config, stats) if config.budget is not None else None
    smooth = activation_smoothing(weights, config, stats)
    for name, w in weights.items():
        if config.is_excluded(name):
            excluded.append(name)
            continue
        act = activation_weights((stats or {}).get(name))
        act_cols = activation_outliers(name, int(np.shape(w)[1]), config, (stats or {}).get(name))
        if alloc is not None:
            layers[name] = plan_layer_from_order(name, w, alloc.orders[name], config, k=alloc.ks[name], act=act,
                                                 act_cols=act_cols, smooth=smooth.get(name))
        elif orders is not None:
            layers[name] = plan_layer_from_order(name, w, orders[name], config, act=act, act_cols=act_cols,
                                                 smooth=smooth.get(name))
        else:
            layers[name] = plan_layer(name, w, config, (stats or {}).get(name), smooth=smooth.get(name))
        if progress:
            progress(name)
    return QuantPlan(layers=layers, excluded=tuple(excluded), budget=alloc.report if alloc else None)
