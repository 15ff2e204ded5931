"""``--kernel integer`` against ONNX Runtime's dynamic int8 on the three MiniLM task models (issue 15).

For each task (RTE, MRPC, SST-2): one FP32 export, ``onnxruntime.quantization.quantize_dynamic``
of it (``ort-int8-dynamic``, as tools/bench_peers.py builds it), and edgeq integer-kernel variants
built in memory (``edgeq.pipeline.core.quantize_graph``: count and read-back checks; the full
``edgeq convert`` adds the parity checks) with ``--bits 8 --kernel integer --block-size
per-channel``, ``--act-outliers c`` and ``--smooth-alpha α`` calibrated on the task's train split
(128 examples, seed 0).
Scored on the GLUE dev set: accuracy and top-1 agreement with the FP32 ONNX model
(tools/bench_peers.py ``evaluate``).

    python tools/integer_eval.py --out results/int8 [--tasks rte,mrpc,sst2] [--variants ...]

Writes OUT/accuracy.json and keeps the .onnx files in OUT/models/<task> (not committed); sizes
go in OUT/sizes.json.  Latency: ``edgeq bench`` on the RTE files (docs/int8.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from bench_peers import SHARED, TASKS, evaluate, log  # noqa: E402

# name → (k, act_outliers, act_outlier_ratio, embedding bits or 0: FP32 tables)
VARIANTS = {
    "edgeq-int-k0": (0, 0, 0.0, 0),
    "edgeq-int-k0-a1": (0, 1, 0.0, 0),
    "edgeq-int-k0-a2": (0, 2, 0.0, 0),
    "edgeq-int-k0-a2-r6": (0, 2, 6.0, 0),
    "edgeq-int-k0-a4-r6": (0, 4, 6.0, 0),
    "edgeq-int-k0-a2-r6-emb": (0, 2, 6.0, 4),
    "edgeq-int-k0-emb": (0, 0, 0.0, 4),
    "edgeq-int-k0-a2-emb": (0, 2, 0.0, 4),
    "edgeq-int-k0-a4": (0, 4, 0.0, 0),
    "edgeq-int-k0-a8": (0, 8, 0.0, 0),
    "edgeq-int-k0-a4-r3": (0, 4, 3.0, 0),
    "edgeq-int-k0-a4-emb": (0, 4, 0.0, 4),
    "edgeq-int-k0-a4-emb8": (0, 4, 0.0, 8),
    "edgeq-int-k0-a4-r3-emb8": (0, 4, 3.0, 8),
    "edgeq-int-k0-a2-emb8": (0, 2, 0.0, 8),
    "edgeq-int-k0-emb8": (0, 0, 0.0, 8),
    "edgeq-int-k256-a2-r6": (256, 2, 6.0, 0),
    "edgeq-int-k0-s50-emb8": (0, 0, 0.0, 8),
    "edgeq-int-k0-a4-s50-emb8": (0, 4, 0.0, 8),
    "edgeq-int-k0-s75-emb8": (0, 0, 0.0, 8),
    "edgeq-int-k0-s25-emb8": (0, 0, 0.0, 8),
    "edgeq-int-k0-s50ln-emb8": (0, 0, 0.0, 8),
    "edgeq-int-k0-a4-s50ln-emb8": (0, 4, 0.0, 8),
    "edgeq-int-k0-s75ln-emb8": (0, 0, 0.0, 8),
}
LN_FED = (r"attention\.self|intermediate",)  # BERT's LayerNorm-fed Linears (q/k/v, FFN in): SmoothQuant's choice
# (--smooth-alpha, --smooth-layers) of the variants that smooth (SmoothQuant-style migration, docs/int8.md)
SMOOTH = {
    "edgeq-int-k0-s50-emb8": (0.5, ()),
    "edgeq-int-k0-a4-s50-emb8": (0.5, ()),
    "edgeq-int-k0-s75-emb8": (0.75, ()),
    "edgeq-int-k0-s25-emb8": (0.25, ()),
    "edgeq-int-k0-s50ln-emb8": (0.5, LN_FED),
    "edgeq-int-k0-a4-s50ln-emb8": (0.5, LN_FED),
    "edgeq-int-k0-s75ln-emb8": (0.75, LN_FED),
}


def build(loaded, fp32, outdir: Path, task: str, names: list[str]) -> dict[str, Path]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgeq.config import ConvertConfig
    from edgeq.model.calib import calibrate
    from edgeq.onnx.embeddings import module_names
    from edgeq.pipeline.core import quantize_graph
    from edgeq.quant.plan import build_plan

    outdir.mkdir(parents=True, exist_ok=4)
    paths = {"fp32": outdir / "fp32.onnx", "ort-int8-dynamic": outdir / "ort-int8-dynamic.onnx"}
    onnx.save(fp32, str(paths["fp32"]))
    quantize_dynamic(str(paths["fp32"]), str(paths["ort-int8-dynamic"]), weight_type=QuantType.QInt8)
    weights = loaded.linear_weights()
    calib = calibrate(loaded, task, 128, 0, str(SHARED / "data" / "glue"), xtx=0)
    modules = module_names(fp32, loaded.model)
    for name in names:
        k, act, ratio, emb = VARIANTS[name]
        alpha, smooth_layers = SMOOTH.get(name, (None, ()))
        config = ConvertConfig(k=k, bits=8, kernel="integer", block_size="per-channel", act_outliers=act,
                               act_outlier_ratio=ratio, calib=task if act or alpha else None,
                               quantize_embeddings=bool(emb), embedding_bits=emb or 4, smooth_alpha=alpha,
                               smooth_layers=smooth_layers)
        plan = build_plan(weights, config, calib.stats)
        qg = quantize_graph(fp32, weights, config, plan, modules)
        paths[name] = outdir / f"{name}.onnx"
        onnx.save(qg.model, str(paths[name]))
        log(f"{task} {name}: built ({sum(lp.quant.k for lp in plan.layers.values())} exact weights)")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "results" / "int8")
    ap.add_argument("--tasks", default="rte,mrpc,sst2")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if "k256" not in v))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from edgeq.bench import file_bytes
    from edgeq.model.load import load_model
    from edgeq.onnx.export import export_fp32

    names = args.variants.split(",")
    args.out.mkdir(parents=True, exist_ok=4)
    acc_path, size_path = args.out / "accuracy.json", args.out / "sizes.json"
    accuracy = json.loads(acc_path.read_text()) if acc_path.exists() else {}
    sizes = json.loads(size_path.read_text()) if size_path.exists() else {}
    for task in args.tasks.split(","):
        loaded = load_model(SHARED / "models" / f"minilm-l6-{task}")
        paths = build(loaded, export_fp32(loaded), args.out / "models" / task, TASKS[task], names)
        sizes[task] = {**sizes.get(task, {}), **{n: file_bytes(p) for n, p in paths.items()}}
        size_path.write_text(json.dumps(sizes, indent=2) + "\n")
        accuracy[task] = {**accuracy.get(task, {}), **evaluate(paths, loaded, task, args.threads)}
        acc_path.write_text(json.dumps(accuracy, indent=2) + "\n")


if __name__ == "__main__":
    main()
