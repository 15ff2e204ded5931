"""Which int8 graph form does ONNX Runtime's CPU EP run fastest on MiniLM Linear shapes?

A synthetic stack of ``--layers`` MiniLM-L6 blocks' Linears (q, k, v, attention output 384→384,
FFN up 384→1536, FFN down 1536→384, each followed by a bias and chained), written five ways:

* ``fp32``: MatMul + Add;
* ``dql-mmi``: DynamicQuantizeLinear → MatMulInteger (uint8 x, int8 W, zero points) → Cast →
  Mul(x_scale) → Mul(w_scale [N]) → Add(bias) — ONNX Runtime's level-2 optimizer may fuse it;
* ``dql-mmitf``: DynamicQuantizeLinear → com.microsoft.MatMulIntegerToFloat(x_q, W, x_scale, w_scale [N],
  x_zp, -, bias);
* ``dqmm``: com.microsoft.DynamicQuantizeMatMul(x, W int8, w_scale [N], -, bias): one node;
* ``dqmm-s7``: the same with 7-bit weights (|q| ≤ 63, ORT's ``reduce_range``);
* ``dqmm-u8``: the same with uint8 weights ``q + 128`` and zero point 128 (MLAS' U8U8 kernel);
* ``ort-dynamic``: ``onnxruntime.quantization.quantize_dynamic`` of ``fp32`` (per tensor, its default).

All run interleaved in one process (``edgeq.bench.run_bench``'s rotation, idle workers block:
``session.intra_op.allow_spinning=0``); medians and ratios to ``fp32`` are printed, and each
variant's max|Δ| to fp32 and the op types ONNX Runtime actually kept after optimisation.

    python tools/integer_kernels.py [--shapes 1x16,1x128,8x128] [--repeats 50] [--layers 6]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

HIDDEN, FFN = 384, 1536
SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, FFN), (FFN, HIDDEN)]  # (K, N) per Linear, one block


def build(kind: str, layers: int, seed: int = 0):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(layers * len(SHAPES)):
        k, n = SHAPES[i % len(SHAPES)]
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        b = (rng.standard_normal(n) * 0.1).astype(np.float32)
        qm = 63 if kind == "dqmm-s7" else 127
        s = np.abs(w).max(axis=0) / qm
        wq = np.clip(np.rint(w / s), -qm, qm).astype(np.int8)
        if kind == "dqmm-u8":
            wq = (wq.astype(np.int16) + 128).astype(np.uint8)
        p, y = f"l{i}", f"y{i}"
        inits.append(numpy_helper.from_array(b, f"{p}.b"))
        if kind in ("fp32", "ort-dynamic"):
            inits.append(numpy_helper.from_array(w, f"{p}.w"))
            nodes += [helper.make_node("MatMul", [x, f"{p}.w"], [f"{p}.mm"], name=f"{p}/MatMul"),
                      helper.make_node("Add", [f"{p}.mm", f"{p}.b"], [y], name=f"{p}/Add")]
        else:
            inits += [numpy_helper.from_array(wq, f"{p}.wq"), numpy_helper.from_array(s.astype(np.float32), f"{p}.ws")]
        if kind == "dql-mmi":
            inits.append(numpy_helper.from_array(np.zeros(n, np.int8), f"{p}.wzp"))
            nodes += [
                helper.make_node("DynamicQuantizeLinear", [x], [f"{p}.xq", f"{p}.xs", f"{p}.xzp"], name=f"{p}/DQL"),
                helper.make_node("MatMulInteger", [f"{p}.xq", f"{p}.wq", f"{p}.xzp", f"{p}.wzp"], [f"{p}.acc"],
                                 name=f"{p}/MMI"),
                helper.make_node("Cast", [f"{p}.acc"], [f"{p}.accf"], name=f"{p}/Cast", to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{p}.xs", f"{p}.ws"], [f"{p}.s"], name=f"{p}/Scales"),
                helper.make_node("Mul", [f"{p}.accf", f"{p}.s"], [f"{p}.mm"], name=f"{p}/Scale"),
                helper.make_node("Add", [f"{p}.mm", f"{p}.b"], [y], name=f"{p}/Add"),
            ]
        elif kind == "dql-mmitf":
            nodes += [
                helper.make_node("DynamicQuantizeLinear", [x], [f"{p}.xq", f"{p}.xs", f"{p}.xzp"], name=f"{p}/DQL"),
                helper.make_node("MatMulIntegerToFloat", [f"{p}.xq", f"{p}.wq", f"{p}.xs", f"{p}.ws", f"{p}.xzp", "",
                                                          f"{p}.b"], [y], name=f"{p}/MMITF", domain="com.microsoft"),
            ]
        elif kind.startswith("dqmm"):
            zp = ""
            if kind == "dqmm-u8":
                zp = f"{p}.wzp"
                inits.append(numpy_helper.from_array(np.array(128, np.uint8), zp))
            nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, f"{p}.wq", f"{p}.ws", zp, f"{p}.b"], [y],
                                          name=f"{p}/DQMM", domain="com.microsoft"))
        x = y
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def main() -> None:
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgeq.bench import bench_session, load_average, parse_shapes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1x16,1x128,8x128")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    kinds = ["fp32", "dql-mmi", "dql-mmitf", "dqmm", "dqmm-s7", "dqmm-u8", "ort-dynamic"]
    tmp = Path(tempfile.mkdtemp(prefix="int8-kernels-"))
    paths = {}
    for kind in kinds[:-1]:
        paths[kind] = tmp / f"{kind}.onnx"
        onnx.save(build(kind, args.layers), str(paths[kind]))
    paths["ort-dynamic"] = tmp / "ort-dynamic.onnx"
    quantize_dynamic(str(paths["fp32"]), str(paths["ort-dynamic"]), weight_type=QuantType.QInt8)
    kept = {}
    for kind, p in paths.items():
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp / f"{kind}.opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        kept[kind] = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    sessions = {k: bench_session(p, args.threads) for k, p in paths.items()}
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, load average {load_average()}, "
          f"{args.layers} blocks of 6 Linears")
    for kind in kinds:
        print(f"  {kind:<12} optimized graph: {dict(kept[kind])}")
    rng = np.random.default_rng(1)
    for b, s in parse_shapes(args.shapes):
        feed = {"x": rng.standard_normal((b, s, HIDDEN)).astype(np.float32)}
        ref = sessions["fp32"].run(None, feed)[0]
        times = {k: [] for k in kinds}
        for sess in sessions.values():
            for _ in range(3):
                sess.run(None, feed)
        for r in range(args.repeats):
            for j in range(len(kinds)):
                k = kinds[(r + j) % len(kinds)]
                t0 = time.perf_counter()
                sessions[k].run(None, feed)
                times[k].append(time.perf_counter() - t0)
        base = np.median(times["fp32"])
        print(f"{b}x{s}:")
        for k in kinds:
            d = float(np.max(np.abs(sessions[k].run(None, feed)[0] - ref)) / np.max(np.abs(ref)))
            print(f"  {k:<12} {np.median(times[k]) * 1e3:8.3f} ms  x{np.median(times[k]) / base:.3f}"
                  f"  max|d|/max|fp32| {d:.2e}")
    for p in tmp.iterdir():
        os.remove(p)
    tmp.rmdir()


if __name__ == "__main__":
    main()
