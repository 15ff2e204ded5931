"""LSI (learnable singular-value increments) with LWC (learnable weight clipping), block-wise.

ALGORITHMS.md §9.2 (inferred form; the paper's body could not be read).  For a Linear
``W [N, K] = U diag(σ) Vᵀ`` (thin SVD, data-free), the top-``r`` singular values get learnable
multiplicative increments ``δ`` (init 0) and every scale group ``G`` learnable clipping logits
``γ_G, β_G`` (init 4.0, OmniQuant's LWC)::

    W'(δ)  = W + U_r diag(σ_r ⊙ δ) V_rᵀ                      δ = 0  ⇒  W' = W
    s_G    = max(σ(γ_G)·max W'_G, |σ(β_G)·min W'_G|) / 7       (max/min detached, as OmniQuant)
    Ŵ      = M ⊙ W + (1 − M) ⊙ s ⊙ clamp(round_ste(W'/s), −7, 7)

``round_ste(x) = x + (rint(x) − x).detach()`` (straight-through).  With σ(γ) = σ(β) = 1 the scales
are the RTN scales (max|W_G|/7) and, at δ = 0, Ŵ is RTN exactly.  The salient entries ``M`` stay
exact FP32 (the original weights) inside training, so no capacity is spent on them.

``reconstruct`` fits (δ, γ, β) of every wrapped Linear of one block by AdamW on the
padding-masked MSE between the block's output on the *quantized* inputs and the FP32 block's
output on the FP32 inputs (OmniQuant's block-wise objective), with ``lwc_lr`` for the logits and
``lsi_lr`` for δ; after each epoch the held-out loss is measured and the best epoch's parameters
(epoch 0 = the initialisation) are kept.  ``LSIWeight.export`` turns the result into a
``QuantizedLinear`` (scales of the configured granularity, so MatMulNBits carries them exactly).
Pure torch; no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edgeq.quant.int4 import QMAX, ZERO_POINT, Granularity, QuantizedLinear

LWC_INIT = 4.0
LWC_LR = 1e-1
LSI_LR = 1e-3
LSI_RANK = 64
EPOCHS = 3


class LSIWeight(torch.nn.Module):
    """δ, γ, β of one Linear ``W [N, K]`` with salient ``mask``; calling it gives the fake-quantized Ŵ."""

    def __init__(self, weight, mask, granularity: Granularity, rank: int = LSI_RANK,
                 exclude_salient_from_scale: bool = False, init_logit: float = LWC_INIT):
        super().__init__()
        w = torch.as_tensor(np.asarray(weight, dtype=np.float32)).clone()
        n, k_in = w.shape
        self.shape = (n, k_in)
        self.gran = granularity
        self.b = granularity.export_block(k_in)
        self.exclude = exclude_salient_from_scale
        self.register_buffer("W0", w)
        self.register_buffer("mask", torch.as_tensor(np.asarray(mask, dtype=bool)))
        r = max(0, min(int(rank), min(n, k_in)))
        if r:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            self.register_buffer("U", u[:, :r].contiguous())
            self.register_buffer("S", s[:r].clone())
            self.register_buffer("Vh", vh[:r].contiguous())
            self.delta = torch.nn.Parameter(torch.zeros(r))
        else:
            self.delta = None
        g = self._groups(w).shape[0]
        self.lwc_up = torch.nn.Parameter(torch.full((g, 1), float(init_logit)))
        self.lwc_lo = torch.nn.Parameter(torch.full((g, 1), float(init_logit)))

    def _groups(self, x):
        """``x [N, K]`` → ``[groups, group size]`` (blocks zero-padded to a multiple of b)."""
        n, k_in = self.shape
        if self.gran.kind == "tensor":
            return x.reshape(1, -1)
        if self.gran.kind == "channel":
            return x
        nb = -(-k_in // self.b)
        if nb * self.b != k_in:
            x = torch.nn.functional.pad(x, (0, nb * self.b - k_in))
        return x.reshape(n * nb, self.b)

    def _ungroup(self, xg):
        n, k_in = self.shape
        if self.gran.kind == "block":
            return xg.reshape(n, -1)[:, :k_in]
        return xg.reshape(n, k_in)

    def w_prime(self):
        if self.delta is None:
            return self.W0
        return self.W0 + (self.U * (self.S * self.delta)) @ self.Vh

    def group_scales(self, wp):
        """Scale per group ``[groups, 1]`` from the (detached) range of W' and the clip logits."""
        src = wp.detach()
        if self.exclude:
            src = torch.where(self.mask, torch.zeros_like(src), src)
        g = self._groups(src)
        xmax = torch.sigmoid(self.lwc_up) * g.amax(1, keepdim=True)
        xmin = torch.sigmoid(self.lwc_lo) * g.amin(1, keepdim=True)
        return torch.maximum(xmax.abs(), xmin.abs()) / QMAX

    def forward(self):
        """Fake-quantized Ŵ (differentiable in δ, γ, β through the STE)."""
        wp = self.w_prime()
        s = self.group_scales(wp).clamp_min(1e-12)
        x = self._groups(wp) / s
        q = torch.clamp(x + (torch.round(x) - x).detach(), -QMAX, QMAX) * s
        return torch.where(self.mask, self.W0, self._ungroup(q))

    @torch.no_grad()
    def export(self) -> QuantizedLinear:
        n, k_in = self.shape
        wp = self.w_prime().float().numpy()
        sg = self.group_scales(torch.from_numpy(wp)).float().numpy()  # [groups, 1]
        nb = -(-k_in // self.b)
        if self.gran.kind == "tensor":
            scales = np.full((n, nb), sg.item(), dtype=np.float32)
        elif self.gran.kind == "channel":
            scales = np.repeat(sg.reshape(n, 1), nb, axis=1).astype(np.float32)
        else:
            scales = sg.reshape(n, nb).astype(np.float32)
        s_full = np.repeat(scales, self.b, axis=1)[:, :k_in]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s_full > 0, np.rint(wp / s_full), 0.0)
        codes = (np.clip(q, -QMAX, QMAX) + ZERO_POINT).astype(np.uint8)
        m = self.mask.numpy()
        codes[m] = ZERO_POINT
        idx = np.flatnonzero(m.reshape(-1)).astype(np.int64)
        return QuantizedLinear(codes=codes, scales=scales, block_size=self.b, salient_index=idx,
                               salient_values=self.W0.numpy().reshape(-1)[idx].copy())


@dataclass(frozen=True)
class ReconResult:
    held_out_init: float  # masked MSE at the initialisation (≈ RTN with clip 0.982)
    held_out_best: float
    best_epoch: int  # 0 = the initialisation was kept
    steps: int


def masked_mse(out, target, mask) -> object:
    """Mean squared error over the real tokens (``mask [B, T]``; None for ``[B, n]`` outputs)."""
    d = (out - target) ** 2
    if mask is None or d.dim() == 2:
        return d.mean()
    m = mask.to(d.dtype).unsqueeze(-1)
    return (d * m).sum() / (m.sum() * d.shape[-1]).clamp_min(1)


def reconstruct(
    forward: Callable[[object, dict], object],
    wrappers: dict,
    train: Sequence[tuple],
    held_out: Sequence[tuple],
    epochs: int = EPOCHS,
    lwc_lr: float = LWC_LR,
    lsi_lr: float = LSI_LR,
    progress: Callable[[], None] | None = None,
) -> ReconResult:
    """Fit every wrapper's (δ, γ, β); ``forward(inputs, {name: Ŵ}) → output``; data: (inputs, target, mask)."""
    lwc = [p for w in wrappers.values() for p in (w.lwc_up, w.lwc_lo)]
    lsi = [w.delta for w in wrappers.values() if w.delta is not None]
    groups = [{"params": lwc, "lr": lwc_lr}] + ([{"params": lsi, "lr": lsi_lr}] if lsi else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)

    def evaluate(data) -> float:
        with torch.no_grad():
            ws = {n: w() for n, w in wrappers.items()}
            tot = sum(float(masked_mse(forward(x, ws), y, m)) for x, y, m in data)
        return tot / max(len(data), 1)

    params = lwc + lsi
    snapshot = lambda: [p.detach().clone() for p in params]  # noqa: E731
    init = evaluate(held_out or train)
    best, best_epoch, best_state, steps = init, 0, snapshot(), 0
    for epoch in range(1, epochs + 1):
        for x, y, m in train:
            opt.zero_grad(set_to_none=True)
            ws = {n: w() for n, w in wrappers.items()}
            loss = masked_mse(forward(x, ws), y, m)
            loss.backward()
            opt.step()
            steps += 1
            if progress:
                progress()
        val = evaluate(held_out or train)
        if val < best:
            best, best_epoch, best_state = val, epoch, snapshot()
    with torch.no_grad():
        for p, v in zip(params, best_state):
            p.copy_(v)
    return ReconResult(init, best, best_epoch, steps)
