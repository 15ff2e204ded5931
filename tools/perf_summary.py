"""Markdown tables from results/bench (accuracy.json of tools/bench_peers.py, latency JSON of edgeq bench).

    python tools/perf_summary.py results/bench/accuracy.json results/bench/latency_rte.json > results/bench/summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    acc = json.loads(Path(sys.argv[1]).read_text())
    lat = json.loads(Path(sys.argv[2]).read_text())
    models = lat["models"]
    base = models[0]
    shapes = lat["shapes"]
    name = lambda m: Path(m["path"]).stem  # noqa: E731
    print(f"Latency, size and memory ({lat['threads']} threads, {lat['repeats']} interleaved rounds, "
          f"onnxruntime {lat['onnxruntime']}); ratios to {name(base)} measured in the same run.\n")
    head = (["model", "MiB", "size ×"] + [f"{s} ms (p10–p90)" for s in shapes] + [f"{s} ×" for s in shapes]
            + ["peak mem MiB"])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for m in models:
        row = [name(m), f"{m['file_bytes'] / 2**20:.1f}", f"{m['file_bytes'] / base['file_bytes']:.3f}"]
        row += [f"{m['latency'][s]['median_ms']:.1f} ({m['latency'][s]['p10_ms']:.1f}–{m['latency'][s]['p90_ms']:.1f})"
                for s in shapes]
        row += [f"{m['latency'][s]['median_ms'] / base['latency'][s]['median_ms']:.2f}" for s in shapes]
        row.append("-" if m.get("peak_rss_bytes") is None else f"{m['peak_rss_bytes'] / 2**20:.0f}")
        print("| " + " | ".join(row) + " |")
    tasks = list(acc)
    print("\nGLUE dev accuracy (± one standard error) and top-1 agreement with the FP32 ONNX model.\n")
    head = ["model"] + [f"{t} acc" for t in tasks] + [f"{t} agree" for t in tasks]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for v in acc[tasks[0]]:
        row = [v]
        row += [f"{100 * acc[t][v]['accuracy']:.1f} ± {100 * acc[t][v]['accuracy_se']:.1f}" if v in acc[t] else "-"
                for t in tasks]
        row += [f"{acc[t][v]['agreement_fp32']:.3f}" if v in acc[t] else "-" for t in tasks]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
