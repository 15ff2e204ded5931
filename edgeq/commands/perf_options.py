"""Speed/size options of ``edgeq convert``: bits, 4-bit grid, per-layer 8-bit, correction encoding, 4-bit embeddings.

Kept here (not in cli.py) so that the choices come from one place; the values land in
``ConvertConfig`` (bits, bits8, grid, correction, quantize_embeddings).  See docs/performance.md.
"""

from __future__ import annotations

import click

CORRECTION_CHOICES = ("auto", "dense", "rows", "scatter")  # edgeq.onnx.rewrite.CORRECTION_CHOICES (a test keeps them in sync)
GRID_CHOICES = ("sym7", "sym8")  # edgeq.quant.int4.GRIDS (a test keeps them in sync)
OPTION_NAMES = ("bits", "bits8", "grid", "correction", "quantize_embeddings")


def perf_options(fn):
    opts = [
        click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True,
                     help="MatMulNBits bits of every Linear (8 is fast only with --accuracy-level 4)."),
        click.option("--bits8", multiple=True, metavar="REGEX",
                     help="Quantize Linears whose name matches REGEX to 8 bits (repeatable)."),
        click.option("--grid", type=click.Choice(GRID_CHOICES), default="sym7", show_default=True,
                     help="4-bit grid: sym7 (scale max|w|/7, levels -7..7, the paper's) or sym8 (ONNX Runtime's "
                          "own RTN grid: signed scale max/8, levels -8..7, finer; --quantizer rtn only)."),
        click.option("--correction", type=click.Choice(CORRECTION_CHOICES), default="auto", show_default=True,
                     help="Graph encoding of the k FP32 entries: dense (Gather+MatMul+Add), rows "
                          "(MatMul+MatMul+Add), scatter (ScatterElements); auto picks the cheapest per layer."),
        click.option("--quantize-embeddings/--no-quantize-embeddings", default=False, show_default=True,
                     help="Word-embedding table as 4-bit GatherBlockQuantized (block 32)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def perf_kwargs(params: dict) -> dict:
    """The ConvertConfig fields among a command's parameters."""
    out = {k: params[k] for k in OPTION_NAMES if k in params}
    if "bits" in out:
        out["bits"] = int(out["bits"])
    if "bits8" in out:
        out["bits8"] = tuple(out["bits8"])
    return out
