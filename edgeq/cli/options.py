"""Options shared by several commands, defined once; every choice list comes from its registry.

* :func:`calib_options` — ``--calib``, ``--calib-samples``, ``--data-dir`` (convert, saliency, sweep).
* :func:`quantizer_options` — ``--quantizer`` and its hyper-parameters (``edgeq.quant.registry``).
* :func:`perf_options` — bits, grid, per-layer 8-bit, correction encoding, 4-bit embeddings.
* :func:`threshold_options` — validation data and gates (convert, validate).
* :data:`BLOCK_CHOICES` — ``--block-size`` values (``edgeq.quant.int4.BLOCK_SIZES``).
* :func:`budget_option` — ``--budget F`` (model-wide FP32 fraction instead of ``--k``).

The values land in :class:`edgeq.config.ConvertConfig`, whose field defaults are the defaults here.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from edgeq.config import ConvertConfig
from edgeq.onnx.corrections import CORRECTION_CHOICES
from edgeq.onnx.storage import KERNELS, STORAGES
from edgeq.quant.int4 import BITS, BLOCK_SIZES, GRIDS
from edgeq.quant.registry import QUANTIZERS, SARQC_SALIENCY

BLOCK_CHOICES = [str(b) for b in BLOCK_SIZES] + ["per-channel", "per-tensor"]


def _apply(fn, opts):
    """Apply click options so that --help lists them in the given order."""
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def calib_options(fn):
    """Add --calib, --calib-samples and --data-dir to a click command (in this order in --help)."""
    opts = [
        click.option("--calib", metavar="TASK_OR_FILE", default=None,
                     help="Calibration data for awq/spqr and the calibrated quantizers: a GLUE task name "
                          "(its train split, e.g. rte) or a text/TSV file."),
        click.option("--calib-samples", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Calibration examples (a --seed sample)."),
        click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                     help="GLUE directory holding <TASK>/{train,dev}.tsv "
                          "(default: $EDGEQ_GLUE_DIR, else ../shared/data/glue)."),
    ]
    return _apply(fn, opts)


def budget_option(fn):
    """Add --budget (``ConvertConfig.budget``; exclusive with --k, checked by the command and the config)."""
    return click.option("--budget", type=float, default=_default("budget"), metavar="F",
                        help="Instead of --k: keep the fraction F (e.g. 0.01) of all quantized Linear weights "
                             "FP32, model-wide; each Linear's k goes where it cuts the quantization error most "
                             "(weighted by E[x^2] with --calib). Exclusive with --k.")(fn)


QUANTIZER_OPTION_NAMES = ("quantizer", "sarqc_lambda", "sarqc_saliency", "lsi_epochs", "lsi_rank", "lsi_lr", "lwc_lr")


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
        click.option("--sarqc-saliency", type=click.Choice(list(SARQC_SALIENCY)), default=_default("sarqc_saliency"),
                     show_default=True, help="SARQC saliency weighting the regulariser."),
        click.option("--lsi-epochs", type=click.IntRange(min=0), default=_default("lsi_epochs"), show_default=True,
                     help="LSI epochs per block (the best held-out epoch is kept)."),
        click.option("--lsi-rank", type=click.IntRange(min=0), default=_default("lsi_rank"), show_default=True,
                     help="Singular values with a learnable increment (0: learnable clipping only)."),
        click.option("--lsi-lr", type=click.FloatRange(min=0), default=_default("lsi_lr"), show_default=True,
                     help="Learning rate of the singular-value increments."),
        click.option("--lwc-lr", type=click.FloatRange(min=0), default=_default("lwc_lr"), show_default=True,
                     help="Learning rate of the learnable clipping logits."),
    ]
    return _apply(fn, opts)


def quantizer_kwargs(params: dict) -> dict:
    """The ConvertConfig fields among a command's parameters."""
    return {k: params[k] for k in QUANTIZER_OPTION_NAMES if k in params}


PERF_OPTION_NAMES = ("bits", "bits8", "grid", "correction", "quantize_embeddings", "storage", "kernel", "fuse_qkv",
                     "act_outliers", "act_outlier_ratio", "smooth_alpha", "smooth_layers",
                     "embedding_bits")


def perf_options(fn):
    opts = [
        click.option("--bits", type=click.Choice([str(b) for b in BITS]), default="4", show_default=True,
                     help="Bits per Linear weight. 4 (Q4-sym-7) and 8 (fast only with --accuracy-level 4) are "
                          "MatMulNBits' own; 2 and 3 are stored compact and run by the 4-bit kernel."),
        click.option("--storage", type=click.Choice(["auto", *STORAGES]), default="auto", show_default=True,
                     help="How codes and scales sit in the file: plain (MatMulNBits inputs, float32 scales) or "
                          "compact (b bits per weight and float16 scales, unpacked by ops ONNX Runtime folds at "
                          "load; --kernel integer: int8 weights in 7 bits). auto: compact for 2 and 3 bits. "
                          "--bits8 layers stay plain."),
        click.option("--kernel", type=click.Choice(KERNELS), default="int4", show_default=True,
                     help="int4: every width runs the 4-bit MatMulNBits kernel; native: ONNX Runtime's own "
                          "2-bit kernel (--bits 2 only; slow on x86, for comparison); integer: uint8 dynamic "
                          "activations x int8 weights, DynamicQuantizeMatMul (--bits 8 --block-size per-channel)."),
        click.option("--act-outliers", type=click.IntRange(min=0), default=_default("act_outliers"),
                     show_default=True, metavar="N",
                     help="--kernel integer: per Linear, the N input columns of largest calibration max|x| "
                          "bypass the int8 path and run exactly in FP32 (needs --calib)."),
        click.option("--act-outlier-ratio", type=click.FloatRange(min=0), default=_default("act_outlier_ratio"),
                     show_default=True, metavar="R",
                     help="With --act-outliers: only columns whose calibration max|x| is at least R times the "
                          "median column's (0: always N); Linears without one keep the plain int8 path."),
        click.option("--smooth-alpha", type=float, default=None, metavar="A",
                     help="--kernel integer: SmoothQuant-style migration, 0 < A < 1 (e.g. 0.5): each Linear's input "
                          "column j is divided by s_j = max|x_j|^A / max|W_j|^(1-A) in the activation Mul and W's "
                          "column multiplied by it (needs --calib; docs/int8.md)."),
        click.option("--smooth-layers", multiple=True, metavar="REGEX",
                     help="With --smooth-alpha: smooth only Linears whose name matches REGEX (repeatable; default "
                          "all), e.g. 'attention\\.self|intermediate' for the LayerNorm-fed ones."),
        click.option("--bits8", multiple=True, metavar="REGEX",
                     help="Quantize Linears whose name matches REGEX to 8 bits (repeatable)."),
        click.option("--grid", type=click.Choice(GRIDS), default="sym7", show_default=True,
                     help="Grid: sym7 (scale max|w|/7, levels -7..7, the paper's; 2/3 bits: signed max), sym8 "
                          "(ONNX Runtime's signed max/8, levels -8..7), mse (signed max, scale shrink searched per "
                          "group on the E[x^2]-weighted error with --calib), asym / asym-mse (min-max with "
                          "per-group zero points). 2-4 bits; rtn, gptq, sarqc-gbs (docs/lowbit.md)."),
        click.option("--correction", type=click.Choice(CORRECTION_CHOICES), default="auto", show_default=True,
                     help="Graph encoding of the k FP32 entries: dense (Gather+MatMul+Add), rows "
                          "(MatMul+MatMul+Add), scatter (ScatterElements); auto picks the cheapest per layer."),
        click.option("--quantize-embeddings/--no-quantize-embeddings", default=False, show_default=True,
                     help="Embedding tables as 4-bit GatherBlockQuantized (block 32): the word table and every "
                          "other nn.Embedding table with >= 64 rows (position); token-type tables stay FP32."),
        click.option("--fuse-qkv/--no-fuse-qkv", default=_default("fuse_qkv"), show_default=True,
                     help="Fuse the Linears that read one input (attention q, k, v) into one MatMulNBits, then "
                          "Split; their FP32 corrections are merged when that is no dearer (cost model of auto). "
                          "Groups that cannot be fused are logged with the reason."),
        click.option("--embedding-bits", type=click.Choice(["4", "8"]), default="4", show_default=True,
                     callback=lambda ctx, p, v: int(v),
                     help="Bits of the quantized embedding tables (with --quantize-embeddings): 4 or 8."),
    ]
    return _apply(fn, opts)


def perf_kwargs(params: dict) -> dict:
    """The ConvertConfig fields among a command's parameters."""
    out = {k: params[k] for k in PERF_OPTION_NAMES if k in params}
    if "bits" in out:
        out["bits"] = int(out["bits"])
    if "bits8" in out:
        out["bits8"] = tuple(out["bits8"])
    if "smooth_layers" in out:
        out["smooth_layers"] = tuple(out["smooth_layers"])
    return out


def threshold_options(fn):
    """Validation data, threads and the gates of convert and validate."""
    fn = click.option("--max-abs-diff", type=float, default=None,
                      help="Fail if max|Δ| of the first output against FP32 exceeds this.")(fn)
    fn = click.option("--min-cosine", type=click.FloatRange(-1, 1), default=None,
                      help="Embedding models: fail if any sentence's embedding has cosine below this to FP32's "
                           "(default 0.8).")(fn)
    fn = click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
                      help="Fail if top-1 agreement with FP32 is below this (0-1).")(fn)
    fn = click.option("--max-plan-diff", type=float, default=1e-4, show_default=True,
                      help="Fail if ONNX vs same-quantization PyTorch max|Δ|/max|ref| exceeds this.")(fn)
    fn = click.option("--data", type=click.Path(path_type=Path), default=None,
                      help="GLUE TSV whose sentences are used for validation (default: built-in sample text).")(fn)
    fn = click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most N examples.")(fn)
    fn = click.option("--threads", type=click.IntRange(min=0), default=0,
                      help="ONNX Runtime intra-op threads (0: runtime default).")(fn)
    return fn


def thresholds(max_plan_diff, min_agreement, max_abs_diff, min_cosine=None):
    from edgeq.pipeline.convert import Thresholds

    return Thresholds(max_plan_diff, min_agreement, max_abs_diff, min_cosine)


class _ElapsedFormatter(logging.Formatter):
    """``[  12.3s] message``: seconds since the command started."""

    def __init__(self) -> None:
        super().__init__()
        self.start = time.perf_counter()

    def format(self, record: logging.LogRecord) -> str:
        return f"[{time.perf_counter() - self.start:6.1f}s] {record.getMessage()}"


def configure_logging(quiet: bool) -> None:
    """Progress of the ``edgeq`` loggers on stderr (one formatter); warnings only with ``--quiet``.

    Library code only logs (``logging.getLogger(__name__)``); this, called by each command, is the
    one place that decides where messages go.  Re-running it (several commands in one process, as
    in the tests) replaces the handler, bound to the current ``sys.stderr``.
    """
    root = logging.getLogger("edgeq")
    for h in [h for h in root.handlers if getattr(h, "_edgeq_cli", False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ElapsedFormatter())
    handler._edgeq_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
