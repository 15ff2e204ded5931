"""ONNX Runtime kernel time per operator type (and optionally per node) of one or more models.

Where does a model's latency go?  Runs each model with ORT's profiler on one input shape and sums
the ``*_kernel_time`` events by op type (ms per run).  Used to find the cost of the FP32 correction
branch (docs/performance.md):

    python tools/profile_ops.py k0.onnx k256.onnx --shape 1x128 --threads 1 [--nodes 20]

Inputs: ``input_ids`` (token ids 100…1099), ``attention_mask`` (ones), other int64 inputs zeros.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np


def profile(path: Path, batch: int, seq: int, threads: int,
            runs: int) -> tuple[collections.Counter, collections.Counter, collections.Counter]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / path.stem)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {}
    for i in sess.get_inputs():
        if "input_ids" in i.name:
            feed[i.name] = (np.arange(batch * seq).reshape(batch, seq) % 1000 + 100).astype(np.int64)
        elif "mask" in i.name:
            feed[i.name] = np.ones((batch, seq), np.int64)
        else:
            feed[i.name] = np.zeros((batch, seq), np.int64)
    for _ in range(runs):  # averaged over all runs; the first (cold) one is included
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op, count, by_node = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            by_op[op] += e["dur"]
            count[op] += 1
            by_node[e["name"][: -len("_kernel_time")]] += e["dur"]
    return by_op, count, by_node


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--shape", default="1x128")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--nodes", type=int, default=0, help="also list the N slowest nodes")
    args = ap.parse_args()
    batch, seq = map(int, args.shape.split("x"))
    for path in args.models:
        by_op, count, by_node = profile(path, batch, seq, args.threads, args.runs)
        n = args.runs
        print(f"{path.name} {args.shape}, {args.threads} thread(s): "
              f"kernels {sum(by_op.values()) / n / 1000:.2f} ms/run")
        for op, t in by_op.most_common():
            print(f"  {op:24s} {t / n / 1000:7.3f} ms  nodes {count[op] // n}")
        for name, t in by_node.most_common(args.nodes):
            print(f"    {name:70s} {t / n:8.1f} us")


if __name__ == "__main__":
    main()
