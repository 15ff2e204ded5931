"""Convert one model twice (--threads 1 / PYTHONHASHSEED 1, then --threads 2 / PYTHONHASHSEED 2) and compare.

Prints the sha256 of both out.onnx files and whether the JSON reports agree apart from
``timings_s``, ``memory`` and ``output``.

    python tools/determinism_check.py ../shared/models/minilm-l6-rte --out results/determinism.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args, extra = ap.parse_known_args()
    rows, reports = [], []
    with tempfile.TemporaryDirectory(prefix="edgeq-det-") as d:
        for run, threads in ((1, 1), (2, 2)):
            out = Path(d) / f"run{run}" / "model.onnx"
            out.parent.mkdir()
            env = {**os.environ, "PYTHONHASHSEED": str(run), "OMP_NUM_THREADS": str(threads)}
            cmd = [sys.executable, "-m", "edgeq", "convert", "-q", str(args.model), str(out),
                   "--threads", str(threads), *extra]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, cwd=REPO)
            secs = time.perf_counter() - t0
            sha = hashlib.sha256(out.read_bytes()).hexdigest()
            report = json.loads(out.with_suffix(".json").read_text())
            rows.append((run, threads, sha, out.stat().st_size, secs))
            report.pop("timings_s")
            report.pop("memory", None)
            report.pop("output")
            reports.append(report)
    same = len({r[2] for r in rows}) == 1
    lines = [f"# Determinism: `edgeq convert {args.model}" + (" " + " ".join(extra) if extra else "") + "` twice", "",
             "| run | --threads / OMP threads | PYTHONHASHSEED | sha256 of out.onnx | bytes | wall s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r} | {t} | {r} | `{s}` | {b} | {w:.0f} |" for r, t, s, b, w in rows]
    lines += ["", f"Identical bytes: {'yes' if same else 'NO'}; reports equal apart from timings_s, memory and output: "
              f"{'yes' if reports[0] == reports[1] else 'NO'}."]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0 if same and reports[0] == reports[1] else 1


if __name__ == "__main__":
    sys.exit(main())
