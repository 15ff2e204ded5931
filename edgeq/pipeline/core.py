"""The in-memory core of a conversion: plan the Linears, rewrite the FP32 graph, prove it encodes the plan.

    plan_weights(loaded, weights, config, calibration)      → (QuantPlan, quantizer report)
    quantize_graph(fp32_model, weights, config[, plan])     → QuantizedGraph

For a planned Linear ``W [N, K]`` (codes C, scales s, salient set S with its exact values)::

    Ŵ[i, j] = (C[i, j] − z) · s[i, ⌊j / block⌋]   for (i, j) ∉ S,   z = 2^(bits−1)
    Ŵ[i, j] = W[i, j]                              for (i, j) ∈ S   (the FP32 correction; C = z there)

``quantize_graph`` copies the FP32 ModelProto (the caller's is never modified; with ``copy=False``,
as in convert, which gives its export up, it rewrites that one), replaces every planned Linear by
``MatMulNBits`` + its sparse FP32 correction (:func:`edgeq.onnx.rewrite.rewrite_linears`),
optionally fuses the Linears that read one input (q, k, v) into one MatMulNBits + correction + Split
(``--fuse-qkv``, :func:`edgeq.onnx.fuse_qkv.fuse_shared_inputs`), optionally replaces the
word/position-embedding Gathers by 4-bit ``GatherBlockQuantized``
(``Ê`` = Q4-sym-7 of the table, blocks of 32 along the hidden axis), then requires

* **count**: the rewrite replaced exactly as many Linears as the plan holds;
* **read-back**: decoding the written graph (:func:`edgeq.onnx.readback.read_back`, which knows
  nothing of the plan) gives every planned ``Ŵ`` and ``Ê`` bit for bit.

Either failure raises :class:`edgeq.errors.EdgeqError`: the graph would not be what was planned.
Callers: :mod:`edgeq.pipeline.convert` (file to file, with PyTorch parity), :mod:`edgeq.research.sweep`,
``tools/bench_peers.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edgeq.config import ConvertConfig
from edgeq.errors import EdgeqError, UsageError
from edgeq.onnx.embeddings import quantize_embeddings
from edgeq.onnx.fuse_qkv import FuseResult, fuse_shared_inputs
from edgeq.onnx.integer import rewrite_integer
from edgeq.onnx.readback import iter_read_back
from edgeq.onnx.rewrite import RewriteResult, rewrite_linears
from edgeq.quant.plan import QuantPlan, build_plan
from edgeq.saliency import get_method

EMBEDDING_BLOCK = 32  # GatherBlockQuantized block along the hidden axis

logger = logging.getLogger(__name__)


def memory_bytes() -> tuple[int, int]:
    """(resident set size now, peak resident set size so far) of this process, in bytes.

    ``VmRSS`` / ``VmHWM`` of /proc/self/status (the peak of this address space); where there is
    no /proc, ``ru_maxrss`` for both.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS:", "VmHWM:")))
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import resource

        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
        return peak, peak


def trim_heap() -> None:
    """Give freed heap memory back to the system: glibc's ``malloc_trim(0)`` (elsewhere nothing).

    glibc serves blocks below its dynamic mmap threshold (up to 32 MiB, so every weight of a base
    model) from its heaps and keeps them when freed; without a trim RSS still counts the exporter's
    and ONNX Runtime's freed buffers (results/memory.md).
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def heap_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Have glibc map every block of ``nbytes`` or more on its own (``mallopt(M_MMAP_THRESHOLD)``; elsewhere nothing).

    By default the threshold follows the largest block freed so far (up to 32 MiB), so weights and
    their temporaries come from the heap, which fragments and keeps freed pages between the trims
    of :func:`trim_heap` (all-mpnet-base-v2's plan: +200 MiB at its peak).  Mapped blocks go back to
    the system when freed.  Process-wide; convert sets it once.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


@dataclass
class Timer:
    """Runs named stages, logs their start, duration and memory, and keeps both for the report."""

    stages: dict[str, float] = field(default_factory=dict)
    level: int = logging.INFO  # of the "name ..." / "name: 1.2 s (RSS …)" progress lines
    memory: dict[str, dict[str, int]] = field(default_factory=dict)  # stage → rss_bytes, peak_rss_bytes after it

    def run(self, name: str, fn, *args, **kwargs):
        logger.log(self.level, f"{name} ...")
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.stages[name] = round(time.perf_counter() - t0, 3)
        trim_heap()  # what the stage freed leaves RSS
        rss, peak = memory_bytes()
        self.memory[name] = {"rss_bytes": rss, "peak_rss_bytes": peak}
        logger.log(self.level, f"{name}: {self.stages[name]:.1f} s (RSS {rss / 2**20:.0f} MiB, "
                               f"peak {peak / 2**20:.0f} MiB)")
        return out


@dataclass(frozen=True)
class QuantizedGraph:
    """A quantized graph that has passed the count and read-back checks."""

    model: object  # onnx.ModelProto: the rewritten copy
    plan: QuantPlan
    rewrite: RewriteResult
    planned: Mapping[str, np.ndarray]  # Ŵ per Linear and Ê per embedding module = read_back(model) (PlannedWeights)
    embeddings: dict | None  # the report's "embeddings" section (None without --quantize-embeddings)
    timings_s: dict[str, float] = field(default_factory=dict)  # "rewrite" (and "fuse_qkv", "embeddings")
    fusion: FuseResult | None = None  # --fuse-qkv: the fused groups and the refused ones with their reasons


def needs_calibration_pass(config: ConvertConfig) -> bool:
    """Whether the one-pass input statistics (:func:`edgeq.model.calib.calibrate`) feed the plan."""
    return bool(config.calib) and (config.quantizer == "rtn" or get_method(config.method).needs_calibration
                                   or config.budget is not None)  # --budget weighs errors by E[x²]


def plan_weights(loaded, weights: Mapping[str, np.ndarray], config: ConvertConfig, calibration=None,
                 progress: bool = False) -> tuple[QuantPlan, dict]:
    """The plan of ``weights`` (name → ``[N, K]``) and the report's "quantizer" section.

    RTN: :func:`edgeq.quant.plan.build_plan` (saliency on ``calibration.stats`` when given).
    Calibrated quantizers: :func:`edgeq.model.sequential.run_quantizer`, block by block through the
    PyTorch model ``loaded``.
    """
    if config.quantizer == "rtn":
        plan = build_plan(weights, config, calibration.stats if calibration else None)
        return plan, {"name": "rtn", "hyperparameters": {}, "calibration": None}
    from edgeq.model.sequential import run_quantizer

    return run_quantizer(loaded, weights, config, calibration, progress)


def quantize_graph(fp32_model, weights: Mapping[str, np.ndarray], config: ConvertConfig, plan: QuantPlan | None = None,
                   embedding_modules: Mapping[str, str] | None = None, timer: Timer | None = None,
                   copy: bool = True) -> QuantizedGraph:
    """Rewrite a copy of ``fp32_model`` to ``plan`` (default: the RTN plan of ``weights`` under ``config``).

    ``copy=False`` rewrites ``fp32_model`` itself (no second FP32 graph in memory; the caller gives it up)
    and returns a fresh copy of the result: protobuf (upb) keeps the bytes of removed initializers in
    the message's arena until the message itself is freed, so the caller's dropping ``fp32_model``
    is what releases the FP32 weights.

    ``embedding_modules`` (table initializer → ``nn.Embedding`` name, :func:`edgeq.onnx.embeddings.module_names`)
    names the 4-bit tables after the source model's modules when ``config.quantize_embeddings``.
    ``timer``: the caller's stage timer (its progress lines and durations); default a quiet one
    (debug-level lines).  Either way the durations are in ``QuantizedGraph.timings_s``.
    """
    import onnx

    if plan is None:
        plan = build_plan(weights, config)
    if not plan.layers:
        raise UsageError(f"no Linear left to quantize (--exclude keeps all {len(weights)} in FP32); loosen --exclude")
    timer = timer if timer is not None else Timer(level=logging.DEBUG)
    if copy:
        model = onnx.ModelProto()
        model.CopyFrom(fp32_model)
    else:
        model = fp32_model
    try:
        if config.kernel == "integer":  # DynamicQuantizeMatMul (edgeq.onnx.integer)
            result = timer.run("rewrite", rewrite_integer, model, plan.quants, dict(weights), config.correction,
                               storage=config.storage)
        else:
            result = timer.run("rewrite", rewrite_linears, model, plan.quants, dict(weights), config.accuracy_level,
                               correction=config.correction, storage=config.storage, kernel=config.kernel)
    except ValueError as e:
        raise EdgeqError(f"{e}; exclude them with --exclude REGEX or report this model") from None
    if result.count != len(plan.layers):
        raise EdgeqError(f"rewrote {result.count} Linears but the plan has {len(plan.layers)}; please report this")
    fusion = None
    if config.fuse_qkv:  # Linears reading one input → one MatMulNBits + one correction + Split
        fusion = timer.run("fuse_qkv", fuse_shared_inputs, model, plan.quants, config.correction,
                           config.storage, config.kernel)
        for layers, reason in fusion.refused:
            logger.warning(f"--fuse-qkv: {', '.join(layers)} not fused: {reason}")
        logger.info(f"--fuse-qkv: {len(fusion.fused)} group(s) fused, {len(fusion.refused)} refused")
    tables: dict[str, np.ndarray] = {}
    embeddings = None
    if config.quantize_embeddings:  # word/position tables → GatherBlockQuantized (edgeq.onnx.embeddings)
        emb = timer.run("embeddings", quantize_embeddings, model, EMBEDDING_BLOCK,
                        dict(embedding_modules) if embedding_modules is not None else None, config.embedding_bits)
        if not emb.rewritten:
            raise EdgeqError("--quantize-embeddings found no word-embedding Gather to rewrite ("
                             + ("; ".join(f"{n}: {r}" for n, r in emb.refused[:2]) or "no Gather on input_ids")
                             + "); use --no-quantize-embeddings")
        tables = emb.tables
        embeddings = {"int4": sorted(emb.rewritten.values()),
                      "left_fp32": [{"node": n, "reason": r} for n, r in emb.refused]}
    planned, bad = _check_read_back(model, plan, tables)
    if bad:
        raise EdgeqError(f"the written graph does not encode the plan for {', '.join(bad[:3])}; please report this")
    if not copy:  # upb frees removed initializers only with their message: a fresh one holds just the live graph
        trim_heap()  # before the copy: the read-back's freed buffers leave RSS first
        fresh = onnx.ModelProto()
        fresh.CopyFrom(model)
        model = fresh
    stages = {k: timer.stages[k] for k in ("rewrite", "fuse_qkv", "embeddings") if k in timer.stages}
    return QuantizedGraph(model, plan, result, planned, embeddings, stages, fusion)


class PlannedWeights(Mapping):
    """Ŵ per Linear then Ê per table, in plan order: each decoded from the plan on first access, then kept.

    Lazy so that convert can release each FP32 weight as its Ŵ comes (results/memory.md) instead of
    holding both sets at once; every access after the first returns the same array.
    """

    def __init__(self, plan: QuantPlan, tables: Mapping[str, np.ndarray], order: list[str]):
        self._plan, self._tables, self._order, self._done = plan, tables, order, {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._done:
            if name not in self._order:
                raise KeyError(name)
            self._done[name] = self._plan.layers[name].quant.dequantize() if name in self._plan.layers \
                else self._tables[name]
        return self._done[name]

    def __iter__(self):
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


def _check_read_back(model, plan: QuantPlan, tables: Mapping[str, np.ndarray]) -> tuple[PlannedWeights, list[str]]:
    """(Ŵ per Linear then Ê per table, in plan order; the names whose decoding differs or is missing).

    Layer by layer: each decoded weight is compared with the plan's and both are dropped; the planned
    Ŵ are decoded again when asked for (:class:`PlannedWeights`).
    """
    order = [*plan.layers, *tables]
    seen: set[str] = set()
    differs: set[str] = set()
    for name, got in iter_read_back(model):
        if name in seen or (name not in plan.layers and name not in tables):
            continue
        want = plan.layers[name].quant.dequantize() if name in plan.layers else tables[name]
        if not np.array_equal(want, got):
            differs.add(name)
        seen.add(name)
    bad = [n for n in order if n not in seen or n in differs]
    return PlannedWeights(plan, tables, [n for n in order if n in seen]), bad
