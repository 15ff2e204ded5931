"""``edgeq convert``'s quantizer options (``--quantizer`` and its hyper-parameters); choices from the registry."""

from __future__ import annotations

import click

from edgeq.config import ConvertConfig
from edgeq.quant.registry import QUANTIZERS, SARQC_SALIENCY

OPTION_NAMES = ("quantizer", "sarqc_lambda", "sarqc_saliency", "lsi_epochs", "lsi_rank", "lsi_lr", "lwc_lr")


def _default(name: str):
    return ConvertConfig.__dataclass_fields__[name].default  # one source of truth for defaults


def quantizer_options(fn):
    """Add the quantizer options to a click command (applied in reverse so --help lists them in order)."""
    opts = [
        click.option("--quantizer", type=click.Choice(list(QUANTIZERS)), default="rtn", show_default=True,
                     help="How the non-salient weights are rounded: rtn (data-free) or a calibrated one "
                          "(gptq, sarqc-gbs, sarqc-gs, lsi; these need --calib)."),
        click.option("--sarqc-lambda", default=_default("sarqc_lambda"), show_default=True, metavar="FLOAT|auto",
                     help="SARQC regularisation toward W (relative to mean diag H); auto: per layer, the best of "
                          "0,0.01,0.03,0.1,0.3,1 on held-out calibration tokens."),
        click.option("--sarqc-saliency", type=click.Choice(list(SARQC_SALIENCY)), default=_default("sarqc_saliency"), show_default=True,
                     help="SARQC saliency weighting the regulariser."),
        click.option("--lsi-epochs", type=click.IntRange(min=0), default=_default("lsi_epochs"), show_default=True,
                     help="LSI epochs per block (the best held-out epoch is kept)."),
        click.option("--lsi-rank", type=click.IntRange(min=0), default=_default("lsi_rank"), show_default=True,
                     help="Singular values with a learnable increment (0: learnable clipping only)."),
        click.option("--lsi-lr", type=click.FloatRange(min=0), default=_default("lsi_lr"), show_default=True,
                     help="Learning rate of the singular-value increments."),
        click.option("--lwc-lr", type=click.FloatRange(min=0), default=_default("lwc_lr"), show_default=True,
                     help="Learning rate of the learnable clipping logits."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def quantizer_kwargs(params: dict) -> dict:
    """The ConvertConfig fields among a command's parameters."""
    return {k: params[k] for k in OPTION_NAMES if k in params}
