"""The one registry of int4 quantizers; the CLI's ``--quantizer`` choices come from here.

A quantizer decides the int4 codes and scales of the weights that are *not* among the k salient
entries (``--method`` picks those).  Every quantizer returns an ``edgeq.quant.int4.QuantizedLinear``
(codes 1..15, zero point 8, float32 scales in the MatMulNBits layout of the configured
granularity, the salient flat indices and their FP32 values), so the same MatMulNBits export and
plan-parity validation carry all of them unchanged.

``kind`` says how the quantizer is driven:

* ``"layer"`` — ``fn(w [N, K], salient_index, config, ctx) → (QuantizedLinear, info dict)``, one
  Linear at a time; ``ctx`` (a :class:`LayerContext`) holds the layer's calibration Hessians.
* ``"block"`` — block-wise reconstruction (LSI), driven by ``edgeq.model.sequential``.

Heavy imports are lazy (``edgeq --help`` must not import torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LAMBDA_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)  # --sarqc-lambda auto (ALGORITHMS.md §10.2)
GRID_QUANTIZERS = ("rtn", "gptq", "sarqc-gbs")  # take any --bits/--grid and float16 scales (edgeq.quant.grid)
SARQC_SALIENCY = ("svd", "magnitude", "hessian", "uniform")


@dataclass(frozen=True)
class LayerContext:
    """Calibration of one Linear's input, collected sequentially (float64 torch tensors)."""

    layer: str
    hessian: Any = None  # H = (2/N) XᵀX over all calibration tokens
    hessian_fit: Any = None  # over the fitting tokens (λ selection)
    hessian_holdout: Any = None  # over the held-out tokens (λ selection)


QuantizeFn = Callable[..., tuple]


@dataclass(frozen=True)
class Quantizer:
    name: str
    fn: QuantizeFn | None
    kind: str  # "layer" or "block"
    needs_calibration: bool
    summary: str
    options: tuple[str, ...]  # ConvertConfig fields that are this quantizer's hyper-parameters


QUANTIZERS: dict[str, Quantizer] = {}


def register(name: str, summary: str, needs_calibration: bool, kind: str = "layer",
             options: tuple[str, ...] = ()) -> Callable[[QuantizeFn], QuantizeFn]:
    def decorator(fn: QuantizeFn) -> QuantizeFn:
        if name in QUANTIZERS:
            raise ValueError(f"quantizer {name!r} registered twice")
        QUANTIZERS[name] = Quantizer(name, fn, kind, needs_calibration, summary, options)
        return fn

    return decorator


def get_quantizer(name: str) -> Quantizer:
    try:
        return QUANTIZERS[name]
    except KeyError:
        raise ValueError(f"unknown --quantizer {name!r}; choose from {', '.join(QUANTIZERS)}") from None


def parse_lambda(text) -> float | None:
    """``--sarqc-lambda``: a float ≥ 0, or ``auto`` (None: chosen per layer from LAMBDA_GRID)."""
    s = str(text).strip().lower()
    if s == "auto":
        return None
    try:
        v = float(s)
    except ValueError:
        raise ValueError(f"--sarqc-lambda must be a number >= 0 or 'auto', got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise ValueError(f"--sarqc-lambda must be a finite number >= 0 or 'auto', got {text!r}")
    return v


def hyperparameters(config) -> dict:
    """The hyper-parameters of ``config.quantizer`` (for the report)."""
    q = get_quantizer(config.quantizer)
    return {o: getattr(config, o) for o in q.options}


# --------------------------------------------------------------------------- the quantizers


def _grid_kwargs(config, ctx) -> dict:
    """``grid``/``fp16_scales`` of the layer of ``ctx`` under ``config`` (``ConvertConfig.layer_grid``)."""
    from edgeq.quant.grid import GridSpec

    bits, grid, fp16 = config.layer_grid(ctx.layer if ctx is not None else "")
    return {"grid": GridSpec.make(bits, grid), "fp16_scales": fp16}


def _rtn_of(w, idx, config, ctx):
    from edgeq.quant.int4 import quantize_rtn

    bits, grid, fp16 = config.layer_grid(ctx.layer if ctx is not None else "")
    return quantize_rtn(w, idx, config.granularity, config.exclude_salient_from_scale, bits=bits, grid=grid,
                        fp16_scales=fp16)


@register("rtn", "round-to-nearest Q4-sym-7 (data-free; the default)", needs_calibration=False)
def _rtn(w, idx, config, ctx=None):
    return _rtn_of(w, idx, config, ctx), {}


@register("gptq", "GPTQ error compensation, salient mask inside the loop (calibration)",
          needs_calibration=True, options=("percdamp",))
def _gptq(w, idx, config, ctx):
    from edgeq.quant.gptq import gptq_quantize

    res = gptq_quantize(w, ctx.hessian, idx, config.granularity, config.exclude_salient_from_scale,
                        config.percdamp, **_grid_kwargs(config, ctx))
    return res.quant, {"salient_compensation_max_abs": res.compensated_max_shift}


def _relative_output_error(w, quant, h) -> float:
    """tr(E H Eᵀ) / tr(W H Wᵀ), E = W − Ŵ: the relative layer-output error on the tokens of H."""
    import numpy as np

    h = np.asarray(h, dtype=np.float64)
    w64 = np.asarray(w, dtype=np.float64)
    e = w64 - quant.dequantize().astype(np.float64)
    den = float(np.sum((w64 @ h) * w64))
    return float(np.sum((e @ h) * e)) / den if den > 0 else 0.0


def _sarqc(w, idx, config, ctx, run) -> tuple:
    """Shared by GBS and GS: saliency, then a fixed λ or the held-out choice over LAMBDA_GRID."""
    import numpy as np

    from edgeq.quant.sarqc import element_saliency

    mask = np.zeros(w.size, dtype=bool)
    mask[np.asarray(idx, dtype=np.int64)] = True
    mask = mask.reshape(w.shape)
    hdiag = np.diag(np.asarray(ctx.hessian, dtype=np.float64))
    sal = element_saliency(w, config.sarqc_saliency, mask, config.rank, hdiag)
    lam = parse_lambda(config.sarqc_lambda)
    info: dict = {"saliency": config.sarqc_saliency}
    if lam is None:
        errs = {}
        for cand in LAMBDA_GRID:
            q, _ = run(w, ctx.hessian_fit, idx, cand, sal, mask)
            errs[cand] = _relative_output_error(w, q, ctx.hessian_holdout)
        lam = min(LAMBDA_GRID, key=lambda c: (errs[c], -c))  # ties: the stronger regularisation
        info["lambda_held_out_rel_error"] = {str(c): errs[c] for c in LAMBDA_GRID}
        rtn = _rtn_of(w, idx, config, ctx)
        info["rtn_held_out_rel_error"] = _relative_output_error(w, rtn, ctx.hessian_holdout)
        info["lambda_auto"] = True
    quant, extra = run(w, ctx.hessian, idx, lam, sal, mask)
    info["lambda"] = lam
    info.update(extra)
    return quant, info


@register("sarqc-gbs", "SARQC Gram-based: GPTQ on H + 2λ·mean(diag H)·diag(d) (calibration)",
          needs_calibration=True, options=("sarqc_lambda", "sarqc_saliency", "percdamp"))
def _sarqc_gbs(w, idx, config, ctx):
    from edgeq.quant.gptq import sarqc_gbs
    from edgeq.quant.sarqc import column_saliency

    def run(w, h, idx, lam, sal, mask):
        res = sarqc_gbs(w, h, idx, config.granularity, lam, column_saliency(sal, mask),
                        config.exclude_salient_from_scale, config.percdamp, **_grid_kwargs(config, ctx))
        return res.quant, {"salient_compensation_max_abs": res.compensated_max_shift}

    return _sarqc(w, idx, config, ctx, run)


@register("sarqc-gs", "SARQC scale search: per-group clip ratio, output error + λ·saliency deviation (calibration)",
          needs_calibration=True, options=("sarqc_lambda", "sarqc_saliency"))
def _sarqc_gs(w, idx, config, ctx):
    import numpy as np

    from edgeq.quant.sarqc import sarqc_gs

    def run(w, h, idx, lam, sal, mask):
        q, ratio = sarqc_gs(w, h, idx, config.granularity, lam, sal, config.exclude_salient_from_scale)
        return q, {"clip_ratio_mean": float(np.mean(ratio)), "clip_ratio_min": float(np.min(ratio))}

    return _sarqc(w, idx, config, ctx, run)


register("lsi",
         "LSI: learnable singular-value increments + learnable clipping, block-wise reconstruction (calibration)",
         needs_calibration=True, kind="block",
         options=("lsi_epochs", "lsi_rank", "lsi_lr", "lwc_lr"))(None)


def check_options(config) -> None:
    """Validate the quantizer fields of a ConvertConfig (ValueError with a one-line fix)."""
    q = get_quantizer(config.quantizer)
    if q.needs_calibration and not config.calib:
        raise ValueError(f"--quantizer {q.name} needs calibration data; pass --calib TASK_OR_FILE (e.g. --calib rte)")
    parse_lambda(config.sarqc_lambda)
    if config.sarqc_saliency not in SARQC_SALIENCY:
        raise ValueError(f"--sarqc-saliency must be one of {', '.join(SARQC_SALIENCY)}, got {config.sarqc_saliency!r}")
    for opt in ("lsi_epochs", "lsi_rank"):
        v = getattr(config, opt)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"--{opt.replace('_', '-')} must be a non-negative integer, got {v!r}")
    for opt in ("lsi_lr", "lwc_lr"):
        v = getattr(config, opt)
        if not (isinstance(v, (int, float)) and 0 <= v < float("inf")):
            raise ValueError(f"--{opt.replace('_', '-')} must be a finite number >= 0, got {v!r}")
    if q.name not in GRID_QUANTIZERS:
        if getattr(config, "bits", 4) != 4:
            raise ValueError(f"--quantizer {q.name} produces int4 codes only; use --bits 4 or --quantizer "
                             f"{'/'.join(GRID_QUANTIZERS)}")
        if getattr(config, "grid", "sym7") != "sym7":
            raise ValueError(f"--grid {config.grid} is not implemented for --quantizer {q.name}; use --grid sym7 "
                             f"or --quantizer {'/'.join(GRID_QUANTIZERS)}")
