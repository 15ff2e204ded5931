"""Same inputs and options → byte-identical out.onnx and the same report apart from timings and memory.

Across runs in one process, across processes (another PYTHONHASHSEED) and across thread counts
(ONNX Runtime ``--threads`` 1 vs 2, PyTorch intra-op threads 1 vs 2).  The svd method is used
because its scores come from an SVD, the step most likely to depend on threading.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edgeq.cli import main
from tests.helpers import REPO

ARGS = ["--k", "32", "--method", "svd", "--block-size", "32"]


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def comparable(report_path: Path) -> dict:
    r = json.loads(report_path.read_text())
    r.pop("timings_s")
    r.pop("memory")  # RSS differs between runs and processes
    r.pop("output")  # the path differs between runs by construction
    return r


def convert_in_process(model: Path, out: Path, threads: int, torch_threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        res = CliRunner().invoke(main, ["convert", "-q", *ARGS, "--threads", str(threads), str(model), str(out)])
    finally:
        torch.set_num_threads(before)
    assert res.exit_code == 0, res.stderr


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("determinism")
    model = tiny_model(hidden=64)
    outs = {name: base / name / "model.onnx" for name in "abc"}
    for out in outs.values():
        out.parent.mkdir()
    # another process (another PYTHONHASHSEED), started first so that it runs beside the in-process ones
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "2"}
    with open(base / "c" / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edgeq", "convert", "-q", *ARGS, "--threads", "2", str(model),
                                 str(outs["c"])], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        for name, threads in (("a", 1), ("b", 2)):
            convert_in_process(model, outs[name], threads, threads)
    finally:
        proc.wait(timeout=600)
    assert proc.returncode == 0, (base / "c" / "stderr.txt").read_text()[-2000:]
    return outs


def test_same_bytes_across_runs_threads_and_processes(runs):
    digests = {name: sha256(p) for name, p in runs.items()}
    assert len(set(digests.values())) == 1, digests


def test_same_report_apart_from_timings(runs):
    reports = {name: comparable(p.with_suffix(".json")) for name, p in runs.items()}
    assert reports["a"] == reports["b"] == reports["c"]
