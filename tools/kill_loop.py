"""Interrupt `edgeq convert` with SIGINT / SIGTERM at random moments and check what is left behind.

Each run starts ``edgeq convert MODEL OUT`` in a fresh output directory, waits for a randomly
chosen progress line (start, load, export, plan, rewrite, save, validate) plus a random delay,
then sends SIGINT or SIGTERM (alternating).  After the process ends it records the exit code and
checks: no out.onnx / out.json / out.onnx.data unless the run had already finished (exit 0, in
which case the output must be complete: the .onnx loads and the report is valid JSON), no
``.edgeq-tmp-*`` directory, and the sha256 of every input file unchanged.

    python tools/kill_loop.py ../shared/models/minilm-l6-rte --runs 20 --out results/kill_loop.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STAGES = ["start", "load", "export", "plan", "rewrite", "save", "validate"]


def digest(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def one_run(model: Path, workdir: Path, sig: int, stage: str, delay: float, extra: list[str]) -> dict:
    out = workdir / "out.onnx"
    cmd = [sys.executable, "-m", "edgeq", "convert", str(model), str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1)
    seen: list[str] = []
    reached = threading.Event()
    if stage == "start":
        reached.set()

    def reader():
        for line in proc.stderr:
            seen.append(line.rstrip("\n"))
            if line.rstrip().endswith(f"] {stage} ..."):
                reached.set()
        reached.set()  # process ended before the stage: kill (a no-op) right away

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    reached.wait()
    time.sleep(delay)
    sent_at = time.perf_counter() - t0
    if proc.poll() is None:
        proc.send_signal(sig)
        sent = True
    else:
        sent = False
    code = proc.wait()
    th.join(timeout=10)
    progress = [ln for ln in seen if ln.startswith("[")]
    last_stage = progress[-1].split("] ", 1)[1] if progress else "(before the first stage)"
    errors = [ln for ln in seen if not ln.startswith("[")]
    left = sorted(p.name for p in workdir.iterdir())
    complete = None
    if out.exists():
        import onnx

        try:
            onnx.load(str(out))
            json.loads(out.with_suffix(".json").read_text())
            complete = True
        except Exception:  # noqa: BLE001
            complete = False
    return {
        "signal": signal.Signals(sig).name, "stage": stage, "delay_s": round(delay, 2), "sent_at_s": round(sent_at, 1),
        "sent": sent, "exit": code, "last_progress": last_stage, "stderr_last": errors[-1] if errors else "",
        "left": left, "complete": complete,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--max-delay", type=float, default=3.0, help="seconds after the chosen stage")
    args, extra = ap.parse_known_args()
    rng = random.Random(args.seed)
    inputs_before = digest(args.model)
    rows, failures = [], 0
    base = Path(tempfile.mkdtemp(prefix="edgeq-kill-"))
    try:
        for i in range(args.runs):
            sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
            stage = rng.choice(STAGES)
            delay = rng.uniform(0, args.max_delay if stage != "start" else 20.0)
            wd = base / f"run{i}"
            wd.mkdir()
            r = one_run(args.model, wd, sig, stage, delay, extra)
            r["inputs_unchanged"] = digest(args.model) == inputs_before
            interrupted_clean = r["exit"] != 0 and r["left"] == []
            finished_clean = r["exit"] == 0 and r["complete"] is True and not any(".edgeq-tmp" in n for n in r["left"])
            r["ok"] = r["inputs_unchanged"] and (interrupted_clean or finished_clean)
            failures += not r["ok"]
            rows.append(r)
            print(json.dumps(r), flush=True)
            shutil.rmtree(wd, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    lines = [
        f"# kill loop: `edgeq convert {args.model.name}` interrupted {args.runs} times",
        "",
        f"Command: `python tools/kill_loop.py {args.model} --runs {args.runs} --seed {args.seed}"
        + (" " + " ".join(extra) if extra else "") + "`",
        "",
        "| # | signal | aimed at | sent at (s) | last progress line | exit | files left in the output dir "
        "| inputs unchanged | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        aim = f"{r['stage']} + {r['delay_s']} s"
        lines.append(f"| {i} | {r['signal']} | {aim} | {r['sent_at_s'] if r['sent'] else 'not sent (done)'} | "
                     f"{r['last_progress']} | {r['exit']} | {', '.join(r['left']) or '(none)'} | "
                     f"{'yes' if r['inputs_unchanged'] else 'NO'} | {'yes' if r['ok'] else 'NO'} |")
    n_int = sum(r["exit"] != 0 for r in rows)
    lines += ["", f"{args.runs - failures} of {args.runs} runs ok; {n_int} interrupted (exit != 0) of which "
              f"{sum(r['exit'] != 0 and r['left'] == [] for r in rows)} left no file; "
              f"{sum(r['exit'] == 0 for r in rows)} finished before the signal (complete output).",
              "",
              "stderr of interrupted runs: " + "; ".join(sorted({r["stderr_last"] for r in rows if r["exit"] != 0}))]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
