"""Deployment layouts of ``edgeq convert``: one ``.onnx`` file, or a Hugging Face / Optimum folder,
optionally with the ONNX Runtime Mobile format (``.ort``) and its reduced-build operator config.

A folder ``OUT_DIR/`` holds ``model.onnx``, ``config.json``, the tokenizer files and
``edgeq_report.json`` — what ``optimum.onnxruntime.ORTModelFor*.from_pretrained(OUT_DIR)`` and
transformers' ``AutoTokenizer.from_pretrained(OUT_DIR)`` read. ``--ort-format`` adds ``model.ort``
(ONNX Runtime's own converter: optimization level "all", fixed style, no NCHWc layout so the file is
portable to ARM) and ``model.required_operators.config`` (the ops a reduced ORT build must keep).
Every file is staged by :mod:`edgeq.pipeline.output` and appears together with the others, or not at all.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import EdgeqError, UsageError

MODEL_NAME = "model.onnx"
REPORT_NAME = "edgeq_report.json"
ORT_TOLERANCE = 1e-4  # .ort vs .onnx outputs, max|Δ| / max(1, max|ref|)


@dataclass(frozen=True)
class Layout:
    """Where each output file goes; ``folder`` is None for single-file output."""

    model: Path
    report: Path
    folder: Path | None = None

    @classmethod
    def for_output(cls, out: Path) -> Layout:
        if is_folder_output(out):
            return cls(out / MODEL_NAME, out / REPORT_NAME, out)
        return cls(out, out.with_suffix(".json"))

    @property
    def data(self) -> Path:
        return self.model.with_name(self.model.name + ".data")

    @property
    def ort(self) -> Path:
        return self.model.with_suffix(".ort")

    @property
    def required_operators(self) -> Path:
        return self.model.with_suffix(".required_operators.config")


def is_folder_output(out: Path) -> bool:
    """``x.onnx`` is a file; an existing directory or a name without extension is a folder."""
    if out.suffix == ".onnx":
        return False
    if out.is_dir() or out.suffix == "":
        return True
    raise UsageError(f"output {out} must end in .onnx (one file) or name a folder (no extension, or an existing "
                     "directory) for the Hugging Face layout")


def check_folder_output(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse a folder that is (inside) an input, lacks a writable parent, is a file, or is not empty."""
    out_res = out.resolve()
    for p in inputs:
        p_res = p.resolve()
        if out_res == p_res or p_res in out_res.parents or out_res in p_res.parents:
            raise UsageError(f"output folder {out} overlaps input {p}; choose another output folder")
    parent = out_res if out.is_dir() else out_res.parent
    if not parent.is_dir():
        raise UsageError(f"directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{parent} is not writable; choose another output folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} is a file; give a folder name or a path ending in .onnx")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"output folder {out} is not empty; "
                         "pass --force to overwrite its files or choose a new folder")


@contextlib.contextmanager
def staged(layout: Layout, overwrite: bool = True) -> Iterator:
    """:func:`edgeq.pipeline.output.staged_output` beside the model file; a folder made for it goes again on failure."""
    from edgeq.pipeline.output import staged_output

    made = layout.folder is not None and not layout.folder.exists()
    try:
        if made:
            layout.folder.mkdir()
        with staged_output(layout.model.resolve().parent, overwrite) as stage:
            yield stage
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                layout.folder.rmdir()  # only if empty: nothing of ours was committed
        raise


def stage_hf_files(stage, layout: Layout, loaded) -> list[Path]:
    """Stage ``config.json`` and the tokenizer files of ``loaded`` for ``layout.folder``."""
    tmp = stage.dir / ".hf"
    tmp.mkdir()
    loaded.model.config.to_json_file(str(tmp / "config.json"))
    loaded.tokenizer.save_pretrained(str(tmp))
    finals = []
    for f in sorted(tmp.iterdir()):
        final = layout.folder / f.name
        if final in (layout.model, layout.report):
            raise EdgeqError(f"the tokenizer writes {f.name}, which clashes with edgeq's own file; please report this")
        os.replace(f, stage.path(final))
        finals.append(final)
    tmp.rmdir()
    return finals


def stage_ort_format(stage, layout: Layout, staged_model: Path) -> tuple[Path, Path]:
    """Convert the staged ``.onnx`` with ONNX Runtime's converter; stage ``.ort`` and its operator config."""
    import logging

    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # its INFO lines would bypass --quiet
    tmp = stage.dir / ".ort"
    with contextlib.redirect_stdout(io.StringIO()) as said:  # the tool prints progress; keep --json clean
        try:
            convert_onnx_models_to_ort(staged_model, output_dir=tmp, optimization_styles=[OptimizationStyle.Fixed],
                                       target_platform="arm")
        except Exception as e:  # noqa: BLE001 - the tool raises plain exceptions
            last = (said.getvalue().strip().splitlines() or [str(e)])[-1]
            raise EdgeqError(f"ONNX Runtime could not convert the model to the .ort format ({last[:200]}); "
                             "convert without --ort-format") from None
    ort_file = tmp / staged_model.with_suffix(".ort").name
    config = tmp / staged_model.with_suffix(".required_operators.config").name
    if not (ort_file.is_file() and config.is_file()):
        raise EdgeqError(f"ONNX Runtime's converter did not write {ort_file.name} and {config.name}; "
                         "please report this")
    staged_ort, staged_config = stage.path(layout.ort), stage.path(layout.required_operators)
    os.replace(ort_file, staged_ort)
    lines = config.read_text(encoding="utf-8").splitlines()  # "# - <staging path>" → the final file name
    staged_config.write_text("\n".join(f"# - {layout.ort.name}" if ln.startswith("# - ") else ln
                                       for ln in lines) + "\n",
                             encoding="utf-8")
    return staged_ort, staged_config


def read_required_operators(config_file: Path) -> dict[str, list[str]]:
    """``{domain: [op, ...]}`` from a ``required_operators.config`` (lines ``domain;opset;Op1,Op2``)."""
    ops: dict[str, set[str]] = {}
    for line in config_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, _opset, names = line.split(";", 2)
        ops.setdefault(domain, set()).update(n.strip() for n in names.split(",") if n.strip())
    return {d: sorted(v) for d, v in sorted(ops.items())}


def graph_ops(model) -> dict[str, list[str]]:
    """``{domain: [op_type, ...]}`` of an ONNX model's main graph (``ai.onnx`` for the default domain)."""
    ops: dict[str, set[str]] = {}
    for node in model.graph.node:
        ops.setdefault(node.domain or "ai.onnx", set()).add(node.op_type)
    return {d: sorted(v) for d, v in sorted(ops.items())}


def stage_sentence_files(stage, layout: Layout, loaded, planned) -> list[Path]:
    """The sentence-transformers files of an embedding model's folder (see :func:`sentence_modules`)."""
    import json

    finals = []
    for rel, content in sentence_modules(loaded, planned).items():
        top, *sub = rel.split("/")  # a sub-folder (1_Pooling/...) is staged whole and moved as one
        if sub and layout.folder / top not in stage.targets.values():
            stage.path(layout.folder / top).mkdir()
        staged = stage.path(layout.folder / top) if not sub else stage.dir / rel
        if isinstance(content, bytes):
            staged.write_bytes(content)
        else:
            staged.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        finals.append(layout.folder / rel)
    return finals


def sentence_modules(loaded, planned) -> dict[str, dict | bytes]:
    """``relative path → JSON or bytes`` that make the folder a sentence-transformers model.

    sentence-transformers' ONNX backend runs ``model.onnx`` through Optimum's feature extractor,
    which returns ``last_hidden_state`` only; its own Pooling, Dense and Normalize modules then run
    in PyTorch.  So the folder lists them as the source did (no double pooling: the graph's
    ``sentence_embedding`` is not what it reads), and each Dense carries the planned weights Ŵ
    that the graph computes with, so both give the same embedding.
    """
    import numpy as np
    from safetensors.numpy import save as save_safetensors

    spec = loaded.sentence
    src = spec.folder
    st = "sentence_transformers.models."
    modules = [{"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"}]
    pooling_src = _module_path(src, "Pooling") if src is not None else None
    files: dict[str, dict | bytes] = {
        "1_Pooling/config.json": json_file(pooling_src / "config.json") if pooling_src is not None else
        {"word_embedding_dimension": int(loaded.model.config.hidden_size),
         **{k: spec.pooling == (mode,) for k, mode in _LEGACY_POOLING.items()}},
    }
    dense = iter(n for n, m in loaded.model.named_modules() if n.startswith("dense.") and n.endswith(".linear"))
    for i, step in enumerate(spec.steps, start=2):
        if step == "normalize":
            modules.append({"idx": i, "name": str(i), "path": f"{i}_Normalize", "type": st + "Normalize"})
            continue
        name, path = next(dense), f"{i}_Dense"
        linear = dict(loaded.model.named_modules())[name]
        w = planned.get(name, linear.weight.detach().numpy())
        tensors = {"linear.weight": np.ascontiguousarray(w, dtype=np.float32)}
        if linear.bias is not None:
            tensors["linear.bias"] = linear.bias.detach().numpy().astype(np.float32)
        modules.append({"idx": i, "name": str(i), "path": path, "type": st + "Dense"})
        files[f"{path}/config.json"] = json_file(step.path / "config.json")
        files[f"{path}/model.safetensors"] = save_safetensors(tensors)
    files["modules.json"] = modules
    for name in ("config_sentence_transformers.json", "sentence_bert_config.json"):
        for d in (src, spec.transformer_dir if src is not None else None):
            if d is not None and (d / name).is_file():
                files[name] = json_file(d / name)
                break
    files.setdefault("config_sentence_transformers.json", {"similarity_fn_name": "cosine"})
    return files


_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens"}


def _module_path(folder: Path, kind: str) -> Path:
    import json

    entries = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    return folder / next(e.get("path", "") for e in entries if e["type"].rsplit(".", 1)[-1] == kind)


def json_file(path: Path):
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def stage_deployment(stage, layout: Layout, loaded, model, staged_model: Path, session, batches, large: bool,
                     ort_format: bool, threads: int = 0, planned=None) -> dict:
    """Stage the folder's Hugging Face files and/or the ``.ort`` file (checked against the ``.onnx``)."""
    files = [layout.model, layout.report] + ([layout.data] if large else [])
    info: dict = {"layout": "folder" if layout.folder is not None else "file", "ops": graph_ops(model)}
    if layout.folder is not None:
        files += stage_hf_files(stage, layout, loaded)
        if loaded.sentence is not None:
            files += stage_sentence_files(stage, layout, loaded, planned or {})
    if ort_format:
        if large:
            raise EdgeqError("--ort-format cannot hold a model over 2 GB (FlatBuffers limit); convert without it")
        staged_ort, staged_config = stage_ort_format(stage, layout, staged_model)
        info["ort"] = {**check_ort(session, staged_ort, batches, threads),
                       "required_operators": read_required_operators(staged_config),
                       "optimization": "all (fixed), target arm",
                       "bytes": staged_ort.stat().st_size}
        files += [layout.ort, layout.required_operators]
    base = layout.folder if layout.folder is not None else layout.model.parent
    info["files"] = sorted(str(f.relative_to(base)) for f in files)
    return info


def check_ort(onnx_session, ort_path: Path, batches, threads: int = 0) -> dict:
    """Outputs of the ``.ort`` file vs the ``.onnx`` session on ``batches``; refuse a mismatch."""
    import numpy as np

    from edgeq.onnx.session import make_session
    from edgeq.pipeline.parity import run_onnx

    ref = run_onnx(onnx_session, batches)
    got = run_onnx(make_session(str(ort_path), threads), batches)
    diffs = {k: float(np.max(np.abs(got[k] - v))) if v.size else 0.0 for k, v in ref.items()}
    for k, d in diffs.items():
        limit = ORT_TOLERANCE * max(1.0, float(np.max(np.abs(ref[k]))) if ref[k].size else 1.0)
        if d > limit:
            raise EdgeqError(f"the .ort file disagrees with the .onnx file ({k} max|d| = {d:.3g} > {limit:.3g}); "
                             "please report this model, or convert without --ort-format")
    return {"max_abs_diff_vs_onnx": diffs, "examples": int(sum(len(b["input_ids"]) for b in batches))}
