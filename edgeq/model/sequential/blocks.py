"""The PyTorch plumbing of block-by-block calibration, shared by the layer-wise and LSI drivers.

* :func:`find_blocks` — the transformer blocks of a model (module paths);
* :func:`capture` — one forward pass recording every block's inputs and call arguments;
* :func:`call_block` — run one block on recorded inputs, optionally with substituted weights;
* :func:`set_weight` — write a quantized (dequantized) weight back into the working model;
* :func:`held_out_count` — how many of n examples (or rows) are held out;
* :func:`progress_bar` — the per-block tqdm bar on stderr.
"""

from __future__ import annotations

import sys

import numpy as np

HOLDOUT_FRACTION = 0.25


def held_out_count(n: int) -> int:
    """Examples (or rows) held out of ``n``: the last quarter, none when fewer than 4."""
    return int(n * HOLDOUT_FRACTION) if n >= 4 else 0


def find_blocks(model) -> list[str]:
    """Module paths of the transformer blocks: the longest ModuleList whose items hold Linears."""
    import torch

    best: list[str] = []
    for name, m in model.named_modules():
        if (isinstance(m, torch.nn.ModuleList) and len(m) > len(best)
                and all(any(isinstance(x, torch.nn.Linear) for x in c.modules()) for c in m)):
            best = [f"{name}.{i}" for i in range(len(m))]
    return best


class _Stop(Exception):
    pass


def capture(model, blocks: list[str], batches, stop: bool = False) -> list[dict]:
    """Per batch: every block's (hidden input, other args, kwargs) and the last block's output.

    Each record maps block index → ``(x, args, kwargs)`` and ``"out"`` → the last block's output.
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


def call_block(block, x, args, kwargs, overrides=None):
    """The hidden-state output of ``block(x, *args, **kwargs)``; ``overrides`` substitutes parameters."""
    from torch.func import functional_call

    out = functional_call(block, overrides or {}, (x, *args), kwargs) if overrides else block(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def set_weight(model, name: str, w: np.ndarray) -> None:
    """Copy ``w`` into the weight of the Linear ``name`` of ``model``."""
    import torch

    mod = dict(model.named_modules())[name]
    mod.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="block", file=sys.stderr, leave=False, disable=not enabled)
