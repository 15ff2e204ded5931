"""How stable are the calibration-based selections (awq, spqr) across calibration samples?

For one model: calibrate on --seeds different 128-example samples of the task's train split,
score every Linear, and report the macro IoU (± SE over layers) between the selections of the
same method under different seeds, at every k.  This is the noise floor against which the
SVD–AWQ / SVD–SpQR overlaps of `edgeq saliency` should be read.

    python tools/saliency_seed_stability.py ../shared/models/minilm-l6-rte --calib rte \
        --out results/saliency/minilm-l6-rte/seed_stability.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from edgeq.model.calib import calibrate
from edgeq.model.load import load_model
from edgeq.saliency import ScoreContext, get_method
from edgeq.saliency.overlap import (
    LayerPair,
    descending_order,
    intersection_size,
    summarize,
    topk_from_order,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--methods", default="awq,spqr")
    ap.add_argument("--k", default="1,16,64,256,1024,4096")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    ks = [int(k) for k in a.k.split(",")]
    methods = a.methods.split(",")
    loaded = load_model(a.model_dir)
    weights = loaded.linear_weights()
    orders: dict = {}
    cal_info = []
    for seed in seeds:
        cal = calibrate(loaded, a.calib, a.samples, seed)
        cal_info.append(cal.info())
        for name, w in weights.items():
            for m in methods:
                ctx = ScoreContext(layer=name, stats=cal.stats[name])
                orders[(m, seed, name)] = descending_order(get_method(m).score(torch.from_numpy(w), ctx), max(ks))
    pairs = []
    for m in methods:
        for s1, s2 in itertools.combinations(seeds, 2):
            for name, w in weights.items():
                size = w.size
                for k in ks:
                    kk = min(k, size)
                    c = intersection_size(topk_from_order(orders[(m, s1, name)], kk),
                                          topk_from_order(orders[(m, s2, name)], kk))
                    pairs.append(LayerPair(name, f"{m}@seed{s1}", f"{m}@seed{s2}", k, size, c))
    summary = summarize(pairs)
    report = {"model": a.model_dir.resolve().name, "calibration": cal_info, "methods": methods, "k": ks,
              "summary": summary}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    for m in methods:
        rows = [r for r in summary if r["a"].startswith(m + "@")]
        line = "  ".join(f"k={k}: {100 * np.mean([r['macro_iou'] for r in rows if r['k'] == k]):.1f}" for k in ks)
        print(f"{m} across calibration seeds, mean of pairwise macro IoU %: {line}")


if __name__ == "__main__":
    main()
