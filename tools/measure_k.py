"""Core acceptance figures: fidelity to FP32 vs k, per saliency method, on a GLUE dev set.

For each model and each (method, block size, k): top-1 agreement with the FP32 PyTorch model,
mean |Δlogit|, max |Δlogit|, and the weight reconstruction error Σ_layers ‖W − Ŵ‖²_F, measured
through ONNX Runtime on the converted graph (one export per model, one plan per cell).
The standard error of an agreement p over n examples is sqrt(p(1-p)/n).

    python tools/measure_k.py --models ../shared/models/minilm-l6-rte \
        --data ../shared/data/glue/RTE/dev.tsv --k 0,16,256,4096 --methods svd,magnitude,random \
        --block-sizes 32,per-tensor --out results/core/rte.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="comma-separated model dirs")
    ap.add_argument("--data", required=True, help="comma-separated dev TSVs, one per model")
    ap.add_argument("--k", default="0,16,256,4096")
    ap.add_argument("--methods", default="svd,magnitude,random")
    ap.add_argument("--block-sizes", default="32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exclude-salient-from-scale", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from edgeq.config import ConvertConfig
    from edgeq.model.load import load_model
    from edgeq.model.texts import encode_batches, validation_texts
    from edgeq.onnx.export import export_fp32
    from edgeq.onnx.session import make_session
    from edgeq.pipeline.core import quantize_graph
    from edgeq.pipeline.parity import fidelity, run_onnx, run_torch
    from edgeq.quant.plan import build_plan

    rows = []
    for model_dir, data in zip(args.models.split(","), args.data.split(",")):
        loaded = load_model(model_dir)
        texts, _ = validation_texts(data)
        batches = encode_batches(loaded, texts)
        fp32 = run_torch(loaded.model, loaded, batches)
        base = export_fp32(loaded)
        weights = loaded.linear_weights()
        for block in args.block_sizes.split(","):
            for method in args.methods.split(","):
                for k in (int(x) for x in args.k.split(",")):
                    if k == 0 and method != args.methods.split(",")[0]:
                        continue  # k = 0 is plain int4 whatever the method
                    t0 = time.perf_counter()
                    plan_config = ConvertConfig(method=method, k=k, block_size=block,
                                                exclude_salient_from_scale=args.exclude_salient_from_scale)
                    plan = build_plan(weights, plan_config)
                    model = quantize_graph(base, weights, plan_config, plan).model  # count and read-back checked
                    got = run_onnx(make_session(model.SerializeToString(), args.threads), batches)
                    fid = fidelity(got, fp32)
                    p, n = fid["top1_agreement"], len(texts)
                    rows.append({
                        "model": Path(model_dir).name, "block_size": block,
                        "exclude_salient_from_scale": args.exclude_salient_from_scale, "method": method if k else "int4",
                        "k": k, "examples": n, "top1_agreement": p,
                        "agreement_se": math.sqrt(p * (1 - p) / n),
                        "mean_abs_dlogit": fid["mean_abs_diff"], "max_abs_dlogit": fid["max_abs_diff"],
                        "recon_error": plan.total_recon_error, "seconds": round(time.perf_counter() - t0, 2),
                    })
                    r = rows[-1]
                    print(f"{r['model']:<16} {block:>10} {r['method']:>9} k={k:<5} agree={p:.4f}±{r['agreement_se']:.4f} "
                          f"mean|d|={r['mean_abs_dlogit']:.4f} recon={r['recon_error']:.4f}", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    md = Path(args.out).with_suffix(".md")
    lines = ["| model | block | method | k | agreement ± se | mean abs dlogit | max abs dlogit | sum recon err |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['block_size']} | {r['method']} | {r['k']} | "
                     f"{100 * r['top1_agreement']:.2f} ± {100 * r['agreement_se']:.2f} | {r['mean_abs_dlogit']:.4f} | "
                     f"{r['max_abs_dlogit']:.3f} | {r['recon_error']:.4f} |")
    md.write_text(f"Command: `python {' '.join(sys.argv)}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
