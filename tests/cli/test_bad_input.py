"""The bad-input corpus: one row per case (builder → args → exit code → message regex).

Every case must: exit non-zero (2 for usage errors), print exactly one ``edgeq: error`` /
``edgeq: interrupted`` line on stderr (progress lines aside) naming the problem and the fix, show
no traceback, leave no output (no out.onnx/.json/.data, no ``.edgeq-tmp-*``) and leave every
input byte-identical: the whole case directory and the shared tiny model are hashed before and
after the run.  ``tools/bad_input_report.py`` runs the same table and prints each case's output.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from edgeq.cli import main


@dataclass
class Ctx:
    """What a builder gets: its own directory, the shared tiny model and its converted ONNX."""

    dir: Path
    tiny: Path
    tiny_onnx: Path
    monkeypatch: pytest.MonkeyPatch

    def copy_model(self, name: str = "model") -> Path:
        dst = self.dir / name
        shutil.copytree(self.tiny, dst)
        return dst

    def copy_onnx(self, name: str = "model.onnx") -> Path:
        dst = self.dir / name
        shutil.copy(self.tiny_onnx, dst)
        return dst


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Ctx], dict]  # returns placeholders for args ({model}, {out}, {onnx}, {data})
    args: tuple[str, ...]
    code: int
    message: str  # regex searched in the one error line
    needs: str = ""  # "command" or "command --option" that must exist (commands land independently)

    def __str__(self) -> str:
        return self.id

    def available(self) -> bool:
        if not self.needs:
            return True
        cmd, *opt = self.needs.split()
        command = main.commands.get(cmd)
        return command is not None and all(any(o in p.opts for p in command.params) for o in opt)


# ---------------------------------------------------------------- builders


def _plain(ctx):
    return {}


def _missing_dir(ctx):
    return {"model": ctx.dir / "no-such-model"}


def _empty_dir(ctx):
    (ctx.dir / "empty").mkdir()
    return {"model": ctx.dir / "empty"}


def _config(edit):
    def build(ctx):
        m = ctx.copy_model()
        cfg = m / "config.json"
        text = edit(json.loads(cfg.read_text()))
        cfg.write_text(text if isinstance(text, str) else json.dumps(text))
        return {"model": m}
    return build


def _st(edit):
    """Rewrite model.safetensors with ``edit(bytes) -> bytes``."""
    def build(ctx):
        m = ctx.copy_model()
        p = m / "model.safetensors"
        p.write_bytes(edit(p.read_bytes()))
        return {"model": m}
    return build


def _corrupt_header(b: bytes) -> bytes:
    n = struct.unpack("<Q", b[:8])[0]
    return b[:8] + b"{" * n + b[8 + n:]


def _header(edit):
    """Rewrite the JSON header of model.safetensors with ``edit(dict) -> dict | bytes`` (its length follows)."""
    def rewrite(b: bytes) -> bytes:
        n = struct.unpack("<Q", b[:8])[0]
        h = edit(json.loads(b[8:8 + n]))
        raw = h if isinstance(h, bytes) else json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + b[8 + n:]
    return _st(rewrite)


def _first_tensor(h: dict) -> str:
    return next(k for k in sorted(h) if k != "__metadata__")


def _missing_shard(ctx):
    """A sharded checkpoint whose index names a second shard that was never downloaded."""
    from safetensors.numpy import load_file

    m = ctx.copy_model()
    names = sorted(load_file(m / "model.safetensors"))
    (m / "model.safetensors").rename(m / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"model": m}


def _tensors(edit):
    """Re-save model.safetensors with ``edit(dict of numpy arrays) -> dict``."""
    def build(ctx):
        from safetensors.numpy import load_file, save_file

        m = ctx.copy_model()
        p = m / "model.safetensors"
        save_file(edit(load_file(p)), p)
        return {"model": m}
    return build


def _poison(value):
    def edit(t):
        key = next(k for k in sorted(t) if k.endswith("attention.self.query.weight"))
        t[key] = t[key].copy()
        t[key][1, 2] = value
        return t
    return edit


def _pickle_only(ctx):
    import torch
    from safetensors.torch import load_file

    m = ctx.copy_model()
    torch.save(load_file(m / "model.safetensors"), m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()
    return {"model": m}


def _no_weights(ctx):
    m = ctx.copy_model()
    (m / "model.safetensors").unlink()
    return {"model": m}


def _no_tokenizer(ctx):
    m = ctx.copy_model()
    for p in m.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens", "vocab")):
            p.unlink()
    return {"model": m}


def _shard_index_escape(ctx):
    m = ctx.copy_model()
    (m / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"bert.pooler.dense.weight": "../../../etc/passwd"}}))
    return {"model": m}


def _shard_index(text: str):
    def build(ctx):
        m = ctx.copy_model()
        (m / "model.safetensors.index.json").write_text(text)
        return {"model": m}
    return build


def _tokenizer_file_escape(ctx):
    m = ctx.copy_model()
    p = m / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg["tokenizer_file"] = "/etc/passwd"
    p.write_text(json.dumps(cfg))
    return {"model": m}


def _out_in(sub: str, *, make: bool = True):
    def build(ctx):
        d = ctx.dir / sub
        if make:
            d.mkdir()
        return {"out": d / "out.onnx"}
    return build


def _read_only_dir(ctx):
    d = ctx.dir / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.access(d, os.W_OK):  # running as root: permissions do not bind, so simulate what the OS would say
        real = os.access
        ctx.monkeypatch.setattr("edgeq.pipeline.output.os.access", lambda p, mode: False if Path(p) == d else real(p, mode))
    return {"out": d / "out.onnx"}


def _existing(name: str):
    def build(ctx):
        d = ctx.dir / "outdir"
        d.mkdir()
        (d / name).write_text("precious\n")
        return {"out": d / "out.onnx"}
    return build


def _out_is_dir(ctx):
    (ctx.dir / "out.onnx").mkdir()
    return {"out": ctx.dir / "out.onnx"}


def _out_inside_model(ctx):
    m = ctx.copy_model()
    return {"model": m, "out": m / "model.onnx"}


def _model_dir_named_onnx(ctx):
    m = ctx.copy_model("model.onnx")
    return {"model": m, "out": m}


def _onnx_as_model(ctx):
    return {"model": ctx.copy_onnx()}


def _tsv(text: str | None):
    def build(ctx):
        d = ctx.dir / "RTE"
        d.mkdir()
        if text is not None:
            (d / "dev.tsv").write_text(text)
        return {"data": d / "dev.tsv"}
    return build


def _garbage_onnx(ctx):
    p = ctx.dir / "garbage.onnx"
    p.write_bytes(b"\x00this is not a protobuf\xff" * 10)
    return {"onnx": p}


def _foreign_onnx(ctx):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    p = ctx.dir / "relu.onnx"
    onnx.save_model(helper.make_model(g), str(p))
    return {"onnx": p}


def _edgeq_onnx(edit):
    def build(ctx):
        import onnx

        p = ctx.dir / "sub" / "edited.onnx"  # so that "../secret" names a real file beside "sub"
        p.parent.mkdir()
        model = onnx.load(str(ctx.tiny_onnx))
        edit(model, ctx.dir)
        onnx.save_model(model, str(p))
        return {"onnx": p}
    return build


def _external(location: str):
    def edit(model, d):
        t = next(t for t in model.graph.initializer if t.name.endswith(".qweight"))
        t.ClearField("raw_data")
        t.data_location = 1  # EXTERNAL
        t.external_data.add(key="location", value=location)
        (d / "secret").write_bytes(b"\x88" * 1024)  # a file outside: must never be read
    return edit


def _foreign_layers(model, d):
    for p in model.metadata_props:
        if p.key == "edgeq.layers":
            names = json.loads(p.value)
            p.value = json.dumps(["encoder.not_a_layer"] + names[1:])
            for n in model.graph.node:
                if n.name == f"/{names[0]}/MatMulNBits":
                    n.name = "/encoder.not_a_layer/MatMulNBits"


def _disk_full_on_save(ctx):
    import onnx

    def full(model, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    ctx.monkeypatch.setattr(onnx, "save_model", full)
    return {}


def _disk_full_on_report(ctx):
    """ENOSPC while the report is written into the staging directory (the model is staged already)."""
    real = Path.write_text

    def write_text(self, *a, **k):
        if self.suffix == ".json" and self.parent.name.startswith(".edgeq-tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *a, **k)
    ctx.monkeypatch.setattr(Path, "write_text", write_text)
    return {}


def _old_output(build=_plain):
    """An earlier convert's out.onnx + out.json (``--force`` may replace them only with a complete new pair)."""
    def b(ctx):
        for name in ("out.onnx", "out.json"):
            (ctx.dir / name).write_text(f"the earlier {name}\n")
        return build(ctx)
    return b


def _fail_second_replace(err):
    def build(ctx):
        real, calls = os.replace, []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:  # the .json is in place already: it must be rolled back
                err()
            return real(src, dst)
        ctx.monkeypatch.setattr(os, "replace", replace)
        return {}
    return build


def _enospc():
    raise OSError(errno.ENOSPC, "No space left on device")


def _signal_during(target: str, sig: int):
    """Send ``sig`` to ourselves from inside ``target`` (module:function), after it has run."""
    def build(ctx):
        import importlib

        mod_name, fn_name = target.split(":")
        mod = importlib.import_module(mod_name)
        real = getattr(mod, fn_name)

        def wrapped(*a, **k):
            out = real(*a, **k)
            os.kill(os.getpid(), sig)
            return out
        ctx.monkeypatch.setattr(mod, fn_name, wrapped)
        return {}
    return build


# ---------------------------------------------------------------- the corpus

def _sentence(edit):
    """A sentence-transformers folder (tiny bare encoder in 0_Transformer/, mean pooling, Normalize),
    then ``edit(folder)``."""
    def build(ctx):
        from tests.helpers import make_st_folder, make_tiny_model

        bare = make_tiny_model(ctx.dir / "bare-src", "BertModel")
        folder = make_st_folder(ctx.dir / "st", bare, "sub")
        edit(folder)
        return {"model": folder}
    return build


def _modules(edit):
    def change(folder):
        p = folder / "modules.json"
        p.write_text(edit(p.read_text()))
    return change


def _pooling_config(text: str):
    def change(folder):
        (folder / "1_Pooling" / "config.json").write_text(text)
    return change


def _lstm(text: str) -> str:
    modules = json.loads(text)
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_LSTM", "type": "sentence_transformers.models.LSTM"})
    return json.dumps(modules)


CONVERT = ("convert", "-q", "{model}", "{out}")
VALIDATE = ("validate", "{model}", "{onnx}")
EVAL = ("eval", "{onnx}", "-q", "--tokenizer", "{model}", "--data-dir", "{data}")
BENCH = ("bench", "{onnx}", "--no-memory", "-q", "--repeats", "3")

RTE_OK = "index\tsentence1\tsentence2\tlabel\n0\tthe dog runs\ta dog\tentailment\n1\tthe cat\tno cat\tnot_entailment\n"


def _glue(text: str = RTE_OK, task: str = "RTE", model: str = ""):
    """A GLUE directory holding ``task``/dev.tsv; ``model`` swaps the .onnx for a missing/garbage/escaping one."""
    def build(ctx):
        d = ctx.dir / "glue"
        (d / task).mkdir(parents=True)
        (d / task / "dev.tsv").write_text(text)
        places = {"data": d}
        if model == "garbage":
            places.update(_garbage_onnx(ctx))
        elif model == "escape":
            places.update(_edgeq_onnx(_external("../secret"))(ctx))
        elif model:
            places["onnx"] = ctx.dir / model
        return places
    return build

CASES = [
    # model directory
    Case("model dir missing", _missing_dir, CONVERT, 2, r"does not exist; pass a Hugging Face model directory"),
    Case("model dir empty", _empty_dir, CONVERT, 1, r"has no config\.json"),
    Case("config.json not JSON", _config(lambda c: "{not json"), CONVERT, 1, r"config\.json is not valid JSON"),
    Case("config.json not an object", _config(lambda c: "[1, 2]"), CONVERT, 1, r"must hold a JSON object"),
    Case("unsupported architecture", _config(lambda c: {**c, "model_type": "gpt2"}), CONVERT, 1,
         r"unsupported architecture 'gpt2'.*supports bert, distilbert, roberta"),
    Case("unsupported head", _config(lambda c: {**c, "architectures": ["BertForMaskedLM"]}), CONVERT, 1,
         r"unsupported head BertForMaskedLM"),
    Case("remote code (auto_map)", _config(lambda c: {**c, "auto_map": {"AutoModel": "evil.Model"}}), CONVERT, 1,
         r"custom code.*never runs remote code"),
    Case("safetensors truncated", _st(lambda b: b[: len(b) // 2]), CONVERT, 1, r"model\.safetensors is truncated"),
    Case("safetensors zero bytes", _st(lambda b: b""), CONVERT, 1, r"truncated \(no safetensors header\)"),
    Case("safetensors corrupt header", _st(_corrupt_header), CONVERT, 1, r"corrupt safetensors header"),
    Case("safetensors header length garbled", _st(lambda b: struct.pack("<Q", 2**40 + 3) + b[8:]), CONVERT, 1,
         r"corrupt safetensors header \(header length 1099511627779, file \d+ bytes\); re-download or re-save"),
    Case("safetensors header length off by one", _st(lambda b: struct.pack("<Q", struct.unpack("<Q", b[:8])[0] - 1)
                                                     + b[8:]), CONVERT, 1, r"corrupt safetensors header \(.+\); re-"),
    Case("safetensors header garbage bytes", _st(lambda b: b[:12] + bytes(range(200, 216)) + b[28:]), CONVERT, 1,
         r"corrupt safetensors header \(not (valid JSON|UTF-8)\)"),
    Case("safetensors header not an object", _header(lambda h: [1, 2]), CONVERT, 1, r"\(not a JSON object\)"),
    Case("safetensors tensor size disagrees with shape",
         _header(lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "shape": [7, 7, 7]}}), CONVERT, 1,
         r"data_offsets span \d+ bytes, its shape needs 1372"),
    Case("safetensors unsupported dtype", _header(lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)],
                                                                                     "dtype": "F4"}}),
         CONVERT, 1, r"unsupported dtype 'F4'"),
    Case("shapes disagree with config", _config(lambda c: {**c, "hidden_size": 64}), CONVERT, 1,
         r"tensor shapes in .* disagree with its config\.json"),
    Case("weights missing from checkpoint", _tensors(lambda t: {k: v for k, v in t.items() if "classifier" not in k}),
         CONVERT, 1, r"not in the checkpoint \(first: classifier\.\w+\).*random"),
    Case("no weights file", _no_weights, CONVERT, 1, r"no \*\.safetensors weights"),
    Case("only a pickle .bin", _pickle_only, CONVERT, 1, r"only a pickle checkpoint.*--allow-pickle"),
    Case("NaN in a weight", _tensors(_poison(float("nan"))), CONVERT, 1, r"query\.weight .* 1 NaN/Inf"),
    Case("Inf in a weight", _tensors(_poison(float("inf"))), CONVERT, 1, r"query\.weight .* 1 NaN/Inf"),
    Case("tokenizer missing", _no_tokenizer, CONVERT, 1, r"no usable tokenizer \(no tokenizer files\)"),
    Case("shard missing", _missing_shard, CONVERT, 1,
         r"index\.json names 1 shard\(s\) that are missing \(first: model-00002-of-00002\.safetensors\); download"),
    Case("shard index not valid JSON", _shard_index("{"), CONVERT, 1, r"is not a valid shard index; re-save the model"),
    Case("shard index weight_map a list", _shard_index('{"weight_map": [1, 2]}'), CONVERT, 1,
         r"is not a valid shard index; re-save the model"),
    Case("shard index escapes the dir", _shard_index_escape, CONVERT, 1, r"points at '\.\./\.\./\.\./etc/passwd', outside"),
    Case("tokenizer_file escapes the dir", _tokenizer_file_escape, CONVERT, 1, r"tokenizer_file = '/etc/passwd' points outside"),
    Case("ONNX file given as model dir", _onnx_as_model, CONVERT, 2, r"is an ONNX file; this argument takes a Hugging Face"),
    # sentence-transformers folders
    Case("modules.json malformed", _sentence(_modules(lambda t: t.replace('"type"', "type", 1))), CONVERT, 1,
         r"modules\.json is not valid JSON .*; re-save the model with sentence-transformers"),
    Case("modules.json truncated", _sentence(_modules(lambda t: t[: len(t) // 2])), CONVERT, 1,
         r"modules\.json is not valid JSON"),
    Case("pooling config malformed", _sentence(_pooling_config('{"pooling_mode": ')), CONVERT, 1,
         r"1_Pooling/config\.json is not valid JSON"),
    Case("pooling mode unsupported", _sentence(_pooling_config('{"pooling_mode": "lasttoken"}')), CONVERT, 1,
         r"pooling mode 'lasttoken' is not supported; edgeq supports cls, max, mean"),
    Case("module type unsupported", _sentence(_modules(_lstm)), CONVERT, 1,
         r"unsupported module type 'sentence_transformers\.models\.LSTM'"),
    Case("--pooling on a classifier", _plain, CONVERT + ("--pooling", "mean"), 2,
         r"--pooling needs a bare encoder; .* has a classification/regression head"),
    Case("--normalize without --pooling", _plain, CONVERT + ("--normalize",), 2, r"--normalize needs --pooling"),
    # options
    Case("--k negative", _plain, CONVERT + ("--k", "-5"), 2, r"--k must be >= 0, got -5"),
    Case("--k not an integer", _plain, CONVERT + ("--k", "abc"), 2, r"'--k': 'abc' is not a valid integer"),
    Case("--k fractional", _plain, CONVERT + ("--k", "1.5"), 2, r"'--k': '1\.5' is not a valid integer"),
    Case("--block-size invalid", _plain, CONVERT + ("--block-size", "48"), 2, r"'--block-size': '48' is not one of"),
    # bit widths the file layout cannot carry (every --block-size / granularity and any K can: tests/onnx/test_storage.py)
    Case("--bits 3 --kernel native", _plain, CONVERT + ("--bits", "3", "--kernel", "native"), 2,
         r"--kernel native .* needs --bits 2 \(there is no 3-bit native kernel here\); use --kernel int4",
         "convert --kernel"),
    Case("--bits 2 --storage plain", _plain, CONVERT + ("--bits", "2", "--storage", "plain"), 2,
         r"--bits 2 is stored compact .*; use --storage compact \(or auto\), or --kernel native", "convert --storage"),
    Case("--storage compact --bits 8", _plain, CONVERT + ("--bits", "8", "--storage", "compact"), 2,
         r"--storage compact holds 2, 3 or 4 bits per weight; use --bits 2, 3 or 4", "convert --storage"),
    Case("--rank zero", _plain, CONVERT + ("--rank", "0"), 2, r"--rank must be a positive integer"),
    Case("--exclude bad regex", _plain, CONVERT + ("--exclude", "("), 2, r"--exclude '\(' is not a valid regular expression"),
    Case("--kernel integer at 4 bits", _plain, CONVERT + ("--kernel", "integer", "--block-size", "per-channel"), 2,
         r"--kernel integer runs int8 weights.*use --bits 8"),
    Case("--act-outliers without --calib", _plain,
         CONVERT + ("--bits", "8", "--kernel", "integer", "--block-size", "per-channel", "--act-outliers", "2"), 2,
         r"--act-outliers picks columns by calibration.*--calib"),
    Case("--smooth-alpha without --calib", _plain,
         CONVERT + ("--bits", "8", "--kernel", "integer", "--block-size", "per-channel", "--smooth-alpha", "0.5"), 2,
         r"--smooth-alpha scales columns by calibration.*--calib"),
    Case("--smooth-alpha out of (0, 1)", _plain,
         CONVERT + ("--bits", "8", "--kernel", "integer", "--block-size", "per-channel", "--smooth-alpha", "1",
                    "--calib", "rte"), 2, r"--smooth-alpha must be a fraction in \(0, 1\).*got 1\.0"),
    Case("--smooth-alpha without --kernel integer", _plain, CONVERT + ("--bits", "8", "--smooth-alpha", "0.5"), 2,
         r"--smooth-alpha rescales the integer kernel's activations; use it with --kernel integer"),
    Case("no Linear to quantize", _plain, CONVERT + ("--exclude", "."), 2, r"no Linear left to quantize.*loosen --exclude"),
    Case("unknown option", _plain, CONVERT + ("--kk", "3"), 2, r"No such option '--kk'.*Did you mean"),
    # output path
    Case("output dir missing", _out_in("missing", make=False), CONVERT, 2, r"output directory .* does not exist; create it"),
    Case("output dir read-only", _read_only_dir, CONVERT, 2, r"output directory .* is not writable"),
    Case("output exists", _existing("out.onnx"), CONVERT, 2, r"out\.onnx already exists; pass --force"),
    Case("output report exists", _existing("out.json"), CONVERT, 2, r"out\.json already exists; pass --force"),
    Case("output inside the model dir", _out_inside_model, CONVERT, 2, r"inside or equal to input"),
    Case("output equal to the input", _model_dir_named_onnx, CONVERT, 2, r"inside or equal to input"),
    Case("output is a directory", _out_is_dir, CONVERT, 2, r"is a directory; give a file name"),
    Case("output not .onnx", lambda c: {"out": c.dir / "out.txt"}, CONVERT, 2, r"must end in \.onnx"),
    # validation data
    Case("--data missing", _tsv(None), CONVERT + ("--data", "{data}"), 2, r"--data .* is not a file"),
    Case("--data empty", _tsv(""), CONVERT + ("--data", "{data}"), 1, r"dev\.tsv is empty"),
    Case("--data TSV missing columns", _tsv("index\tlabel\n0\tentailment\n"), CONVERT + ("--data", "{data}"), 1,
         r"cannot find the text columns \(header: index, label\)"),
    Case("--data not UTF-8", lambda c: _write(c, "RTE/dev.tsv", b"\xff\xfe\x00bad"),
         CONVERT + ("--data", "{data}"), 1, r"is not UTF-8 text"),
    Case("validation threshold fails", _plain, CONVERT + ("--max-abs-diff", "0"), 1,
         r"validation failed, no output written \(vs fp32: .* max\|d\| = .*\); relax the threshold"),
    # interrupted or failing writes
    Case("disk full while saving", _disk_full_on_save, CONVERT, 1,
         r"no space left on the device while writing to .*; nothing written — free space or choose another output"),
    Case("disk full while writing the report", _disk_full_on_report, CONVERT, 1,
         r"no space left on the device .*free space or choose another output"),
    Case("disk full while moving into place", _fail_second_replace(_enospc), CONVERT, 1, r"no space left on the device"),
    Case("--force, validation fails: old output kept", _old_output(), CONVERT + ("--force", "--max-abs-diff", "0"), 1,
         r"validation failed, no output written"),
    Case("--force, disk full while moving: old output kept", _old_output(_fail_second_replace(_enospc)),
         CONVERT + ("--force",), 1, r"no space left on the device .*choose another output"),
    Case("--force, SIGTERM during commit: old output kept",
         _old_output(_fail_second_replace(lambda: os.kill(os.getpid(), signal.SIGTERM))), CONVERT + ("--force",), 143,
         r"interrupted; no output was written"),
    Case("SIGINT during save", _signal_during("edgeq.onnx.safe_load:save_onnx", signal.SIGINT), CONVERT, 130,
         r"interrupted; no output was written"),
    Case("SIGTERM during export", _signal_during("edgeq.onnx.export:export_parts", signal.SIGTERM), CONVERT, 143,
         r"interrupted; no output was written"),
    Case("SIGTERM during commit", _fail_second_replace(lambda: os.kill(os.getpid(), signal.SIGTERM)), CONVERT, 143,
         r"interrupted; no output was written"),
    # validate
    Case("validate: ONNX missing", lambda c: {"onnx": c.dir / "nope.onnx"}, VALIDATE, 2, r"nope\.onnx does not exist"),
    Case("validate: arguments swapped", lambda c: {"model": c.copy_onnx(), "onnx": c.copy_model()}, VALIDATE, 2,
         r"is a model directory; the second argument is the \.onnx file"),
    Case("validate: not an ONNX file", _garbage_onnx, VALIDATE, 1, r"not a readable ONNX file|holds no ONNX graph"),
    Case("validate: ONNX not from edgeq", _foreign_onnx, VALIDATE, 1, r"not written by edgeq convert"),
    Case("validate: ONNX of another model", _edgeq_onnx(_foreign_layers), VALIDATE, 1,
         r"does not belong to .*: no Linear named encoder\.not_a_layer"),
    Case("validate: external data '../'", _edgeq_onnx(_external("../secret")), VALIDATE, 1,
         r"external data at '\.\./secret', outside its directory"),
    Case("validate: external data absolute", _edgeq_onnx(_external("/etc/passwd")), VALIDATE, 1,
         r"external data at '/etc/passwd', outside its directory"),
    Case("validate: external data missing", _edgeq_onnx(_external("gone.bin")), VALIDATE, 1,
         r"external data file gone\.bin is missing"),
    Case("validate: model dir missing", lambda c: {"model": c.dir / "nope"}, VALIDATE, 2, r"nope does not exist"),
    # calibration (convert --calib, awq/spqr, calibrated quantizers)
    Case("--calib file empty", lambda c: _write(c, "calib.txt", b""), CONVERT + ("--method", "awq", "--calib", "{data}"),
         1, r"calibration file .*calib\.txt has no text", "convert --calib"),
    Case("awq without --calib", _plain, CONVERT + ("--method", "awq"), 2, r"--method awq needs calibration data; pass --calib",
         "convert --calib"),
    Case("gptq without --calib", _plain, CONVERT + ("--quantizer", "gptq"), 2,
         r"--quantizer gptq needs calibration data; pass --calib", "convert --quantizer"),
    # --budget (model-wide FP32 fraction)
    Case("--budget with --k", _plain, CONVERT + ("--k", "16", "--budget", "0.01"), 2,
         r"--budget and --k are mutually exclusive; drop --k", "convert --budget"),
    Case("--budget out of range", _plain, CONVERT + ("--budget", "1"), 2,
         r"--budget must be a fraction in \[0, 1\)", "convert --budget"),
    # eval
    Case("eval: unknown task", _glue(), EVAL + ("--task", "FOO"), 2, r"unknown GLUE task 'FOO'; choose from", "eval"),
    Case("eval: GLUE dir missing the task", _glue(task="SST-2"), EVAL + ("--task", "RTE"), 2,
         r"RTE/dev\.tsv does not exist; pass --data-dir", "eval"),
    Case("eval: TSV missing columns", _glue("index\tfoo\tlabel\n0\ta\tentailment\n"), EVAL + ("--task", "RTE"), 1,
         r"no column 'sentence1' \(header: index, foo, label\)", "eval"),
    Case("eval: unknown label", _glue("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n"), EVAL + ("--task", "RTE"), 1,
         r"label 'maybe' is not one of RTE's", "eval"),
    Case("eval: model missing", _glue(model="nope.onnx"), EVAL + ("--task", "RTE"), 2, r"nope\.onnx does not exist", "eval"),
    Case("eval: not an ONNX file", _glue(model="garbage"), EVAL + ("--task", "RTE"), 1,
         r"cannot load .*garbage\.onnx", "eval"),
    Case("eval: external data escapes", _glue(model="escape"), EVAL + ("--task", "RTE"), 1,
         r"External data path|outside its directory", "eval"),
    # sweep, saliency, bench
    Case("sweep: --k not integers", _plain, ("sweep", "{model}", "--task", "RTE", "--k", "1,abc", "--out", "{out}"), 2,
         r"--k '1,abc': give comma-separated integers", "sweep"),
    Case("sweep: unknown method", _plain, ("sweep", "{model}", "--task", "RTE", "--methods", "svd,nope", "--out", "{out}"),
         2, r"unknown saliency method 'nope'", "sweep"),
    Case("sweep: model dir missing", _missing_dir, ("sweep", "{model}", "--task", "RTE", "--out", "{out}"), 2,
         r"is not a model directory", "sweep"),
    Case("sweep: task model on STS-B", _plain, ("sweep", "{model}", "--task", "STS-B", "--methods", "svd", "--out",
                                                 "{out}"), 1,
         r"has a classification/regression head.*sentence-transformers folder.*--task", "sweep"),
    Case("saliency: unknown method", _plain, ("saliency", "{model}", "--methods", "svd,nope", "--out", "{out}"), 2,
         r"unknown method 'nope' in --methods", "saliency"),
    Case("saliency: negative k", _plain, ("saliency", "{model}", "--k", "-1", "--out", "{out}"), 2,
         r"--k '-1' must list positive integers", "saliency"),
    Case("saliency: awq without --calib", _plain, ("saliency", "{model}", "--methods", "svd,awq", "--out", "{out}"), 2,
         r"need calibration data; pass --calib", "saliency"),
    Case("bench: model missing", lambda c: {"onnx": c.dir / "nope.onnx"}, BENCH, 2, r"nope\.onnx is not an \.onnx file", "bench"),
    Case("bench: not an ONNX file", _garbage_onnx, BENCH, 1, r"not a readable ONNX file|holds no ONNX graph", "bench"),
    Case("bench: external data escapes", _edgeq_onnx(_external("../secret")), BENCH, 1,
         r"external data at '\.\./secret', outside its directory", "bench"),
    Case("bench: bad --shapes", _plain, BENCH + ("--shapes", "1xq"), 2, r"bad shape '1xq' in --shapes", "bench"),
]


def _write(ctx, rel, data: bytes):
    p = ctx.dir / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return {"data": p}


# ---------------------------------------------------------------- running a case


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (and the names of empty dirs): the before/after check."""
    out = {}
    for root in roots:
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for p in sorted(root.rglob("*")) if root.is_dir() else []:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@dataclass
class Outcome:
    exit_code: int
    lines: list[str]  # stderr lines other than progress ("[  1.0s] ...") and warnings
    stderr: str
    changed: list[str]  # files created, changed or removed


def run_case(case: Case, ctx: Ctx) -> Outcome:
    places = {"model": ctx.tiny, "out": ctx.dir / "out.onnx", "onnx": ctx.tiny_onnx, "data": ""}
    places.update(case.build(ctx))
    args = [a.format(**places) for a in case.args]
    watched = (ctx.dir, ctx.tiny, ctx.tiny_onnx.parent)
    before = tree_digest(*watched)
    res = CliRunner().invoke(main, args, prog_name="edgeq")
    after = tree_digest(*watched)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(("[", "warning:"))]
    return Outcome(res.exit_code, lines, res.stderr, changed)


@pytest.fixture(scope="module")
def tiny(tiny_bert):
    return tiny_bert  # every case hashes it before and after: it stays untouched


@pytest.fixture(scope="module")
def tiny_onnx(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-input-onnx") / "model.onnx"
    res = CliRunner().invoke(main, ["convert", "-q", "--k", "8", str(tiny), str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    return out


def test_corpus_size():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(case, tiny, tiny_onnx, tmp_path, monkeypatch):
    if not case.available():
        pytest.skip(f"`edgeq {case.needs}` is not in this version")
    out = run_case(case, Ctx(tmp_path, tiny, tiny_onnx, monkeypatch))
    assert out.exit_code == case.code, out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.lines) == 1, out.stderr  # one line naming the problem and the fix
    assert re.match(r"edgeq: (error|interrupted)", out.lines[0]), out.lines[0]
    assert re.search(case.message, out.lines[0]), out.lines[0]
    assert out.changed == [], f"files created/changed: {out.changed}"  # no partial output, inputs untouched
    assert not list(tmp_path.rglob(".edgeq-tmp-*"))


def test_debug_shows_the_traceback(tiny, tmp_path, monkeypatch):
    ctx = Ctx(tmp_path, tiny, tmp_path / "unused.onnx", monkeypatch)
    m = _tensors(_poison(float("nan")))(ctx)["model"]
    res = CliRunner().invoke(main, ["--debug", "convert", "-q", str(m), str(tmp_path / "o.onnx")])
    assert res.exit_code != 0
    assert type(res.exception).__name__ == "EdgeqError"  # re-raised, so the traceback is shown


def test_allow_pickle_warns_once_and_converts(tiny, tmp_path, monkeypatch):
    m = _pickle_only(Ctx(tmp_path, tiny, tmp_path / "unused.onnx", monkeypatch))["model"]
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(main, ["convert", "-q", "--allow-pickle", str(m), str(out)])
    assert res.exit_code == 0, res.stderr
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "can execute code" in warnings[0]
    assert out.is_file()


def test_force_overwrites_and_k_beyond_layer_size_is_all_fp32(tiny, tmp_path):
    """--k larger than a layer keeps that whole layer in FP32 (accepted, not an error)."""
    out = tmp_path / "o.onnx"
    out.write_text("old")
    res = CliRunner().invoke(main, ["convert", "-q", "--force", "--k", "1000000", str(tiny), str(out)])
    assert res.exit_code == 0, res.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert all(lay["k"] == lay["shape"][0] * lay["shape"][1] for lay in report["layers"].values())
    assert all(lay["recon_error"] == 0.0 for lay in report["layers"].values())
    assert not list(tmp_path.rglob(".edgeq-tmp-*"))


# ---------------------------------------------------------------- two converts racing to one output

# Runs `edgeq convert` with StagedOutput.commit held at a barrier until both processes have staged
# and validated their file, so that both commits really meet (each passed the "already exists"
# check long before).  argv: barrier directory, then the CLI arguments.
_RACER = """
import os, sys, time
from pathlib import Path
from edgeq.pipeline import output
barrier, real = Path(sys.argv[1]), output.StagedOutput.commit
def commit(self):
    (barrier / str(os.getpid())).touch()
    t0 = time.monotonic()
    while len(list(barrier.iterdir())) < 2 and time.monotonic() - t0 < 300:
        time.sleep(0.02)
    real(self)
output.StagedOutput.commit = commit
from edgeq.cli import main
main(sys.argv[2:], prog_name="edgeq")
"""


@dataclass
class Race:
    codes: list[int]  # exit code of each process (the first converts with --k 0, the second with --k 8)
    errors: list[str]  # their stderr lines other than progress
    out_k: int | None  # k recorded in out.onnx's metadata (None: no out.onnx)
    report_k: int | None  # k recorded in out.json
    report_bytes_match: bool  # out.json's file_bytes is out.onnx's size
    leftovers: list[str]  # .edgeq-tmp-* and anything but out.onnx/out.json


def race(tiny: Path, d: Path, force: bool) -> Race:
    import subprocess
    import sys

    import onnx

    from tests.helpers import REPO

    barrier, out = d / "barrier", d / "out" / "out.onnx"
    barrier.mkdir()
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(barrier), "convert", "-q", "--k", str(k),
                               *(["--force"] if force else []), str(tiny), str(out)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for k in (0, 8)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    out_k = report_k = None
    if out.exists():
        meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        out_k = json.loads(meta["edgeq.config"])["k"]
    report = out.with_suffix(".json")
    rep = json.loads(report.read_text()) if report.exists() else None
    report_k = rep["config"]["k"] if rep else None
    return Race([p.returncode for p in procs],
                [ln for e in errs for ln in e.splitlines() if ln.strip() and not ln.startswith(("[", "warning:"))],
                out_k, report_k, bool(rep) and rep["file_bytes"] == out.stat().st_size,
                sorted(p.name for p in out.parent.iterdir() if p.name not in ("out.onnx", "out.json")))


def race_ok(r: Race, force: bool) -> bool:
    """One complete pair from one process; without --force the other refuses in one line; never a mix."""
    one_pair = r.out_k in (0, 8) and r.report_k == r.out_k and r.report_bytes_match and r.leftovers == []
    if force:  # both succeed, one commit after the other: the second replaced the first pair whole
        return one_pair and r.codes == [0, 0] and r.errors == []
    refused = len(r.errors) == 1 and re.match(r"edgeq: error: output .* appeared while this convert ran .*"
                                              r"choose another output or pass --force", r.errors[0]) is not None
    return one_pair and sorted(r.codes) == [0, 1] and refused and r.out_k == (0, 8)[r.codes.index(0)]


def test_two_converts_racing_to_one_output(tiny, tmp_path):
    """Two processes, both past the "already exists" check, commit at the same moment (no --force).

    The --force variant (both succeed, the last pair wins whole) is in results/bad_input.md
    (tools/bad_input_report.py); its mechanism, the directory lock held across the commit, is
    tested in-process in tests/pipeline/test_output.py.  One pair of processes only: each one
    imports torch, which is most of the cost.
    """
    r = race(tiny, tmp_path, force=False)
    assert "Traceback" not in "\n".join(r.errors), r.errors
    assert race_ok(r, force=False), r
