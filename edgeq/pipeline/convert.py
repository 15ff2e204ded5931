"""``convert`` and ``validate``: an edgeq file from a Hugging Face model, checked at every stage.

``convert`` runs, each stage a named function (durations in the report's ``timings_s``):

1. :func:`load_checked` — load the model (refusing a single tensor of 2 GB or more);
   :func:`calibrate_if_needed` — one pass of input statistics when the plan uses them;
2. :func:`reference_outputs` (stage ``reference``) — the validation text and the FP32 PyTorch outputs on it;
3. :func:`export_checked` — the FP32 ONNX export, max|Δ| vs PyTorch ≤ EXPORT_TOLERANCE·max(1, max|y|);
4. :func:`quantize` — plan and rewrite in memory (:mod:`edgeq.pipeline.core`: count and read-back
   checks), then the ``edgeq.version`` / ``edgeq.config`` metadata;
5. save to a staging directory and validate the file (:func:`parity_checks`: plan parity
   max|Δ|/max|ref| ≤ ``--max-plan-diff`` against PyTorch carrying the planned Ŵ, and fidelity to
   FP32); nothing is written unless every gate passes;
6. :func:`edgeq.pipeline.report.make_report` — the JSON report, committed with the model (and the deployment package).

``validate_file`` runs step 5 on an existing file, decoding Ŵ from it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq import __version__
from edgeq.config import ConvertConfig
from edgeq.errors import EdgeqError, ValidationFailed
from edgeq.pipeline.core import Timer, heap_mmap_threshold, trim_heap
from edgeq.pipeline.parity import Check, ParityReport
from edgeq.pipeline.report import make_report, memory_report

EXPORT_TOLERANCE = 1e-4  # FP32 ONNX vs PyTorch, max|Δ| (relative to max(1, max|ref|))
PLAN_TOLERANCE = 1e-4  # quantized ONNX vs same-quantization PyTorch, max|Δ| / max|ref|

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thresholds:
    plan_rel_diff: float = PLAN_TOLERANCE
    min_agreement: float | None = None
    max_abs_diff: float | None = None
    min_cosine: float | None = None  # sentence_embedding, worst sentence; None: parity.DEFAULT_MIN_COSINE


def parity_checks(loaded, session, fp32_out, ref_weights, batches, thresholds: Thresholds, source: str,
                  plan_session=None, sts_gold=None, integer_model=None) -> ParityReport:
    """(a) ONNX vs PyTorch with ``ref_weights``; (b) ONNX vs the FP32 outputs ``fp32_out``.

    ``plan_session``: for (a) when the file's MatMulNBits use accuracy_level ≠ 0 (int8 activations
    are run-time arithmetic, not the weights): the same graph at accuracy_level 0.
    ``sts_gold``: STS-B scores of the sentence pairs (rows 2i, 2i+1) of an embedding model.
    ``integer_model``: the file's ModelProto; when it has DynamicQuantizeMatMul Linears
    (``--kernel integer``) the reference quantizes their inputs as the kernel does, the gated plan
    parity is per Linear on ONNX Runtime's own inputs and the end-to-end one is reported without a
    limit (rounding-boundary flips cascade; :mod:`edgeq.pipeline.parity`).
    """
    from edgeq.onnx.integer import integer_layers
    from edgeq.pipeline.parity import (
        embedding_checks,
        fidelity,
        integer_layer_parity,
        integer_reference,
        reference_model,
        relative_max_diff,
        run_onnx,
        run_torch,
    )

    got = run_onnx(session, batches)
    got_plan = run_onnx(plan_session, batches) if plan_session is not None else got
    reference = reference_model(loaded, ref_weights)
    integer = integer_layers(integer_model) if integer_model is not None else {}
    if integer:
        reference = integer_reference(reference, integer)
    ref = run_torch(reference, loaded, batches)
    report = ParityReport(examples=len(next(iter(fp32_out.values()))) if batches else 0, source=source)
    report.examples = int(sum(len(b["input_ids"]) for b in batches))
    if integer:
        per_layer = integer_layer_parity(integer_model, loaded, integer, batches)
        report.checks.append(Check("plan parity: every Linear on ORT inputs max|d|/max|ref|",
                                   max(per_layer.values()), thresholds.plan_rel_diff))
    for name, rel in relative_max_diff(got_plan, ref).items():
        label = f"plan parity{' (end to end, no limit)' if integer else ''}: {name} max|d|/max|ref|"
        report.checks.append(Check(label, rel, None if integer else thresholds.plan_rel_diff))
    fid = fidelity(got, fp32_out)
    out = fid["output"]
    report.checks.append(Check(f"vs fp32: {out} max|d|", fid["max_abs_diff"], thresholds.max_abs_diff))
    report.checks.append(Check(f"vs fp32: {out} mean|d|", fid["mean_abs_diff"], None))
    if fid["regression"] is not None:  # one logit: its cosine is only sign agreement
        for metric, value in fid["regression"].items():
            report.checks.append(Check(f"vs fp32: {out} {metric}", value, None, True))
    else:
        report.checks.append(Check(f"vs fp32: {out} mean cosine", fid["mean_cosine"], None, True))
    report.checks += embedding_checks(fid, got, fp32_out, thresholds.min_cosine, sts_gold)
    if fid["top1_agreement"] is not None:
        report.checks.append(Check("vs fp32: top-1 agreement", fid["top1_agreement"], thresholds.min_agreement, True))
    elif thresholds.min_agreement is not None:
        raise EdgeqError("--min-agreement needs a classification model (this one has no logits)")
    return report


@dataclass(frozen=True)
class Reference:
    """The validation text, its batches, and the FP32 PyTorch outputs on them."""

    batches: list
    outputs: dict[str, np.ndarray]
    source: str
    sts_gold: np.ndarray | None = None  # embedding models on an STS-B TSV: the pairs' gold scores


def load_checked(model_dir: Path, allow_pickle: bool, pooling: str = "none", normalize: bool = False):
    """Load the model; refuse a single tensor of 2 GB or more (protobuf cannot copy one such message)."""
    from edgeq.model.load import load_model

    loaded = load_model(model_dir, allow_pickle, pooling, normalize)
    huge = next(((n, p.numel() * 4) for n, p in loaded.model.named_parameters() if p.numel() * 4 >= 2**31), None)
    if huge:  # protobuf cannot copy one message of 2 GB or more, which the ONNX rewrite needs
        raise EdgeqError(f"weight {huge[0]} alone is {huge[1] / 1e9:.2f} GB; edgeq cannot convert a single tensor "
                         "of 2 GB or more (protobuf limit), only models whose total exceeds it")
    return loaded


def calibrate_if_needed(loaded, config: ConvertConfig, timer: Timer, progress: bool):
    """Statistics of every Linear input (edgeq.model.calib) when the plan uses them, else None."""
    from edgeq.pipeline.core import needs_calibration_pass

    if not needs_calibration_pass(config):
        return None
    from edgeq.model.calib import calibrate
    from edgeq.saliency import get_method

    # --act-outliers / --smooth-alpha alone read max|x|: skip the n x n XᵀX (the slow part on FFN inputs)
    xtx = not ((config.act_outliers or config.smooth_alpha) and config.quantizer == "rtn"
               and not get_method(config.method).needs_calibration)
    return timer.run("calibrate", calibrate, loaded, config.calib, config.calib_samples, config.seed,
                     config.data_dir, xtx=xtx, progress=progress)


def reference_outputs(loaded, data: Path | None, limit: int | None) -> Reference:
    from edgeq.model.texts import encode_batches
    from edgeq.pipeline.parity import run_torch, validation_inputs

    texts, source, gold = validation_inputs(loaded, data, limit)
    batches = encode_batches(loaded, texts)
    return Reference(batches, run_torch(loaded.model, loaded, batches), source, gold)


def export_checked(loaded, config: ConvertConfig, ref: Reference, threads: int, timer: Timer):
    """The FP32 ONNX export and its max|Δ| per output against PyTorch (refused beyond EXPORT_TOLERANCE).

    Memory (results/memory.md): the export comes without its weights serialized
    (:func:`edgeq.onnx.export.export_parts`), the folded Linear weights are views of the model's own,
    ONNX Runtime checks it from a weightless graph plus an external-data file written from the arrays,
    and only after that session is released are the weights copied into the ModelProto.
    """
    from edgeq.onnx.export import attach_weights, export_parts, share_linear_weights
    from edgeq.onnx.session import session_with_weights
    from edgeq.pipeline.parity import run_onnx

    parts = timer.run("export", export_parts, loaded, config.opset)
    share_linear_weights(parts, loaded.model)  # the folded Wᵀ copies go: views of the model's W stand in
    session = session_with_weights(parts.model, parts.weights, threads)
    got = run_onnx(session, ref.batches)
    del session
    trim_heap()
    model = attach_weights(parts)
    diff = {k: float(np.max(np.abs(got[k] - v))) for k, v in ref.outputs.items()}
    for k, d in diff.items():
        scale = max(1.0, float(np.max(np.abs(ref.outputs[k]))))
        if d > EXPORT_TOLERANCE * scale:
            raise EdgeqError(f"FP32 export does not match PyTorch ({k} max|d| = {d:.3g}); please report this model")
    return model, diff


def quantize(loaded, fp32_model, weights, config: ConvertConfig, calibration, timer: Timer, progress: bool):
    """Plan (RTN or the calibrated quantizer), the checked in-memory rewrite (edgeq.pipeline.core), metadata."""
    from edgeq.onnx.graph import set_meta
    from edgeq.pipeline.core import plan_weights, quantize_graph

    stage = "plan" if config.quantizer == "rtn" else "quantize"  # calibrated: block by block (edgeq.model.sequential)
    plan, quantizer_report = timer.run(stage, plan_weights, loaded, weights, config, calibration, progress)
    modules = None
    if config.quantize_embeddings:
        from edgeq.onnx.embeddings import module_names

        modules = module_names(fp32_model, loaded.model)
    qg = quantize_graph(fp32_model, weights, config, plan, modules, timer, copy=False)  # the export is given up
    set_meta(qg.model, "edgeq.version", __version__)  # after edgeq.layers (and edgeq.embeddings): order is bytes
    set_meta(qg.model, "edgeq.config", json.dumps(config.to_dict(), sort_keys=True))
    qg.model.producer_name, qg.model.producer_version = "edgeq", __version__
    return qg, quantizer_report


@dataclass
class Converted:
    """Everything a conversion computed before writing: the quantized graph and what the report needs."""

    model_dir: Path
    config: ConvertConfig
    loaded: object  # edgeq.model.load.LoadedModel, carrying the planned Ŵ (parity.carry_planned)
    calibration: object | None
    ref: Reference
    export_diff: dict[str, float]
    fp32_sizes: dict
    weights: dict[str, np.ndarray]  # every Linear's weight as loaded.model now carries it (planned: Ŵ)
    graph: object  # edgeq.pipeline.core.QuantizedGraph
    quantizer_report: dict


def prepare(model_dir: Path, config: ConvertConfig, data, limit, threads: int, progress: bool,
            timer: Timer) -> Converted:
    """Stages 1–4: load, calibrate, reference outputs, checked export, plan and checked rewrite."""
    from edgeq.onnx.sizes import size_by_component
    from edgeq.pipeline.parity import carry_planned

    loaded = timer.run("load", load_checked, model_dir, config.allow_pickle, config.pooling, config.normalize)
    calibration = calibrate_if_needed(loaded, config, timer, progress)
    ref = timer.run("reference", reference_outputs, loaded, data, limit)  # the PyTorch FP32 pass on --data
    fp32_model, export_diff = export_checked(loaded, config, ref, threads, timer)
    fp32_sizes = size_by_component(fp32_model)
    qg, quantizer_report = quantize(loaded, fp32_model, loaded.linear_weights(), config, calibration, timer, progress)
    carry_planned(loaded, qg.planned)  # the FP32 weights are done with: only Ŵ from here on (results/memory.md)
    weights = loaded.linear_weights()
    return Converted(model_dir, config, loaded, calibration, ref, export_diff, fp32_sizes, weights, qg,
                     quantizer_report)


def write_validated(c: Converted, out: Path, thresholds: Thresholds, threads: int, ort_format: bool,
                    timer: Timer, t_start: float, overwrite: bool = True) -> dict:
    """Stages 5–6: save to a staging directory, validate the file, commit it with its report (or nothing)."""
    from edgeq.onnx.rewrite import exact_arithmetic_copy
    from edgeq.onnx.safe_load import save_onnx, weight_bytes
    from edgeq.onnx.session import make_session, session_of_model
    from edgeq.pipeline.deploy import Layout, stage_deployment, staged

    model, limit = c.graph.model, c.config.external_data_threshold
    layout = Layout.for_output(out)  # one .onnx file, or a Hugging Face folder (edgeq.pipeline.deploy)
    with staged(layout, overwrite) as stage:
        tmp_model, tmp_report = stage.path(layout.model), stage.path(layout.report)
        large = weight_bytes(model) > limit
        tmp_data = stage.path(layout.data) if large else None
        timer.run("save", save_onnx, model, tmp_model, large)
        session = make_session(str(tmp_model), threads)
        exact = exact_arithmetic_copy(model)
        plan_session = None if exact is None else session_of_model(exact, threads, limit)
        parity = timer.run("validate", parity_checks, c.loaded, session, c.ref.outputs, c.graph.planned,
                           c.ref.batches, thresholds, c.ref.source, plan_session, c.ref.sts_gold, model)
        file_bytes = tmp_model.stat().st_size + (tmp_data.stat().st_size if tmp_data else 0)
        report = make_report(c, out, large, file_bytes, parity, timer, t_start)
        if not parity.ok:
            logger.info("validation:\n" + parity.table())
            failed = "; ".join(f"{x.name} = {x.value:.4g}, limit {x.limit:.4g}" for x in parity.failures())
            raise ValidationFailed(f"validation failed, no output written ({failed}); relax the threshold or raise --k")
        if layout.folder is not None or ort_format:
            report["deployment"] = timer.run("package", stage_deployment, stage, layout, c.loaded, model, tmp_model,
                                             session, c.ref.batches, large, ort_format, threads, c.graph.planned)
            report["timings_s"].update(package=timer.stages["package"], total=round(time.perf_counter() - t_start, 3))
            report["memory"] = memory_report(timer)
        tmp_report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        stage.commit()
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
    overwrite: bool = True,
) -> dict:
    """Convert ``model_dir`` to ``out`` (atomically) and return the report (also written as JSON).

    ``overwrite=False`` refuses to replace files that appear at ``out`` while the conversion runs.
    """
    t_start, timer = time.perf_counter(), Timer()
    heap_mmap_threshold()  # freed weights and temporaries leave RSS at once (results/memory.md)
    converted = prepare(model_dir, config, data, limit, threads or 0, progress, timer)
    trim_heap()  # the FP32 export went with prepare's frame
    return write_validated(converted, out, thresholds, threads or 0, ort_format, timer, t_start, overwrite)


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
    from edgeq.model.texts import encode_batches
    from edgeq.onnx.readback import read_back
    from edgeq.onnx.rewrite import exact_arithmetic_copy
    from edgeq.onnx.safe_load import load_onnx
    from edgeq.onnx.session import make_session, session_of_model
    from edgeq.pipeline.parity import run_torch, validation_inputs

    model = load_onnx(onnx_path)  # refuses external data outside the file's directory
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        recorded = json.loads(meta.get("edgeq.config", "{}"))
    except json.JSONDecodeError:
        recorded = {}
    loaded = load_model(model_dir, allow_pickle, recorded.get("pooling", "none"), bool(recorded.get("normalize")))
    try:
        decoded = read_back(model)
    except ValueError as e:
        raise EdgeqError(f"{onnx_path}: {e}") from None
    missing = [n for n in decoded if n not in dict(loaded.model.named_modules())]
    if missing:
        raise EdgeqError(f"{onnx_path} does not belong to {model_dir}: no Linear named {missing[0]}")
    texts, source, gold = validation_inputs(loaded, data, limit)
    batches = encode_batches(loaded, texts)
    fp32_out = run_torch(loaded.model, loaded, batches)
    session = make_session(str(onnx_path), threads or 0)
    exact = exact_arithmetic_copy(model)
    plan_session = None if exact is None else session_of_model(exact, threads or 0)
    return parity_checks(loaded, session, fp32_out, decoded, batches, thresholds, source, plan_session, gold,
                         model)
