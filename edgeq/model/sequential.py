"""Sequential calibration for the calibrated quantizers (GPTQ, SARQC-GBS/GS, LSI).

ALGORITHMS.md §1.3: quantize transformer block i, then run the *quantized* block i to produce the
inputs of block i+1 (gptq's ``opt_sequential``, OmniQuant).  The Linears outside the blocks (BERT's
pooler, the classification heads) come last, on the inputs of the fully quantized encoder.

Calibration examples (``edgeq.model.calib.load_calibration_texts``: a seeded sample of a GLUE train
split or a file) are split once: the last quarter of the seeded sample is **held out** (for
SARQC's λ choice and LSI's early stopping), the rest fits.  Padding tokens never enter a statistic
or a loss (``edgeq.model.calib`` masks them; the LSI loss is masked).

* ``layer`` quantizers (gptq, sarqc-*): for each block, one streamed pass per split of
  ``edgeq.model.calib.collect_input_stats`` over the partly quantized model gives each Linear's
  H = (2/N) XᵀX on the fitting tokens, on the held-out tokens and on all of them; each Linear is
  then quantized by its registry function and its Ŵ written into the working model.
* ``block`` quantizer (lsi): one FP32 pass records every block's inputs and call arguments; for
  each block, its Linears are wrapped (``edgeq.quant.lsi.LSIWeight``) and trained to reproduce the
  FP32 block output from the quantized-model input (``edgeq.quant.lsi.reconstruct``); the head
  Linears outside the blocks are trained layer-wise on their recorded inputs.

The salient entries of each Linear are picked exactly as for RTN (``edgeq.quant.plan.plan_layer`` with
the configured ``--method``, on the original weight and the one-pass FP32 statistics).
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edgeq.config import ConvertConfig
from edgeq.errors import EdgeqError
from edgeq.quant.registry import LayerContext, get_quantizer, hyperparameters

HOLDOUT_FRACTION = 0.25
HEAD_ROWS_CAP = 8192  # rows kept per head Linear for layer-wise LSI

logger = logging.getLogger(__name__)


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


def find_blocks(model) -> list[str]:
    """Module paths of the transformer blocks: the longest ModuleList whose items hold Linears."""
    import torch

    best: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > len(best):
            if all(any(isinstance(x, torch.nn.Linear) for x in c.modules()) for c in m):
                best = [f"{name}.{i}" for i in range(len(m))]
    return best


def _split(texts: list) -> tuple[list, list]:
    n_ho = int(len(texts) * HOLDOUT_FRACTION) if len(texts) >= 4 else 0
    return (texts[: len(texts) - n_ho], texts[len(texts) - n_ho:]) if n_ho else (texts, [])


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="block", file=sys.stderr, leave=False, disable=not enabled)


def quantize_sequential(
    loaded,
    weights: Mapping[str, np.ndarray],
    config: ConvertConfig,
    texts: list,
    sel_stats: Mapping[str, object] | None = None,
    progress: bool = False,
    batch_size: int = 16,
) -> SequentialResult:
    """Plan every Linear of ``weights`` (except ``--exclude``) with the calibrated ``config.quantizer``."""
    import torch

    from edgeq.model.texts import encode_batches
    from edgeq.quant.plan import QuantPlan

    q = get_quantizer(config.quantizer)
    fit_texts, ho_texts = _split(list(texts))
    fit, ho = (encode_batches(loaded, t, batch_size, order="chars") for t in (fit_texts, ho_texts))
    count = lambda bs: int(sum(int(b["attention_mask"].sum()) for b in bs))  # noqa: E731
    split = {"fit_examples": len(fit_texts), "held_out_examples": len(ho_texts),
             "fit_tokens": count(fit), "held_out_tokens": count(ho)}
    targets = [n for n in weights if not config.is_excluded(n)]
    excluded = tuple(n for n in weights if config.is_excluded(n))
    work = copy.deepcopy(loaded.model).eval()
    work.requires_grad_(False)
    blocks = find_blocks(work)
    groups = [(p, [n for n in targets if n.startswith(p + ".")]) for p in blocks]
    in_blocks = {n for _, ns in groups for n in ns}
    groups.append(("heads", [n for n in targets if n not in in_blocks]))
    runner = _run_layerwise if q.kind == "layer" else _run_lsi
    with torch.inference_mode(False):
        plans, info, timings = runner(work, weights, config, groups, fit, ho, sel_stats or {}, progress)
    ordered = {n: plans[n] for n in targets}
    return SequentialResult(QuantPlan(layers=ordered, excluded=excluded), {n: info[n] for n in targets},
                            {k: round(v, 3) for k, v in timings.items()}, split)


def _plan(name, w, config, stats, quantize):
    from edgeq.quant.plan import plan_layer

    return plan_layer(name, w, config, stats, quantize=quantize)


def _set_weight(model, name: str, w: np.ndarray) -> None:
    import torch

    mod = dict(model.named_modules())[name]
    mod.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))


# --------------------------------------------------------------------------- gptq / sarqc


def _hessians(sf, sh, name):
    """(H over all tokens, H over fitting tokens, H over held-out tokens) of one Linear."""
    a = sf[name]
    b = sh[name] if sh else None
    h_fit = a.hessian()
    if b is None:
        return h_fit, h_fit, h_fit
    h_all = (a.xtx + b.xtx) * (2.0 / max(a.count + b.count, 1))
    return h_all, h_fit, b.hessian()


def _block_stats(block, names, prefix, xs, args, masks):
    """Input statistics (edgeq.model.calib's InputStats, XᵀX) of the Linears ``names`` of one block."""
    import torch

    from edgeq.model.calib import InputStats, accumulate, masked_rows

    mods = dict(block.named_modules())
    stats: dict = {}
    cur = {"mask": None}

    def hook(n):
        def h(module, a):
            x = a[0]
            if n not in stats:
                stats[n] = InputStats(n_features=int(x.shape[-1]), layers=[n])
            accumulate(stats[n], masked_rows(x, cur["mask"]))
        return h

    hs = [mods[n[len(prefix) + 1:]].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for x, (a, kw), m in zip(xs, args, masks):
                cur["mask"] = m
                _call_block(block, x, a, kw)
    finally:
        for h in hs:
            h.remove()
    return stats


def _run_layerwise(work, weights, config, groups, fit, ho, sel_stats, progress):
    import torch

    from edgeq.model.calib import collect_input_stats

    q = get_quantizer(config.quantizer)
    plans, info = {}, {}
    t = {"capture": 0.0, "collect": 0.0, "quantize": 0.0, "propagate": 0.0}
    blocks = [p for p, _ in groups[:-1]]
    batches = fit + ho
    t0 = time.perf_counter()
    rec = _capture(work, blocks[:1], batches, stop=True) if blocks else []
    t["capture"] = time.perf_counter() - t0
    xq = [r[0][0] for r in rec]
    args = [r[0][1:] for r in rec]
    masks = [torch.from_numpy(b["attention_mask"]) for b in batches]
    nf = len(fit)
    mods = dict(work.named_modules())
    bar = _bar(len(groups), f"{config.quantizer}", progress)
    for prefix, names in groups:
        t0 = time.perf_counter()
        if prefix == "heads":
            if not names:
                bar.update(1)
                continue
            sf = collect_input_stats(work, fit, names)
            sh = collect_input_stats(work, ho, names) if ho else None
        else:
            block = mods[prefix]
            sf = _block_stats(block, names, prefix, xq[:nf], args[:nf], masks[:nf])
            sh = _block_stats(block, names, prefix, xq[nf:], args[nf:], masks[nf:]) if ho else None
        t1 = time.perf_counter()
        for name in names:
            h_all, h_fit, h_ho = _hessians(sf, sh, name)
            ctx = LayerContext(name, h_all.numpy(), h_fit.numpy(), h_ho.numpy())
            extra: dict = {}

            def quantize(w, idx, _ctx=ctx, _extra=extra):
                quant, inf = q.fn(w, idx, config, _ctx)
                _extra.update(inf)
                return quant

            plans[name] = _plan(name, weights[name], config, sel_stats.get(name), quantize)
            info[name] = extra
            _set_weight(work, name, plans[name].quant.dequantize())
        t2 = time.perf_counter()
        if prefix != "heads":
            with torch.no_grad():
                xq = [_call_block(block, xq[b], *args[b]) for b in range(len(batches))]
        t3 = time.perf_counter()
        t["collect"] += t1 - t0
        t["quantize"] += t2 - t1
        t["propagate"] += t3 - t2
        t[f"block:{prefix}"] = t3 - t0
        logger.info(f"{config.quantizer} {prefix}: {len(names)} Linears in {t3 - t0:.1f} s")
        bar.update(1)
    bar.close()
    return plans, info, t


# --------------------------------------------------------------------------- lsi


class _Stop(Exception):
    pass


def _capture(model, blocks: list[str], batches, stop: bool = False):
    """Per batch: every block's (hidden input, other args, kwargs) and the last block's output.

    With ``stop`` only the first block's inputs are recorded and the forward pass ends there.
    """
    import torch

    mods = dict(model.named_modules())
    rec: list[dict] = []
    cur: dict = {}

    def pre(i):
        def hook(module, args, kwargs):
            cur[i] = (args[0].detach(), args[1:], dict(kwargs))
            if stop:
                raise _Stop
        return hook

    def post(module, args, output):
        cur["out"] = (output[0] if isinstance(output, tuple) else output).detach()

    hs = [mods[p].register_forward_pre_hook(pre(i), with_kwargs=True) for i, p in enumerate(blocks)]
    hs.append(mods[blocks[-1]].register_forward_hook(post))
    try:
        with torch.no_grad():
            for b in batches:
                cur = {}
                try:
                    model(**{k: torch.from_numpy(v) for k, v in b.items()})
                except _Stop:
                    pass
                rec.append(cur)
    finally:
        for h in hs:
            h.remove()
    return rec


def _call_block(block, x, args, kwargs, overrides=None):
    from torch.func import functional_call

    out = functional_call(block, overrides or {}, (x, *args), kwargs) if overrides else block(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _lsi_wrappers(names, weights, config, sel_stats, prefix_len):
    from edgeq.quant.int4 import quantize_rtn
    from edgeq.quant.lsi import LSIWeight

    wr, idxs = {}, {}
    for name in names:
        def grab(w, idx, _n=name):
            idxs[_n] = idx
            return quantize_rtn(w, idx, config.granularity, config.exclude_salient_from_scale)

        _plan(name, weights[name], config, sel_stats.get(name), grab)  # the salient selection only
        w = weights[name]
        mask = np.zeros(w.size, dtype=bool)
        mask[idxs[name]] = True
        wr[name] = LSIWeight(w, mask.reshape(w.shape), config.granularity, config.lsi_rank,
                             config.exclude_salient_from_scale)
    return wr


def _finish(names, wr, weights, config, sel_stats, res, work, plans, info):
    for name in names:
        exported = wr[name].export()
        plans[name] = _plan(name, weights[name], config, sel_stats.get(name), lambda w, idx, _q=exported: _q)
        d = wr[name].delta
        info[name] = {"held_out_mse_init": res.held_out_init, "held_out_mse_best": res.held_out_best,
                      "best_epoch": res.best_epoch, "steps": res.steps,
                      "clip_mean": float(np.mean(_sig(wr[name].lwc_up))),
                      "delta_abs_max": float(d.detach().abs().max()) if d is not None else 0.0}
        _set_weight(work, name, plans[name].quant.dequantize())


def _sig(p):
    import torch

    return torch.sigmoid(p.detach()).numpy()


def _run_lsi(work, weights, config, groups, fit, ho, sel_stats, progress):
    import torch

    from edgeq.model.calib import masked_rows
    from edgeq.quant.lsi import reconstruct

    torch.manual_seed(config.seed)
    plans, info = {}, {}
    t = {"capture": 0.0, "train": 0.0, "propagate": 0.0}
    blocks = [p for p, _ in groups[:-1]]
    batches = fit + ho
    t0 = time.perf_counter()
    rec = _capture(work, blocks, batches) if blocks else []
    t["capture"] += time.perf_counter() - t0
    masks = [torch.from_numpy(b["attention_mask"]) for b in batches]
    xq = [r[0][0] for r in rec]
    mods = dict(work.named_modules())
    bar = _bar(len(groups), "lsi", progress)
    for i, (prefix, names) in enumerate(groups[:-1]):
        t0 = time.perf_counter()
        block = mods[prefix]
        tgt = [rec[b][i + 1][0] if i + 1 < len(blocks) else rec[b]["out"] for b in range(len(batches))]
        args = [rec[b][i][1:] for b in range(len(batches))]
        wr = _lsi_wrappers(names, weights, config, sel_stats, len(prefix) + 1)
        rel = {n: n[len(prefix) + 1:] + ".weight" for n in names}

        def fwd(x, ws, _a=None):
            a, kw = x[1]
            return _call_block(block, x[0], a, kw, {rel[n]: w for n, w in ws.items()})

        data = [((xq[b], args[b]), tgt[b], masks[b]) for b in range(len(batches))]
        res = reconstruct(fwd, wr, data[: len(fit)], data[len(fit):], config.lsi_epochs, config.lwc_lr,
                          config.lsi_lr)
        t1 = time.perf_counter()
        _finish(names, wr, weights, config, sel_stats, res, work, plans, info)
        with torch.no_grad():
            xq = [_call_block(block, xq[b], *args[b]) for b in range(len(batches))]
        t2 = time.perf_counter()
        t["train"] += t1 - t0
        t["propagate"] += t2 - t1
        t[f"block:{prefix}"] = t2 - t0
        logger.info(f"lsi {prefix}: held-out block MSE {res.held_out_init:.4g} -> {res.held_out_best:.4g} "
            f"(epoch {res.best_epoch}, {res.steps} steps) in {t2 - t0:.1f} s")
        bar.update(1)
    heads = groups[-1][1]
    if heads:
        t0 = time.perf_counter()
        rows = _head_inputs(work, heads, batches, masked_rows)
        for name in heads:
            wr = _lsi_wrappers([name], weights, config, sel_stats, 0)
            bias = mods[name].bias
            x_all = rows[name]
            y_all = torch.nn.functional.linear(x_all, torch.from_numpy(weights[name]), bias)
            n_ho = int(len(x_all) * HOLDOUT_FRACTION) if len(x_all) >= 4 else 0
            chunks = [(x_all[j:j + 64], y_all[j:j + 64], None) for j in range(0, len(x_all) - n_ho, 64)]
            held = [(x_all[len(x_all) - n_ho:], y_all[len(x_all) - n_ho:], None)] if n_ho else []

            def fwd(x, ws, _n=name, _b=bias):
                return torch.nn.functional.linear(x, ws[_n], _b)

            res = reconstruct(fwd, wr, chunks, held, config.lsi_epochs, config.lwc_lr, config.lsi_lr)
            _finish([name], wr, weights, config, sel_stats, res, work, plans, info)
        t["train"] += time.perf_counter() - t0
        t["block:heads"] = time.perf_counter() - t0
        logger.info(f"lsi heads: {len(heads)} Linears in {time.perf_counter() - t0:.1f} s")
    bar.update(1)
    bar.close()
    return plans, info, t


def _head_inputs(model, names, batches, masked_rows):
    """Non-padding input rows of each head Linear (the model carries the quantized blocks)."""
    import torch

    mods = dict(model.named_modules())
    rows: dict[str, list] = {n: [] for n in names}
    state = {"mask": None}

    def hook(n):
        def h(module, args):
            rows[n].append(masked_rows(args[0].detach(), state["mask"]))
        return h

    hs = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                feed = {k: torch.from_numpy(v) for k, v in b.items()}
                state["mask"] = feed["attention_mask"]
                model(**feed)
    finally:
        for h in hs:
            h.remove()
    out = {}
    for n in names:
        if not rows[n]:
            raise EdgeqError(f"Linear {n} was never called during calibration; exclude it with --exclude")
        out[n] = torch.cat(rows[n])[:HEAD_ROWS_CAP]
    return out


def run_quantizer(loaded, weights, config: ConvertConfig, calibration=None, progress: bool = False):
    """``edgeq convert``'s entry point: (QuantPlan, the report's "quantizer" section)."""
    from edgeq.model.calib import load_calibration_texts

    t0 = time.perf_counter()
    ct = load_calibration_texts(config.calib, config.calib_samples, config.seed, config.data_dir)
    res = quantize_sequential(loaded, weights, config, ct.texts, calibration.stats if calibration else None,
                              progress)
    res.timings_s["total"] = round(time.perf_counter() - t0, 3)
    src = {"source": ct.source, "samples": len(ct.texts), "available": ct.available, "seed": ct.seed}
    return res.plan, res.report(config, src)


def rtn_report(config: ConvertConfig) -> dict:
    return {"name": config.quantizer, "hyperparameters": hyperparameters(config), "calibration": None}
