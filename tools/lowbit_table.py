#!/usr/bin/env python
"""The ``results/lowbit/`` table of issue 12 ("Below 4 bits"): a resumable grid of convert + eval cells.

Every cell is literally command lines: an ``edgeq convert ...`` (or a peer's builder) followed by
``edgeq eval OUT.onnx --task T --tokenizer MODEL --json CELL.json``.  Agreement with FP32 = the
fraction of dev predictions equal to those of the FP32 PyTorch model (``edgeq eval MODEL_DIR --task
T``, run once per task and kept in ``OUT/fp32_<task>.json``).  Statistics: binomial standard errors
``sqrt(p(1-p)/n)·100`` of the accuracy and of the agreement.

The grid is ``bits × selection × method × quantizer × grid × storage`` per task, where a selection is either
a per-Linear ``--k N`` (flags that exist today) or a model-wide ``--budget F``; nothing here knows
which methods, budgets or grids ``edgeq convert`` accepts: a rejected flag makes a failed cell with
the one-line error.  Budget 0 / k 0 keeps no weight exact, so it is one cell per (bits, quantizer,
grid) whatever the method.  ``--calib <task>`` is passed to every convert (it only runs when the
method or quantizer needs it).  Peers (ONNX Runtime RTN at 2/4 bits, HQQ, NNCF) are built once per
task by the commands in :data:`PEERS` and scored by the same eval.

    python tools/lowbit_table.py run --tasks SST-2 --bits 2,3,4 --ks 0 --peers all
    python tools/lowbit_table.py run --tasks SST-2 --bits 2 --ks 256 --methods magnitude,svd,random
    python tools/lowbit_table.py run --tasks RTE,MRPC,SST-2 --budgets 0,0.001,0.005,0.01 \\
        --methods error,error-act --quantizers rtn,gptq --grids mse,asym
    python tools/lowbit_table.py render          # results/lowbit/table.md, commands.md, size_fidelity.png

Each finished cell is one JSON line of ``OUT/cells.jsonl`` (the last line of an id wins); a re-run
skips cells already ``ok`` (and failed ones with ``--skip-failed``).  Models go to ``--work``
(default ``results/lowbit/work``, not committed).  STS-B (the bundled all-MiniLM-L6-v2 embedding
model, no MODEL_DIR) is a cell kind whose eval is ``edgeq eval OUT --task STS-B``: its metrics are
recorded as ``edgeq eval`` reports them (no agreement).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_REL = Path("../shared")  # commands are run from the repository root and recorded with this relative path
MODELS = {"RTE": "minilm-l6-rte", "MRPC": "minilm-l6-mrpc", "SST-2": "minilm-l6-sst2", "STS-B": None}
EDGEQ = [sys.executable, "-m", "edgeq"]
# the separate venv of tools/nncf_peer.py (its docstring installs it)
NNCF_PYTHON = Path(os.environ.get("EDGEQ_NNCF_PYTHON", REPO.parent / "venv-nncf" / "bin" / "python"))
BASELINE = "ort-rtn-b32"  # the Linear-bytes ratio column is relative to this peer of the same task
# peer name → (builder, what the table says about its configuration)
PEERS = {
    "ort-rtn-b32": ("ort", "ONNX Runtime MatMulNBitsQuantizer, 4-bit symmetric RTN, block 32, accuracy_level 4"),
    "ort-rtn-b128": ("ort", "ONNX Runtime MatMulNBitsQuantizer, 4-bit symmetric RTN, block 128, accuracy_level 4"),
    "ort-rtn2-b32": ("ort", "ONNX Runtime MatMulNBitsQuantizer, 2-bit symmetric RTN, block 32, accuracy_level 4"),
    "ort-hqq-b32": ("ort", "ONNX Runtime HQQ, 4-bit asymmetric (zero points), block 32"),
    "nncf-int4-sym": ("nncf", "NNCF 3.4 compress_weights INT4_SYM group 32, data-free, DQ form (opset 21), "
                              "Gemm/Gather ignored"),
    "nncf-int4-sym-awq-se": ("nncf", "NNCF 3.4 compress_weights INT4_SYM group 32, AWQ + scale estimation "
                                     "(128 train examples), DQ form, Gemm/Gather ignored"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def csv(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


# ------------------------------------------------------------------ the grid


def cell_id(task, bits, sel, method, quantizer, grid, storage="default") -> str:
    return f"{task}/b{bits}-{sel}-{method}-{quantizer}-{grid}" + ("" if storage == "default" else f"-{storage}")


def edgeq_cells(args) -> list[dict]:
    """The declared grid as cell dicts (deduplicated: no exact weights → one method, "none")."""
    sels = [("k", int(k)) for k in csv(args.ks)] + [("budget", float(b)) for b in csv(args.budgets)]
    if not sels:
        raise SystemExit("no selection: give --ks (0,256) and/or --budgets (0,0.001); --bits '' for peers only")
    cells, seen = [], set()
    for task, bits, (kind, val), method, quantizer, grid, storage in itertools.product(
            csv(args.tasks), [int(b) for b in csv(args.bits)], sels, csv(args.methods), csv(args.quantizers),
            csv(args.grids), csv(args.storages)):
        exact = val != 0
        method = method if exact else "none"
        sel = f"k{val}" if kind == "k" else f"budget{val:g}"
        cid = cell_id(task, bits, "k0" if not exact else sel, method, quantizer, grid, storage)
        if cid in seen:
            continue
        seen.add(cid)
        cells.append(dict(id=cid, kind="edgeq", task=task, bits=bits, selection=kind, k=val if kind == "k" else None,
                          budget=val if kind == "budget" else None, method=method, quantizer=quantizer, grid=grid,
                          storage=storage))
    return cells


def peer_cells(args) -> list[dict]:
    names = list(PEERS) if args.peers == "all" else csv(args.peers)
    unknown = set(names) - set(PEERS)
    if unknown:
        raise SystemExit(f"unknown peer(s) {', '.join(sorted(unknown))}; choose from {', '.join(PEERS)}")
    return [dict(id=f"{task}/peer-{name}", kind="peer", task=task, peer=name, config=PEERS[name][1])
            for task in csv(args.tasks) if MODELS.get(task) for name in names]


def commands(cell: dict, work: Path) -> tuple[list[list[str]], list[str], Path, Path]:
    """(build commands, eval command, output .onnx, eval JSON) of a cell."""
    task = cell["task"]
    stem = cell["id"].replace("/", "_")
    out, ev = work / f"{stem}.onnx", work / f"{stem}.eval.json"
    model = SHARED_REL / "models" / MODELS[task] if MODELS.get(task) else None
    if cell["kind"] == "edgeq":
        conv = [*EDGEQ, "convert", "-q", "--force", "--threads", "1", "--bits", str(cell["bits"])]
        if cell["method"] == "none":  # k 0 and budget 0 are the same file: nothing kept exact
            conv += ["--k", "0"]
        elif cell["selection"] == "k":
            conv += ["--k", str(cell["k"])]
        else:
            conv += ["--budget", f"{cell['budget']:g}"]
        if cell["method"] != "none":
            conv += ["--method", cell["method"]]
        if cell["quantizer"] != "rtn":
            conv += ["--quantizer", cell["quantizer"]]
        if cell["grid"] != "default":
            conv += ["--grid", cell["grid"]]
        if cell.get("storage", "default") != "default":
            conv += ["--storage", cell["storage"]]
        conv += ["--calib", task.lower().replace("-", "")]  # used only by calibrated methods/quantizers/grids
        if model is None:  # the bundled embedding model: measure, don't gate (the default --min-cosine refuses 2 bits)
            conv += ["--min-cosine", "0"]
        build = [conv + ([str(model)] if model is not None else []) + [str(out)]]
    elif PEERS[cell["peer"]][0] == "ort":
        build = [[sys.executable, "tools/lowbit_table.py", "peer", cell["peer"], str(model), str(out)]]
    else:
        fp32 = work / f"{task}_fp32.onnx"
        mode = "awq-se" if cell["peer"].endswith("awq-se") else "data-free"
        build = [[sys.executable, "tools/export_fp32.py", str(model), str(fp32)],
                 [str(NNCF_PYTHON), "tools/nncf_peer.py", str(fp32), str(out), "--mode", mode,
                  "--tokenizer", str(model), "--calib", str(SHARED_REL / "data" / "glue" / task / "train.tsv")]]
    ev_cmd = [*EDGEQ, "eval", str(out), "--task", task, "--threads", "1", "-q", "--json", str(ev)]
    if model is not None:
        ev_cmd += ["--tokenizer", str(model)]
    return build, ev_cmd, out, ev


# ------------------------------------------------------------------ running


def run_cmd(cmd: list[str]) -> tuple[bool, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in (p.stderr + p.stdout).strip().splitlines() if ln.strip()]
    return p.returncode == 0, (lines[-1] if lines else f"exit {p.returncode}"), time.perf_counter() - t0


def show(cmd: list[str]) -> str:
    """A command as recorded: edgeq instead of the interpreter path, python for tools."""
    if cmd[:3] == EDGEQ:
        cmd = ["edgeq", *cmd[3:]]
    elif cmd[0] == sys.executable:
        cmd = ["python", *cmd[1:]]
    elif cmd[0] == str(NNCF_PYTHON):
        cmd = ["venv-nncf/bin/python", *cmd[1:]]
    return shlex.join(c.replace(f"{REPO}/", "") for c in cmd)  # no machine paths in the record


def fp32_predictions(task: str, out: Path) -> list:
    path = out / f"fp32_{task}.json"
    if not path.exists():
        model = SHARED_REL / "models" / MODELS[task]
        tmp = out / f"fp32_{task}.tmp.json"
        cmd = [*EDGEQ, "eval", str(model), "--task", task, "--threads", "1", "-q", "--json", str(tmp)]
        log(f"FP32 reference: {show(cmd)}")
        ok, msg, _ = run_cmd(cmd)
        if not ok:
            raise SystemExit(f"FP32 eval of {task} failed: {msg}")
        r = json.loads(tmp.read_text())
        tmp.unlink()
        path.write_text(json.dumps({"command": show(cmd), "correct": r["correct"], "examples": r["examples"],
                                    "metrics": r["metrics"], "predictions": r["predictions"]}) + "\n")
    return json.loads(path.read_text())["predictions"]


def sizes_of(onnx_path: Path) -> dict:
    """Linear bytes (codes + scales + FP32 correction + Linears left FP32) and file bytes.

    From the convert report next to the file (edgeq cells); for peers the same accounting
    (``edgeq.onnx.sizes.size_by_component``) on the file itself.
    """
    report = onnx_path.with_suffix(".json")
    if report.exists():
        r = json.loads(report.read_text())
        s, file_bytes = r["size_bytes"], r["file_bytes"]
    else:
        from edgeq.onnx.safe_load import load_onnx
        from edgeq.onnx.sizes import size_by_component

        s = size_by_component(load_onnx(onnx_path))
        file_bytes = onnx_path.stat().st_size + sum(p.stat().st_size for p in onnx_path.parent.glob(
            onnx_path.name + ".data"))
    linear = s["int4_codes"] + s["scales"] + s["fp32_correction"] + s["fp32_linear"]
    return {"linear_bytes": linear, "file_bytes": file_bytes, "size_bytes": s}


def embedding_fidelity(onnx_path: Path) -> dict:
    """Mean and min per-sentence cosine to the FP32 embeddings (the convert report's checks; embedding models)."""
    report = onnx_path.with_suffix(".json")
    if not report.exists():
        return {}
    found = {}
    for check in json.loads(report.read_text()).get("parity", {}).get("checks", []):
        for key, label in (("mean_cosine", "sentence_embedding mean cosine"),
                           ("min_cosine", "sentence_embedding min cosine")):
            if check.get("name", "").endswith(label):
                found[key] = check["value"]
    return found


def score(pred: list, gold_correct: int, n: int, ref: list) -> dict:
    p = gold_correct / n
    agree = sum(a == b for a, b in zip(pred, ref)) / len(ref)
    return {"correct": gold_correct, "n": n, "accuracy": 100 * p, "accuracy_se": 100 * math.sqrt(p * (1 - p) / n),
            "agreement": 100 * agree, "agreement_se": 100 * math.sqrt(agree * (1 - agree) / len(ref))}


def run_cell(cell: dict, work: Path, out: Path) -> dict:
    build, ev_cmd, onnx_out, ev = commands(cell, work)
    rec = {**cell, "convert_cmd": [show(c) for c in build], "eval_cmd": show(ev_cmd)}
    t_build = 0.0
    for cmd in build:
        ok, msg, dt = run_cmd(cmd)
        t_build += dt
        if not ok:
            return {**rec, "status": "failed", "stage": "convert", "error": msg}
    rec["convert_seconds"] = round(t_build, 1)
    rec.update(sizes_of(onnx_out))
    rec.update(embedding_fidelity(onnx_out))
    ok, msg, dt = run_cmd(ev_cmd)
    if not ok:
        return {**rec, "status": "failed", "stage": "eval", "error": msg}
    r = json.loads(ev.read_text())
    rec["eval_seconds"] = round(dt, 1)
    rec["metrics"] = r["metrics"]
    if r.get("correct") is not None:
        rec.update(score(r["predictions"], r["correct"], r["examples"], fp32_predictions(cell["task"], out)))
    return {**rec, "status": "ok"}


def load_store(path: Path) -> dict[str, dict]:
    recs = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                recs[r["id"]] = r
    return recs


def cmd_run(args) -> int:
    out, work = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    store = out / "cells.jsonl"
    cells = (edgeq_cells(args) if args.bits else []) + (peer_cells(args) if args.peers else [])
    done = load_store(store)
    for i, cell in enumerate(cells, 1):
        prev = done.get(cell["id"])
        if prev and (prev["status"] == "ok" or args.skip_failed):
            continue
        if cell["task"] != "STS-B":
            fp32_predictions(cell["task"], out)
        log(f"[{i}/{len(cells)}] {cell['id']}")
        rec = run_cell(cell, work, out)
        rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with store.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        log(f"  {rec['status']}: " + (rec.get("error", "") if rec["status"] != "ok" else
                                      f"acc {rec.get('accuracy', float('nan')):.2f} agree "
                                      f"{rec.get('agreement', float('nan')):.2f} linear {rec['linear_bytes']:,}"))
        if not args.keep_models:
            for p in work.glob(cell["id"].replace("/", "_") + ".*"):
                p.unlink()
    return 0


# ------------------------------------------------------------------ peers (ONNX Runtime builders of bench_peers)


def cmd_peer(args) -> int:
    import onnx

    from edgeq.model.load import load_model
    from edgeq.onnx.export import export_fp32
    from tools.bench_peers import ort_hqq, ort_rtn

    fp32 = export_fp32(load_model(args.model_dir))
    builders = {"ort-rtn-b32": lambda: ort_rtn(fp32, bits=4, block_size=32),
                "ort-rtn-b128": lambda: ort_rtn(fp32, bits=4, block_size=128),
                "ort-rtn2-b32": lambda: ort_rtn(fp32, bits=2, block_size=32),
                "ort-hqq-b32": lambda: ort_hqq(fp32, bits=4, block_size=32)}
    if args.name not in builders:
        raise SystemExit(f"{args.name} is not an ONNX Runtime peer; choose from {', '.join(builders)}")
    onnx.save(builders[args.name](), str(args.out))
    return 0


# ------------------------------------------------------------------ rendering


def cmd_render(args) -> int:
    from tools.lowbit_render import render

    render(load_store(args.out / "cells.jsonl"), args.out, BASELINE)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the declared cells that are not finished yet")
    r.add_argument("--tasks", default="SST-2", help="comma list of RTE, MRPC, SST-2, STS-B (bundled embedding model)")
    r.add_argument("--bits", default="2,3,4", help="comma list (empty: peers only)")
    r.add_argument("--ks", default="", help="per-Linear k values (--k), e.g. 0,256")
    r.add_argument("--budgets", default="", help="model-wide budgets (--budget), e.g. 0,0.001,0.005,0.01")
    r.add_argument("--methods", default="magnitude", help="saliency methods (--method); unused when k/budget is 0")
    r.add_argument("--quantizers", default="rtn", help="rtn, gptq, ... (--quantizer)")
    r.add_argument("--grids", default="default", help="default (no --grid flag), sym7, sym8, mse, asym, ...")
    r.add_argument("--storages", default="default", help="default (no --storage flag), compact, plain")
    r.add_argument("--peers", default="", help=f"comma list or 'all': {', '.join(PEERS)}")
    r.add_argument("--out", type=Path, default=REPO / "results" / "lowbit")
    r.add_argument("--work", type=Path, default=REPO / "results" / "lowbit" / "work")
    r.add_argument("--skip-failed", action="store_true", help="do not retry cells recorded as failed")
    r.add_argument("--keep-models", action="store_true", help="keep the .onnx files in --work")
    p = sub.add_parser("peer", help="build one ONNX Runtime peer file (a cell's build command)")
    p.add_argument("name")
    p.add_argument("model_dir", type=Path)
    p.add_argument("out", type=Path)
    d = sub.add_parser("render", help="write table.md, commands.md and size_fidelity.png from cells.jsonl")
    d.add_argument("--out", type=Path, default=REPO / "results" / "lowbit")
    args = ap.parse_args(argv)
    return {"run": cmd_run, "peer": cmd_peer, "render": cmd_render}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
