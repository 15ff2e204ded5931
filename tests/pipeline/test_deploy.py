"""Deployment: the Hugging Face / Optimum folder, the .ort (ORT Mobile) file, and JavaScript clients.

Tiny random models check the layout, refusals and all-or-nothing writes; the shared RTE model
(k=256) is run in onnxruntime-node (native), onnxruntime-web (WASM, in Node), the .ort file and
Optimum, each against Python ONNX Runtime on the same tokenised RTE dev inputs.  The RTE conversion
is the session fixture ``rte_k256`` (tests/conftest.py), shared with tests/pipeline/test_real_models.py.
Tests needing optimum or node request the ``optimum_ort`` / ``node`` fixtures and are marked ``deploy``;
they skip before any work when those are missing (under CI=1 they fail instead).
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main
from tests.helpers import REPO

NODE_DIR = REPO / "tests" / "node"
TOL = 1e-4  # JavaScript / .ort logits vs Python ONNX Runtime, max|Δ|


def _convert(*args: str):
    return CliRunner().invoke(main, ["convert", "-q", *args], catch_exceptions=False)


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _encode(folder: Path, pairs, batch: int = 16):
    """Tokenise with the tokenizer saved in the output folder (as a client would)."""
    from transformers import AutoTokenizer

    from edgeq.model.texts import encode_texts

    return encode_texts(AutoTokenizer.from_pretrained(folder), pairs, batch_size=batch)


def _run(session, batches) -> np.ndarray:
    names = {i.name for i in session.get_inputs()}
    return np.concatenate([session.run(["logits"], {k: v for k, v in b.items() if k in names})[0] for b in batches])


# ---------------------------------------------------------------- tiny models: layout, refusals, atomicity

@pytest.fixture(scope="module")
def tiny_folder(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT as a Hugging Face folder with --ort-format (read-only)."""
    out = tmp_path_factory.mktemp("tiny-folder") / "deploy"
    res = _convert("--k", "16", "--ort-format", str(tiny_bert), str(out))
    assert res.exit_code == 0, res.output
    return out


def test_folder_layout(tiny_folder):
    out = tiny_folder
    names = sorted(p.name for p in out.iterdir())
    for f in ("model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "edgeq_report.json",
              "model.ort", "model.required_operators.config"):
        assert f in names, names
    assert not [n for n in names if n.startswith(".")], names  # no staging leftovers
    report = json.loads((out / "edgeq_report.json").read_text())
    assert sorted(report["deployment"]["files"]) == names
    assert report["deployment"]["ops"]["com.microsoft"] == ["MatMulNBits"]


@pytest.mark.deploy
def test_folder_loads_in_optimum(tiny_folder, optimum_ort):
    out = tiny_folder
    model = optimum_ort.ORTModelForSequenceClassification.from_pretrained(out)
    batches = _encode(out, [("the quick brown fox", "jumps over the lazy dog"), ("a man is playing guitar", None)], 1)
    want = _run(_session(out / "model.onnx"), batches)
    got = np.concatenate([np.asarray(model(**b).logits) for b in batches])
    np.testing.assert_array_equal(got, want)  # the same file in the same runtime: bit-identical


@pytest.mark.deploy
def test_encoder_folder_loads_in_optimum_feature_extraction(tiny_model, optimum_ort, tmp_path):
    src = tiny_model("RobertaModel")
    out = tmp_path / "deploy"
    res = _convert("--k", "4", str(src), str(out))
    assert res.exit_code == 0, res.output
    model = optimum_ort.ORTModelForFeatureExtraction.from_pretrained(out)
    batches = _encode(out, [("the quick brown fox", None)], 1)
    sess = _session(out / "model.onnx")
    want = sess.run(["last_hidden_state"], {i.name: batches[0][i.name] for i in sess.get_inputs()})[0]
    np.testing.assert_array_equal(np.asarray(model(**batches[0]).last_hidden_state), want)


def test_folder_output_validate_accepts_folder(tiny_bert, tmp_path):
    out = tmp_path / "deploy"
    assert _convert("--k", "4", str(tiny_bert), str(out)).exit_code == 0
    res = CliRunner().invoke(main, ["validate", str(tiny_bert), str(out)])
    assert res.exit_code == 0, res.output


def test_folder_refusals(tiny_bert, tmp_path):
    bad_ext = _convert(str(tiny_bert), str(tmp_path / "model.json"))
    assert bad_ext.exit_code == 2 and "must end in .onnx" in bad_ext.output and not (tmp_path / "model.json").exists()
    inside = _convert(str(tiny_bert), str(tiny_bert / "out"))
    assert inside.exit_code == 2 and "overlaps input" in inside.output and not (tiny_bert / "out").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep")
    res = _convert(str(tiny_bert), str(busy))
    assert res.exit_code == 2 and "not empty" in res.output
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    res = _convert("--force", "--k", "4", str(tiny_bert), str(busy))
    assert res.exit_code == 0, res.output
    assert (busy / "model.onnx").is_file() and (busy / "notes.txt").read_text() == "keep"


def test_folder_failed_convert_leaves_nothing(tiny_bert, tmp_path):
    out = tmp_path / "deploy"
    res = _convert("--k", "0", "--max-abs-diff", "1e-9", str(tiny_bert), str(out))  # validation fails
    assert res.exit_code != 0
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _convert("--k", "0", "--max-abs-diff", "1e-9", str(tiny_bert), str(empty))
    assert res.exit_code != 0 and list(empty.iterdir()) == []


def test_ort_format_single_file(tiny_bert, tmp_path):
    out = tmp_path / "m.onnx"
    res = _convert("--k", "16", "--ort-format", "--json", str(tiny_bert), str(out))
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)  # the converter's own prints must not pollute --json
    assert (tmp_path / "m.ort").is_file() and (tmp_path / "m.required_operators.config").is_file()
    assert "MatMulNBits" in report["deployment"]["ort"]["required_operators"]["com.microsoft"]
    batches = _encode(tiny_bert, [("she bought three apples", "at market"), ("service slow", "food arrived cold")])
    np.testing.assert_allclose(_run(_session(tmp_path / "m.ort"), batches), _run(_session(out), batches),
                               rtol=0, atol=TOL)


# ---------------------------------------------------------------- the shared RTE model in each client
#
# Every client runs single-threaded, so they run side by side on the 2 cores: node_clients starts the
# three JavaScript runs as subprocesses and the tests collect them; meanwhile ``rte`` runs model.onnx
# and model.ort in Python ONNX Runtime in two threads.  The WASM test (the slowest run) comes last.


@pytest.fixture(scope="module")
def rte_inputs(rte_k256):
    """The converted RTE folder (model.onnx, model.ort) and the 277 dev examples tokenised by its tokenizer."""
    from edgeq.model.texts import read_glue_texts

    return rte_k256.out, _encode(rte_k256.out, read_glue_texts(rte_k256.data))


class RTE(NamedTuple):
    folder: Path
    batches: list
    want: np.ndarray  # model.onnx in Python ONNX Runtime, every dev example
    ort: np.ndarray  # model.ort in Python ONNX Runtime, every dev example


@pytest.fixture(scope="module")
def rte(rte_inputs) -> RTE:
    folder, batches = rte_inputs
    with ThreadPoolExecutor(1) as pool:  # ONNX Runtime releases the GIL while it computes
        ort = pool.submit(_run, _session(folder / "model.ort"), batches)
        want = _run(_session(folder / "model.onnx"), batches)
        return RTE(folder, batches, want, ort.result())


class NodeRun:
    """``node tests/node/run.mjs`` on one model and some batches, started in the background."""

    def __init__(self, node: str, work: Path, model: Path, batches, backend: str):
        self.work, self.backend = work, backend
        work.mkdir()
        spec = {"model": str(model), "output": "logits", "batches": [
            {k: {"dims": list(v.shape), "data": v.ravel().tolist()} for k, v in b.items()} for b in batches]}
        (work / "inputs.json").write_text(json.dumps(spec))
        with open(work / "stderr.txt", "wb") as err:  # a file, not a pipe: nothing reads it until the end
            self.proc = subprocess.Popen([node, str(NODE_DIR / "run.mjs"), str(work), "--backend", backend],
                                         stdout=subprocess.DEVNULL, stderr=err)

    def result(self) -> np.ndarray:
        self.proc.wait(timeout=600)
        assert self.proc.returncode == 0, (self.work / "stderr.txt").read_text()[-2000:]
        got = json.loads((self.work / f"outputs-{self.backend}.json").read_text())
        assert got["runtime"] == f"onnxruntime-{self.backend}"
        return np.concatenate([np.asarray(b["data"], np.float32).reshape(b["dims"]) for b in got["batches"]])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


WASM_BATCHES = 4  # 64 examples: the single-threaded WASM build is ~6x slower than native


@pytest.fixture(scope="module")
def node_clients(rte_inputs, node, tmp_path_factory):
    """onnxruntime-node on model.onnx (every dev batch) and on model.ort (4 batches), onnxruntime-web
    (WASM) on model.onnx (4 batches): all started now, collected by the tests."""
    folder, batches = rte_inputs
    work = tmp_path_factory.mktemp("node-clients")
    runs = {"node": NodeRun(node, work / "node", folder / "model.onnx", batches, "node"),
            "node-ort": NodeRun(node, work / "node-ort", folder / "model.ort", batches[:4], "node"),
            "web": NodeRun(node, work / "web", folder / "model.onnx", batches[:WASM_BATCHES], "web")}
    yield runs
    for run in runs.values():
        run.stop()


@pytest.mark.real
@pytest.mark.deploy
def test_rte_onnxruntime_node_matches_python(node_clients, rte):
    want = rte.want
    got = node_clients["node"].result()
    assert got.shape == want.shape == (277, 2)
    assert np.max(np.abs(got - want)) <= TOL
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    got_ort = node_clients["node-ort"].result()  # the mobile file in the same client
    assert np.max(np.abs(got_ort - want[: len(got_ort)])) <= TOL
    np.testing.assert_array_equal(got_ort.argmax(1), want[: len(got_ort)].argmax(1))


@pytest.mark.real
def test_rte_ort_format_matches_onnx(rte, rte_k256):
    folder, got, want = rte.folder, rte.ort, rte.want
    assert got.shape == want.shape == (277, 2)
    assert np.max(np.abs(got - want)) <= TOL
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    check = rte_k256.report["deployment"]["ort"]  # convert's own check, on the examples it validated on
    assert check["examples"] == 32 and max(check["max_abs_diff_vs_onnx"].values()) <= TOL
    config = (folder / "model.required_operators.config").read_text()
    assert "com.microsoft;1;" in config and "MatMulNBits" in config
    assert "# - model.ort" in config and ".edgeq-tmp" not in config  # no staging path leaks into the config


@pytest.mark.real
@pytest.mark.deploy
def test_rte_optimum_pipeline(rte, optimum_ort):
    folder, batches, want = rte.folder, rte.batches, rte.want
    model = optimum_ort.ORTModelForSequenceClassification.from_pretrained(folder)
    got = np.concatenate([np.asarray(model(**b).logits) for b in batches[:2]])
    np.testing.assert_array_equal(got, want[: len(got)])


def _level0_copy(folder: Path, dst: Path) -> Path:
    """The folder's model.onnx with every MatMulNBits at accuracy_level 0 (FP32 activations)."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"))
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    path = dst / "model-level0.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.real
@pytest.mark.deploy
def test_rte_onnxruntime_web_wasm_matches_python(node_clients, rte_inputs, tmp_path):
    folder, batches = rte_inputs
    got = node_clients["web"].result()
    # The WASM build has no int8-activation MatMulNBits kernel: at accuracy_level 4 (edgeq's default) it
    # computes the FP32 path (measured: within 1e-5 of native level 0, ~0.1 logits from native level 4).
    # So it is held to native ONNX Runtime running the same file at accuracy_level 0.
    sub = _run(_session(_level0_copy(folder, tmp_path)), batches[:WASM_BATCHES])
    assert got.shape == sub.shape
    assert np.max(np.abs(got - sub)) <= TOL
    np.testing.assert_array_equal(got.argmax(1), sub.argmax(1))


# ---------------------------------------------------------------- compact 2/3-bit files in each client


@pytest.fixture(scope="module")
def tiny_compact(tiny_bert, tmp_path_factory):
    """The tiny BERT (hidden 48: K is not a multiple of the block 32) at --bits 2 and 3 (compact storage),
    and 3 batches of random token ids with padding."""
    import onnx

    work = tmp_path_factory.mktemp("compact")
    files = {}
    for bits in (2, 3):
        out = work / f"b{bits}.onnx"
        res = _convert("--k", "8", "--bits", str(bits), str(tiny_bert), str(out))
        assert res.exit_code == 0, res.output
        inits = {t.name: t for t in onnx.load(str(out)).graph.initializer}
        planes = [t for name, t in inits.items() if name.endswith(".qplanes")]
        assert planes and all(t.dims[0] == bits for t in planes)  # really the compact b-bit layout
        assert not any(name.endswith(".qweight") for name in inits)
        files[bits] = out
    vocab = json.loads((tiny_bert / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(5)
    batches = []
    for b, s in ((4, 9), (2, 17), (3, 5)):
        mask = np.ones((b, s), np.int64)
        mask[0, s // 2:] = 0
        batches.append({"input_ids": rng.integers(0, vocab, (b, s), dtype=np.int64), "attention_mask": mask,
                        "token_type_ids": np.zeros((b, s), np.int64)})
    return files, batches


@pytest.mark.deploy
@pytest.mark.parametrize("bits", [2, 3])
def test_compact_file_in_node_and_wasm_matches_python(tiny_compact, node, tmp_path, bits):
    """onnxruntime-node and onnxruntime-web (WASM) run the unpacking subgraph (or fold it) to the same
    logits as Python ONNX Runtime (edgeq's default accuracy_level 0: FP32 activations on every runtime)."""
    files, batches = tiny_compact
    runs = {backend: NodeRun(node, tmp_path / backend, files[bits], batches, backend) for backend in ("node", "web")}
    try:
        want = _run(_session(files[bits]), batches)
        for backend, run in runs.items():
            got = run.result()
            assert got.shape == want.shape == (9, 2), backend
            assert np.max(np.abs(got - want)) <= TOL, backend
            np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    finally:
        for run in runs.values():
            run.stop()
