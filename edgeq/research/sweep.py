"""Table I sweep: every (saliency method, k) cell converted and scored on a GLUE dev set, in-process.

One model load, one FP32 export, one score per (method, Linear), reused for every k: a layer's
top-k selection is the first k entries of its stable descending score order, sorted
(``edgeq.quant.plan.selection_order``, the same sort as ``topk_flat``), so ``order[:k_max]`` is all
that is kept.  Each cell is planned by ``edgeq.quant.plan.build_plan(..., orders=)`` and quantized
by the in-memory core (``edgeq.pipeline.core.quantize_graph``: a rewritten copy of the FP32 graph,
count and read-back checked), then evaluated on ONNX Runtime.  The FP32 row is the exported FP32 graph on ONNX Runtime (its PyTorch
correct count is recorded beside it); ``int4`` is k = 0 (no FP32 entries, method-independent).

Every finished cell is written at once to ``OUT/cells/<cell>.json`` (atomically) with the sweep
settings; a rerun loads those instead of recomputing them, and refuses a directory whose cells
were made with other settings.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError, UsageError
from edgeq.evaluation import metrics

FP32, INT4 = "fp32", "int4-k0"
CALIB_FIELDS = ("calib", "calib_samples", "percdamp")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepSettings:
    """What makes two sweeps' cells comparable (methods and the k grid may grow between runs)."""

    model_dir: str
    task: str
    block_size: str = "32"
    rank: int = 8
    seed: int = 0
    exclude_salient_from_scale: bool = False
    limit: int | None = None
    max_length: int = 128
    accuracy_level: int = 0
    # calibration (only cells of methods that need it depend on these; recorded per cell)
    calib: str | None = None
    calib_samples: int = 128
    percdamp: float = 0.01

    def key(self) -> dict:
        d = asdict(self)
        for f in CALIB_FIELDS:
            d.pop(f)
        d["model_dir"] = Path(self.model_dir).resolve().name  # the model, not where it was mounted
        return d

    def calib_key(self) -> dict:
        return {f: getattr(self, f) for f in CALIB_FIELDS}


def cell_id(method: str, k: int) -> str:
    return INT4 if k == 0 else f"{method}-k{k}"


def cell_ids(methods: Sequence[str], ks: Sequence[int]) -> list[str]:
    ids = [FP32] + ([INT4] if 0 in ks else [])
    return ids + [cell_id(m, k) for m in methods for k in ks if k > 0]


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_cells(out: Path, settings: SweepSettings, methods: Sequence[str] = ()) -> dict[str, dict]:
    """Finished cells in ``out/cells``; a calibrated cell made with other --calib settings is redone."""
    cells = {}
    for p in sorted((out / "cells").glob("*.json")):
        try:
            c = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a damaged cell is recomputed
        if c.get("settings") != settings.key():
            raise UsageError(f"{out} holds cells of a different sweep ({p.name}: {c.get('settings')}); "
                             "choose another --out directory")
        if "calib" in c and c["calib"] != settings.calib_key():
            if c.get("method") in methods:
                raise UsageError(f"{p} was calibrated with {c['calib']}, not {settings.calib_key()}; "
                                 "pass the same --calib/--calib-samples/--percdamp or another --out")
            continue
        cells[c["cell"]] = c
    return cells


def _pred_codes(preds: Sequence[str], labels: Sequence[str]) -> str:
    index = {name: str(i) for i, name in enumerate(labels)}
    return "".join(index[p] for p in preds)


def make_cell(cell: str, method: str | None, k: int, result, labels, fp32_codes: str | None, extra: dict) -> dict:
    """The stored record of one cell: metrics, correct/n, standard errors, agreement with FP32."""
    n = result.examples
    codes = _pred_codes(result.predictions, labels)
    c = {"cell": cell, "method": method, "k": k, "examples": n, "metrics": result.metrics,
         "correct": result.correct, "predictions": codes, "eval_seconds": result.seconds, **extra}
    if "accuracy" in result.metrics:
        c["accuracy_se"] = metrics.binomial_se(result.metrics["accuracy"], n)
    if fp32_codes is not None:
        agree = float(np.mean([a == b for a, b in zip(codes, fp32_codes)]))
        c["agreement"] = agree
        c["agreement_se"] = metrics.binomial_se(agree, n)
    return c


@dataclass
class SweepRun:
    cells: dict[str, dict]
    computed: list[str]
    reused: list[str]


class _Context:
    """Everything loaded once when at least one cell has to be computed."""

    def __init__(self, settings: SweepSettings, data_dir, threads: int, quiet: bool):
        import onnx  # noqa: F401
        import torch

        from edgeq.evaluation.evaluate import encode_sorted
        from edgeq.evaluation.tasks import dev_file, get_task, label_ids, read_examples
        from edgeq.model.load import load_model
        from edgeq.onnx.export import export_fp32

        if threads:
            torch.set_num_threads(threads)
        self.settings, self.data_dir, self.threads, self.quiet = settings, data_dir, threads, quiet
        self.task = get_task(settings.task)
        self.examples = read_examples(self.task, dev_file(self.task, data_dir), settings.limit)
        self.loaded = load_model(Path(settings.model_dir))
        if self.loaded.head != "sequence-classification":
            raise EdgeqError(f"{settings.model_dir} has no classification head; sweep a fine-tuned task model")
        label_ids(self.task, self.loaded.id2label, len(self.loaded.id2label or {}))  # refuse mismatched labels early
        self.batches = encode_sorted(self.loaded.tokenizer, self.examples.texts, self.loaded.input_names,
                                     settings.max_length)
        self.weights = self.loaded.linear_weights()
        t0 = time.perf_counter()
        self.fp32 = export_fp32(self.loaded)
        self.loaded.model.eval()  # torch.onnx.export leaves the wrapped model in training mode (dropout on)
        logger.info(f"loaded and exported FP32 in {time.perf_counter() - t0:.1f} s")
        self._calibration = None

    def evaluate(self, model_bytes, engine="onnxruntime"):
        from edgeq.evaluation.evaluate import evaluate, onnx_predictor, torch_predictor
        from edgeq.onnx.session import make_session

        if engine == "pytorch":
            predict = torch_predictor(self.loaded.model)
        else:
            predict, _ = onnx_predictor(make_session(model_bytes, self.threads))
        return evaluate(self.task, self.examples, predict, self.batches, self.loaded.id2label,
                        str(self.settings.model_dir), engine, self.quiet)

    def calibration(self):
        if self._calibration is None:
            from edgeq.model.calib import calibrate

            s = self.settings
            if not s.calib:
                raise UsageError("the awq/spqr methods need calibration data; pass --calib TASK_OR_FILE (e.g. --calib rte)")
            self._calibration = calibrate(self.loaded, s.calib, s.calib_samples, s.seed, self.data_dir,
                                          progress=not self.quiet)
            logger.info(f"calibration: {self._calibration.info()}")
        return self._calibration

    def config(self, method: str | None, k: int):
        from edgeq.config import ConvertConfig

        st = self.settings
        return ConvertConfig(method=method or "svd", k=k, rank=st.rank, seed=st.seed, block_size=st.block_size,
                             exclude_salient_from_scale=st.exclude_salient_from_scale,
                             accuracy_level=st.accuracy_level, calib=st.calib, calib_samples=st.calib_samples,
                             percdamp=st.percdamp)

    def orders(self, method: str, k_max: int) -> dict[str, np.ndarray]:
        """Per Linear: the first ``k_max`` flat indices in stable descending score order."""
        from edgeq.quant.plan import selection_order
        from edgeq.saliency import get_method

        stats = self.calibration().stats if get_method(method).needs_calibration else {}
        config = self.config(method, k_max)
        return {name: selection_order(name, w, config, stats.get(name), k_max) for name, w in self.weights.items()}

    def quantized_cell(self, method: str | None, orders: dict[str, np.ndarray] | None, k: int) -> tuple[bytes, dict]:
        """The checked ONNX bytes of one cell (edgeq.pipeline.core) and its plan statistics."""
        from edgeq.pipeline.core import quantize_graph
        from edgeq.quant.plan import build_plan

        config = self.config(method, k)
        plan = build_plan(self.weights, config, orders=orders if k else None)
        qg = quantize_graph(self.fp32, self.weights, config, plan)
        info = {"linears": qg.rewrite.count, "fp32_entries": int(sum(lp.quant.k for lp in plan.layers.values())),
                "recon_error_total": plan.total_recon_error}
        return qg.model.SerializeToString(), info


def run_sweep(settings: SweepSettings, methods: Sequence[str], ks: Sequence[int], out: Path,
              data_dir: Path | None = None, threads: int = 1, quiet: bool = False,
) -> SweepRun:
    """Compute every missing cell of ``methods × ks`` (plus FP32 and int4) into ``out/cells``."""
    from edgeq.evaluation.tasks import get_task
    from edgeq.saliency import get_method

    for m in methods:
        try:
            get_method(m)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if not settings.calib and any(get_method(m).needs_calibration for m in methods):
        raise UsageError("the awq/spqr methods need calibration data; pass --calib TASK_OR_FILE (e.g. --calib rte)")
    if any(k < 0 for k in ks):
        raise UsageError("--k values must be >= 0")
    labels = get_task(settings.task).labels
    if not labels:
        raise UsageError(f"{settings.task} is a regression task; the sweep scores classification tasks")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    cells = load_cells(out, settings, methods)
    wanted = cell_ids(methods, ks)
    reused = [c for c in wanted if c in cells]
    computed: list[str] = []
    missing = [c for c in wanted if c not in cells]
    if not missing:
        return SweepRun({c: cells[c] for c in wanted}, computed, reused)

    ctx = _Context(settings, data_dir, threads, quiet)
    base = {"settings": settings.key(), "engine": "onnxruntime", "threads": threads}

    def store(cell: dict) -> None:
        _write_json(out / "cells" / f"{cell['cell']}.json", cell)
        cells[cell["cell"]] = cell
        computed.append(cell["cell"])
        acc = cell["metrics"].get("accuracy")
        logger.info(f"{cell['cell']:<16} " + (f"accuracy {100 * acc:6.2f} ({cell['correct']}/{cell['examples']})" if acc is not None else
                                      str(cell["metrics"])) + (f", agreement {100 * cell['agreement']:.2f}" if "agreement" in cell else ""))

    if FP32 not in cells:
        res = ctx.evaluate(ctx.fp32.SerializeToString())
        torch_res = ctx.evaluate(None, engine="pytorch")
        store(make_cell(FP32, None, 0, res, labels, None, {
            **base, "pytorch_correct": torch_res.correct, "pytorch_metrics": torch_res.metrics,
            "pytorch_same_predictions": torch_res.predictions == res.predictions}))
    fp32_codes = cells[FP32]["predictions"]
    if INT4 in missing:
        model, info = ctx.quantized_cell(None, None, 0)
        store(make_cell(INT4, None, 0, ctx.evaluate(model), labels, fp32_codes, {**base, **info}))
    for m in methods:
        todo = [k for k in ks if k > 0 and cell_id(m, k) not in cells]
        if not todo:
            continue
        t0 = time.perf_counter()
        orders = ctx.orders(m, max(todo))
        score_s = round(time.perf_counter() - t0, 3)
        logger.info(f"{m}: scored {len(orders)} Linears in {score_s:.1f} s")
        calib = {"calib": settings.calib_key(), "calibration": ctx.calibration().info()} \
            if get_method(m).needs_calibration else {}
        for k in todo:
            t1 = time.perf_counter()
            model, info = ctx.quantized_cell(m, orders, k)
            info.update(calib)
            res = ctx.evaluate(model)
            info["cell_seconds"] = round(time.perf_counter() - t1, 3)
            info["score_seconds"] = score_s
            store(make_cell(cell_id(m, k), m, k, res, labels, fp32_codes, {**base, **info}))
    return SweepRun({c: cells[c] for c in wanted}, computed, reused)
