"""``edgeq bench`` smoke tests on tiny graphs (no timing assertions: speed is judged in benchmarks)."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgeq.bench import parse_shapes, vocab_size
from edgeq.cli import main


def tiny(path, vocab=30, hidden=8, token_types=True):
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["e"], axis=0),
             helper.make_node("ReduceSum", ["e", "axes"], ["logits"], keepdims=0)]
    inits = [numpy_helper.from_array(np.random.default_rng(0).normal(size=(vocab, hidden)).astype(np.float32), "E"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.INT64, ["B", "S"]) for n in names],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", hidden])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_bench_cli_smoke(tmp_path):
    a, b = tiny(tmp_path / "a.onnx"), tiny(tmp_path / "b.onnx", vocab=20)
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", str(a), str(b), "--shapes", "1x4,2x8", "--repeats", "3",
                                    "--warmup", "1", "--threads", "1", "--json", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "a.onnx" in res.output and "b.onnx" in res.output and "×1x4" in res.output
    data = json.loads(out.read_text())
    assert data["shapes"] == ["1x4", "2x8"] and len(data["models"]) == 2
    for m in data["models"]:
        assert set(m["latency"]) == {"1x4", "2x8"}
        q = m["latency"]["2x8"]
        assert q["p10_ms"] <= q["median_ms"] <= q["p90_ms"] and q["iqr_ms"] >= 0
        assert m["peak_rss_bytes"] > 0 and m["file_bytes"] > 0  # a session allocates something
        assert m["sizes"]["embeddings"] > 0
    assert data["models"][0]["sizes"]["embeddings"] == 30 * 8 * 4


def test_bench_rejects_bad_input(tmp_path):
    a = tiny(tmp_path / "a.onnx")
    other = tiny(tmp_path / "c.onnx", token_types=False)
    for args, msg in (([str(a), "--shapes", "1x0"], "bad shape"),
                      ([str(tmp_path / "missing.onnx")], "not an .onnx file"),
                      ([str(a), str(other), "--no-memory", "--repeats", "3"], "same source model")):
        res = CliRunner().invoke(main, ["bench", "-q", *args])
        assert res.exit_code == 2 and msg in res.output, res.output
        assert "Traceback" not in res.output


def test_parse_shapes_and_vocab(tmp_path):
    assert parse_shapes("1x16, 8X128") == [(1, 16), (8, 128)]
    with pytest.raises(ValueError, match="BATCHxSEQ"):
        parse_shapes("16")
    assert vocab_size(onnx.load(str(tiny(tmp_path / "v.onnx", vocab=17)))) == 17


def test_bench_sessions_do_not_spin(tmp_path):
    """Several sessions share the process: idle workers must block, not spin (docs/performance.md)."""
    from edgeq.bench import bench_session

    sess = bench_session(tiny(tmp_path / "a.onnx"), 2)
    assert sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_pareto_shortfalls_name_every_failed_criterion():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pareto", Path(__file__).parents[1] / "tools" / "pareto.py")
    pareto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pareto)
    peer = {"size": 0.6, "lat 1x128": 1.0, "acc rte": 0.57, "se rte": 0.03, "agree rte": 0.92}
    assert pareto.shortfalls(dict(peer), peer, ["1x128"], ["rte"]) == []  # ties dominate
    worse = dict(peer, size=0.7, **{"lat 1x128": 1.1, "acc rte": 0.54, "agree rte": 0.90})
    fails = pareto.shortfalls(worse, peer, ["1x128"], ["rte"])
    assert len(fails) == 4 and fails[0].startswith("size") and "1.0 SE" in fails[2]
    fp32 = dict(peer, **{"agree rte": 1.0})  # agreement is not compared against FP32 itself
    assert pareto.shortfalls(dict(peer), fp32, ["1x128"], ["rte"]) == []


def test_busy_machine_warning(monkeypatch):
    import edgeq.bench as bench

    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert bench.busy_machine_warning(2) is None
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (9.5, 0.0, 0.0))
    assert "load average 9.5 on 2 cores" in bench.busy_machine_warning(2)
