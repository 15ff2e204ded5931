"""The JSON report of one conversion (``out.json``, and ``edgeq convert --json``)."""

from __future__ import annotations

import time
from pathlib import Path

from edgeq import __version__
from edgeq.pipeline.core import Timer
from edgeq.pipeline.parity import ParityReport


def make_report(c, out: Path, large: bool, file_bytes: int, parity: ParityReport, timer: Timer,
                t_start: float) -> dict:
    """``c``: the :class:`edgeq.pipeline.convert.Converted` of the run; ``parity``: its validation."""
    from edgeq.onnx.sizes import size_by_component

    plan = c.graph.plan
    return {
        "edgeq_version": __version__,
        "model_dir": str(c.model_dir),
        "model_type": c.loaded.model_type,
        "head": c.loaded.head,
        "sentence": c.loaded.sentence.describe() if c.loaded.sentence is not None else None,
        "output": str(out),
        "config": c.config.to_dict(),
        "calibration": c.calibration.info() if c.calibration else None,
        "quantizer": c.quantizer_report,
        "linears_total": len(c.weights),
        "linears_quantized": c.graph.rewrite.count,
        "linears_excluded": list(plan.excluded),
        "embeddings": c.graph.embeddings,
        "fused_qkv": None if c.graph.fusion is None else {  # --fuse-qkv (edgeq.onnx.fuse_qkv)
            "fused": c.graph.fusion.fused, "corrections": c.graph.fusion.corrections,
            "refused": [{"layers": layers, "reason": r} for layers, r in c.graph.fusion.refused]},
        "shared_input_quantization": shared_quantization(c.graph.rewrite.layers),  # --kernel integer
        "external_data": large,
        "export_max_abs_diff": c.export_diff,
        "recon_error_total": plan.total_recon_error,
        "budget": plan.budget,  # --budget: fraction, total kept, k per layer (None with --k)
        "layers": {name: lp.stats() for name, lp in plan.layers.items()},
        "size_bytes": size_by_component(c.graph.model),
        "size_bytes_fp32": c.fp32_sizes,
        "file_bytes": file_bytes,
        "parity": parity.to_dict(),
        "timings_s": {**timer.stages, "total": round(time.perf_counter() - t_start, 3)},
        "memory": memory_report(timer),
    }


def shared_quantization(layers: dict[str, dict]) -> dict | None:
    """Integer-kernel files: {group: its parts} for Linears that quantize one input once, and the Linears that
    read a shared input but keep their own quantization, with why (edgeq.onnx.integer.share_groups)."""
    if not any("input_quantized_by" in info for info in layers.values()):
        return None
    groups: dict[str, list[str]] = {}
    for name, info in layers.items():
        if info["input_quantized_by"] != name:
            groups.setdefault(info["input_quantized_by"], []).append(name)
    not_shared = {name: info["input_not_shared"] for name, info in layers.items() if "input_not_shared" in info}
    return {"groups": groups, "not_shared": not_shared}


def memory_report(timer: Timer) -> dict:
    """The report's "memory" section: the process's peak RSS so far and RSS/peak after each stage."""
    from edgeq.pipeline.core import memory_bytes

    return {"peak_rss_bytes": memory_bytes()[1], "stages": dict(timer.memory)}
