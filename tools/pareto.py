"""Pareto frontier of edgeq configurations against the peers (issue 5's dominance target).

Reads the accuracy JSON of ``tools/bench_peers.py`` (GLUE dev accuracy ± SE and top-1 agreement per
task and variant) and the ``edgeq bench`` JSON of the same variants (size, median latency per
shape, one interleaved run), then:

* for every peer (FP32 and ONNX Runtime's quantizers), lists the edgeq configurations that are at
  least as good on **all** of size, latency at the chosen shapes, dev accuracy on every task and
  agreement with FP32 on every task (strict dominance; agreement is not compared against FP32
  itself), and for the closest edgeq configuration, which criteria fail and by how much;
* draws size × vs latency × (ratios to FP32 in the same run) with accuracy labels.

    python tools/pareto.py results/bench/accuracy.json results/bench/peers_rte.json \
        --md results/bench/pareto.md --png results/bench/pareto.png

Issue 15 (``tools/integer_eval.py --render``): ``--reference ort-int8-dynamic`` takes the ratios to
that model instead of FP32, ``--peers`` names the peers, ``--variants`` lists rows even when the
bench run lacks them (latency "–", size from ``--sizes``), ``--stsb`` adds the STS-B Spearman
column and ``--min-agreement 0.98`` adds the acceptance check of every edgeq row against the
reference (size ≤, latency ratio ≤ 1.00 at every shape, agreement with FP32 ≥ the floor, dev
accuracy ≥ the reference's on every task).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PEERS = ("fp32", "ort-rtn-acc4", "ort-rtn-acc4-emb", "ort-hqq", "ort-int8-dynamic")


def load(acc_path: Path, bench_path: Path, shapes: list[str], reference: str = "fp32",
         names: list[str] | None = None, sizes: dict[str, int] | None = None) -> dict[str, dict]:
    """Rows of ratios to ``reference``: the bench run's models, or ``names`` (latency None when not timed)."""
    acc = json.loads(acc_path.read_text())
    bench = {Path(m["path"]).stem: m for m in json.loads(bench_path.read_text())["models"]}
    nbytes = {**(sizes or {}), **{n: m["file_bytes"] for n, m in bench.items()}}
    base = bench.get(reference)
    rows = {}
    for name in names if names is not None else list(bench):
        if not all(name in acc[t] for t in acc) or name not in nbytes:
            continue
        m = bench.get(name)
        rows[name] = {
            "size": nbytes[name] / nbytes[reference] if reference in nbytes else None,
            **{f"lat {s}": m["latency"][s]["median_ms"] / base["latency"][s]["median_ms"] if m and base else None
               for s in shapes},
            **{f"acc {t}": acc[t][name]["accuracy"] for t in acc},
            **{f"se {t}": acc[t][name]["accuracy_se"] for t in acc},
            **{f"agree {t}": acc[t][name]["agreement_fp32"] for t in acc},
        }
    return rows


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def shortfalls(e: dict, p: dict, shapes: list[str], tasks: list[str]) -> list[str]:
    """Criteria on which ``e`` is worse than ``p`` (empty: e dominates p)."""
    out = []
    if e["size"] > p["size"]:
        out.append(f"size {e['size']:.3f} > {p['size']:.3f}")
    for s in shapes:
        if e[f"lat {s}"] is None or p[f"lat {s}"] is None:
            out.append(f"{s} not timed")
        elif e[f"lat {s}"] > p[f"lat {s}"]:
            out.append(f"{s} {e[f'lat {s}']:.2f} > {p[f'lat {s}']:.2f}")
    for t in tasks:
        if e[f"acc {t}"] < p[f"acc {t}"]:
            d = 100 * (p[f"acc {t}"] - e[f"acc {t}"])
            out.append(f"{t} acc −{d:.1f} pt ({d / (100 * p[f'se {t}']):.1f} SE)")
        if p[f"agree {t}"] < 1.0 and e[f"agree {t}"] < p[f"agree {t}"]:  # FP32 itself: agreement 1 by definition
            out.append(f"{t} agree {e[f'agree {t}']:.3f} < {p[f'agree {t}']:.3f}")
    return out


def acceptance(e: dict, ref: dict, shapes: list[str], tasks: list[str], min_agreement: float) -> list[str]:
    """Issue 15's criteria for ``e`` against the reference row (ratios to it, so its latency is 1.00)."""
    out = []
    if e["size"] > ref["size"]:
        out.append(f"size {e['size']:.3f}× (+{100 * (e['size'] / ref['size'] - 1):.1f} %)")
    for s in shapes:
        if e[f"lat {s}"] is None:
            out.append(f"{s} not timed")
        elif e[f"lat {s}"] > ref[f"lat {s}"]:
            out.append(f"{s} {e[f'lat {s}']:.2f}× (+{100 * (e[f'lat {s}'] / ref[f'lat {s}'] - 1):.0f} %)")
    for t in tasks:
        if e[f"agree {t}"] < min_agreement:
            a = e[f"agree {t}"]
            out.append(f"{t} agreement {a:.3f} < {min_agreement:.2f} (short by {min_agreement - a:.3f})")
        if e[f"acc {t}"] < ref[f"acc {t}"]:
            d = 100 * (ref[f"acc {t}"] - e[f"acc {t}"])
            out.append(f"{t} acc −{d:.1f} pt ({d / (100 * ref[f'se {t}']):.1f} SE)")
    return out


def markdown(rows: dict[str, dict], all_shapes: list[str], shapes: list[str], tasks: list[str],
             peers: tuple[str, ...] = PEERS, reference: str = "fp32", stsb: dict[str, float] | None = None,
             min_agreement: float | None = None) -> str:
    edgeq = [n for n in rows if n.startswith("edgeq")]
    sts = stsb is not None
    ref = "" if reference == "fp32" else " " + reference
    lines = [f"| model | size ×{ref} | " + " | ".join(f"{s} ×" for s in all_shapes) + " | "
             + " | ".join(f"{t} acc" for t in tasks) + " | " + " | ".join(f"{t} agree" for t in tasks)
             + (" | STS-B ρ×100" if sts else "") + " |",
             "|" + "---|" * (2 + len(all_shapes) + 2 * len(tasks) + sts)]
    for n, r in rows.items():
        lines.append(f"| {n} | {_num(r['size'], '.3f')} | " + " | ".join(_num(r[f"lat {s}"]) for s in all_shapes)
                     + " | " + " | ".join(f"{100 * r[f'acc {t}']:.1f} ± {100 * r[f'se {t}']:.1f}" for t in tasks)
                     + " | " + " | ".join(f"{r[f'agree {t}']:.3f}" for t in tasks)
                     + (f" | {_num(stsb.get(n))}" if sts else "") + " |")
    if min_agreement is not None and reference in rows:
        lines += ["", f"Acceptance against **{reference}** (size ≤ its size, latency ratio ≤ 1.00 at "
                  + ", ".join(all_shapes) + f", agreement with FP32 ≥ {min_agreement} and dev accuracy ≥ "
                  f"{reference}'s on " + ", ".join(tasks) + "):", ""]
        for e in edgeq:
            fails = acceptance(rows[e], rows[reference], all_shapes, tasks, min_agreement)
            lines.append(f"* {e}: " + ("**meets every criterion**." if not fails else "fails on " + "; ".join(fails)
                                       + "."))
    lines += ["", "Dominance (an edgeq configuration at least as good on size, latency at "
              + ", ".join(shapes) + ", dev accuracy and agreement on " + ", ".join(tasks) + "):", ""]
    for p in peers:
        if p not in rows:
            continue
        fails = {e: shortfalls(rows[e], rows[p], shapes, tasks) for e in edgeq}
        winners = [e for e, f in fails.items() if not f]
        if not fails:
            continue
        if winners:
            lines.append(f"* **{p}**: dominated by {', '.join(winners)}.")
        else:
            best = min(fails, key=lambda e: len(fails[e]))
            lines.append(f"* **{p}**: not dominated. Closest: {best} — fails on {'; '.join(fails[best])}.")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict], shape: str, tasks: list[str], png: Path, ymax: float = 1.8,
         reference: str = "FP32 ONNX") -> None:
    """Size × vs latency × at ``shape``; points numbered, the key lists name and accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, key) = plt.subplots(1, 2, figsize=(11, 5.5), gridspec_kw={"width_ratios": [1.4, 1]})
    lines = []
    for i, (n, r) in enumerate(rows.items(), 1):
        if r[f"lat {shape}"] is None or r["size"] is None:
            lines.append(f"{i:2d} {n}: " + "/".join(f"{100 * r[f'acc {t}']:.1f}" for t in tasks) + " (not timed)")
            continue
        peer = not n.startswith("edgeq")
        y = min(r[f"lat {shape}"], ymax)
        ax.scatter(r["size"], y, marker="s" if peer else "o", color="tab:gray" if peer else "tab:blue",
                   facecolors="none" if y < r[f"lat {shape}"] else None)
        ax.annotate(str(i), (r["size"], y), fontsize=7, xytext=(3, 2), textcoords="offset points")
        accs = "/".join(f"{100 * r[f'acc {t}']:.1f}" for t in tasks)
        off = f" (latency {r[f'lat {shape}']:.1f}, off chart)" if y < r[f"lat {shape}"] else ""
        lines.append(f"{i:2d} {n}: {accs}{off}")
    ax.axhline(1.0, color="k", lw=0.5, ls=":")
    ax.set_ylim(top=ymax * 1.03)
    ax.set_xlabel(f"file size × {reference}")
    ax.set_ylabel(f"median latency at {shape} × {reference} (same run)")
    ax.set_title("squares: FP32 and ONNX Runtime's quantizers; circles: edgeq", fontsize=9)
    ax.grid(alpha=0.3)
    key.axis("off")
    key.text(0, 1, f"dev accuracy % ({'/'.join(tasks)})\n\n" + "\n".join(lines), va="top", family="monospace",
             fontsize=7, transform=key.transAxes)
    fig.tight_layout()
    fig.savefig(png, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("accuracy", type=Path)
    ap.add_argument("bench", type=Path)
    ap.add_argument("--shapes", default="1x128,8x128", help="latency shapes that count for dominance")
    ap.add_argument("--plot-shape", default="1x128")
    ap.add_argument("--md", type=Path)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--peers", default=",".join(PEERS), help="models the dominance check compares against")
    ap.add_argument("--reference", default="fp32", help="the model every ratio is taken to")
    ap.add_argument("--variants", help="rows to show (default: the bench run's models)")
    ap.add_argument("--sizes", type=Path, help="JSON {name: bytes} (or sizes.json: its rte entry) for rows the "
                    "bench run lacks")
    ap.add_argument("--stsb", type=Path, help="JSON {name: {spearman: ρ×100}} (or stsb.json): an STS-B column")
    ap.add_argument("--min-agreement", type=float, help="add the acceptance check against --reference")
    args = ap.parse_args()
    print(render(args.accuracy, args.bench, args.shapes.split(","), args.plot_shape, args.md, args.png,
                 tuple(args.peers.split(",")), args.reference, args.variants.split(",") if args.variants else None,
                 _flat(json.loads(args.sizes.read_text()), "rte") if args.sizes else None,
                 _flat(json.loads(args.stsb.read_text()), "stsb") if args.stsb else None, args.min_agreement))


def _flat(data: dict, key: str) -> dict:
    """``data[key]`` for the per-task files of tools/integer_eval.py (sizes.json, stsb.json), else ``data``."""
    return data[key] if key in data and isinstance(data[key], dict) else data


def render(acc: Path, bench: Path, shapes: list[str], plot_shape: str, md: Path | None, png: Path | None,
           peers: tuple[str, ...] = PEERS, reference: str = "fp32", names: list[str] | None = None,
           sizes: dict[str, int] | None = None, stsb: dict[str, dict] | None = None,
           min_agreement: float | None = None, header: str = "", tasks: list[str] | None = None) -> str:
    """The table (and plot) of ``acc`` × ``bench``; returns the markdown (also written to ``md``)."""
    tasks = tasks or list(json.loads(acc.read_text()))
    bench_shapes = json.loads(bench.read_text())["shapes"]
    rows = load(acc, bench, bench_shapes, reference, names, sizes)
    sts = None if stsb is None else {n: v["spearman"] for n, v in stsb.items()}
    text = header + markdown(rows, bench_shapes, shapes, tasks, peers, reference, sts, min_agreement)
    if md:
        md.write_text(text, encoding="utf-8")
    if png:
        plot(rows, plot_shape, tasks, png, *((1.8, "FP32 ONNX") if reference == "fp32" else (2.6, reference)))
    return text


if __name__ == "__main__":
    main()
