"""Sequential calibration for the calibrated quantizers (GPTQ, SARQC-GBS/GS, LSI).

ALGORITHMS.md §1.3: quantize transformer block i, then run the *quantized* block i to produce the
inputs of block i+1 (gptq's ``opt_sequential``, OmniQuant).  The Linears outside the blocks (BERT's
pooler, the classification heads) come last, on the inputs of the fully quantized encoder.

Calibration examples (``edgeq.model.calib.load_calibration_texts``: a seeded sample of a GLUE train
split or a file) are split once: the last quarter of the seeded sample is **held out** (for
SARQC's λ choice and LSI's early stopping), the rest fits.  Padding tokens never enter a statistic
or a loss (``edgeq.model.calib`` masks them; the LSI loss is masked).

* ``layer`` quantizers (gptq, sarqc-*), :mod:`edgeq.model.sequential.layerwise`: for each block,
  one streamed pass per split over the partly quantized model gives each Linear's H = (2/N) XᵀX
  on the fitting tokens, on the held-out tokens and on all of them; each Linear is then quantized
  by its registry function and its Ŵ written into the working model.
* ``block`` quantizer (lsi), :mod:`edgeq.model.sequential.reconstruct`: one FP32 pass records every
  block's inputs and call arguments; for each block, its Linears are wrapped
  (``edgeq.quant.lsi.LSIWeight``) and trained to reproduce the FP32 block output from the
  quantized-model input (``edgeq.quant.lsi.reconstruct``); the head Linears outside the blocks are
  trained layer-wise on their recorded inputs.

Both drive the model through :mod:`edgeq.model.sequential.blocks` (find, record and call blocks).
This module splits the calibration text, groups the Linears by block and dispatches
(:func:`quantize_sequential`); :func:`run_quantizer` is ``edgeq convert``'s entry point.

The salient entries of each Linear are picked exactly as for RTN (``edgeq.quant.plan.plan_layer`` with
the configured ``--method``, on the original weight and the one-pass FP32 statistics); with
``--budget`` the k of each Linear comes from ``edgeq.quant.plan.budget_allocation`` on the same, before
any block is quantized (the allocation measures RTN error on the layer's grid, the proxy for every
quantizer).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edgeq.config import ConvertConfig
from edgeq.model.calib import CALIB_BATCH_SIZE, load_calibration_texts
from edgeq.model.sequential.blocks import HOLDOUT_FRACTION, find_blocks, held_out_count
from edgeq.model.sequential.layerwise import run_layerwise
from edgeq.model.sequential.reconstruct import run_lsi
from edgeq.model.texts import encode_batches
from edgeq.quant.plan import QuantPlan, budget_allocation
from edgeq.quant.registry import get_quantizer, hyperparameters

__all__ = ["HOLDOUT_FRACTION", "SequentialResult", "find_blocks", "quantize_sequential", "run_quantizer"]


@dataclass
class SequentialResult:
    plan: object  # edgeq.quant.plan.QuantPlan
    layers: dict[str, dict]  # quantizer info per Linear (λ, held-out errors, ...)
    timings_s: dict[str, float] = field(default_factory=dict)
    split: dict = field(default_factory=dict)

    def report(self, config: ConvertConfig, calibration: dict) -> dict:
        return {"name": config.quantizer, "hyperparameters": hyperparameters(config),
                "calibration": {**calibration, **self.split}, "timings_s": self.timings_s,
                "layers": self.layers}


def _split(texts: list) -> tuple[list, list]:
    """(fitting, held-out) examples: the held-out ones are the last quarter."""
    n_ho = held_out_count(len(texts))
    return (texts[: len(texts) - n_ho], texts[len(texts) - n_ho:]) if n_ho else (texts, [])


def _tokens(batches) -> int:
    return int(sum(int(b["attention_mask"].sum()) for b in batches))


def quantize_sequential(
    loaded,
    weights: Mapping[str, np.ndarray],
    config: ConvertConfig,
    texts: list,
    sel_stats: Mapping[str, object] | None = None,
    progress: bool = False,
    batch_size: int = CALIB_BATCH_SIZE,
) -> SequentialResult:
    """Plan every Linear of ``weights`` (except ``--exclude``) with the calibrated ``config.quantizer``."""
    import torch

    q = get_quantizer(config.quantizer)
    fit_texts, ho_texts = _split(list(texts))
    fit, ho = (encode_batches(loaded, t, batch_size, order="chars") for t in (fit_texts, ho_texts))
    split = {"fit_examples": len(fit_texts), "held_out_examples": len(ho_texts),
             "fit_tokens": _tokens(fit), "held_out_tokens": _tokens(ho)}
    targets = [n for n in weights if not config.is_excluded(n)]
    excluded = tuple(n for n in weights if config.is_excluded(n))
    work = copy.deepcopy(loaded.model).eval()
    work.requires_grad_(False)
    blocks = find_blocks(work)
    groups = [(p, [n for n in targets if n.startswith(p + ".")]) for p in blocks]
    in_blocks = {n for _, ns in groups for n in ns}
    groups.append(("heads", [n for n in targets if n not in in_blocks]))
    runner = run_layerwise if q.kind == "layer" else run_lsi
    alloc = budget_allocation(weights, config, sel_stats) if config.budget is not None else None
    with torch.inference_mode(False):
        plans, info, timings = runner(work, weights, config, groups, fit, ho, sel_stats or {}, progress,
                                      alloc.ks if alloc else None)
    ordered = {n: plans[n] for n in targets}
    plan = QuantPlan(layers=ordered, excluded=excluded, budget=alloc.report if alloc else None)
    return SequentialResult(plan, {n: info[n] for n in targets},
                            {k: round(v, 3) for k, v in timings.items()}, split)


def run_quantizer(loaded, weights, config: ConvertConfig, calibration=None, progress: bool = False):
    """``edgeq convert``'s entry point: (QuantPlan, the report's "quantizer" section)."""
    t0 = time.perf_counter()
    ct = load_calibration_texts(config.calib, config.calib_samples, config.seed, config.data_dir)
    res = quantize_sequential(loaded, weights, config, ct.texts, calibration.stats if calibration else None,
                              progress)
    res.timings_s["total"] = round(time.perf_counter() - t0, 3)
    src = {"source": ct.source, "samples": len(ct.texts), "available": ct.available, "seed": ct.seed}
    return res.plan, res.report(config, src)
