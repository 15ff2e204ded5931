"""Sequential drive of the ``block`` quantizer (LSI): block output reconstruction.

One FP32 pass records every block's inputs and call arguments (and so each block's FP32 output,
the next block's input).  For each block in order, its Linears are wrapped
(``edgeq.quant.lsi.LSIWeight``: RTN codes plus trained rounding offsets, clipping and a low-rank
term) and trained (``edgeq.quant.lsi.reconstruct``) to reproduce the FP32 block output from the
*quantized* model's input to that block, with a padding-masked loss, early-stopped on the held-out
batches; the exported Ŵ are written into the working model, which then gives the next block its
inputs.  The Linears outside the blocks (pooler, classifier) are trained layer-wise on their
recorded input rows (at most :data:`HEAD_ROWS_CAP`, the last quarter held out).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.model.calib import masked_rows
from edgeq.model.sequential.blocks import (
    call_block,
    capture,
    held_out_count,
    progress_bar,
    set_weight,
)
from edgeq.quant.int4 import quantize_rtn
from edgeq.quant.plan import plan_layer

HEAD_ROWS_CAP = 8192  # rows kept per head Linear for layer-wise LSI
HEAD_CHUNK = 64  # rows per training step of a head Linear

logger = logging.getLogger(__name__)


def _wrappers(names, weights, config, sel_stats, ks=None):
    """An ``LSIWeight`` per Linear, its salient entries picked exactly as the plan will pick them."""
    from edgeq.quant.lsi import LSIWeight

    wr, idxs = {}, {}
    for name in names:
        def grab(w, idx, _n=name):
            idxs[_n] = idx
            return quantize_rtn(w, idx, config.granularity, config.exclude_salient_from_scale)

        plan_layer(name, weights[name], config, sel_stats.get(name), quantize=grab,  # the salient selection only
                   k=ks[name] if ks else None)
        w = weights[name]
        mask = np.zeros(w.size, dtype=bool)
        mask[idxs[name]] = True
        wr[name] = LSIWeight(w, mask.reshape(w.shape), config.granularity, config.lsi_rank,
                             config.exclude_salient_from_scale)
    return wr


def _finish(names, wr, weights, config, sel_stats, res, work, plans, info, ks=None):
    """Plan each trained Linear with its exported Ŵ, record its training info, write Ŵ into ``work``."""
    import torch

    for name in names:
        exported = wr[name].export()
        plans[name] = plan_layer(name, weights[name], config, sel_stats.get(name),
                                 quantize=lambda w, idx, _q=exported: _q, k=ks[name] if ks else None)
        d = wr[name].delta
        info[name] = {"held_out_mse_init": res.held_out_init, "held_out_mse_best": res.held_out_best,
                      "best_epoch": res.best_epoch, "steps": res.steps,
                      "clip_mean": float(np.mean(torch.sigmoid(wr[name].lwc_up.detach()).numpy())),
                      "delta_abs_max": float(d.detach().abs().max()) if d is not None else 0.0}
        set_weight(work, name, plans[name].quant.dequantize())


def run_lsi(work, weights, config, groups, fit, ho, sel_stats, progress, ks=None):
    """(plans, per-Linear info, timings) of LSI over ``groups`` (blocks, then ``"heads"``); see the module doc.

    ``ks``: k per Linear (``--budget``) instead of ``config.k``."""
    import torch

    from edgeq.quant.lsi import reconstruct

    torch.manual_seed(config.seed)
    plans, info = {}, {}
    t = {"capture": 0.0, "train": 0.0, "propagate": 0.0}
    blocks = [p for p, _ in groups[:-1]]
    batches = fit + ho
    t0 = time.perf_counter()
    rec = capture(work, blocks, batches) if blocks else []
    t["capture"] += time.perf_counter() - t0
    masks = [torch.from_numpy(b["attention_mask"]) for b in batches]
    xq = [r[0][0] for r in rec]
    mods = dict(work.named_modules())
    bar = progress_bar(len(groups), "lsi", progress)
    for i, (prefix, names) in enumerate(groups[:-1]):
        t0 = time.perf_counter()
        block = mods[prefix]
        tgt = [rec[b][i + 1][0] if i + 1 < len(blocks) else rec[b]["out"] for b in range(len(batches))]
        args = [rec[b][i][1:] for b in range(len(batches))]
        wr = _wrappers(names, weights, config, sel_stats, ks)
        rel = {n: n[len(prefix) + 1:] + ".weight" for n in names}

        def fwd(x, ws, _block=block, _rel=rel):
            a, kw = x[1]
            return call_block(_block, x[0], a, kw, {_rel[n]: w for n, w in ws.items()})

        data = [((xq[b], args[b]), tgt[b], masks[b]) for b in range(len(batches))]
        res = reconstruct(fwd, wr, data[: len(fit)], data[len(fit):], config.lsi_epochs, config.lwc_lr,
                          config.lsi_lr)
        t1 = time.perf_counter()
        _finish(names, wr, weights, config, sel_stats, res, work, plans, info, ks)
        with torch.no_grad():
            xq = [call_block(block, xq[b], *args[b]) for b in range(len(batches))]
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
        _train_heads(work, heads, weights, config, sel_stats, batches, plans, info, ks)
        t["train"] += time.perf_counter() - t0
        t["block:heads"] = time.perf_counter() - t0
        logger.info(f"lsi heads: {len(heads)} Linears in {time.perf_counter() - t0:.1f} s")
    bar.update(1)
    bar.close()
    return plans, info, t


def _train_heads(work, heads, weights, config, sel_stats, batches, plans, info, ks=None):
    """Layer-wise LSI of the Linears outside the blocks, on their inputs in the quantized ``work``."""
    import torch

    from edgeq.quant.lsi import reconstruct

    mods = dict(work.named_modules())
    rows = _head_inputs(work, heads, batches)
    for name in heads:
        wr = _wrappers([name], weights, config, sel_stats, ks)
        bias = mods[name].bias
        x_all = rows[name]
        y_all = torch.nn.functional.linear(x_all, torch.from_numpy(weights[name]), bias)
        n_fit = len(x_all) - held_out_count(len(x_all))
        chunks = [(x_all[j:j + HEAD_CHUNK], y_all[j:j + HEAD_CHUNK], None) for j in range(0, n_fit, HEAD_CHUNK)]
        held = [(x_all[n_fit:], y_all[n_fit:], None)] if n_fit < len(x_all) else []

        def fwd(x, ws, _n=name, _b=bias):
            return torch.nn.functional.linear(x, ws[_n], _b)

        res = reconstruct(fwd, wr, chunks, held, config.lsi_epochs, config.lwc_lr, config.lsi_lr)
        _finish([name], wr, weights, config, sel_stats, res, work, plans, info, ks)


def _head_inputs(model, names, batches):
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
