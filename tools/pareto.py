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
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PEERS = ("fp32", "ort-rtn-acc4", "ort-rtn-acc4-emb", "ort-hqq", "ort-int8-dynamic")


def load(acc_path: Path, bench_path: Path, shapes: list[str]) -> dict[str, dict]:
    acc = json.loads(acc_path.read_text())
    bench = json.loads(bench_path.read_text())
    base = next(m for m in bench["models"] if Path(m["path"]).stem == "fp32")
    rows = {}
    for m in bench["models"]:
        name = Path(m["path"]).stem
        if not all(name in acc[t] for t in acc):
            continue
        rows[name] = {
            "size": m["file_bytes"] / base["file_bytes"],
            **{f"lat {s}": m["latency"][s]["median_ms"] / base["latency"][s]["median_ms"] for s in shapes},
            **{f"acc {t}": acc[t][name]["accuracy"] for t in acc},
            **{f"se {t}": acc[t][name]["accuracy_se"] for t in acc},
            **{f"agree {t}": acc[t][name]["agreement_fp32"] for t in acc},
        }
    return rows


def shortfalls(e: dict, p: dict, shapes: list[str], tasks: list[str]) -> list[str]:
    """Criteria on which ``e`` is worse than ``p`` (empty: e dominates p)."""
    out = []
    if e["size"] > p["size"]:
        out.append(f"size {e['size']:.3f} > {p['size']:.3f}")
    for s in shapes:
        if e[f"lat {s}"] > p[f"lat {s}"]:
            out.append(f"{s} {e[f'lat {s}']:.2f} > {p[f'lat {s}']:.2f}")
    for t in tasks:
        if e[f"acc {t}"] < p[f"acc {t}"]:
            d = 100 * (p[f"acc {t}"] - e[f"acc {t}"])
            out.append(f"{t} acc −{d:.1f} pt ({d / (100 * p[f'se {t}']):.1f} SE)")
        if p[f"agree {t}"] < 1.0 and e[f"agree {t}"] < p[f"agree {t}"]:  # FP32 itself: agreement 1 by definition
            out.append(f"{t} agree {e[f'agree {t}']:.3f} < {p[f'agree {t}']:.3f}")
    return out


def markdown(rows: dict[str, dict], all_shapes: list[str], shapes: list[str], tasks: list[str]) -> str:
    edgeq = [n for n in rows if n.startswith("edgeq")]
    lines = ["| model | size × | " + " | ".join(f"{s} ×" for s in all_shapes) + " | "
             + " | ".join(f"{t} acc" for t in tasks) + " | " + " | ".join(f"{t} agree" for t in tasks) + " |",
             "|" + "---|" * (2 + len(all_shapes) + 2 * len(tasks))]
    for n, r in rows.items():
        lines.append(f"| {n} | {r['size']:.3f} | " + " | ".join(f"{r[f'lat {s}']:.2f}" for s in all_shapes) + " | "
                     + " | ".join(f"{100 * r[f'acc {t}']:.1f} ± {100 * r[f'se {t}']:.1f}" for t in tasks) + " | "
                     + " | ".join(f"{r[f'agree {t}']:.3f}" for t in tasks) + " |")
    lines += ["", "Dominance (an edgeq configuration at least as good on size, latency at "
              + ", ".join(shapes) + ", dev accuracy and agreement on " + ", ".join(tasks) + "):", ""]
    for p in PEERS:
        if p not in rows:
            continue
        fails = {e: shortfalls(rows[e], rows[p], shapes, tasks) for e in edgeq}
        winners = [e for e, f in fails.items() if not f]
        if winners:
            lines.append(f"* **{p}**: dominated by {', '.join(winners)}.")
        else:
            best = min(fails, key=lambda e: len(fails[e]))
            lines.append(f"* **{p}**: not dominated. Closest: {best} — fails on {'; '.join(fails[best])}.")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict], shape: str, tasks: list[str], png: Path, ymax: float = 1.8) -> None:
    """Size × vs latency × at ``shape``; points numbered, the key lists name and accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, key) = plt.subplots(1, 2, figsize=(11, 5.5), gridspec_kw={"width_ratios": [1.4, 1]})
    lines = []
    for i, (n, r) in enumerate(rows.items(), 1):
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
    ax.set_xlabel("file size × FP32 ONNX")
    ax.set_ylabel(f"median latency at {shape} × FP32 ONNX (same run)")
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
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    tasks = list(json.loads(args.accuracy.read_text()))
    bench_shapes = json.loads(args.bench.read_text())["shapes"]
    rows = load(args.accuracy, args.bench, bench_shapes)
    text = markdown(rows, bench_shapes, shapes, tasks)
    if args.md:
        args.md.write_text(text, encoding="utf-8")
    print(text)
    if args.png:
        plot(rows, args.plot_shape, tasks, args.png)


if __name__ == "__main__":
    main()
