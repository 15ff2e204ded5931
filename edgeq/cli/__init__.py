"""``edgeq`` command line: the group, its error handling and exit codes; one module per command.

Heavy imports (torch, onnx, onnxruntime) are lazy, inside each command, so ``edgeq --help`` is fast.
"""

from __future__ import annotations

import os
import sys

import click

# PyTorch's OpenMP workers sleep instead of spinning while they wait (read when torch is imported, which
# the commands do lazily, after this).  Results are unchanged; on a shared machine a spinning worker stalls
# the one it waits for: the float64 SVDs of the svd plan of all-mpnet-base-v2 took > 45 min of wall time
# spinning at load ~15 on 2 cores (results/memory.md), against ~50 s of CPU work (tests/conftest.py: same).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from edgeq import __version__
from edgeq.errors import EdgeqError, interrupt_exit_code, sigterm_interrupts


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
        with sigterm_interrupts(sigint=True):  # SIGTERM and Ctrl-C both discard staged output
            return self._invoke(ctx)

    def _invoke(self, ctx):
        debug = "--debug" in sys.argv or bool(ctx.params.get("debug")) or bool((ctx.obj or {}).get("debug"))
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
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (see edgeq.errors.sigterm_interrupts)
            atomic = ctx.invoked_subcommand in ("convert", "validate")  # others may keep finished parts
            click.echo("edgeq: interrupted" + ("; no output was written" if atomic else ""), err=True)
            ctx.exit(interrupt_exit_code(e))
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


from edgeq.cli.bench import bench  # noqa: E402
from edgeq.cli.convert import convert  # noqa: E402
from edgeq.cli.eval import eval_cmd  # noqa: E402
from edgeq.cli.saliency import saliency_cmd  # noqa: E402
from edgeq.cli.sweep import sweep_cmd  # noqa: E402
from edgeq.cli.validate import validate  # noqa: E402

for _command in (convert, validate, eval_cmd, bench, sweep_cmd, saliency_cmd):
    main.add_command(_command)
