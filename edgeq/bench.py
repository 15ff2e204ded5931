"""Latency, size and peak memory of ONNX models, measured side by side (``edgeq bench``).

Latency.  For each input shape ``B×S`` every model runs ``warmup`` times, then ``repeats``
rounds; in each round every model runs once, in a rotated order (round r starts at model
``r mod m``), so slow drifts of the machine (other jobs, thermal state) hit all models alike and the
ratios are fair.  Per model and shape we report the median ``t̃`` of the wall times and the spread
``p10–p90`` and IQR ``p75 − p25``; the ratio to the first model is ``t̃_i / t̃_0``.  All models of a
run share the same feeds (random token ids below the smallest vocabulary, all-ones mask).

Peak memory.  Each model is loaded in a fresh Python subprocess (``python -m edgeq.bench``), which
records its peak RSS (``VmHWM``; ``ru_maxrss`` without /proc) after importing onnxruntime and
numpy (before reading the file), then after creating the session and running every shape once;
the difference is the session's peak resident memory (parsed model, prepacked weights, folded
constants, arenas, activations) in bytes.

Size.  File bytes (plus external data) and :func:`edgeq.onnx.sizes.size_by_component`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeq.onnx.session import make_session

MAX_RANDOM_ID = 1000  # token ids are drawn below min(vocab, this)

logger = logging.getLogger(__name__)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"1x16,8x128"`` → ``[(1, 16), (8, 128)]``; raises ValueError naming the bad item."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"bad shape {item.strip()!r} in --shapes; use BATCHxSEQ items such as 1x16,8x128")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def _quantiles(t: np.ndarray) -> dict[str, float]:
    p10, p25, p50, p75, p90 = np.percentile(t, [10, 25, 50, 75, 90])
    return {"median_ms": p50 * 1e3, "p10_ms": p10 * 1e3, "p90_ms": p90 * 1e3, "iqr_ms": (p75 - p25) * 1e3}


def vocab_size(model) -> int | None:
    """Rows of the table gathered by ``input_ids`` (Gather or GatherBlockQuantized), if constant."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Gather", "GatherBlockQuantized") and len(node.input) > 1 and node.input[1] == "input_ids":
            t = inits.get(node.input[0])
            if t is not None:
                return int(t.dims[0])
    return None


def make_feeds(input_names: list[str], batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in input_names:
        if name == "input_ids":
            feeds[name] = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, seq), dtype=np.int64)
        else:  # token_type_ids and anything else integer-like
            feeds[name] = np.zeros((batch, seq), dtype=np.int64)
    return feeds


def bench_session(path: Path, threads: int):
    """A session whose idle workers block: several sessions share the process (edgeq.onnx.session)."""
    return make_session(path, threads, spinning=False)


@dataclass
class ModelResult:
    path: str
    file_bytes: int
    sizes: dict[str, int]
    latency: dict[str, dict[str, float]] = field(default_factory=dict)  # "BxS" → quantiles
    peak_rss_bytes: int | None = None


def file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def run_bench(
    paths: list[Path],
    shapes: list[tuple[int, int]],
    threads: int = 2,
    repeats: int = 30,
    warmup: int = 3,
    memory: bool = True,
) -> list[ModelResult]:
    """Measure every model in ``paths`` on every shape, interleaved; see the module docstring."""
    import onnx

    from edgeq.onnx.sizes import size_by_component

    results, sessions, vocabs = [], [], []
    for p in paths:
        proto = onnx.load(str(p), load_external_data=False)
        results.append(ModelResult(str(p), file_bytes(p), size_by_component(proto)))
        vocabs.append(vocab_size(proto) or MAX_RANDOM_ID)
        sessions.append(bench_session(p, threads))
    names = [i.name for i in sessions[0].get_inputs()]
    for p, s in zip(paths, sessions):
        if [i.name for i in s.get_inputs()] != names:
            raise ValueError(f"{p} has inputs {[i.name for i in s.get_inputs()]}, the first model {names}; "
                             "bench models of the same source model together")
    vocab = min([MAX_RANDOM_ID] + vocabs)
    m = len(paths)
    for b, s in shapes:
        key = f"{b}x{s}"
        feeds = make_feeds(names, b, s, vocab)
        times = np.zeros((m, repeats))
        for sess in sessions:
            for _ in range(warmup):
                sess.run(None, feeds)
        for r in range(repeats):
            for j in range(m):
                i = (r + j) % m
                t0 = time.perf_counter()
                sessions[i].run(None, feeds)
                times[i, r] = time.perf_counter() - t0
        for i in range(m):
            results[i].latency[key] = _quantiles(times[i])
        logger.info(f"{key}: " + ", ".join(f"{results[i].latency[key]['median_ms']:.2f}" for i in range(m)) + " ms")
    del sessions
    if memory:
        for res, p in zip(results, paths):
            res.peak_rss_bytes = peak_memory(p, shapes, threads, vocab)
    return results


def peak_memory(path: Path, shapes: list[tuple[int, int]], threads: int, vocab: int = MAX_RANDOM_ID) -> int:
    """Peak RSS growth (bytes) of loading ``path`` and running each shape once, in a subprocess."""
    arg = ",".join(f"{b}x{s}" for b, s in shapes)
    cmd = [sys.executable, "-m", "edgeq.bench", str(path), arg, str(threads), str(vocab)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise RuntimeError(f"memory probe of {path} failed: {out.stderr.strip().splitlines()[-1:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_delta_bytes"])


def _peak_rss_kib() -> int:
    """High-water RSS of this process in KiB: ``VmHWM`` (per address space, so a fresh one after exec).

    ``ru_maxrss`` is not used where ``/proc`` exists: Linux carries the parent's peak across
    fork+exec, so a child started by a big parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _memory_child(path: str, shapes: str, threads: int, vocab: int) -> dict:
    import onnxruntime  # noqa: F401 - counted in the baseline

    before = _peak_rss_kib()
    sess = bench_session(Path(path), threads)
    names = [i.name for i in sess.get_inputs()]
    for b, s in parse_shapes(shapes):
        sess.run(None, make_feeds(names, b, s, vocab))
    after = _peak_rss_kib()
    return {"peak_rss_delta_bytes": (after - before) * 1024, "peak_rss_bytes": after * 1024}


def _aligned(head: list, rows: list[list]) -> str:
    """``head`` and ``rows`` as left-aligned columns two spaces apart."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [head, *rows])


def ratio_table(results: list[ModelResult], shapes: list[tuple[int, int]]) -> str:
    """Plain-text table: size, peak memory and median latency, each also as a ratio to the first model."""
    base = results[0]
    keys = [f"{b}x{s}" for b, s in shapes]
    head = ["model", "MiB", "×size", "mem MiB", "×mem"] + [h for k in keys for h in (f"{k} ms", "p10–p90", f"×{k}")]
    rows = []
    for r in results:
        mem = r.peak_rss_bytes
        row = [Path(r.path).name, f"{r.file_bytes / 2**20:.2f}", f"{r.file_bytes / base.file_bytes:.3f}",
               "-" if mem is None else f"{mem / 2**20:.1f}",
               "-" if mem is None or not base.peak_rss_bytes else f"{mem / base.peak_rss_bytes:.2f}"]
        for k in keys:
            q, q0 = r.latency[k], base.latency[k]
            row += [f"{q['median_ms']:.2f}", f"{q['p10_ms']:.2f}–{q['p90_ms']:.2f}",
                    f"{q['median_ms'] / q0['median_ms']:.3f}"]
        rows.append(row)
    return _aligned(head, rows)


def component_table(results: list[ModelResult]) -> str:
    from edgeq.onnx.sizes import COMPONENTS

    head = ["model"] + list(COMPONENTS)
    rows = [[Path(r.path).name] + [f"{r.sizes.get(c, 0) / 2**20:.2f}" for c in COMPONENTS] for r in results]
    return "MiB by component\n" + _aligned(head, rows)


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def busy_machine_warning(threads: int) -> str | None:
    """A one-line warning when other work competes for the cores (1-minute load average), else None."""
    load = load_average()
    cores = os.cpu_count() or 1
    if load is not None and load > max(0.5, cores - threads):
        return (f"warning: load average {load:.1f} on {cores} cores — other work competes with the "
                f"benchmark; ratios within one run stay comparable, absolute times do not")
    return None


def to_json(results: list[ModelResult], shapes, threads: int, repeats: int, warmup: int) -> dict:
    import onnxruntime

    load = load_average()
    return {
        "onnxruntime": onnxruntime.__version__,
        "load_average_1min": None if load is None else round(load, 2),
        "threads": threads,
        "repeats": repeats,
        "warmup": warmup,
        "shapes": [f"{b}x{s}" for b, s in shapes],
        "argv": sys.argv,
        "models": [asdict(r) for r in results],
    }


if __name__ == "__main__":  # memory probe: python -m edgeq.bench MODEL SHAPES THREADS
    print(json.dumps(_memory_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
