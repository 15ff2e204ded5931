"""Table I (Markdown, CSV, JSON) and Figure 1 (PNG) from the cells of a sweep.

Rows: FP32, then per variant (the cell-id suffix of :mod:`edgeq.research.cells`) int4 (k = 0) and
each method × k.  Each row gives the task's metrics (%), the correct count out of n, the binomial
standard error ``sqrt(p(1−p)/n)`` of the accuracy, the agreement with the FP32 model's predictions
with its own standard error, and (cells that record them) mean and max |Δlogit| against FP32.
Figure 1 plots the headline metric against k (log x) with ±1 s.e. bars, one line per method and
variant, and beside it the agreement with FP32 (a more sensitive view: it counts flips in both
directions); FP32 and int4 are horizontal lines.

STS-B sweeps (embedding models) give Spearman and Pearson ×100 instead of accuracy, and the mean / min
cosine of each dev sentence's embedding to FP32's instead of agreement and |Δlogit|; the figure plots
Spearman and the mean cosine against k.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from edgeq.research.cells import FP32, cell_id

FIGURES = ("mean_abs_dlogit", "max_abs_dlogit", "recon_error_total")  # in the rows of cells that record them
STS_FIGURES = ("mean_cosine", "min_cosine", "recon_error_total")


def rows(cells: dict[str, dict], methods: Sequence[str], ks: Sequence[int], suffixes: Sequence[str] = ("",)
         ) -> list[dict]:
    """FP32, then per variant (cell-id suffix): int4 (k = 0) and each method × k."""
    order = [(FP32, "FP32", None)]
    for s in suffixes:
        order += [(cell_id(None, 0, s), "int4" + s, 0)] + [(cell_id(m, k, s), m + s, k)
                                                          for m in methods for k in ks if k > 0]
    out = []
    for cid, label, k in order:
        c = cells.get(cid)
        if c is None:
            continue
        if "correct" not in c:  # an STS-B cell
            out.append(_sts_row(c, label, k))
            continue
        row = {"row": label, "k": k, "examples": c["examples"], "correct": c.get("correct")}
        for name, v in c["metrics"].items():
            row[name] = v
        row["accuracy_se"] = c.get("accuracy_se")
        row["agreement"] = c.get("agreement")
        row["agreement_se"] = c.get("agreement_se")
        if cid == FP32:
            row["pytorch_correct"] = c.get("pytorch_correct")
        if "mean_abs_dlogit" in c:  # cells of this version: |Δlogit| vs FP32 and Σ‖W − Ŵ‖²
            row.update({f: c.get(f) for f in FIGURES})
        out.append(row)
    return out


def _sts_row(c: dict, label: str, k: int | None) -> dict:
    row = {"row": label, "k": k, "examples": c["examples"], **c["metrics"]}
    if "pytorch_metrics" in c:  # FP32: PyTorch's figures, and the export's cosines to PyTorch's embeddings
        row.update({f"pytorch_{m}": v for m, v in c["pytorch_metrics"].items()})
        row.update(mean_cosine=c.get("pytorch_mean_cosine"), min_cosine=c.get("pytorch_min_cosine"))
    else:
        row.update({f: c.get(f) for f in STS_FIGURES})
    return row


def sts_markdown(rs: list[dict], title: str) -> str:
    head = ["row", "k", "Spearman", "Pearson", "mean cos vs FP32", "min cos vs FP32", "Σ‖W−Ŵ‖²"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rs:
        vals = [r["row"], "" if r["k"] is None else str(r["k"]), _pct(r.get("spearman")), _pct(r.get("pearson"))]
        vals += [f"{r[f]:.5f}" if r.get(f) is not None else "" for f in ("mean_cosine", "min_cosine")]
        vals.append(f"{r['recon_error_total']:.1f}" if r.get("recon_error_total") is not None else "")
        lines.append("| " + " | ".join(vals) + " |")
    fp32 = next((r for r in rs if "pytorch_spearman" in r), None)
    if fp32 is not None:
        lines += ["", f"FP32 PyTorch: Spearman {_pct(fp32['pytorch_spearman'])}, Pearson "
                      f"{_pct(fp32.get('pytorch_pearson'))}; the FP32 row's cosines are ONNX Runtime vs PyTorch."]
    return "\n".join(lines) + "\n"


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def markdown(rs: list[dict], metric_names: Sequence[str], title: str) -> str:
    dlogit = any("mean_abs_dlogit" in r for r in rs)  # cells computed before the figure existed lack it
    head = ["row", "k"] + [m for m in metric_names] + ["± s.e.", "correct / n", "agree w/ FP32", "± s.e."]
    head += ["mean abs Δlogit", "max abs Δlogit"] if dlogit else []
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rs:
        vals = [r["row"], "" if r["k"] is None else str(r["k"])]
        vals += [_pct(r.get(m)) for m in metric_names]
        vals += [_pct(r.get("accuracy_se")), f"{r['correct']} / {r['examples']}" if r["correct"] is not None else "",
                 _pct(r.get("agreement")), _pct(r.get("agreement_se"))]
        if dlogit:
            vals += [f"{r[f]:.4f}" if r.get(f) is not None else "" for f in ("mean_abs_dlogit", "max_abs_dlogit")]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def pivot_markdown(cells: dict[str, dict], methods: Sequence[str], ks: Sequence[int], metric: str,
                   suffixes: Sequence[str] = ("",)) -> str:
    """(Method, variant) × k grid of ``metric`` (%) ± s.e. (accuracy only), FP32 and int4 in the caption."""
    pos = [k for k in ks if k > 0]
    lines = ["| method | " + " | ".join(f"k={k}" for k in pos) + " |", "|---|" + "---|" * len(pos)]
    for m, s in ((m, s) for s in suffixes for m in methods):
        vals = []
        for k in pos:
            c = cells.get(cell_id(m, k, s))
            if c is None:
                vals.append("")
                continue
            se = c.get("accuracy_se") if metric == "accuracy" else None
            vals.append(_pct(c["metrics"][metric]) + (f" ± {_pct(se)}" if se is not None else ""))
        lines.append(f"| {m}{s} | " + " | ".join(vals) + " |")
    ref = []
    for cid, name in [(FP32, "FP32")] + [(cell_id(None, 0, s), f"int4{s} k=0") for s in suffixes]:
        if cid in cells:
            ref.append(f"{name} {_pct(cells[cid]['metrics'][metric])}")
    return "\n".join(lines) + ("\n\n" + "; ".join(ref) + f" ({metric}, %)\n" if ref else "\n")


def to_csv(rs: list[dict]) -> str:
    keys: list[str] = []
    for r in rs:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rs:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in keys})
    return buf.getvalue()


def figure(cells: dict[str, dict], methods: Sequence[str], ks: Sequence[int], metric: str, title: str, path: Path,
           suffixes: Sequence[str] = ("",)) -> None:
    """Left: ``metric`` vs k; right: agreement with FP32 vs k (±1 s.e. bars; x jittered per line).

    One line per (method, variant): colour = method, line style = variant.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sts = metric == "spearman"
    colors = {"svd": "tab:blue", "awq": "tab:green", "spqr": "tab:red", "magnitude": "tab:orange", "random": "tab:gray",
              "error": "tab:purple", "error-act": "tab:brown"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    pos = [k for k in ks if k > 0]
    panels = ((metric, "accuracy_se" if metric == "accuracy" else None, "Spearman ×100" if sts else f"{metric} (%)",
               100),
              ("agreement", "agreement_se", "agreement with FP32 predictions (%)", 100) if not sts else
              ("mean_cosine", None, "mean cosine to FP32 sentence embeddings", 1))
    lines = [(m, s) for s in suffixes for m in methods]
    styles = ["-", "--", "-.", ":"]
    for ax, (key, se_key, ylabel, scale) in zip(axes, panels):
        def value(c, key=key):
            return c["metrics"][key] if key in c["metrics"] else c.get(key)

        for i, (m, s) in enumerate(lines):
            pts = [(k, cells[cell_id(m, k, s)]) for k in pos if cell_id(m, k, s) in cells]
            if not pts:
                continue
            jitter = 1.07 ** (i - (len(lines) - 1) / 2)  # overlapping lines stay visible
            x = [k * jitter for k, _ in pts]
            y = [scale * value(c) for _, c in pts]
            err = [scale * (c.get(se_key) or 0) if se_key else 0 for _, c in pts]
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=2, lw=1.4, elinewidth=0.7, label=m + s,
                        color=colors.get(m), ls=styles[suffixes.index(s) % len(styles)])
        refs = [(FP32, "FP32", "--", 1.0)] + [(cell_id(None, 0, s), f"int4{s} (k=0)", ":",
                                               1.0 - 0.5 * i / len(suffixes))
                                             for i, s in enumerate(suffixes)]
        for cid, name, style, alpha in refs:
            if cid in cells and value(cells[cid]) is not None:
                ax.axhline(scale * value(cells[cid]), color="black", ls=style, lw=1, label=name, alpha=alpha)
        ax.set_xscale("log")
        ax.set_xlabel("k (FP32 entries kept per Linear)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle(title + ("" if sts else "  (bars: ±1 binomial s.e.)"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(out: Path, cells: dict[str, dict], methods: Sequence[str], ks: Sequence[int], task, title: str,
                  meta: dict, suffixes: Sequence[str] = ("",)) -> dict[str, Path]:
    """Write table1.md/.csv/.json and figure1.png into ``out``; returns their paths."""
    from edgeq.evaluation.embedding import is_sts

    rs = rows(cells, methods, ks, suffixes)
    sts = is_sts(task)
    metric = "spearman" if sts else task.metrics[0]  # MTEB's STS headline
    paths = {"md": out / "table1.md", "csv": out / "table1.csv", "json": out / "table1.json",
             "png": out / "figure1.png"}
    md = sts_markdown(rs, title) if sts else markdown(rs, task.metrics, title)
    md += "\n" + pivot_markdown(cells, methods, ks, metric, suffixes)
    md += ("\nSpearman / Pearson ×100 of the cosine of the two sentences' sentence_embedding vs the gold score; "
           "cosines: each dev sentence's embedding vs FP32 PyTorch's.\n" if sts else
           "\nAccuracy ± binomial standard error sqrt(p(1-p)/n); agreement = share of dev examples on which the "
           "cell predicts the same label as the FP32 model.\n")
    paths["md"].write_text(md, encoding="utf-8")
    paths["csv"].write_text(to_csv(rs), encoding="utf-8")
    paths["json"].write_text(json.dumps({**meta, "rows": rs}, indent=1) + "\n", encoding="utf-8")
    figure(cells, methods, ks, metric, title, paths["png"], suffixes)
    return paths
