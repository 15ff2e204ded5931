"""Saliency methods: importing this package registers every built-in method."""

from edgeq.saliency import (
    calibrated,  # noqa: F401  (registers awq, spqr, error-act)
    weight_only,  # noqa: F401  (registers svd, magnitude, random, error)
)
from edgeq.saliency.registry import (
    SALIENCY_METHODS,
    ScoreContext,
    descending_order,
    get_method,
    topk_flat,
    topk_from_order,
)

__all__ = ["SALIENCY_METHODS", "ScoreContext", "descending_order", "get_method", "topk_flat", "topk_from_order"]
