"""tools/table1_summary.py: an STS-B sweep directory (Spearman, no accuracy) is skipped with a note, not crashed on."""

from __future__ import annotations

import importlib.util
import json

from tests.helpers import REPO


def test_sts_sweeps_are_skipped(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("table1_summary", REPO / "tools" / "table1_summary.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for name, task, metrics in (("sts", "STS-B", {"pearson": 0.8, "spearman": 0.8}), ("rte", "RTE", {"accuracy": 0.6})):
        (tmp_path / name / "cells").mkdir(parents=True)
        cell = {"cell": "fp32", "metrics": metrics, "settings": {"task": task, "model_dir": "model"}}
        (tmp_path / name / "cells" / "fp32.json").write_text(json.dumps(cell))
    sweeps = tool.load(tmp_path)
    assert list(sweeps) == ["rte"]
    assert "skipping sts: a STS-B sweep" in capsys.readouterr().err
