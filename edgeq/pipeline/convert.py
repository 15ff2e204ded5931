"""``convert`` and ``validate``: load → export → plan → rewrite → check → write, with timings."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq import __version__
from edgeq.config import ConvertConfig
from edgeq.errors import EdgeqError, UsageError, ValidationFailed
from edgeq.pipeline.parity import Check, ParityReport

EXPORT_TOLERANCE = 1e-4  # FP32 ONNX vs PyTorch, max|Δ| (relative to max(1, max|ref|))
PLAN_TOLERANCE = 1e-4  # quantized ONNX vs same-quantization PyTorch, max|Δ| / max|ref|

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thresholds:
    plan_rel_diff: float = PLAN_TOLERANCE
    min_agreement: float | None = None
    max_abs_diff: float | None = None


@dataclass
class Timer:
    """Runs named stages, logs their start and duration, and keeps the durations for the report."""

    stages: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn, *args, **kwargs):
        logger.info(f"{name} ...")
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.stages[name] = round(time.perf_counter() - t0, 3)
        logger.info(f"{name}: {self.stages[name]:.1f} s")
        return out


def parity_checks(loaded, session, fp32_out, ref_weights, batches, thresholds: Thresholds, source: str,
                  plan_session=None) -> ParityReport:
    """(a) ONNX vs PyTorch with ``ref_weights``; (b) ONNX vs the FP32 outputs ``fp32_out``.

    ``plan_session``: for (a) when the file's MatMulNBits use accuracy_level ≠ 0 (int8 activations
    are run-time arithmetic, not the weights): the same graph at accuracy_level 0.
    """
    from edgeq.pipeline.parity import (
        fidelity,
        reference_model,
        relative_max_diff,
        run_onnx,
        run_torch,
    )

    got = run_onnx(session, batches)
    got_plan = run_onnx(plan_session, batches) if plan_session is not None else got
    ref = run_torch(reference_model(loaded, ref_weights), loaded, batches)
    report = ParityReport(examples=len(next(iter(fp32_out.values()))) if batches else 0, source=source)
    report.examples = int(sum(len(b["input_ids"]) for b in batches))
    for name, rel in relative_max_diff(got_plan, ref).items():
        report.checks.append(Check(f"plan parity: {name} max|d|/max|ref|", rel, thresholds.plan_rel_diff))
    fid = fidelity(got, fp32_out)
    out = fid["output"]
    report.checks.append(Check(f"vs fp32: {out} max|d|", fid["max_abs_diff"], thresholds.max_abs_diff))
    report.checks.append(Check(f"vs fp32: {out} mean|d|", fid["mean_abs_diff"], None))
    report.checks.append(Check(f"vs fp32: {out} mean cosine", fid["mean_cosine"], None, True))
    if fid["top1_agreement"] is not None:
        report.checks.append(Check("vs fp32: top-1 agreement", fid["top1_agreement"], thresholds.min_agreement, True))
    elif thresholds.min_agreement is not None:
        raise EdgeqError("--min-agreement needs a classification model (this one has no logits)")
    return report


def convert(
    model_dir: Path,
    out: Path,
    config: ConvertConfig,
    data: Path | None = None,
    limit: int | None = None,
    thresholds: Thresholds = Thresholds(),
    threads: int | None = None,
    progress: bool = False,
    ort_format: bool = False,
) -> dict:
    """Convert ``model_dir`` to ``out`` (atomically) and return the report (also written as JSON)."""
    from edgeq.model.load import load_model
    from edgeq.model.texts import encode_batches, validation_texts
    from edgeq.onnx.export import export_fp32
    from edgeq.onnx.graph import set_meta
    from edgeq.onnx.readback import read_back
    from edgeq.onnx.rewrite import exact_arithmetic_copy, rewrite_linears
    from edgeq.onnx.safe_load import save_onnx, weight_bytes
    from edgeq.onnx.session import make_session, session_of_model
    from edgeq.onnx.sizes import size_by_component
    from edgeq.pipeline.deploy import Layout, stage_deployment, staged
    from edgeq.pipeline.parity import run_onnx, run_torch
    from edgeq.quant.plan import build_plan
    from edgeq.saliency import get_method

    t_start = time.perf_counter()
    timer = Timer()
    loaded = timer.run("load", load_model, model_dir, config.allow_pickle)
    huge = next(((n, p.numel() * 4) for n, p in loaded.model.named_parameters() if p.numel() * 4 >= 2**31), None)
    if huge:  # protobuf cannot copy one message of 2 GB or more, which the ONNX rewrite needs
        raise EdgeqError(f"weight {huge[0]} alone is {huge[1] / 1e9:.2f} GB; edgeq cannot convert a single tensor "
                         "of 2 GB or more (protobuf limit), only models whose total exceeds it")
    calibration = None
    needs_one_pass = config.quantizer == "rtn" or get_method(config.method).needs_calibration
    if config.calib and needs_one_pass:  # statistics of every Linear input (edgeq.model.calib), for calibration-based methods
        from edgeq.model.calib import calibrate

        calibration = timer.run("calibrate", calibrate, loaded, config.calib, config.calib_samples, config.seed,
                                config.data_dir, progress=progress)
    texts, source = validation_texts(data, limit)
    batches = encode_batches(loaded, texts)
    fp32_out = run_torch(loaded.model, loaded, batches)

    model = timer.run("export", export_fp32, loaded, config.opset, config.external_data_threshold)
    fp32_got = run_onnx(session_of_model(model, threads or 0, config.external_data_threshold), batches)
    export_diff = {k: float(np.max(np.abs(fp32_got[k] - v))) for k, v in fp32_out.items()}
    for k, d in export_diff.items():
        scale = max(1.0, float(np.max(np.abs(fp32_out[k]))))
        if d > EXPORT_TOLERANCE * scale:
            raise EdgeqError(f"FP32 export does not match PyTorch ({k} max|d| = {d:.3g}); please report this model")
    fp32_sizes = size_by_component(model)

    weights = loaded.linear_weights()
    if config.quantizer == "rtn":
        plan = timer.run("plan", build_plan, weights, config, calibration.stats if calibration else None)
        quantizer_report = {"name": "rtn", "hyperparameters": {}, "calibration": None}
    else:  # calibrated quantizers: sequential, block by block (edgeq.model.sequential)
        from edgeq.model.sequential import run_quantizer

        plan, quantizer_report = timer.run("quantize", run_quantizer, loaded, weights, config, calibration,
                                           progress)
    if not plan.layers:
        raise UsageError(f"no Linear left to quantize (--exclude keeps all {len(weights)} in FP32); loosen --exclude")
    try:
        result = timer.run("rewrite", rewrite_linears, model, plan.quants, weights, config.accuracy_level,
                           correction=config.correction)
    except ValueError as e:
        raise EdgeqError(f"{e}; exclude them with --exclude REGEX or report this model") from None
    if result.count != len(plan.layers):
        raise EdgeqError(f"rewrote {result.count} Linears but the plan has {len(plan.layers)}; please report this")
    planned = {name: lp.quant.dequantize() for name, lp in plan.layers.items()}
    embeddings_report = None
    if config.quantize_embeddings:  # word/position tables → GatherBlockQuantized (edgeq.onnx.embeddings)
        from edgeq.onnx.embeddings import module_names, quantize_embeddings

        emb = timer.run("embeddings", quantize_embeddings, model, 32, module_names(model, loaded.model))
        if not emb.rewritten:
            raise EdgeqError("--quantize-embeddings found no word-embedding Gather to rewrite ("
                             + ("; ".join(f"{n}: {r}" for n, r in emb.refused[:2]) or "no Gather on input_ids")
                             + "); use --no-quantize-embeddings")
        planned.update(emb.tables)
        embeddings_report = {"int4": sorted(emb.rewritten.values()),
                             "left_fp32": [{"node": n, "reason": r} for n, r in emb.refused]}
    decoded = read_back(model)
    bad = [n for n in planned if not np.array_equal(planned[n], decoded[n])]
    if bad:
        raise EdgeqError(f"the written graph does not encode the plan for {', '.join(bad[:3])}; please report this")

    set_meta(model, "edgeq.version", __version__)  # after edgeq.layers (and edgeq.embeddings): order is bytes
    set_meta(model, "edgeq.config", json.dumps(config.to_dict(), sort_keys=True))
    model.producer_name, model.producer_version = "edgeq", __version__

    layout = Layout.for_output(out)  # one .onnx file, or a Hugging Face folder (edgeq.pipeline.deploy)
    with staged(layout) as stage:
        tmp_model = stage.path(layout.model)
        tmp_report = stage.path(layout.report)
        large = weight_bytes(model) > config.external_data_threshold
        tmp_data = stage.path(layout.data) if large else None
        timer.run("save", save_onnx, model, tmp_model, large)
        session = make_session(str(tmp_model), threads or 0)
        exact = exact_arithmetic_copy(model)
        plan_session = None if exact is None else session_of_model(exact, threads or 0, config.external_data_threshold)
        parity = timer.run(
            "validate", parity_checks, loaded, session, fp32_out, planned, batches, thresholds, source, plan_session
        )
        report = {
            "edgeq_version": __version__,
            "model_dir": str(model_dir),
            "model_type": loaded.model_type,
            "head": loaded.head,
            "output": str(out),
            "config": config.to_dict(),
            "calibration": calibration.info() if calibration else None,
            "quantizer": quantizer_report,
            "linears_total": len(weights),
            "linears_quantized": result.count,
            "linears_excluded": list(plan.excluded),
            "embeddings": embeddings_report,
            "external_data": large,
            "export_max_abs_diff": export_diff,
            "recon_error_total": plan.total_recon_error,
            "layers": {name: lp.stats() for name, lp in plan.layers.items()},
            "size_bytes": size_by_component(model),
            "size_bytes_fp32": fp32_sizes,
            "file_bytes": tmp_model.stat().st_size + (tmp_data.stat().st_size if tmp_data else 0),
            "parity": parity.to_dict(),
            "timings_s": {**timer.stages, "total": round(time.perf_counter() - t_start, 3)},
        }
        if not parity.ok:
            logger.info("validation:\n" + parity.table())
            failed = "; ".join(f"{c.name} = {c.value:.4g}, limit {c.limit:.4g}" for c in parity.failures())
            raise ValidationFailed(f"validation failed, no output written ({failed}); relax the threshold or raise --k")
        if layout.folder is not None or ort_format:
            report["deployment"] = timer.run("package", stage_deployment, stage, layout, loaded, model, tmp_model,
                                             session, batches, large, ort_format, threads or 0)
            report["timings_s"].update(package=timer.stages["package"], total=round(time.perf_counter() - t_start, 3))
        tmp_report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        stage.commit()
    return report


def validate_file(
    model_dir: Path,
    onnx_path: Path,
    data: Path | None = None,
    limit: int | None = None,
    thresholds: Thresholds = Thresholds(),
    threads: int | None = None,
    allow_pickle: bool = False,
) -> ParityReport:
    """Check an edgeq ONNX file against its source model: plan parity (decoded from the file) and fidelity."""
    from edgeq.model.load import load_model
    from edgeq.model.texts import encode_batches, validation_texts
    from edgeq.onnx.readback import read_back
    from edgeq.onnx.rewrite import exact_arithmetic_copy
    from edgeq.onnx.safe_load import load_onnx
    from edgeq.onnx.session import make_session, session_of_model
    from edgeq.pipeline.parity import run_torch

    model = load_onnx(onnx_path)  # refuses external data outside the file's directory
    loaded = load_model(model_dir, allow_pickle)
    try:
        decoded = read_back(model)
    except ValueError as e:
        raise EdgeqError(f"{onnx_path}: {e}") from None
    missing = [n for n in decoded if n not in dict(loaded.model.named_modules())]
    if missing:
        raise EdgeqError(f"{onnx_path} does not belong to {model_dir}: no Linear named {missing[0]}")
    texts, source = validation_texts(data, limit)
    batches = encode_batches(loaded, texts)
    fp32_out = run_torch(loaded.model, loaded, batches)
    session = make_session(str(onnx_path), threads or 0)
    exact = exact_arithmetic_copy(model)
    plan_session = None if exact is None else session_of_model(exact, threads or 0)
    return parity_checks(loaded, session, fp32_out, decoded, batches, thresholds, source, plan_session)
