"""The run-time floor of any graph-level correction branch: a k=0 model plus a trivial branch.

Writes two variants of an edgeq k=0 file (every MatMulNBits output gets the branch) and times them
against the original with ``edgeq.bench.run_bench`` (interleaved, as ``edgeq bench``):

* ``add1``: ``y = y_q + c`` with a constant ``c [N]`` — one extra Add per Linear;
* ``branch1col``: ``y = y_q + Gather(x, [0]) @ D[1, N]`` — the dense encoding with one column.

Any exact FP32 correction needs at least an op that reads x and an op that adds into y, so the
second variant's ratio is a lower bound on the cost of a k > 0 branch at the same node count.

    python tools/correction_floor.py k0.onnx OUTDIR [--threads 2 --repeats 40 --shapes 1x16,1x128,8x128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def variant(model, kind: str):
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "MatMulNBits":
            continue
        n_out = next(a.i for a in node.attribute if a.name == "N")
        y, y_q, p = node.output[0], node.output[0] + "_q", node.name + "_floor"
        node.output[0] = y_q
        if kind == "add1":
            graph.initializer.append(numpy_helper.from_array(np.full(n_out, 1e-30, np.float32), p + "_c"))
            nodes.append(helper.make_node("Add", [y_q, p + "_c"], [y], name=p + "_Add"))
        else:
            graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), p + "_i"))
            graph.initializer.append(numpy_helper.from_array(np.full((1, n_out), 1e-30, np.float32), p + "_D"))
            nodes += [helper.make_node("Gather", [node.input[0], p + "_i"], [p + "_xs"], name=p + "_Gather", axis=-1),
                      helper.make_node("MatMul", [p + "_xs", p + "_D"], [p + "_d"], name=p + "_MatMul"),
                      helper.make_node("Add", [y_q, p + "_d"], [y], name=p + "_Add")]
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("k0", type=Path, help="an edgeq convert --k 0 file")
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--shapes", default="1x16,1x128,8x128")
    args = ap.parse_args()
    import onnx

    model = onnx.load(str(args.k0))
    args.outdir.mkdir(parents=True, exist_ok=True)
    paths = [args.k0]
    for kind in ("add1", "branch1col"):
        paths.append(args.outdir / f"floor_{kind}.onnx")
        onnx.save(variant(model, kind), str(paths[-1]))
    from edgeq.bench import parse_shapes, ratio_table, run_bench

    shapes = parse_shapes(args.shapes)
    results = run_bench(paths, shapes, args.threads, args.repeats, 3, memory=False)
    print(f"{args.threads} thread(s), {args.repeats} interleaved rounds; ratios (×) against {args.k0.name}")
    print(ratio_table(results, shapes))


if __name__ == "__main__":
    main()
