"""``edgeq saliency``: score every Linear once per method, then compare the top-k selections.

Flow: load → (calibrate, when a method needs it) → for each Linear, each method: score once,
keep the first max(k) of its stable descending order → :mod:`edgeq.saliency.overlap` for every k and
pair → JSON, CSV and a PNG in the style of the SVD paper's Figure 2 (IoU vs k, log x).
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

from edgeq import __version__
from edgeq.errors import UsageError

SUMMARY_CSV = "overlap_summary.csv"
LAYERS_CSV = "overlap_layers.csv"
CONCENTRATION_CSV = "concentration.csv"
REPORT_JSON = "saliency.json"
PLOT_PNG = "iou.png"

logger = logging.getLogger(__name__)


def check_methods(methods: Sequence[str], calib: str | None) -> None:
    from edgeq.saliency import SALIENCY_METHODS

    unknown = [m for m in methods if m not in SALIENCY_METHODS]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r} in --methods; "
                         f"choose from {', '.join(sorted(SALIENCY_METHODS))}")
    if len(set(methods)) != len(methods) or len(methods) < 2:
        raise UsageError("--methods needs at least two distinct methods, e.g. svd,awq,spqr")
    need = [m for m in methods if SALIENCY_METHODS[m].needs_calibration]
    if need and not calib:
        raise UsageError(f"--methods {','.join(need)} need calibration data; "
                         "pass --calib TASK_OR_FILE (e.g. --calib rte)")


def analyze(model_dir: Path, methods: Sequence[str], ks: Sequence[int], calib: str | None = None,
            calib_samples: int = 128, seed: int = 0, data_dir: Path | None = None, rank: int = 8,
            percdamp: float = 0.01, exclude: Sequence[str] = (), allow_pickle: bool = False,
            progress: bool = False) -> dict:
    """The full report (JSON-ready): per-layer pairs, summary, concentration, timings."""
    import torch

    from edgeq.model.load import load_model
    from edgeq.saliency import ScoreContext, get_method
    from edgeq.saliency.overlap import descending_order, layer_overlaps, summarize

    check_methods(methods, calib)
    t0 = time.perf_counter()
    timings: dict = {}
    loaded = load_model(model_dir, allow_pickle)
    timings["load"] = round(time.perf_counter() - t0, 3)
    calibration = None
    if calib and any(get_method(m).needs_calibration for m in methods):
        from edgeq.model.calib import calibrate

        logger.info("calibrating ...")
        calibration = calibrate(loaded, calib, calib_samples, seed, data_dir, progress=progress)
        timings["calibrate"] = round(calibration.seconds, 3)
    weights = {n: w for n, w in loaded.linear_weights().items() if not any(re.search(p, n) for p in exclude)}
    if not weights:
        raise UsageError("--exclude leaves no Linear to analyze")
    kmax = max(ks)
    score_s = {m: 0.0 for m in methods}
    pairs, conc, shapes = [], [], {}
    it = weights.items()
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(weights), desc="scoring", unit="layer", leave=False)
    for name, w in it:
        wt = torch.from_numpy(w)
        orders = {}
        for m in methods:
            t = time.perf_counter()
            ctx = ScoreContext(layer=name, rank=rank, seed=seed, percdamp=percdamp,
                               stats=calibration.stats.get(name) if calibration else None)
            orders[m] = descending_order(get_method(m).score(wt, ctx), kmax)
            score_s[m] += time.perf_counter() - t
        shapes[name] = list(w.shape)
        p, c = layer_overlaps(name, w.shape, orders, ks)
        pairs += p
        conc += c
    timings["score"] = {m: round(s, 3) for m, s in score_s.items()}
    timings["calibrate_plus_score"] = round(timings.get("calibrate", 0.0) + sum(score_s.values()), 3)
    timings["total"] = round(time.perf_counter() - t0, 3)
    return {
        "edgeq_version": __version__,
        "model_dir": str(model_dir),
        "model": Path(model_dir).resolve().name,
        "methods": list(methods),
        "k": list(ks),
        "rank": rank,
        "percdamp": percdamp,
        "seed": seed,
        "exclude": list(exclude),
        "calibration": calibration.info() if calibration else None,
        "layers": shapes,
        "summary": summarize(pairs),
        "per_layer": [p.row() for p in pairs],
        "concentration": [dict(c.__dict__) for c in conc],
        "timings_s": timings,
        "torch_threads": torch.get_num_threads(),
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def compact(report: dict) -> dict:
    """The report with per-layer rows nested as lists over k (the CSVs hold the flat rows)."""
    ks = report["k"]
    per_layer: dict = {}
    for r in report["per_layer"]:
        d = per_layer.setdefault(r["layer"], {"size": r["size"], "intersection": {}, "iou": {}})
        pair = f"{r['a']}|{r['b']}"
        d["intersection"].setdefault(pair, [None] * len(ks))[ks.index(r["k"])] = r["intersection"]
        d["iou"].setdefault(pair, [None] * len(ks))[ks.index(r["k"])] = round(r["iou"], 5)
    conc: dict = {}
    for c in report["concentration"]:
        d = conc.setdefault(c["layer"], {}).setdefault(c["method"], {"rows_touched": [None] * len(ks),
                                                                       "cols_touched": [None] * len(ks)})
        d["rows_touched"][ks.index(c["k"])] = c["rows_touched"]
        d["cols_touched"][ks.index(c["k"])] = c["cols_touched"]
    return {**report, "per_layer": per_layer, "concentration": conc}


def write_outputs(report: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / REPORT_JSON, out / SUMMARY_CSV, out / LAYERS_CSV, out / CONCENTRATION_CSV, out / PLOT_PNG]
    text = json.dumps(compact(report), indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    paths[0].write_text(text + "\n", encoding="utf-8")
    _write_csv(paths[1], report["summary"])
    _write_csv(paths[2], report["per_layer"])
    _write_csv(paths[3], report["concentration"])
    plot_iou(report, paths[4])
    return paths


def plot_iou(report: dict, path: Path) -> None:
    """Macro IoU (%) vs k on a log axis, one series per pair (± standard error), chance as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["summary"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    pairs = list(dict.fromkeys((r["a"], r["b"]) for r in rows))
    markers = "osD^vP*Xh<>"
    for i, (a, b) in enumerate(pairs):
        rs = sorted((r for r in rows if (r["a"], r["b"]) == (a, b)), key=lambda r: r["k"])
        ax.errorbar([r["k"] for r in rs], [100 * r["macro_iou"] for r in rs],
                    yerr=[100 * (r["macro_iou_se"] if r["macro_iou_se"] == r["macro_iou_se"] else 0) for r in rs],
                    marker=markers[i % len(markers)], capsize=3, label=f"{a.upper()} vs {b.upper()}")
    chance = sorted({(r["k"], r["chance_iou"]) for r in rows})
    ax.plot([c[0] for c in chance], [100 * c[1] for c in chance], "k--", lw=1, label="chance (independent)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["k"], [str(k) for k in report["k"]])
    ax.minorticks_off()
    ax.set_xlabel("k (FP32 weights per Linear)")
    ax.set_ylabel("Selection similarity, macro IoU (%)")
    ax.set_ylim(0, 100)
    cal = report.get("calibration")
    src = f"; calib {Path(cal['source']).parent.name or cal['source']} ×{cal['samples']}" if cal else ""
    ax.set_title(f"{report['model']}: top-k selection IoU ({len(report['layers'])} Linears{src})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
