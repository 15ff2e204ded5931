"""How much the top-k selections of two saliency methods agree (ALGORITHMS.md §7).

For one layer ℓ with ``M_ℓ = m·n`` weights and two selections ``A_ℓ, B_ℓ`` of ``k`` flat indices:

    c_ℓ          = |A_ℓ ∩ B_ℓ|
    IoU_ℓ        = c_ℓ / |A_ℓ ∪ B_ℓ| = c_ℓ / (2k − c_ℓ)
    overlap@k_ℓ  = c_ℓ / k
    macro IoU(k) = mean_ℓ IoU_ℓ         (standard error: std_ℓ / √L)
    micro IoU(k) = Σ_ℓ c_ℓ / Σ_ℓ (2k − c_ℓ)
    chance IoU   = mean_ℓ c⁰_ℓ / (2k − c⁰_ℓ) with c⁰_ℓ = k² / M_ℓ, the expected overlap of two
                   independent uniform k-subsets (what unrelated methods would score)

Layers with ``k ≥ M_ℓ`` select everything (IoU = 1 trivially) and are left out of the aggregates
at that k (``layers`` counts those kept).  Selection concentration: the number of distinct rows
and columns a selection touches.  Selections come from one stable descending sort of each score
(:func:`edgeq.saliency.registry.descending_order`, ties → lower flat index, the same sort as
:func:`edgeq.saliency.topk_flat`), so one score serves every k.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from edgeq.saliency.registry import descending_order, topk_from_order  # noqa: F401  (the one top-k, re-exported)


def intersection_size(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.intersect1d(a, b, assume_unique=True).size)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two index sets (1.0 for two empty sets)."""
    c = intersection_size(a, b)
    union = len(a) + len(b) - c
    return c / union if union else 1.0


def chance_iou(k: int, size: int) -> float:
    """IoU of two independent uniform k-subsets of ``size`` items, using the expected overlap k²/size."""
    k = min(k, size)
    c = k * k / size
    return c / (2 * k - c) if k else 1.0


@dataclass(frozen=True)
class LayerPair:
    layer: str
    a: str
    b: str
    k: int
    size: int  # m·n
    intersection: int

    @property
    def iou(self) -> float:
        k = min(self.k, self.size)
        return self.intersection / (2 * k - self.intersection) if k else 1.0

    @property
    def overlap(self) -> float:
        k = min(self.k, self.size)
        return self.intersection / k if k else 1.0

    def row(self) -> dict:
        return {**asdict(self), "iou": self.iou, "overlap": self.overlap}


@dataclass(frozen=True)
class Concentration:
    layer: str
    method: str
    k: int
    rows: int  # m
    cols: int  # n
    rows_touched: int
    cols_touched: int


def layer_overlaps(layer: str, shape: tuple[int, int], orders: Mapping[str, np.ndarray], ks: Sequence[int]
                   ) -> tuple[list[LayerPair], list[Concentration]]:
    """Pairwise intersections and concentration of one layer, for every k (orders: method → descending order)."""
    m, n = shape
    size = m * n
    pairs, conc = [], []
    for k in ks:
        sel = {meth: topk_from_order(o, min(k, size)) for meth, o in orders.items()}
        for meth, idx in sel.items():
            conc.append(Concentration(layer, meth, k, m, n, int(np.unique(idx // n).size),
                                      int(np.unique(idx % n).size)))
        for a, b in itertools.combinations(orders, 2):
            pairs.append(LayerPair(layer, a, b, k, size, intersection_size(sel[a], sel[b])))
    return pairs, conc


def summarize(pairs: Sequence[LayerPair]) -> list[dict]:
    """Macro/micro IoU and overlap@k per (a, b, k) over the layers where k < m·n."""
    groups: dict[tuple[str, str, int], list[LayerPair]] = {}
    for p in pairs:
        groups.setdefault((p.a, p.b, p.k), []).append(p)
    out = []
    for (a, b, k), ps in groups.items():
        kept = [p for p in ps if p.k < p.size]
        if not kept:
            continue
        ious = np.array([p.iou for p in kept])
        c = np.array([p.intersection for p in kept], dtype=np.float64)
        out.append({
            "a": a, "b": b, "k": k, "layers": len(kept),
            "macro_iou": float(ious.mean()),
            "macro_iou_se": float(ious.std(ddof=1) / np.sqrt(len(kept))) if len(kept) > 1 else float("nan"),
            "micro_iou": float(c.sum() / np.sum(2 * k - c)),
            "macro_overlap": float(np.mean(c / k)),
            "micro_overlap": float(c.sum() / (k * len(kept))),
            "chance_iou": float(np.mean([chance_iou(k, p.size) for p in kept])),
            "layers_identical": int(np.sum(c == k)),
        })
    return out
