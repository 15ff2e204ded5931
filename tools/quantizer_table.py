"""Dev accuracy of every --quantizer (rtn, gptq, sarqc-gbs, sarqc-gs, lsi) on the shared MiniLM task models.

For one GLUE task: load the model and export its FP32 ONNX graph once; for each cell
(quantizer × k × block size) plan the quantization exactly as ``edgeq convert`` does (``build_plan``
for rtn, ``edgeq.model.sequential.quantize_sequential`` for the calibrated quantizers, calibration =
a seeded sample of the task's *train* split), rewrite a copy of the graph with MatMulNBits
(``rewrite_linears``), check that the graph decodes to the plan and that ONNX Runtime matches the
PyTorch model carrying the planned weights (plan parity, as convert does), then compute accuracy
from the ONNX model's logits on the whole dev set (ONNX Runtime, 1 thread) against the labels.
Rows are appended to ``results/quantizers/<task>.jsonl`` (cells already there are skipped), and
``--render`` writes ``results/quantizers/table.md`` with binomial standard errors.

    python tools/quantizer_table.py --task RTE            # one task (run the tasks in parallel)
    python tools/quantizer_table.py --render
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OUT = REPO / "results" / "quantizers"
TASKS = {"RTE": "rte", "MRPC": "mrpc", "SST-2": "sst2"}
LABEL_COL = {"RTE": "label", "MRPC": "Quality", "SST-2": "label"}
QUANTIZERS = ("rtn", "gptq", "sarqc-gbs", "sarqc-gs", "lsi")
CELLS = [(b, k, q) for b in ("32", "per-channel") for k in (0, 256) for q in QUANTIZERS]
CALIB_SEED = 1  # the calibration sample (train split); dev is the evaluation set


def dev_set(task: str, loaded):
    import csv

    from edgeq.model.texts import read_glue_texts

    path = SHARED / "data" / "glue" / task / "dev.tsv"
    texts = read_glue_texts(path)
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    col = rows[0].index(LABEL_COL[task])
    raw = [r[col] for r in rows[1:] if len(r) > col]
    label2id = {v: int(k) for k, v in loaded.model.config.id2label.items()}
    labels = np.array([int(x) if x.isdigit() else label2id[x] for x in raw])
    assert len(labels) == len(texts), (len(labels), len(texts))
    return texts, labels


def run_logits(session, batches, order):
    from edgeq.pipeline.parity import run_onnx

    logits = run_onnx(session, batches)["logits"]
    out = np.empty_like(logits)
    out[order] = logits
    return out


def main_task(task: str, threads: int, only: tuple[str, ...] = QUANTIZERS, lsi: dict | None = None,
              blocks: tuple[str, ...] = ("32", "per-channel")) -> None:
    import torch

    from edgeq.config import ConvertConfig
    from edgeq.model.load import load_model
    from edgeq.model.texts import encode_batches
    from edgeq.onnx.export import export_fp32
    from edgeq.onnx.session import make_session
    from edgeq.pipeline.core import plan_weights, quantize_graph
    from edgeq.pipeline.parity import reference_model, relative_max_diff, run_onnx, run_torch

    torch.set_num_threads(threads)
    OUT.mkdir(parents=True, exist_ok=True)
    rows_path = OUT / f"{task}.jsonl"
    done = set()
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["block_size"], r["k"], r["quantizer"]))
    model_dir = SHARED / "models" / f"minilm-l6-{TASKS[task]}"
    loaded = load_model(model_dir)
    texts, labels = dev_set(task, loaded)
    order = np.argsort([len(a) + len(b or "") for a, b in texts], kind="stable")
    batches = encode_batches(loaded, [texts[i] for i in order])
    parity_batches = encode_batches(loaded, [texts[i] for i in order[:: max(1, len(order) // 32)]])
    fp32 = export_fp32(loaded, 17)
    weights = loaded.linear_weights()

    def emit(row):
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    if ("fp32", 0, "fp32") not in done:
        t0 = time.perf_counter()
        logits = run_logits(make_session(fp32.SerializeToString(), threads), batches, order)
        acc = float(np.mean(logits.argmax(1) == labels))
        emit({"task": task, "block_size": "fp32", "k": 0, "quantizer": "fp32", "accuracy": acc,
              "n": len(labels), "eval_s": round(time.perf_counter() - t0, 1)})
    for block, k, q in CELLS:
        if (block, k, q) in done or q not in only or block not in blocks:
            continue
        config = ConvertConfig(method="svd", k=k, block_size=block, quantizer=q, seed=CALIB_SEED,
                               calib=None if q == "rtn" else TASKS[task], calib_samples=128,
                               data_dir=str(SHARED / "data" / "glue"), **(lsi or {}))
        t0, c0 = time.perf_counter(), time.process_time()
        plan, report = plan_weights(loaded, weights, config)  # rtn: build_plan; else edgeq.model.sequential
        info = report.get("layers", {})
        t_quant, c_quant = time.perf_counter() - t0, time.process_time() - c0
        qg = quantize_graph(fp32, weights, config, plan)  # rewrite, count and read-back checked
        session = make_session(qg.model.SerializeToString(), threads)
        ref = run_torch(reference_model(loaded, dict(qg.planned)), loaded, parity_batches)
        parity = max(relative_max_diff(run_onnx(session, parity_batches), ref).values())
        assert parity <= 1e-4, f"plan parity {parity}"
        t1 = time.perf_counter()
        logits = run_logits(session, batches, order)
        acc = float(np.mean(logits.argmax(1) == labels))
        lams = [v["lambda"] for v in info.values() if "lambda" in v]
        row = {"task": task, "block_size": block, "k": k, "quantizer": q, "accuracy": acc, "n": len(labels),
               "quantize_s": round(t_quant, 1), "quantize_cpu_s": round(c_quant, 1), "eval_s": round(time.perf_counter() - t1, 1),
               "plan_parity": parity, "recon_error_total": plan.total_recon_error}
        if lams:
            row["lambda_counts"] = {str(v): lams.count(v) for v in sorted(set(lams))}
        if q == "lsi":
            row["lsi"] = {o: getattr(config, o) for o in ("lsi_epochs", "lsi_rank", "lsi_lr", "lwc_lr")}
            row["lsi_best_epochs"] = [v["best_epoch"] for v in info.values()]
        emit(row)


def render() -> None:
    rows = []
    for task in TASKS:
        p = OUT / f"{task}.jsonl"
        if p.exists():
            rows += [json.loads(x) for x in p.read_text().splitlines()]
    get = {(r["task"], r["block_size"], r["k"], r["quantizer"]): r for r in rows}
    lines = ["# Dev accuracy by quantizer (SVD saliency, rank 8)", "",
             "MiniLM-L6 task models of `../shared/models`; accuracy from the ONNX Runtime logits of the whole dev",
             "set (1 thread) against the labels, ± binomial standard error sqrt(p(1−p)/n).  Calibrated quantizers:",
             f"128 examples of the task's train split (seed {CALIB_SEED}; last quarter held out for λ / early stopping).",
             "`quant s` = wall seconds of the quantization step alone on this shared 2-core machine; most cells ran while",
             "other sessions loaded it (load average 11–20), the per-channel RTE/MRPC cells of sarqc-gs, lsi and",
             "sarqc-gbs k=256 on a quiet machine (wall ≈ CPU); `/ cpu` = its CPU seconds (process time, 1 torch thread)",
             "where recorded.  Wall time of a whole `edgeq convert` per quantizer, measured quietly: docs/quantizers.md.",
             "Generated by `tools/quantizer_table.py --render` from the `*.jsonl` rows next to this file.", ""]
    head = "| block | k | quantizer | " + " | ".join(f"{t} acc ± se | Δ vs rtn | quant s" for t in TASKS) + " |"
    lines += [head, "|" + "---|" * (3 + 3 * len(TASKS))]
    fp = "| FP32 | – | – | " + " | ".join(
        (f"{get[(t, 'fp32', 0, 'fp32')]['accuracy']:.4f} ± {_se(get[(t, 'fp32', 0, 'fp32')]):.4f} | | "
         if (t, "fp32", 0, "fp32") in get else "– | | ") for t in TASKS) + " |"
    lines.append(fp)
    for block, k, q in CELLS:
        cells = []
        for t in TASKS:
            r = get.get((t, block, k, q))
            base = get.get((t, block, k, "rtn"))
            if r is None:
                cells.append("not run | | ")
                continue
            d = f"{r['accuracy'] - base['accuracy']:+.4f}" if base and q != "rtn" else ""
            cpu = f" / {r['quantize_cpu_s']}" if "quantize_cpu_s" in r else ""
            cells.append(f"{r['accuracy']:.4f} ± {_se(r):.4f} | {d} | {r.get('quantize_s', '')}{cpu}")
        lines.append(f"| {block} | {k} | {q} | " + " | ".join(cells) + " |")
    lam = [(r["task"], r["block_size"], r["k"], r["quantizer"], r["lambda_counts"]) for r in get.values() if "lambda_counts" in r]
    if lam:
        lines += ["", "λ chosen per layer by `--sarqc-lambda auto` (value: number of the 38 Linears):", ""]
        lines += [f"* {t} block {b} k={k} {q}: {c}" for t, b, k, q, c in lam]
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _se(r) -> float:
    p, n = r["accuracy"], r["n"]
    return math.sqrt(p * (1 - p) / n)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=list(TASKS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--only", default=",".join(QUANTIZERS), help="comma-separated quantizers to run")
    ap.add_argument("--blocks", default="32,per-channel", help="comma-separated block sizes to run")
    ap.add_argument("--lsi", default="{}", help="JSON of LSI ConvertConfig fields (lsi_epochs, lwc_lr, ...)")
    a = ap.parse_args()
    if a.render:
        render()
    elif a.task:
        main_task(a.task, a.threads, tuple(a.only.split(",")), json.loads(a.lsi), tuple(a.blocks.split(",")))
    else:
        ap.error("pass --task TASK or --render")
        sys.exit(2)
