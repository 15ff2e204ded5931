"""The one registry of saliency methods; the CLI's ``--method`` choices come from here.

A method maps a Linear weight ``W [N, K]`` (plus, for calibration methods, the layer's input
statistics) to a score of the same shape; the ``k`` highest scores of a layer stay FP32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


ScoreFn = Callable[["torch.Tensor", ScoreContext], "torch.Tensor"]


@dataclass(frozen=True)
class SaliencyMethod:
    name: str
    score: ScoreFn
    needs_calibration: bool
    summary: str


SALIENCY_METHODS: dict[str, SaliencyMethod] = {}


def register(name: str, summary: str, needs_calibration: bool = False) -> Callable[[ScoreFn], ScoreFn]:
    def decorator(fn: ScoreFn) -> ScoreFn:
        if name in SALIENCY_METHODS:
            raise ValueError(f"saliency method {name!r} registered twice")
        SALIENCY_METHODS[name] = SaliencyMethod(name, fn, needs_calibration, summary)
        return fn

    return decorator


def get_method(name: str) -> SaliencyMethod:
    try:
        return SALIENCY_METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown saliency method {name!r}; choose from {', '.join(sorted(SALIENCY_METHODS))}"
        ) from None


def topk_flat(score: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the ``k`` largest scores; ties go to the lower flat index."""
    import torch

    flat = score.detach().reshape(-1)
    k = max(0, min(int(k), flat.numel()))
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    if k == flat.numel():
        return torch.arange(k, dtype=torch.long)
    order = torch.sort(flat, descending=True, stable=True).indices
    return order[:k].sort().values
