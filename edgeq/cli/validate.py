"""``edgeq validate``: check an edgeq ONNX file against its source model (a CI gate)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from edgeq.cli.options import configure_logging, threshold_options, thresholds
from edgeq.errors import UsageError


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("model_onnx", type=click.Path(path_type=Path))
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle .bin checkpoints (runs their code!).")
@click.option("--json", "json_out", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@threshold_options
def validate(model_dir, model_onnx, allow_pickle, json_out, quiet, data, limit, threads,
             max_plan_diff, min_agreement, max_abs_diff, min_cosine):
    """Check MODEL_ONNX (written by edgeq convert) against MODEL_DIR; exit 1 on a failed threshold.

    (a) ONNX vs PyTorch carrying exactly the weights decoded from the file (strict);
    (b) ONNX vs the original FP32 model: max/mean |Δ|, cosine, top-1 agreement.

    \b
    MODEL_ONNX may also be a folder written by edgeq convert (its model.onnx is checked).

    \b
    Examples (a CI gate):
      edgeq validate ./model out.onnx --data glue/SST-2/dev.tsv --min-agreement 0.99
      edgeq validate ./model out/ --json > validation.json
    """
    from edgeq.pipeline.convert import validate_file

    if model_onnx.is_dir() and (model_onnx / "edgeq_report.json").is_file():  # a folder written by edgeq convert
        model_onnx = model_onnx / "model.onnx"
    if model_onnx.is_dir() or (model_onnx.exists() and model_onnx.suffix != ".onnx"
                               and (model_onnx / "config.json").exists()):
        raise UsageError(f"{model_onnx} is a model directory; the second argument is the .onnx file")
    if not model_onnx.is_file():
        raise UsageError(f"{model_onnx} does not exist; pass the .onnx file written by edgeq convert")
    configure_logging(quiet)
    logging.getLogger("edgeq.cli").info(
        f"checking {model_onnx} against {model_dir} (loads the model, runs PyTorch and ONNX Runtime) ...")
    report = validate_file(model_dir, model_onnx, data, limit,
                           thresholds(max_plan_diff, min_agreement, max_abs_diff, min_cosine), threads, allow_pickle)
    if json_out:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"{report.examples} examples ({report.source})")
        click.echo(report.table())
    if not report.ok:
        names = ", ".join(c.name for c in report.failures())
        click.echo(f"edgeq: validation failed: {names}", err=True)
        sys.exit(1)
