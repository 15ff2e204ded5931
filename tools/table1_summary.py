#!/usr/bin/env python
"""Summarise results/table1/*/cells into Markdown: per-sweep grids, the closing-note cells
(k = 1, 256, 4096) next to the paper's figures, and every method's difference from the
magnitude and random baselines with its standard errors.

    python tools/table1_summary.py [results/table1] > summary.md

Standard error: each cell's binomial s.e. sqrt(p(1−p)/n).  A difference between two cells is
called "within noise" when |Δ| ≤ 1 binomial s.e. of the cell.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# the paper's figures (ALGORITHMS.md §8.3; DistilBERT, not these MiniLM models): accuracy %
PAPER = {
    ("MRPC", 1): "SVD 85.54 / AWQ 86.01 / SpQR 86.11",
    ("RTE", "high"): "SVD 66.06 / AWQ 65.34 / SpQR 65.34 (\"high protection budgets\", k not stated)",
}
METHODS = ("svd", "awq", "spqr", "magnitude", "random")


def load(root: Path) -> dict[str, dict]:
    sweeps = {}
    for d in sorted(p for p in root.iterdir() if (p / "cells").is_dir()):
        cells = {}
        for f in (d / "cells").glob("*.json"):
            c = json.loads(f.read_text())
            cells[c["cell"]] = c
        if "fp32" in cells and "accuracy" not in cells["fp32"]["metrics"]:  # STS-B: Spearman, no accuracy
            print(f"skipping {d.name}: a {cells['fp32']['settings']['task']} sweep (not accuracy); "
                  f"its own table is {d / 'table1.md'}", file=sys.stderr)
        elif "fp32" in cells:
            sweeps[d.name] = {"cells": cells, "settings": cells["fp32"]["settings"],
                              "command": (d / "COMMAND").read_text().strip() if (d / "COMMAND").is_file() else ""}
    return sweeps


def acc(c) -> float:
    return 100 * c["metrics"]["accuracy"]


def se(c) -> float:
    return 100 * c["accuracy_se"]


def fmt(c) -> str:
    return f"{acc(c):.2f} ± {se(c):.2f} ({c['correct']}/{c['examples']})"


def ks_of(cells) -> list[int]:
    return sorted({c["k"] for c in cells.values() if c.get("method")})


def grid(name: str, sw: dict) -> str:
    cells = sw["cells"]
    ks = ks_of(cells)
    methods = [m for m in METHODS if any(c.get("method") == m for c in cells.values())]
    s = sw["settings"]
    out = [f"#### {s['task']}, block {s['block_size']} (`{name}`)", ""]
    if sw["command"]:
        out += [f"`{sw['command']}`", ""]
    fp, i4 = cells["fp32"], cells.get("int4-k0")
    out.append(f"FP32 {fmt(fp)} (PyTorch {fp.get('pytorch_correct')}/{fp['examples']}); "
               + (f"int4 k=0 {fmt(i4)}, agreement with FP32 {100 * i4['agreement']:.2f} %" if i4 else ""))
    out += [""] + _method_table(methods, ks, cells, lambda c: f"{acc(c):.2f} ({c['correct']})")
    out.append("")
    out.append(f"(accuracy %, correct count in brackets; binomial s.e. of every cell ≈ {se(fp):.2f} points)")
    if i4 and i4.get("recon_error_total"):
        out += ["", "Weight reconstruction error Σ‖W − Ŵ‖²_F over the quantized Linears, as % of int4 (k=0):", ""]
        out += _method_table(methods, ks, cells,
                             lambda c: f"{100 * c['recon_error_total'] / i4['recon_error_total']:.2f}")
    return "\n".join(out) + "\n"


def _method_table(methods, ks, cells, fmt_cell) -> list[str]:
    """Markdown rows: one per method, one column per k, ``fmt_cell(cell)`` where the cell exists."""
    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for m in methods:
        row = [fmt_cell(c) if (c := cells.get(f"{m}-k{k}")) else "" for k in ks]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return lines


def differences(sweeps: dict) -> str:
    """Every non-baseline method cell against magnitude and random at the same k."""
    lines = ["| sweep | method | k | acc | Δ vs magnitude (ex.) | Δ vs random (ex.) | |Δ| > 1 s.e.? |",
             "|---|---|---|---|---|---|---|"]
    for name, sw in sweeps.items():
        cells = sw["cells"]
        for m in ("svd", "awq", "spqr"):
            for k in ks_of(cells):
                c = cells.get(f"{m}-k{k}")
                if c is None:
                    continue
                d = []
                beyond = []
                for base in ("magnitude", "random"):
                    b = cells.get(f"{base}-k{k}")
                    if b is None:
                        d.append("")
                        continue
                    delta = c["correct"] - b["correct"]
                    d.append(f"{delta:+d}")
                    if abs(acc(c) - acc(b)) > se(c):
                        beyond.append(base)
                lines.append(f"| {name} | {m} | {k} | {acc(c):.2f} | {d[0]} | {d[1]} | {', '.join(beyond) or 'no'} |")
    return "\n".join(lines) + "\n"


def tally(sweeps: dict) -> str:
    """Wins / ties / losses (in correct examples) of each method against each baseline, all sweeps."""
    lines = ["| method | vs | cells | wins | ties | losses | largest gain | largest loss | |Δ| > 1 s.e. |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in ("svd", "awq", "spqr"):
        for base in ("magnitude", "random"):
            deltas, beyond = [], 0
            for sw in sweeps.values():
                cells = sw["cells"]
                for k in ks_of(cells):
                    a, b = cells.get(f"{m}-k{k}"), cells.get(f"{base}-k{k}")
                    if a and b:
                        deltas.append(a["correct"] - b["correct"])
                        beyond += abs(acc(a) - acc(b)) > se(a)
            if deltas:
                w = sum(d > 0 for d in deltas)
                t = sum(d == 0 for d in deltas)
                lines.append(f"| {m} | {base} | {len(deltas)} | {w} | {t} | {len(deltas) - w - t} | "
                             f"{max(deltas):+d} | {min(deltas):+d} | {beyond} |")
    return "\n".join(lines) + "\n"


def closing(sweeps: dict) -> str:
    lines = ["| task | granularity | k | " + " | ".join(METHODS) + " | paper (DistilBERT) |",
             "|---|---|---|" + "---|" * (len(METHODS) + 1)]
    for name, sw in sweeps.items():
        cells, s = sw["cells"], sw["settings"]
        for k in (1, 256, 4096):
            if not any(f"{m}-k{k}" in cells for m in METHODS):
                continue
            vals = [f"{acc(cells[f'{m}-k{k}']):.2f}" if f"{m}-k{k}" in cells else "–" for m in METHODS]
            paper = PAPER.get((s["task"], k)) or (PAPER.get((s["task"], "high")) if k == 4096 else "") or ""
            lines.append(f"| {s['task']} | {s['block_size']} | {k} | " + " | ".join(vals) + f" | {paper} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]) if argv else Path("results/table1")
    sweeps = load(root)
    if not sweeps:
        print(f"no sweeps under {root}", file=sys.stderr)
        return 1
    print("### Closing-note cells (accuracy %, k = 1, 256, 4096)\n")
    print(closing(sweeps))
    print("### Each sweep\n")
    for name, sw in sweeps.items():
        print(grid(name, sw))
    print("### SVD / AWQ / SpQR against the magnitude and random baselines (same quantizer, same k)\n")
    print(tally(sweeps))
    print(differences(sweeps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
