"""``edgeq saliency``: how much the top-k selections of saliency methods overlap (Figure 2 style)."""

from __future__ import annotations

from pathlib import Path

import click

from edgeq.cli.options import calib_options, configure_logging
from edgeq.errors import UsageError

DEFAULT_KS = "1,16,64,256,1024,4096"


def _ints(text: str) -> list[int]:
    try:
        ks = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise UsageError(f"--k {text!r} must be comma-separated integers, e.g. {DEFAULT_KS}") from None
    if not ks or ks[0] < 1:
        raise UsageError(f"--k {text!r} must list positive integers, e.g. {DEFAULT_KS}")
    return ks


@click.command("saliency")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--methods", default="svd,awq,spqr", show_default=True,
              help="Comma-separated saliency methods to compare (every pair).")
@click.option("--k", "k_list", default=DEFAULT_KS, show_default=True, help="Comma-separated budgets k per Linear.")
@calib_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sample and of random.")
@click.option("--rank", type=click.IntRange(min=1), default=8, show_default=True, help="SVD rank r of the svd method.")
@click.option("--percdamp", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="Hessian damping of spqr, relative to mean diag(H).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Leave out Linears whose name matches REGEX.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory for saliency.json, overlap_*.csv, concentration.csv and iou.png.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="PyTorch intra-op threads (0: runtime default; 1 is much faster on an oversubscribed CPU).")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle .bin checkpoints (runs their code!).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def saliency_cmd(model_dir, methods, k_list, calib, calib_samples, data_dir, seed, rank, percdamp, exclude,
                 out_dir, threads, allow_pickle, quiet):
    """Compare the top-k selections of saliency methods on every Linear of MODEL_DIR.

    Each method scores each Linear once; for every k and every pair of methods the
    per-layer IoU |A∩B|/|A∪B| and overlap@k |A∩B|/k are written, with macro (mean over
    layers, ± standard error) and micro (pooled) aggregates, the chance level of
    unrelated selections, and how many distinct rows/columns each selection touches.

    \b
    Example (the SVD paper's Figure 2 on a MiniLM RTE model):
      edgeq saliency ../shared/models/minilm-l6-rte --methods svd,awq,spqr,magnitude,random \\
          --calib rte --out results/saliency/minilm-l6-rte
    """
    import re

    from edgeq.research.saliency_report import analyze, check_methods, write_outputs

    names = [m.strip() for m in methods.split(",") if m.strip()]
    ks = _ints(k_list)
    check_methods(names, calib)
    for p in exclude:
        try:
            re.compile(p)
        except re.error as e:
            raise UsageError(f"--exclude {p!r} is not a valid regular expression: {e}") from None
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; pass a directory")
    if calib:
        from edgeq.model.calib import resolve_calib_source

        resolve_calib_source(calib, data_dir)
    if threads:
        import torch

        torch.set_num_threads(threads)
    configure_logging(quiet)
    report = analyze(model_dir, names, ks, calib, calib_samples, seed, data_dir, rank, percdamp, tuple(exclude),
                     allow_pickle, progress=not quiet)
    paths = write_outputs(report, out_dir)
    if quiet:
        return
    t = report["timings_s"]
    click.echo(f"{report['model']}: {len(report['layers'])} Linears, methods {', '.join(names)}")
    if report["calibration"]:
        c = report["calibration"]
        click.echo(f"calibration: {c['samples']} examples of {c['source']} (seed {c['seed']}), {c['tokens']} tokens")
    click.echo(f"{'pair':<22}" + "".join(f"{'k=' + str(k):>10}" for k in ks) + "   (macro IoU %)")
    pairs = list(dict.fromkeys((r["a"], r["b"]) for r in report["summary"]))
    by = {(r["a"], r["b"], r["k"]): r for r in report["summary"]}
    for a, b in pairs:
        cells = [by.get((a, b, k)) for k in ks]
        click.echo(f"{a + ' vs ' + b:<22}"
                   + "".join(f"{100 * r['macro_iou']:>10.1f}" if r else f"{'-':>10}" for r in cells))
    chance = {r["k"]: r["chance_iou"] for r in report["summary"]}
    click.echo(f"{'chance':<22}" + "".join(f"{100 * chance[k]:>10.2f}" if k in chance else f"{'-':>10}" for k in ks))
    click.echo(f"time: calibration {t.get('calibrate', 0):.1f} s, scoring "
               + ", ".join(f"{m} {s:.1f} s" for m, s in t["score"].items()) + f"; total {t['total']:.1f} s")
    click.echo("wrote " + ", ".join(str(p) for p in paths))
