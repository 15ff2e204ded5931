"""``edgeq bench``: latency, size and peak memory of ONNX models side by side (see edgeq.bench)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgeq.cli.options import configure_logging
from edgeq.errors import UsageError


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--shapes", default="1x16,1x128,8x128", show_default=True,
              help="Comma-separated BATCHxSEQ input shapes.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="ONNX Runtime intra-op threads.")
@click.option("--repeats", type=click.IntRange(min=3), default=30, show_default=True,
              help="Timed rounds per shape (each round runs every model once, interleaved).")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Untimed runs per model and shape.")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory subprocess per model.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the full results as JSON to this file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def bench(models, shapes, threads, repeats, warmup, no_memory, json_path, quiet):
    """Time MODELS (.onnx files of one source model) on the same inputs; ratios are to the first.

    Runs are interleaved (every round runs each model once, in rotated order) so the
    ratios are fair on a busy machine. Reports median latency with p10-p90 spread, file
    size by component, and each session's peak memory (measured in a subprocess).

    \b
    Example:
      edgeq bench fp32.onnx edgeq-k256.onnx ort-rtn.onnx --shapes 1x16,1x128,8x128 --threads 2
    """
    from edgeq.bench import (
        busy_machine_warning,
        component_table,
        parse_shapes,
        ratio_table,
        run_bench,
        to_json,
    )

    for m in models:
        if not m.is_file() or m.suffix != ".onnx":
            raise UsageError(f"{m} is not an .onnx file; pass the models to compare, baseline first")
    from edgeq.onnx.safe_load import load_onnx

    for m in models:  # readable, and external data confined to its directory (edgeq.onnx.safe_load)
        load_onnx(m, load_external=False)
    try:
        shape_list = parse_shapes(shapes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    configure_logging(quiet)
    busy = busy_machine_warning(threads)
    if busy:
        click.echo(busy, err=True)
    try:
        results = run_bench(list(models), shape_list, threads, repeats, warmup, not no_memory)
    except ValueError as e:
        raise UsageError(str(e)) from None
    click.echo(f"{threads} thread(s), {repeats} interleaved rounds after {warmup} warm-up runs; "
               "ratios (×) against the first model")
    click.echo(ratio_table(results, shape_list))
    click.echo(component_table(results))
    if json_path:
        json_path.write_text(json.dumps(to_json(results, shape_list, threads, repeats, warmup), indent=2) + "\n",
                             encoding="utf-8")
