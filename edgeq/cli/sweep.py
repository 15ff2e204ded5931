"""``edgeq sweep``: Table I and Figure 1 — every cell of the grid converted and scored in-process.

Grid: ``--methods`` × ``--k`` × ``--quantizers`` × ``--bits`` × ``--grid`` × ``--block-size``
(comma lists); cell ids in :mod:`edgeq.research.cells`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from edgeq.cli.options import BLOCK_CHOICES, calib_options, configure_logging
from edgeq.errors import UsageError
from edgeq.quant.int4 import BITS, GRIDS
from edgeq.quant.registry import QUANTIZERS


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--k {text!r}: give comma-separated integers, e.g. 0,1,16,256") from None
    if not vals:
        raise UsageError("--k needs at least one value")
    return list(dict.fromkeys(vals))


def _choices(allowed):
    """A click callback: a comma list of values from ``allowed`` (duplicates dropped, order kept)."""
    def parse(ctx, param, text: str) -> list[str]:
        vals = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise click.BadParameter(f"{(bad or [text])[0]!r} is not one of {', '.join(map(repr, allowed))}.")
        return vals

    return parse


@click.command("sweep")
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.option("--task", required=True, metavar="TASK",
              help="GLUE task (RTE, MRPC, SST-2, QNLI, CoLA, WNLI) of a task model, or STS-B of an embedding model "
                   "(cosine of sentence_embedding; default MODEL_DIR: the bundled all-MiniLM-L6-v2).")
@click.option("--methods", default="svd,awq,spqr,magnitude,random", show_default=True,
              help="Comma-separated saliency methods.")
@click.option("--k", "k_list", default="0,1,16,64,256,1024,4096", show_default=True,
              help="Comma-separated FP32 entries per Linear (0: the plain int4 row).")
@click.option("--block-size", default="32", show_default=True, callback=_choices(BLOCK_CHOICES),
              help="Comma-separated scale granularities: block of N inputs, per-channel or per-tensor. The "
                   "first is the sweep's own (its settings); cells at the others get a suffix, e.g. -per-channel.")
@click.option("--quantizers", default="rtn", show_default=True, callback=_choices(list(QUANTIZERS)),
              help="Comma-separated quantizers (edgeq.quant.registry); calibrated ones need --calib. Cells of "
                   "quantizers other than rtn get a suffix, e.g. svd-k256-gptq.")
@click.option("--bits", "bits_list", default="4", show_default=True, callback=_choices([str(b) for b in BITS]),
              help="Comma-separated bits per Linear weight (2, 3: stored compact and run by the 4-bit kernel; 4; "
                   "8); cells at other than 4 get a suffix, e.g. -bits2.")
@click.option("--grid", "grids", default="sym7", show_default=True, callback=_choices(list(GRIDS)),
              help="Comma-separated grids (sym7, sym8, mse, asym, asym-mse; not lsi/sarqc-gs); "
                   "cell ids get the suffix -GRID.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output directory (cells/, table1.md/.csv/.json, figure1.png); rerun to resume.")
@click.option("--rank", type=int, default=8, show_default=True, help="SVD rank r of the svd method.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random and of the calibration sample.")
@click.option("--exclude-salient-from-scale", is_flag=True, help="Compute scales without the k FP32 entries.")
@calib_options
@click.option("--percdamp", type=float, default=0.01, show_default=True, help="Hessian damping of spqr.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N dev examples only.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="ONNX Runtime / PyTorch intra-op threads.")
@click.option("--max-length", type=click.IntRange(min=8), default=128, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def sweep_cmd(model_dir, task, methods, k_list, block_size, quantizers, bits_list, grids, out, rank, seed,
              exclude_salient_from_scale, calib, calib_samples, percdamp, data_dir, limit, threads, max_length, quiet):
    """Convert and evaluate MODEL_DIR for every cell of the grid; write Table I and Figure 1 to --out.

    The grid is methods × k × quantizers × bits × grid × block size. Everything runs in one
    process: the model is loaded and exported once, each method scores each Linear once, and
    every k (and every rtn variant) reuses that score. Each cell records accuracy, agreement
    with FP32, mean/max |Δlogit| vs FP32, reconstruction error and plan parity (STS-B: Spearman and
    Pearson, and the mean/min cosine of the sentence embeddings to FP32's). Finished cells
    are stored in OUT/cells/ and not recomputed when the command is run again.

    \b
    Example:
      edgeq sweep ../shared/models/minilm-l6-rte --task RTE --methods svd,magnitude,random \\
          --block-size 32 --threads 1 --out results/rte-b32
      edgeq sweep ../shared/models/minilm-l6-rte --task RTE --methods svd --k 0,256 \\
          --quantizers rtn,gptq --block-size 32,per-channel --calib rte --out results/rte-q
      edgeq sweep --task STS-B --methods magnitude,svd --k 0,256 --out results/sts
    """
    from edgeq.evaluation.tasks import get_task
    from edgeq.model.load import default_model_dir
    from edgeq.research.cells import variants
    from edgeq.research.sweep import SweepSettings, run_sweep
    from edgeq.research.table import write_outputs

    spec = get_task(task)
    method_list = list(dict.fromkeys(m.strip() for m in methods.split(",") if m.strip()))
    ks = _ints(k_list)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    name = Path(model_dir).resolve().name if model_dir is not None else "all-MiniLM-L6-v2"
    model_dir = model_dir if model_dir is not None else default_model_dir()
    if not Path(model_dir).is_dir():
        raise UsageError(f"{model_dir} is not a model directory; the sweep converts a Hugging Face model directory")
    settings = SweepSettings(
        model_dir=str(model_dir), task=spec.name, block_size=block_size[0], rank=rank, seed=seed,
        exclude_salient_from_scale=exclude_salient_from_scale, limit=limit, max_length=max_length,
        calib=calib, calib_samples=calib_samples, percdamp=percdamp,
    )
    configure_logging(quiet)
    grid = variants(block_size, quantizers, [int(b) for b in bits_list], grids)
    run = run_sweep(settings, method_list, ks, out, data_dir, threads, quiet, grid)
    suffixes = [v.suffix(settings.block_size) for v in run.variants]
    title = f"{spec.name} dev, {name}, block {settings.block_size}"
    meta = {"command": "edgeq " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "settings": settings.key(),
            "calib": settings.calib_key(), "methods": method_list, "k": ks}
    if suffixes != [""]:
        meta["variants"] = [{"suffix": s, **v.record()} for v, s in zip(run.variants, suffixes)]
    paths = write_outputs(out, run.cells, method_list, ks, spec, title, meta, suffixes)
    (out / "COMMAND").write_text(meta["command"] + "\n", encoding="utf-8")
    click.echo(paths["md"].read_text(encoding="utf-8"))
    click.echo(f"{len(run.computed)} cells computed, {len(run.reused)} reused; "
               f"wrote {', '.join(str(p) for p in paths.values())}", err=True)
