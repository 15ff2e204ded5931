"""Sequential drive of the ``layer`` quantizers (GPTQ, SARQC-*): one Linear at a time, on Hessians.

For each transformer block, in order: the inputs of its Linears are collected on the partly
quantized model (fitting and held-out batches separately), giving each Linear H = (2/N) XᵀX on the
fitting tokens, the held-out tokens and all of them (an ``edgeq.quant.registry.LayerContext``);
each Linear is then quantized by its registry function and its Ŵ written into the working model;
finally the quantized block is run to give the next block its inputs.  The Linears outside the
blocks (pooler, classifier: group ``"heads"``) come last, collected over the whole quantized model.
"""

from __future__ import annotations

import logging
import time

from edgeq.model.calib import InputStats, accumulate, collect_input_stats, masked_rows
from edgeq.model.sequential.blocks import call_block, capture, progress_bar, set_weight
from edgeq.quant.plan import plan_layer
from edgeq.quant.registry import LayerContext, get_quantizer

logger = logging.getLogger(__name__)


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
                call_block(block, x, a, kw)
    finally:
        for h in hs:
            h.remove()
    return stats


def run_layerwise(work, weights, config, groups, fit, ho, sel_stats, progress, ks=None):
    """(plans, per-Linear info, timings) of the ``layer`` quantizer ``config.quantizer``; see the module doc.

    ``ks``: k per Linear (``--budget``) instead of ``config.k``."""
    import torch

    q = get_quantizer(config.quantizer)
    plans, info = {}, {}
    t = {"capture": 0.0, "collect": 0.0, "quantize": 0.0, "propagate": 0.0}
    blocks = [p for p, _ in groups[:-1]]
    batches = fit + ho
    t0 = time.perf_counter()
    rec = capture(work, blocks[:1], batches, stop=True) if blocks else []
    t["capture"] = time.perf_counter() - t0
    xq = [r[0][0] for r in rec]
    args = [r[0][1:] for r in rec]
    masks = [torch.from_numpy(b["attention_mask"]) for b in batches]
    nf = len(fit)
    mods = dict(work.named_modules())
    bar = progress_bar(len(groups), f"{config.quantizer}", progress)
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

            plans[name] = plan_layer(name, weights[name], config, sel_stats.get(name), quantize=quantize,
                                     k=ks[name] if ks else None)
            info[name] = extra
            set_weight(work, name, plans[name].quant.dequantize())
        t2 = time.perf_counter()
        if prefix != "heads":
            with torch.no_grad():
                xq = [call_block(block, xq[b], *args[b]) for b in range(len(batches))]
        t3 = time.perf_counter()
        t["collect"] += t1 - t0
        t["quantize"] += t2 - t1
        t["propagate"] += t3 - t2
        t[f"block:{prefix}"] = t3 - t0
        logger.info(f"{config.quantizer} {prefix}: {len(names)} Linears in {t3 - t0:.1f} s")
        bar.update(1)
    bar.close()
    return plans, info, t
