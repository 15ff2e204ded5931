"""Per-Linear output error of the integer kernel's plans: plain, act-outlier columns, SmoothQuant-style smoothing.

For every Linear of a MiniLM task model, the FP32 inputs of the first N GLUE dev examples (forward hooks)
go through :func:`edgeq.quant.integer.integer_linear` with each variant's plan (``build_plan`` on
128 calibration examples of the train split, seed 0); printed: ``‖y − x Wᵀ‖ / ‖x Wᵀ‖`` over those inputs,
one row per Linear, then the mean per Linear type (docs/int8.md, SmoothQuant section).

    python tools/smooth_layer_errors.py --task RTE [--examples 32] > results/int8/smooth_layer_errors_rte.txt
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
INTEGER = dict(k=0, bits=8, kernel="integer", block_size="per-channel")
VARIANTS = {"plain": {}, "a4": dict(act_outliers=4), "s25": dict(smooth_alpha=0.25), "s50": dict(smooth_alpha=0.5),
            "s75": dict(smooth_alpha=0.75)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="RTE")
    ap.add_argument("--examples", type=int, default=32)
    args = ap.parse_args()

    import numpy as np
    import torch

    from edgeq.config import ConvertConfig
    from edgeq.evaluation.tasks import get_task, read_examples
    from edgeq.model.calib import calibrate
    from edgeq.model.load import load_model
    from edgeq.model.texts import encode_batches
    from edgeq.quant.integer import input_factors, integer_linear
    from edgeq.quant.plan import build_plan

    task = args.task
    loaded = load_model(SHARED / "models" / f"minilm-l6-{task.lower().replace('-', '')}")
    weights = loaded.linear_weights()
    calib = calibrate(loaded, task, 128, 0, str(SHARED / "data" / "glue"), xtx=False)
    ex = read_examples(get_task(task), SHARED / "data" / "glue" / task / "dev.tsv")
    mods = dict(loaded.model.named_modules())
    inputs: dict[str, list] = {n: [] for n in weights}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].detach().clone()))
             for n in weights]
    with torch.no_grad():
        for b in encode_batches(loaded, ex.texts[:args.examples]):
            loaded.model(**{k: torch.from_numpy(v) for k, v in b.items()})
    for h in hooks:
        h.remove()
    plans = {v: build_plan(weights, ConvertConfig(**INTEGER, **kw, calib=task if kw else None), calib.stats)
             for v, kw in VARIANTS.items()}
    print("layer", *VARIANTS, f"(||y - y32|| / ||y32||, {args.examples} {task} dev examples)")
    by_type = defaultdict(list)
    for name, w in weights.items():
        w32 = torch.from_numpy(np.asarray(w, np.float32))
        row = []
        for plan in plans.values():
            q = plan.layers[name].quant
            qi = torch.from_numpy((q.codes.astype(np.int16) - 128).astype(np.float64))
            exact = np.zeros(q.shape, np.float32)
            exact.reshape(-1)[q.salient_index] = q.salient_values
            f = input_factors(q)
            num = den = 0.0
            for x in inputs[name]:
                ref = x @ w32.T
                y = integer_linear(x, qi, torch.from_numpy(q.scales[:, 0].astype(np.float32)), None,
                                   torch.from_numpy(exact), None if f is None else torch.from_numpy(f))
                num, den = num + float(((y - ref) ** 2).sum()), den + float((ref ** 2).sum())
            row.append((num / den) ** 0.5)
        by_type[re.sub(r"^.*layer\.\d+\.", "", name)].append(row)
        print(name, " ".join(f"{v:.4f}" for v in row))
    print("\nmean per Linear type")
    for kind, rows in by_type.items():
        print(kind, " ".join(f"{statistics.mean(c):.4f}" for c in zip(*rows)))


if __name__ == "__main__":
    main()
