"""Compact storage vs the same plan stored plain: Linear bytes, bit-identical outputs, session-creation time.

    python tools/compact_storage_check.py ../shared/models/minilm-l6-rte ../shared/data/glue/RTE/dev.tsv

For k = 0 and 256: plan with float16 scales (``ConvertConfig(storage="compact")``), rewrite the FP32
export twice (``storage="plain"`` and ``"compact"``), run ONNX Runtime on every example of the TSV
and compare the outputs with ``np.array_equal``; also today's plan (float32 scales) stored plain,
for the byte ratio, and the median of 5 session creations of each file.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np

from edgeq.config import ConvertConfig
from edgeq.model.load import load_model
from edgeq.model.texts import encode_batches, read_glue_texts
from edgeq.onnx.export import export_fp32
from edgeq.onnx.rewrite import rewrite_linears
from edgeq.onnx.session import make_session
from edgeq.onnx.sizes import size_by_component
from edgeq.quant.plan import build_plan


def linear_bytes(model) -> int:
    s = size_by_component(model)
    return s["int4_codes"] + s["scales"] + s["fp32_correction"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("tsv", type=Path)
    args = ap.parse_args()
    loaded = load_model(args.model)
    fp32 = export_fp32(loaded)
    weights = loaded.linear_weights()
    batches = encode_batches(loaded, read_glue_texts(args.tsv))
    for k in (0, 256):
        plan = build_plan(weights, ConvertConfig(k=k, storage="compact"))
        files, sizes = {}, {}
        for storage in ("plain", "compact"):
            m = copy.deepcopy(fp32)
            rewrite_linears(m, plan.quants, weights, storage=storage)
            files[storage], sizes[storage] = m.SerializeToString(), linear_bytes(m)
        today = copy.deepcopy(fp32)
        rewrite_linears(today, build_plan(weights, ConvertConfig(k=k)).quants, weights)
        sessions = {st: make_session(b, 2) for st, b in files.items()}
        same = all(np.array_equal(sessions["plain"].run(None, b)[0], sessions["compact"].run(None, b)[0])
                   for b in batches)
        times: dict[str, list[float]] = {"plain": [], "compact": []}
        for _ in range(5):
            for st in times:
                t0 = time.perf_counter()
                make_session(files[st], 2)
                times[st].append(time.perf_counter() - t0)
        n = sum(len(b["input_ids"]) for b in batches)
        print(f"k={k}: Linear bytes today {linear_bytes(today)}, compact {sizes['compact']} "
              f"({sizes['compact'] / linear_bytes(today):.3f}x); same plan plain vs compact on {n} examples: "
              f"bit-identical {same}; session creation median plain {np.median(times['plain']):.3f} s, "
              f"compact {np.median(times['compact']):.3f} s")


if __name__ == "__main__":
    main()
