"""Table I sweep: every cell of ``method × k × variant`` converted and scored on a GLUE dev set, in-process.

Variants (:mod:`edgeq.research.cells`) are the other grid dimensions: quantizer, bits, 4-bit grid and
granularity.  One model load, one FP32 export, one score per (method, Linear, bits × grid × granularity)
reused for every k: a layer's top-k selection is the first k entries of its stable descending score
order, sorted (:func:`edgeq.quant.plan.selection_order`, the same sort as ``topk_flat``), so
``order[:k_max]`` is all that is kept.  An RTN cell is planned by ``build_plan(..., orders=)``; a
calibrated quantizer's cell by :func:`edgeq.pipeline.core.plan_weights` (block by block, selecting on
its own).  Every cell is then quantized by the in-memory core (:func:`edgeq.pipeline.core.quantize_graph`:
a rewritten copy of the FP32 graph, count and read-back checked) and evaluated on ONNX Runtime.

Recorded per quantized cell, besides the task metrics and the agreement with FP32 predictions:

* ``mean_abs_dlogit`` / ``max_abs_dlogit``: mean and max over all dev logits of |z_q − z_fp32|
  (z_fp32: the PyTorch FP32 model);
* ``recon_error_total`` = Σ_layers ‖W − Ŵ‖²_F;
* calibrated quantizers: ``quantize_seconds`` (wall), ``quantize_cpu_seconds`` (process time) and the
  ``quantizer`` report of ``edgeq convert`` (hyper-parameters, calibration split, per-layer λ / epochs);
* ``plan_parity`` = max|z_onnx − z_ref| / max|z_ref| on the shortest and the longest batch, z_ref
  from PyTorch carrying the planned Ŵ (refused above ``PLAN_TOLERANCE``, as ``edgeq convert`` does).

The FP32 row is the exported FP32 graph on ONNX Runtime (its PyTorch correct count is recorded
beside it); ``int4-k0`` is k = 0 (no FP32 entries, method-independent).  Finished cells are stored
at once and reused by a rerun (:func:`edgeq.research.cells.load_cells`).

STS-B (an embedding model: a sentence-transformers folder, or a bare encoder mean-pooled as by ``edgeq eval``)
is scored on ``sentence_embedding``, each sentence alone (:func:`edgeq.evaluation.evaluate.score_embeddings`):
Spearman/Pearson of the pair cosines and, instead of agreement and |Δlogit|, ``mean_cosine`` / ``min_cosine``
over dev sentences of cos(e_q, e_fp32) (e_fp32: PyTorch; the FP32 row: ``pytorch_mean/min_cosine``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError, UsageError
from edgeq.research.cells import (  # noqa: F401  (FP32, INT4, cell_ids, load_cells: the sweep's API)
    FP32,
    INT4,
    SweepSettings,
    Variant,
    cell_id,
    cell_ids,
    load_cells,
    make_cell,
    make_sts_cell,
    usable_variants,
    write_json,
)

logger = logging.getLogger(__name__)
CALIB_NEEDED = "the awq/spqr methods need calibration data; pass --calib TASK_OR_FILE (e.g. --calib rte)"
STS_NEEDS_EMBEDDINGS = ("{} has a classification/regression head (logits); the STS-B sweep scores the cosine of "
                        "sentence embeddings: pass a sentence-transformers folder or a bare encoder, or sweep this "
                        "model with --task set to the GLUE task it was fine-tuned for")


@dataclass
class SweepRun:
    cells: dict[str, dict]
    computed: list[str]
    reused: list[str]
    variants: list[Variant] = field(default_factory=list)  # the grid's usable variants, in order


class _Context:
    """Everything loaded once when at least one cell has to be computed."""

    def __init__(self, settings: SweepSettings, data_dir, threads: int, quiet: bool):
        import torch

        from edgeq.evaluation.embedding import is_sts, sentences
        from edgeq.evaluation.evaluate import encode_sorted, pooling_for
        from edgeq.evaluation.tasks import dev_file, get_task, label_ids, read_examples
        from edgeq.model.load import load_model
        from edgeq.onnx.export import export_fp32

        if threads:
            torch.set_num_threads(threads)
        self.settings, self.data_dir, self.threads, self.quiet = settings, data_dir, threads, quiet
        self.task = get_task(settings.task)
        self.sts = is_sts(self.task)  # scored on sentence embeddings (each sentence alone), not on logits
        self.examples = read_examples(self.task, dev_file(self.task, data_dir), settings.limit)
        self.loaded = load_model(Path(settings.model_dir), pooling=pooling_for(Path(settings.model_dir), self.task))
        if self.sts and self.loaded.sentence is None:
            raise EdgeqError(STS_NEEDS_EMBEDDINGS.format(settings.model_dir))
        if not self.sts and self.loaded.head != "sequence-classification":
            raise EdgeqError(f"{settings.model_dir} has no classification head; sweep a fine-tuned task model")
        if not self.sts:
            label_ids(self.task, self.loaded.id2label, len(self.loaded.id2label or {}))  # refuse mismatched labels
        self.batches = encode_sorted(self.loaded.tokenizer, sentences(self.examples) if self.sts else
                                     self.examples.texts, self.loaded.input_names, settings.max_length)
        self.weights = self.loaded.linear_weights()
        t0 = time.perf_counter()
        self.fp32 = export_fp32(self.loaded)
        self.loaded.model.eval()  # torch.onnx.export leaves the wrapped model in training mode (dropout on)
        logger.info(f"loaded and exported FP32 in {time.perf_counter() - t0:.1f} s")
        self._calibration = None
        self._fp32_logits: np.ndarray | None = None
        self._orders: dict[tuple, dict[str, np.ndarray]] = {}
        self.score_seconds: dict[tuple, float] = {}

    def predictors(self):
        """(torch model → predict, ORT session → predict): logits, or STS sentence embeddings."""
        from edgeq.evaluation.embedding import onnx_embedder, torch_embedder
        from edgeq.evaluation.evaluate import onnx_predictor, torch_predictor

        if self.sts:
            return torch_embedder, lambda session: onnx_embedder(session)[0]
        return torch_predictor, lambda session: onnx_predictor(session)[0]

    def evaluate(self, model_bytes, engine="onnxruntime", predict=None):
        """(EvalResult, outputs in file order: logits [n, C], or STS sentence embeddings [2n, d]) of ONNX bytes,
        or of a PyTorch model's ``predict``."""
        from edgeq.evaluation.evaluate import evaluate, score_embeddings
        from edgeq.onnx.session import make_session

        if predict is None:
            torch_predict, onnx_predict = self.predictors()
            predict = torch_predict(self.loaded.model) if engine == "pytorch" else \
                onnx_predict(make_session(model_bytes, self.threads))
        if self.sts:
            res, emb = score_embeddings(self.task, self.examples, predict, self.batches, str(self.settings.model_dir),
                                        engine, self.quiet, "sentence_embedding")
            if engine == "pytorch":
                self._fp32_logits = emb
            return res, emb
        outs = []

        def recorded(feed):  # evaluate() keeps only the predictions; the logits are kept here
            outs.append(np.asarray(predict(feed)))
            return outs[-1]

        res = evaluate(self.task, self.examples, recorded, self.batches, self.loaded.id2label,
                       str(self.settings.model_dir), engine, self.quiet)
        logits = np.zeros((res.examples, outs[0].shape[-1]) if outs else (0, 0))
        for (idx, _), y in zip(self.batches, outs):
            logits[idx] = y.reshape(len(idx), -1)
        if engine == "pytorch":
            self._fp32_logits = logits
        return res, logits

    def fp32_logits(self) -> np.ndarray:
        if self._fp32_logits is None:
            self.evaluate(None, engine="pytorch")
        return self._fp32_logits

    def calibration(self):
        if self._calibration is None:
            from edgeq.model.calib import calibrate

            s = self.settings
            if not s.calib:
                raise UsageError(CALIB_NEEDED)
            self._calibration = calibrate(self.loaded, s.calib, s.calib_samples, s.seed, self.data_dir,
                                          progress=not self.quiet)
            logger.info(f"calibration: {self._calibration.info()}")
        return self._calibration

    def config(self, method: str | None, k: int, variant: Variant):
        from edgeq.config import ConvertConfig

        st = self.settings
        return ConvertConfig(method=method or "svd", k=k, rank=st.rank, seed=st.seed, block_size=variant.block_size,
                             exclude_salient_from_scale=st.exclude_salient_from_scale, bits=variant.bits,
                             grid=variant.grid, quantizer=variant.quantizer, accuracy_level=st.accuracy_level,
                             calib=st.calib, calib_samples=st.calib_samples, percdamp=st.percdamp,
                             data_dir=str(self.data_dir) if self.data_dir else None)

    def orders(self, method: str, k_max: int, variant: Variant | None = None) -> dict[str, np.ndarray]:
        """Per Linear: the first ``k_max`` flat indices in stable descending score order (kept for later cells);
        per grid (bits, grid, granularity), which a method such as ``error`` scores on."""
        from edgeq.quant.plan import selection_order
        from edgeq.saliency import get_method

        variant = variant or Variant(self.settings.block_size)
        key = (method, variant.bits, variant.grid, variant.block_size)
        kept = self._orders.get(key)
        if kept is not None and all(len(o) >= min(k_max, self.weights[n].size) for n, o in kept.items()):
            return kept
        t0 = time.perf_counter()
        stats = self.calibration().stats if get_method(method).needs_calibration else {}
        config = self.config(method, k_max, variant)
        orders = {name: selection_order(name, w, config, stats.get(name), k_max) for name, w in self.weights.items()}
        self._orders[key], self.score_seconds[key] = orders, round(time.perf_counter() - t0, 3)
        logger.info(f"{method}: scored {len(orders)} Linears in {self.score_seconds[key]:.1f} s")
        return orders

    def quantized_cell(self, config, orders: dict[str, np.ndarray] | None) -> tuple[object, dict]:
        """The checked quantized graph of one cell (edgeq.pipeline.core) and what its record adds."""
        from edgeq.pipeline.core import needs_calibration_pass, plan_weights, quantize_graph
        from edgeq.quant.plan import build_plan

        info: dict = {}
        if config.quantizer == "rtn":
            plan = build_plan(self.weights, config, orders=orders if config.k else None)
        else:
            calibration = self.calibration() if needs_calibration_pass(config) else None
            t0, c0 = time.perf_counter(), time.process_time()
            plan, report = plan_weights(self.loaded, self.weights, config, calibration, not self.quiet)
            info = {"quantize_seconds": round(time.perf_counter() - t0, 3),
                    "quantize_cpu_seconds": round(time.process_time() - c0, 3), "quantizer": report}
        qg = quantize_graph(self.fp32, self.weights, config, plan)
        info.update(linears=qg.rewrite.count, fp32_entries=int(sum(lp.quant.k for lp in plan.layers.values())),
                    recon_error_total=plan.total_recon_error)
        return qg, info

    def figures_of(self, outs: np.ndarray) -> dict:
        """|Δlogit| (mean, max) against FP32 PyTorch; STS: each sentence embedding's cosine to FP32's (mean, min)."""
        from edgeq.pipeline.parity import fidelity

        if not self.sts:
            d = np.abs(outs - self.fp32_logits())
            return {"mean_abs_dlogit": float(d.mean()), "max_abs_dlogit": float(d.max())}
        fid = fidelity({"sentence_embedding": outs}, {"sentence_embedding": self.fp32_logits()})
        return {"mean_cosine": fid["mean_cosine"], "min_cosine": fid["min_cosine"]}

    def figures(self, qg, logits: np.ndarray) -> dict:
        """|Δlogit| against FP32 PyTorch on every example (STS: the cosine of each sentence's embedding to
        FP32 PyTorch's), and plan parity on two batches."""
        from edgeq.onnx.rewrite import exact_arithmetic_copy
        from edgeq.onnx.session import make_session
        from edgeq.pipeline.convert import PLAN_TOLERANCE
        from edgeq.pipeline.parity import reference_model

        out = self.figures_of(logits)
        pick = [self.batches[i] for i in sorted({0, len(self.batches) - 1})] if self.batches else []
        torch_predict, onnx_predict = self.predictors()
        ref_predict = torch_predict(reference_model(self.loaded, dict(qg.planned)))
        exact = exact_arithmetic_copy(qg.model)  # accuracy_level ≠ 0: parity of the weights at level 0
        run = onnx_predict(make_session(exact.SerializeToString(), self.threads)) if exact is not None else None
        got = [run(feed) if run else logits[idx] for idx, feed in pick]
        ref = [ref_predict(feed) for _, feed in pick]
        parity = float(max((np.max(np.abs(g.reshape(r.shape) - r)) for g, r in zip(got, ref)), default=0.0)
                       / max(max((np.max(np.abs(r)) for r in ref), default=0.0), 1e-12))
        if parity > PLAN_TOLERANCE:
            raise EdgeqError(f"plan parity {parity:.3g} > {PLAN_TOLERANCE:g}: ONNX Runtime does not compute the plan; "
                             "please report this")
        return {**out, "plan_parity": parity}


def _check_model(model: Path, sts: bool) -> None:
    """Refuse, before anything is written, a model the task cannot score (sentence embeddings vs logits)."""
    from edgeq.model.load import read_config

    embedding = (model / "modules.json").is_file()
    head = not embedding and any(a.endswith("ForSequenceClassification")
                                 for a in read_config(model).get("architectures") or [])
    if sts and head:
        raise EdgeqError(STS_NEEDS_EMBEDDINGS.format(model))
    if not sts and not head:
        raise EdgeqError(f"{model} is a {'sentence-embedding model' if embedding else 'bare encoder'} (no "
                         "classification head); sweep it with --task STS-B (cosine) or sweep a fine-tuned task model")


def run_sweep(settings: SweepSettings, methods: Sequence[str], ks: Sequence[int], out: Path,
              data_dir: Path | None = None, threads: int = 1, quiet: bool = False,
              grid: Sequence[Variant] | None = None) -> SweepRun:
    """Compute every missing cell of ``methods × ks × grid`` (plus FP32 and int4) into ``out/cells``.

    ``grid`` defaults to the one variant of the settings (RTN, 4 bits, sym7, ``settings.block_size``).
    """
    from edgeq.evaluation.embedding import is_sts
    from edgeq.evaluation.tasks import get_task
    from edgeq.saliency import get_method

    for m in methods:
        try:
            get_method(m)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if not settings.calib and any(get_method(m).needs_calibration for m in methods):
        raise UsageError(CALIB_NEEDED)
    if any(k < 0 for k in ks):
        raise UsageError("--k values must be >= 0")
    task = get_task(settings.task)
    labels, sts = task.labels, is_sts(task)
    if not labels and not sts:
        raise UsageError(f"{settings.task} is a regression task; the sweep scores classification tasks and STS-B")
    _check_model(Path(settings.model_dir), sts)
    grid = usable_variants(settings, grid or [Variant(settings.block_size)])
    suffixes = [v.suffix(settings.block_size) for v in grid]
    wanted = cell_ids(methods, ks, suffixes)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    cells = load_cells(out, settings, wanted)
    reused = [c for c in wanted if c in cells]
    computed: list[str] = []
    if all(c in cells for c in wanted):
        return SweepRun({c: cells[c] for c in wanted}, computed, reused, grid)

    ctx = _Context(settings, data_dir, threads, quiet)
    base = {"settings": settings.key(), "engine": "onnxruntime", "threads": threads}

    def store(cell: dict) -> None:
        write_json(out / "cells" / f"{cell['cell']}.json", cell)
        cells[cell["cell"]] = cell
        computed.append(cell["cell"])
        m, acc = cell["metrics"], cell["metrics"].get("accuracy")
        logger.info(f"{cell['cell']:<16} " + (f"accuracy {100 * acc:6.2f} ({cell['correct']}/{cell['examples']})"
                                              if acc is not None else ", ".join(f"{n} {100 * v:6.2f}" for n, v in
                                                                                 m.items()) if sts else str(m))
                    + (f", agreement {100 * cell['agreement']:.2f}" if "agreement" in cell else "")
                    + (f", min cosine {cell['min_cosine']:.5f}" if "min_cosine" in cell else ""))

    if FP32 not in cells:
        res, out32 = ctx.evaluate(ctx.fp32.SerializeToString())
        torch_res, _ = ctx.evaluate(None, engine="pytorch")
        if sts:  # the FP32 export's sentence embeddings against PyTorch's
            figs = {f"pytorch_{n}": v for n, v in ctx.figures_of(out32).items()}
            store(make_sts_cell(FP32, None, 0, res, {**base, "pytorch_metrics": torch_res.metrics, **figs}))
        else:
            store(make_cell(FP32, None, 0, res, labels, None, {
                **base, "pytorch_correct": torch_res.correct, "pytorch_metrics": torch_res.metrics,
                "pytorch_same_predictions": torch_res.predictions == res.predictions}))
    fp32_codes = cells[FP32]["predictions"]

    todo = []  # (method, k, variant, suffix) of every missing cell, variant by variant
    for v, s in zip(grid, suffixes):
        todo += ([(None, 0, v, s)] if 0 in ks else []) + [(m, k, v, s) for m in methods for k in ks if k > 0]
    todo = [t for t in todo if cell_id(t[0], t[1], t[3]) not in cells]
    k_max = {m: max([k for mm, k, v, _ in todo if mm == m and v.quantizer == "rtn"], default=0) for m in methods}

    def compute(method: str | None, k: int, variant: Variant, suffix: str) -> None:
        config = ctx.config(method, k, variant)
        extra: dict = {"variant": variant.record()}
        orders = None
        if k and variant.quantizer == "rtn":
            orders = ctx.orders(method, k_max[method], variant)
            extra["score_seconds"] = ctx.score_seconds[(method, variant.bits, variant.grid, variant.block_size)]
        t0 = time.perf_counter()
        if (method and get_method(method).needs_calibration) or variant.quantizer != "rtn":
            extra.update(calib=settings.calib_key())
            if method and get_method(method).needs_calibration:
                extra["calibration"] = ctx.calibration().info()
        qg, info = ctx.quantized_cell(config, orders)
        res, logits = ctx.evaluate(qg.model.SerializeToString())
        info.update(ctx.figures(qg, logits), cell_seconds=round(time.perf_counter() - t0, 3))
        cid = cell_id(method, k, suffix)
        store(make_sts_cell(cid, method, k, res, {**base, **extra, **info}) if sts else
              make_cell(cid, method, k, res, labels, fp32_codes, {**base, **extra, **info}))

    for method, k, variant, suffix in todo:
        compute(method, k, variant, suffix)
    return SweepRun({c: cells[c] for c in wanted}, computed, reused, grid)
