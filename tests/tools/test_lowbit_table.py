"""tools/lowbit_table.py: the grid declaration, the commands of a cell, failed and resumed cells, rendering.

The commands themselves are replaced by a fake ``run_cmd`` (the real ones convert the shared models);
what is checked is what the harness asks for and what it records.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def tool():
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("lowbit_table", REPO / "tools" / "lowbit_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(tool, argv):
    import argparse

    ns = argparse.Namespace(tasks="SST-2", bits="2", ks="", budgets="", methods="magnitude", quantizers="rtn",
                            grids="default", storages="default", peers="")
    for k, v in argv.items():
        setattr(ns, k, v)
    return ns


def test_grid_declaration_and_commands(tool, tmp_path):
    cells = tool.edgeq_cells(_args(tool, {"bits": "2,4", "ks": "0,256", "budgets": "0,0.001",
                                          "methods": "magnitude,error", "quantizers": "rtn,gptq"}))
    ids = [c["id"] for c in cells]
    assert len(ids) == len(set(ids))
    # nothing exact (k 0 = budget 0) is one cell per bits × quantizer × grid, whatever the method
    assert sorted(i for i in ids if "-k0-" in i) == ["SST-2/b2-k0-none-gptq-default", "SST-2/b2-k0-none-rtn-default",
                                                     "SST-2/b4-k0-none-gptq-default", "SST-2/b4-k0-none-rtn-default"]
    assert len(ids) == 2 * 2 * (1 + 2 + 2)  # bits × quantizers × (nothing exact, 2 methods × (k 256, budget))
    by_id = {c["id"]: c for c in cells}
    build, ev, out, ev_json = tool.commands(by_id["SST-2/b2-budget0.001-error-gptq-default"], tmp_path)
    conv = tool.show(build[0])
    assert conv.startswith("edgeq convert ") and "--bits 2 --budget 0.001 --method error --quantizer gptq" in conv
    models = tool.SHARED_REL / "models"  # only named in the commands, never read here
    assert f"--calib sst2 {models}/minilm-l6-sst2" in conv and "--grid" not in conv
    k0 = tool.show(tool.commands(by_id["SST-2/b4-k0-none-rtn-default"], tmp_path)[0][0])
    assert "--k 0" in k0 and "--method" not in k0 and "--budget" not in k0
    shown = tool.show(ev)
    assert shown.startswith(f"edgeq eval {out} --task SST-2") and f"--tokenizer {models}" in shown
    sts = tool.edgeq_cells(_args(tool, {"tasks": "STS-B", "ks": "0"}))[0]
    build, ev, _, _ = tool.commands(sts, tmp_path)
    sts_conv = tool.show(build[0])
    assert str(models) not in sts_conv and "--calib stsb" in sts_conv  # the bundled model, STS-B train as calibration
    assert "--min-cosine 0" in sts_conv  # low-bit cells are measured, not refused by the default cosine gate
    assert "--task STS-B" in tool.show(ev) and "--tokenizer" not in ev
    compact = tool.edgeq_cells(_args(tool, {"bits": "4", "ks": "0", "storages": "default,compact"}))
    assert [c["id"] for c in compact] == ["SST-2/b4-k0-none-rtn-default", "SST-2/b4-k0-none-rtn-default-compact"]
    assert "--storage compact" in tool.show(tool.commands(compact[1], tmp_path)[0][0])
    assert "--storage" not in tool.show(tool.commands(compact[0], tmp_path)[0][0])
    grid = tool.edgeq_cells(_args(tool, {"ks": "256", "grids": "mse,asym"}))
    assert [tool.show(tool.commands(c, tmp_path)[0][0]).split("--grid ")[1].split()[0] for c in grid] == ["mse", "asym"]


def test_failed_cells_are_recorded_and_retried_finished_ones_skipped(tool, tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd):
        calls.append(cmd)
        if "--budget" in cmd:
            return False, "edgeq: error: No such option: --budget", 0.1
        if "eval" in cmd:
            ev = cmd[cmd.index("--json") + 1]
            preds = ["positive", "negative", "positive", "positive"]
            open(ev, "w").write(json.dumps({"metrics": {"accuracy": 0.75}, "correct": 3, "examples": 4,
                                            "predictions": preds}))
        return True, "", 1.0

    monkeypatch.setattr(tool, "run_cmd", fake_run)
    monkeypatch.setattr(tool, "fp32_predictions", lambda task, out: ["positive", "negative", "negative", "positive"])
    monkeypatch.setattr(tool, "sizes_of", lambda p: {"linear_bytes": 100, "file_bytes": 200, "size_bytes": {}})
    argv = ["run", "--bits", "2", "--ks", "0", "--budgets", "0.01", "--out", str(tmp_path), "--work",
            str(tmp_path / "work")]
    assert tool.main(argv) == 0
    recs = tool.load_store(tmp_path / "cells.jsonl")
    ok, failed = recs["SST-2/b2-k0-none-rtn-default"], recs["SST-2/b2-budget0.01-magnitude-rtn-default"]
    assert ok["status"] == "ok" and ok["correct"] == 3 and ok["n"] == 4
    assert ok["accuracy"] == pytest.approx(75.0) and ok["accuracy_se"] == pytest.approx(100 * (0.75 * 0.25 / 4) ** 0.5)
    assert ok["agreement"] == pytest.approx(75.0)  # 3 of 4 predictions equal FP32's
    assert ok["convert_cmd"][0].startswith("edgeq convert") and ok["eval_cmd"].startswith("edgeq eval")
    assert failed["status"] == "failed" and failed["error"] == "edgeq: error: No such option: --budget"
    calls.clear()
    assert tool.main(argv) == 0  # the finished cell is skipped, the failed one retried
    assert len(calls) == 1 and "--budget" in calls[0]
    calls.clear()
    assert tool.main([*argv, "--skip-failed"]) == 0 and calls == []

    from tools.lowbit_render import render

    render(tool.load_store(tmp_path / "cells.jsonl"), tmp_path, tool.BASELINE)
    table = (tmp_path / "table.md").read_text()
    assert "| 2 | 0 | none | rtn | default | — | 100 | 200 | 75.00 ± 21.65 | 75.00 ± 21.65 |" in table
    assert "## Failed cells" in table and "No such option: --budget" in table
    assert "edgeq convert" in (tmp_path / "commands.md").read_text()
    assert (tmp_path / "size_fidelity.png").stat().st_size > 0
