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

Issue 15's final measurement (docs/int8.md "Reproduce"), one command::

    python tools/integer_eval.py --out results/int8 --tasks rte,mrpc,sst2 --stsb --bench --render

adds the peers of :data:`PEERS` (ONNX Runtime per-channel int8, RTN int4, the fused FP32 graph, and
edgeq's default int4 file), ``--stsb`` (the same variants from all-MiniLM-L6-v2, STS-B dev
Spearman → OUT/stsb.json), ``--bench`` (one interleaved ``edgeq.bench.run_bench`` of the RTE files,
load average before/after → OUT/bench.json, bench.txt) and ``--render`` (tools/pareto.py against
ORT dynamic int8 → OUT/pareto.md, pareto.png).  Every file is rebuilt on every run (code changes
between runs); the JSON files are merged per task and variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from bench_peers import SHARED, TASKS, evaluate, log, ort_rtn  # noqa: E402

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
    "edgeq-int-k0-a4-emb8-compact": (0, 4, 0.0, 8),  # --storage compact: 7-bit weights, fp16 exact values
    "edgeq-int-k0-a4-r3-emb8-compact": (0, 4, 3.0, 8),
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
COMPACT = {name for name in VARIANTS if name.endswith("-compact")}


# issue 15 item 4: the peers of the final measurement, built per task beside the integer variants
PEERS = {
    "ort-int8-perchannel": "quantize_dynamic(per_channel=True, reduce_range=False, weight_type=QInt8)",
    "ort-int8-perchannel-rr": "the same with reduce_range=True (7-bit weights: no u8·s8 int16 saturation on AVX2)",
    "ort-rtn-int4": "MatMulNBitsQuantizer RTN int4, block 32, symmetric, accuracy_level 4 (bench_peers.ort_rtn)",
    "fp32-fused": "FP32 through onnxruntime.transformers.optimizer (bert, use_multi_head_attention)",
    "edgeq-int4-k0": "edgeq's default int4 MatMulNBits file at k = 0 (ConvertConfig(k=0))",
}
FINAL = ["fp32", "fp32-fused", "ort-int8-dynamic", "ort-int8-perchannel", "ort-rtn-int4", "edgeq-int4-k0",
         "edgeq-int-k0-emb8", "edgeq-int-k0-a4-emb8", "edgeq-int-k0-a4-r3-emb8", "edgeq-int-k0-a4-emb8-compact",
         "edgeq-int-k0-a4-r3-emb8-compact"]
SHAPES = "1x16,1x128,8x128"
REFERENCE = "ort-int8-dynamic"


def fused_fp32(fp32_path: Path, config):
    """The FP32 graph with ONNX Runtime's BERT fusions (../shared/docs/PEERS.md: MultiHeadAttention,
    SkipLayerNormalization, BiasGelu, EmbedLayerNormalization), as ``python -m
    onnxruntime.transformers.optimizer --model_type bert --use_multi_head_attention`` writes it."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_multi_head_attention = True
    return optimize_model(str(fp32_path), "bert", config.num_attention_heads, config.hidden_size, options)


def build_peer(name: str, paths: dict[str, Path], fp32, loaded, weights, modules) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = paths["fp32"].with_name(f"{name}.onnx")
    if name.startswith("ort-int8-perchannel"):
        quantize_dynamic(str(paths["fp32"]), str(path), per_channel=True, reduce_range=name.endswith("-rr"),
                         weight_type=QuantType.QInt8)
    elif name == "ort-rtn-int4":
        onnx.save(ort_rtn(fp32), str(path))
    elif name == "fp32-fused":
        fused_fp32(paths["fp32"], loaded.model.config).save_model_to_file(str(path))
    elif name == "edgeq-int4-k0":
        from edgeq.config import ConvertConfig
        from edgeq.pipeline.core import quantize_graph
        from edgeq.quant.plan import build_plan

        config = ConvertConfig(k=0)
        onnx.save(quantize_graph(fp32, weights, config, build_plan(weights, config), modules).model, str(path))
    else:
        raise ValueError(f"unknown variant {name}; choose from {', '.join([*VARIANTS, *PEERS])}")
    return path


def build(loaded, fp32, outdir: Path, calib_spec: str, names: list[str]) -> dict[str, Path]:
    """fp32, ort-int8-dynamic and ``names`` (VARIANTS or PEERS), rebuilt from ``fp32`` into ``outdir``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgeq.config import ConvertConfig
    from edgeq.model.calib import calibrate
    from edgeq.onnx.embeddings import module_names
    from edgeq.pipeline.core import quantize_graph
    from edgeq.quant.plan import build_plan

    outdir.mkdir(parents=True, exist_ok=True)
    paths = {"fp32": outdir / "fp32.onnx", "ort-int8-dynamic": outdir / "ort-int8-dynamic.onnx"}
    onnx.save(fp32, str(paths["fp32"]))
    quantize_dynamic(str(paths["fp32"]), str(paths["ort-int8-dynamic"]), weight_type=QuantType.QInt8)
    weights = loaded.linear_weights()
    modules = module_names(fp32, loaded.model)
    for name in (n for n in names if n in PEERS):
        paths[name] = build_peer(name, paths, fp32, loaded, weights, modules)
        log(f"{outdir.name} {name}: built")
    stats = None
    for name in (n for n in names if n in VARIANTS):
        k, act, ratio, emb = VARIANTS[name]
        alpha, smooth_layers = SMOOTH.get(name, (None, ()))
        if stats is None:
            stats = calibrate(loaded, calib_spec, 128, 0, str(SHARED / "data" / "glue"), xtx=0).stats
        config = ConvertConfig(k=k, bits=8, kernel="integer", block_size="per-channel", act_outliers=act,
                               act_outlier_ratio=ratio, calib=calib_spec if act or alpha else None,
                               quantize_embeddings=bool(emb), embedding_bits=emb or 4, smooth_alpha=alpha,
                               smooth_layers=smooth_layers, storage="compact" if name in COMPACT else "plain")
        plan = build_plan(weights, config, stats)
        qg = quantize_graph(fp32, weights, config, plan, modules)
        paths[name] = outdir / f"{name}.onnx"
        onnx.save(qg.model, str(paths[name]))
        log(f"{outdir.name} {name}: built ({sum(lp.quant.k for lp in plan.layers.values())} exact weights)")
    return paths


def merge_json(path: Path, key: str, values: dict) -> None:
    """``path[key] |= values`` (earlier variants of that key are kept)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = {**data.get(key, {}), **values}
    path.write_text(json.dumps(data, indent=2) + "\n")


def stsb(out: Path, names: list[str], threads: int) -> None:
    """The variants built from all-MiniLM-L6-v2 (sentence_embedding output), scored on STS-B dev."""
    from scipy.stats import spearmanr

    from edgeq.bench import file_bytes
    from edgeq.evaluation.evaluate import evaluate_path
    from edgeq.evaluation.tasks import get_task, read_examples
    from edgeq.model.load import default_model_dir, load_model
    from edgeq.model.texts import read_glue_texts
    from edgeq.onnx.export import export_fp32

    glue = SHARED / "data" / "glue" / "STS-B"
    model_dir = default_model_dir()
    loaded = load_model(model_dir)
    outdir = out / "models" / "stsb"
    outdir.mkdir(parents=True, exist_ok=True)
    # the model embeds one sentence at a time: calibrate on single train sentences, not on pairs
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "stsb_train_sentences.txt"
        calib.write_text("\n".join(s for pair in read_glue_texts(glue / "train.tsv") for s in pair if s) + "\n",
                         encoding="utf-8")
        paths = build(loaded, export_fp32(loaded), outdir, str(calib), names)
    merge_json(out / "sizes.json", "stsb", {n: file_bytes(p) for n, p in paths.items()})
    task = get_task("STS-B")
    ex = read_examples(task, glue / "dev.tsv")
    res, sims = {}, {}
    for name, path in paths.items():
        r = evaluate_path(path, task, ex, threads, tokenizer_dir=model_dir)
        sims[name] = r.predictions
        res[name] = {"spearman": 100 * r.metrics["spearman"], "pearson": 100 * r.metrics["pearson"],
                     "similarity_spearman_fp32": float(spearmanr(r.predictions, sims["fp32"]).statistic),
                     "embedding": r.extra.get("embedding"), "n": r.examples, "model": "all-MiniLM-L6-v2"}
        if VARIANTS.get(name, (0, 0))[1]:
            res[name]["calib"] = "128 single STS-B train sentences (seed 0)"
        log(f"STS-B {name}: spearman {res[name]['spearman']:.2f}")
    merge_json(out / "stsb.json", "stsb", res)


def bench(out: Path, names: list[str], threads: int, repeats: int) -> None:
    """One interleaved run of the RTE files (spinning off, edgeq.bench), load average before and after."""
    from edgeq.bench import component_table, load_average, parse_shapes, ratio_table, run_bench, to_json

    paths = [out / "models" / "rte" / f"{n}.onnx" for n in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"error: {missing[0]} does not exist; build it first (--tasks rte --variants {','.join(names)})")
    shapes = parse_shapes(SHAPES)
    before = load_average()
    before = None if before is None else round(before, 2)
    log(f"bench: {len(paths)} models, {repeats} rounds, load average {before}")
    results = run_bench(paths, shapes, threads, repeats, 3, True)
    data = to_json(results, shapes, threads, repeats, 3)
    data["load_average_1min_before"], data["load_average_1min_after"] = before, data["load_average_1min"]
    (out / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    table = ratio_table(results, shapes)
    (out / "bench.txt").write_text(f"load average (1 min) before {before}, after {data['load_average_1min']}\n"
                                   + table + "\n\n" + component_table(results) + "\n")
    print(table)


def render(out: Path, bench_json: Path, names: list[str]) -> None:
    """OUT/pareto.md and pareto.png: ratios to ORT dynamic int8, the acceptance check, the STS-B column."""
    from pareto import render as pareto_render

    b = json.loads(bench_json.read_text())
    peers = tuple(dict.fromkeys([REFERENCE, *(n for n in names if not n.startswith("edgeq"))]))
    sizes = json.loads((out / "sizes.json").read_text()).get("rte", {})
    sts = out / "stsb.json"
    load = f"{b['load_average_1min_before']} before, {b['load_average_1min']} after" \
        if "load_average_1min_before" in b else f"{b.get('load_average_1min')} at the end"
    header = (f"Latency: `{bench_json.name}` ({', '.join(Path(m['path']).stem for m in b['models'])}; "
              f"{b['threads']} threads, {b['repeats']} interleaved rounds, 1-minute load average {load}); "
              f"rows it lacks show –. Sizes: the RTE files. Ratios to {REFERENCE}.\n\n")
    text = pareto_render(out / "accuracy.json", bench_json, b["shapes"], "1x128", out / "pareto.md",
                         out / "pareto.png", peers, REFERENCE, names, sizes,
                         json.loads(sts.read_text())["stsb"] if sts.exists() else None, 0.98, header,
                         [t for t in TASKS if t in json.loads((out / "accuracy.json").read_text())])
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "results" / "int8")
    ap.add_argument("--tasks", default="rte,mrpc,sst2", help="GLUE tasks to build and score ('' for none)")
    ap.add_argument("--variants", default=",".join(n for n in FINAL if n not in ("fp32", "ort-int8-dynamic")),
                    help="from VARIANTS and PEERS ('all': every one but k256); fp32, ort-int8-dynamic always")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stsb", action="store_true", help="also the variants of all-MiniLM-L6-v2 on STS-B dev")
    ap.add_argument("--bench", action="store_true", help="one interleaved edgeq bench of the RTE files")
    ap.add_argument("--bench-variants", default=",".join(FINAL))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--render", action="store_true", help="pareto.md/png against ORT dynamic int8")
    ap.add_argument("--bench-json", type=Path, help="the bench run --render reads (default OUT/bench.json)")
    args = ap.parse_args()

    from edgeq.bench import file_bytes
    from edgeq.model.load import load_model
    from edgeq.onnx.export import export_fp32

    every = [n for n in (*VARIANTS, *PEERS) if "k256" not in n]
    names = every if args.variants == "all" else [n for n in args.variants.split(",") if n]
    bench_names = args.bench_variants.split(",")
    if args.bench and "rte" not in args.tasks.split(","):
        sys.exit("error: --bench times the RTE files this run builds; add rte to --tasks")
    unknown = [n for n in [*names, *bench_names] if n not in (*VARIANTS, *PEERS, "fp32", "ort-int8-dynamic")]
    if unknown:
        sys.exit(f"error: unknown variant {unknown[0]}; choose from {', '.join([*VARIANTS, *PEERS])}")
    args.out.mkdir(parents=True, exist_ok=True)
    for task in (t for t in args.tasks.split(",") if t):
        loaded = load_model(SHARED / "models" / f"minilm-l6-{task}")
        built = names + [n for n in bench_names if n not in names] if task == "rte" and args.bench else names
        paths = build(loaded, export_fp32(loaded), args.out / "models" / task, TASKS[task], built)
        merge_json(args.out / "sizes.json", task, {n: file_bytes(p) for n, p in paths.items()})
        merge_json(args.out / "accuracy.json", task, evaluate(paths, loaded, task, args.threads))
    if args.stsb:
        stsb(args.out, names, args.threads)
    if args.bench:
        bench(args.out, bench_names, args.threads, args.repeats)
    if args.render:
        render(args.out, args.bench_json or args.out / "bench.json", bench_names)


if __name__ == "__main__":
    main()
