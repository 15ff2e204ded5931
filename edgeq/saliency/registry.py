"""The one registry of saliency methods; the CLI's ``--method`` choices come from here.

A method maps a Linear weight ``W [N, K]`` (plus, for calibration methods, the layer's input
statistics) to a score of the same shape; the ``k`` highest scores of a layer stay FP32.
The selection is one stable descending sort (:func:`descending_order`; ties → lower flat index)
whose first k entries, sorted, are the top-k at every k.

A method registered with ``exclude_salient_from_scale=True`` chose its entries assuming the scales
are computed without them (``error``, ``error-act``): ``ConvertConfig`` then turns
``--exclude-salient-from-scale`` on by itself (and the report's config shows it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily so that `edgeq --help` stays fast
    import torch


@dataclass(frozen=True)
class ScoreContext:
    """What a scoring function may look at besides the weight."""

    layer: str  # module path of the Linear, e.g. "bert.encoder.layer.0.attention.self.query"
    rank: int = 8  # SVD rank r
    seed: int = 0  # for the random baseline
    stats: Any = None  # calibration statistics of the layer's input (calibration methods)
    percdamp: float = 0.01  # relative Hessian damping of the spqr method (× mean diag H)
    # the grid the plan quantizes this layer on (edgeq.quant.int4.quantize_rtn), for the error methods
    bits: int = 4  # 2, 3, 4 or 8
    grid: str = "sym7"  # sym7 or sym8 (4 bits; 2/3 bits always use the signed-max grid)
    granularity: Any = None  # edgeq.quant.int4.Granularity; None: blocks of 32
    fp16_scales: bool = False  # scales rounded to float16 (compact storage)


ScoreFn = Callable[["torch.Tensor", ScoreContext], "torch.Tensor"]


@dataclass(frozen=True)
class SaliencyMethod:
    name: str
    score: ScoreFn
    needs_calibration: bool
    summary: str
    exclude_salient_from_scale: bool = False  # the plan must compute scales without the salient entries


SALIENCY_METHODS: dict[str, SaliencyMethod] = {}


def register(name: str, summary: str, needs_calibration: bool = False,
             exclude_salient_from_scale: bool = False) -> Callable[[ScoreFn], ScoreFn]:
    def decorator(fn: ScoreFn) -> ScoreFn:
        if name in SALIENCY_METHODS:
            raise ValueError(f"saliency method {name!r} registered twice")
        SALIENCY_METHODS[name] = SaliencyMethod(name, fn, needs_calibration, summary, exclude_salient_from_scale)
        return fn

    return decorator


def get_method(name: str) -> SaliencyMethod:
    try:
        return SALIENCY_METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown saliency method {name!r}; choose from {', '.join(sorted(SALIENCY_METHODS))}"
        ) from None


def descending_order(score, limit: int | None = None) -> np.ndarray:
    """Flat indices by decreasing score, ties → lower flat index (a stable sort), the first ``limit``.

    The one top-k of edgeq: the selection at any k is ``sort(order[:k])``, so one sort of a layer's
    score serves every k (``topk_from_order``).
    """
    import torch

    flat = torch.as_tensor(score).detach().reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    return order[: limit if limit is not None else order.numel()].numpy().astype(np.int64)


def topk_from_order(order: np.ndarray, k: int) -> np.ndarray:
    """The sorted top-``k`` flat indices given a descending order (``k`` clipped to its length)."""
    return np.sort(order[: max(0, int(k))])


def topk_flat(score: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the ``k`` largest scores; ties go to the lower flat index."""
    import torch

    n = score.numel()
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    if k == n:
        return torch.arange(k, dtype=torch.long)
    return torch.from_numpy(topk_from_order(descending_order(score, k), k))
