"""Interleaved min-of-N latency (robust on a loaded machine): python mintime.py threads rounds shapes models..."""
import os, sys, time
CLOCK = time.process_time if os.environ.get("CPU_CLOCK") else time.perf_counter
import numpy as np, onnxruntime as ort
threads, rounds, shapes, models = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
sess = []
for m in models:
    so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1
    sess.append(ort.InferenceSession(m, so, providers=["CPUExecutionProvider"]))
for shape in shapes.split(","):
    b, t = map(int, shape.split("x"))
    feed = {}
    for i in sess[0].get_inputs():
        feed[i.name] = (np.arange(b * t).reshape(b, t) % 1000 + 100) if "input_ids" in i.name else (np.ones((b, t), np.int64) if "mask" in i.name else np.zeros((b, t), np.int64))
    times = [[] for _ in models]
    for s in sess:
        for _ in range(3): s.run(None, feed)
    for r in range(rounds):
        for j in range(len(models)):
            idx = (j + r) % len(models)
            t0 = CLOCK(); sess[idx].run(None, feed); times[idx].append(CLOCK() - t0)
    mins = [min(x) * 1e3 for x in times]; meds = [float(np.median(x)) * 1e3 for x in times]
    print(shape, " ".join(f"{m.split('/')[-1]}: min {a:.2f} med {c:.2f}" for m, a, c in zip(models, mins, meds)), flush=True)
    print(shape, "min ratios to first:", " ".join(f"{a / mins[0]:.3f}" for a in mins), "| k256/k0:", f"{mins[1]/mins[0]:.3f}", "k256f/k0f:", f"{mins[3]/mins[2]:.3f}" if len(mins) > 3 else "", flush=True)
