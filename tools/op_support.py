"""Which ONNX Runtime client runs an edgeq output folder: the ops of its graph and of its .ort file, and
the logits of Python ORT, onnxruntime-node, onnxruntime-web (WASM, in Node) and the .ort file on GLUE dev.

    python tools/op_support.py OUT_DIR --data ../shared/data/glue/RTE/dev.tsv [--web-limit 64] [--json F]

OUT_DIR is written by `edgeq convert MODEL OUT_DIR --ort-format`. Needs node and tests/node installed
(`cd tests/node && npm ci --ignore-scripts`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def encode(folder: Path, pairs, batch: int = 16):
    """Tokenise with the tokenizer saved in the output folder (as a client would)."""
    from transformers import AutoTokenizer

    from edgeq.model.texts import encode_texts

    return encode_texts(AutoTokenizer.from_pretrained(folder), pairs, batch_size=batch)


def run_python(path: Path, batches) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    return np.concatenate([s.run(["logits"], {k: v for k, v in b.items() if k in names})[0] for b in batches])


def run_node(model: Path, batches, backend: str) -> tuple[np.ndarray, str]:
    with tempfile.TemporaryDirectory() as d:
        spec = {"model": str(model), "output": "logits", "batches": [
            {k: {"dims": list(v.shape), "data": v.ravel().tolist()} for k, v in b.items()} for b in batches]}
        (Path(d) / "inputs.json").write_text(json.dumps(spec))
        subprocess.run([shutil.which("node") or "node", str(REPO / "tests/node/run.mjs"), d, "--backend", backend],
                       check=True, capture_output=True, text=True)
        got = json.loads((Path(d) / f"outputs-{backend}.json").read_text())
    y = np.concatenate([np.asarray(b["data"], np.float32).reshape(b["dims"]) for b in got["batches"]])
    return y, f"{got['runtime']} {got['version']}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--web-limit", type=int, default=64, help="examples for the (slow, 1-thread) WASM run")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import onnx
    import onnxruntime

    from edgeq.model.texts import read_glue_texts
    from edgeq.pipeline.deploy import graph_ops, read_required_operators

    folder = args.folder
    ops = graph_ops(onnx.load(str(folder / "model.onnx"), load_external_data=False))
    ort_ops = read_required_operators(folder / "model.required_operators.config")
    pairs = read_glue_texts(args.data)
    batches = encode(folder, pairs)
    web_batches = batches[: max(1, args.web_limit // 16)]

    rows = []
    t = time.perf_counter()
    ref = run_python(folder / "model.onnx", batches)
    rows.append((f"onnxruntime (Python) {onnxruntime.__version__}, .onnx", len(ref), 0.0, 1.0, time.perf_counter() - t))
    model0 = onnx.load(str(folder / "model.onnx"))  # MatMulNBits at accuracy_level 0: FP32 activations
    for node in model0.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    with tempfile.TemporaryDirectory() as d:
        onnx.save(model0, str(Path(d) / "level0.onnx"))
        ref0 = run_python(Path(d) / "level0.onnx", batches)
    for label, fn in [
        ("node", lambda: run_node(folder / "model.onnx", batches, "node")),
        ("web", lambda: run_node(folder / "model.onnx", web_batches, "web")),
        ("ort", lambda: (run_python(folder / "model.ort", batches),
                         f"onnxruntime (Python) {onnxruntime.__version__}, .ort")),
        ("node-ort", lambda: run_node(folder / "model.ort", batches, "node")),
        ("web-ort", lambda: run_node(folder / "model.ort", web_batches, "web")),
    ]:
        t = time.perf_counter()
        y, name = fn()
        r = ref[: len(y)]
        if label.startswith("web"):
            name += " (wasm EP, 1 thread)"
        if label.endswith("-ort"):
            name += ", .ort"
        rows.append((name, len(y), float(np.max(np.abs(y - r))), float(np.mean(y.argmax(1) == r.argmax(1))),
                     time.perf_counter() - t, float(np.max(np.abs(y - ref0[: len(y)])))))

    print(f"ops of {folder / 'model.onnx'}:")
    for d, names in ops.items():
        print(f"  {d}: {', '.join(names)}")
    print(f"ops of {folder / 'model.ort'} (model.required_operators.config):")
    for d, names in ort_ops.items():
        print(f"  {d}: {', '.join(names)}")
    rows[0] += (float(np.max(np.abs(ref - ref0))),)
    print(f"\n{'runtime':<52} {'examples':>8} {'max|d| vs Python':>17} {'same argmax':>11} {'time s':>7}"
          f" {'max|d| vs Python, accuracy_level 0':>34}")
    for name, n, d, agree, sec, d0 in rows:
        print(f"{name:<52} {n:>8} {d:>17.3g} {agree:>11.4f} {sec:>7.1f} {d0:>34.3g}")
    if args.json:
        args.json.write_text(json.dumps({"ops": ops, "ort_required_operators": ort_ops, "data": str(args.data),
                                         "runs": [dict(zip(("runtime", "examples", "max_abs_diff", "argmax_agreement",
                                                            "seconds", "max_abs_diff_vs_level0"), r)) for r in rows]},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
