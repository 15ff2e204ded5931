"""edgeq configurations side by side with FP32 ONNX and ONNX Runtime's own quantizers.

For each shared MiniLM model (RTE, MRPC, SST-2): one FP32 export, then every variant is built
from that same ModelProto (edgeq's in-memory core, ``edgeq.pipeline.core.quantize_graph``: the
rewrite with its count and read-back checks, without edgeq convert's PyTorch validation), and
scored on the GLUE dev set: accuracy (± one standard error, sqrt(p(1-p)/n)) and top-1 agreement
with the FP32 ONNX model.  Latency, size and peak memory come from ``edgeq.bench.run_bench`` on
the first task's files (interleaved rounds).

    python tools/bench_peers.py --out results/bench [--tasks rte,mrpc,sst2] [--repeats 20]

Writes OUT/accuracy.json, OUT/bench.json, OUT/summary.md and keeps the .onnx files in OUT/models
(not committed).  Heavy: run it on a quiet machine; ratios are only comparable within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TASKS = {"rte": "RTE", "mrpc": "MRPC", "sst2": "SST-2"}

# name → (k, bits, accuracy_level, correction, quantize embeddings[, 4-bit grid])
EDGEQ = {
    "edgeq-k0": (0, 4, 0, "auto", False),
    "edgeq-k256": (256, 4, 0, "auto", False),
    "edgeq-k256-dense": (256, 4, 0, "dense", False),
    "edgeq-k256-scatter": (256, 4, 0, "scatter", False),
    "edgeq-k0-emb": (0, 4, 0, "auto", True),
    "edgeq-k256-emb": (256, 4, 0, "auto", True),
    "edgeq-k0-acc4": (0, 4, 4, "auto", False),
    "edgeq-k256-acc4": (256, 4, 4, "auto", False),
    "edgeq-k0-acc4-emb": (0, 4, 4, "auto", True),
    "edgeq-k256-acc4-emb": (256, 4, 4, "auto", True),
    "edgeq-k0-b8-acc4-emb": (0, 8, 4, "auto", True),
    "edgeq-k256-b8-acc4-emb": (256, 8, 4, "auto", True),
    "edgeq-k4096-emb": (4096, 4, 0, "auto", True),
    "edgeq-k0-g8": (0, 4, 0, "auto", False, "sym8"),
    "edgeq-k256-g8": (256, 4, 0, "auto", False, "sym8"),
    "edgeq-k0-g8-acc4": (0, 4, 4, "auto", False, "sym8"),
    "edgeq-k256-g8-acc4": (256, 4, 4, "auto", False, "sym8"),
    "edgeq-k0-g8-emb": (0, 4, 0, "auto", True, "sym8"),
    "edgeq-k256-g8-emb": (256, 4, 0, "auto", True, "sym8"),
    "edgeq-k0-g8-acc4-emb": (0, 4, 4, "auto", True, "sym8"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ort_rtn(fp32, bits: int = 4, block_size: int = 32, emb: bool = False):
    """ONNX Runtime's symmetric RTN (MatMulNBitsQuantizer) at accuracy_level 4: MatMuls (and the word embeddings)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(copy.deepcopy(fp32), bits=bits, block_size=block_size, is_symmetric=True,
                             accuracy_level=4, op_types_to_quantize=("MatMul", "Gather") if emb else ("MatMul",),
                             quant_axes=(("MatMul", 0), ("Gather", 1)))
    q.process()
    return q.model.model


def ort_hqq(fp32, bits: int = 4, block_size: int = 32):
    """ONNX Runtime's HQQ (half-quadratic, asymmetric with zero points) on the MatMuls."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(copy.deepcopy(fp32), algo_config=HQQWeightOnlyQuantConfig(block_size=block_size,
                                                                                       bits=bits))
    q.process()
    return q.model.model


def build_variants(loaded, fp32, outdir: Path, names: list[str]) -> dict[str, Path]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgeq.config import ConvertConfig
    from edgeq.onnx.embeddings import module_names
    from edgeq.pipeline.core import quantize_graph
    from edgeq.quant.plan import build_plan, selection_order

    outdir.mkdir(parents=True, exist_ok=True)
    paths = {"fp32": outdir / "fp32.onnx"}
    onnx.save(fp32, str(paths["fp32"]))
    for name, emb in (("ort-rtn-acc4", False), ("ort-rtn-acc4-emb", True)):
        if name not in names:
            continue
        paths[name] = outdir / f"{name}.onnx"
        onnx.save(ort_rtn(fp32, emb=emb), str(paths[name]))
    if "ort-hqq" in names:  # HQQ (half-quadratic, asymmetric with zero points), block 32, int4
        paths["ort-hqq"] = outdir / "ort-hqq.onnx"
        onnx.save(ort_hqq(fp32), str(paths["ort-hqq"]))
    if "ort-int8-dynamic" in names:
        paths["ort-int8-dynamic"] = outdir / "ort-int8-dynamic.onnx"
        quantize_dynamic(str(paths["fp32"]), str(paths["ort-int8-dynamic"]), weight_type=QuantType.QInt8)
    weights = loaded.linear_weights()
    modules = module_names(fp32, loaded.model)
    chosen = {name: v for name, v in EDGEQ.items() if name in names}
    t0 = time.perf_counter()  # one SVD score per Linear; every k's selection is a prefix of its order
    k_max = max((v[0] for v in chosen.values()), default=0)
    orders = {n: selection_order(n, w, ConvertConfig(), limit=k_max) for n, w in weights.items()} if k_max else None
    log(f"selection orders (k <= {k_max}): {time.perf_counter() - t0:.1f} s")
    for name, (k, bits, acc, corr, emb, *rest) in chosen.items():
        config = ConvertConfig(k=k, bits=bits, grid=rest[0] if rest else "sym7", accuracy_level=acc, correction=corr,
                               quantize_embeddings=emb)
        plan = build_plan(weights, config, orders=orders)
        qg = quantize_graph(fp32, weights, config, plan, modules)  # count and read-back checked
        paths[name] = outdir / f"{name}.onnx"
        onnx.save(qg.model, str(paths[name]))
        if qg.rewrite.fallbacks:
            log(f"{name}: {len(qg.rewrite.fallbacks)} layer(s) fell back to scatter")
    return paths


def evaluate(paths: dict[str, Path], loaded, task: str, threads: int) -> dict[str, dict]:
    import onnxruntime as ort

    from edgeq.evaluation.evaluate import encode_sorted
    from edgeq.evaluation.tasks import get_task, label_ids, read_examples

    spec = get_task(TASKS[task])
    ex = read_examples(spec, SHARED / "data" / "glue" / TASKS[task] / "dev.tsv")
    batches = encode_sorted(loaded.tokenizer, ex.texts, loaded.input_names)
    id2label = {int(k): v for k, v in loaded.model.config.id2label.items()}
    out, preds = {}, {}
    for name, path in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        logits = np.zeros((len(ex.texts), len(id2label)), np.float32)
        for idx, feed in batches:
            logits[idx] = sess.run(["logits"], feed)[0]
        ids = label_ids(spec, id2label, logits.shape[1])
        col_to_label = {i: n for n, i in ids.items()}
        preds[name] = np.array([col_to_label[int(c)] for c in logits.argmax(1)], dtype=object)
        acc = float(np.mean(preds[name] == ex.gold))
        out[name] = {"accuracy": acc, "accuracy_se": float(np.sqrt(acc * (1 - acc) / len(ex.gold))),
                     "agreement_fp32": float(np.mean(preds[name] == preds["fp32"])), "n": len(ex.gold)}
        log(f"{task} {name}: acc {acc:.4f} agreement {out[name]['agreement_fp32']:.4f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    ap.add_argument("--tasks", default="rte,mrpc,sst2")
    ap.add_argument("--variants",
                    default=",".join(["ort-rtn-acc4", "ort-rtn-acc4-emb", "ort-hqq", "ort-int8-dynamic", *EDGEQ]))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--shapes", default="1x16,1x128,8x128")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args()

    from edgeq.bench import component_table, parse_shapes, ratio_table, run_bench, to_json
    from edgeq.model.load import load_model
    from edgeq.onnx.export import export_fp32

    names = args.variants.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    accuracy, first_paths = {}, None
    for task in args.tasks.split(","):
        loaded = load_model(SHARED / "models" / f"minilm-l6-{task}")
        fp32 = export_fp32(loaded)
        paths = build_variants(loaded, fp32, args.out / "models" / task, names)
        first_paths = first_paths or paths
        log(f"{task}: built {len(paths)} models")
        if not args.skip_eval:
            accuracy[task] = evaluate(paths, loaded, task, args.threads)
            (args.out / "accuracy.json").write_text(json.dumps(accuracy, indent=2) + "\n")
    if not args.skip_bench:
        shapes = parse_shapes(args.shapes)
        order = list(first_paths)
        results = run_bench([first_paths[n] for n in order], shapes, args.threads, args.repeats, 3, True)
        (args.out / "bench.json").write_text(json.dumps(to_json(results, shapes, args.threads, args.repeats, 3),
                                                        indent=2) + "\n")
        (args.out / "bench.txt").write_text(ratio_table(results, shapes) + "\n\n" + component_table(results) + "\n")
        print(ratio_table(results, shapes))


if __name__ == "__main__":
    main()
