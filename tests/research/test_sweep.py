"""`edgeq sweep` on a tiny model: cells match `edgeq.quant.plan`, resumability, Table I / Figure 1 files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.errors import UsageError
from edgeq.research.sweep import FP32, INT4, SweepSettings, Variant, _Context, run_sweep
from tests.evaluation.test_evaluate import RTE_LABELS, set_labels, write_rte


@pytest.fixture(scope="module")
def tiny(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model = tiny_model(seed=5, hidden=64, copy_to=root / "model")  # its labels are edited
    set_labels(model, RTE_LABELS)
    write_rte(root / "glue", n=20, seed=1)
    return root, model


def test_selection_reused_across_k_equals_build_plan(tiny):
    """order[:k] of one score per layer must equal what `edgeq.quant.plan.build_plan` selects for each k."""
    from edgeq.config import ConvertConfig
    from edgeq.quant.plan import build_plan

    root, model = tiny
    ctx = _Context(SweepSettings(str(model), "RTE", block_size="16"), root / "glue", 1, True)
    assert not ctx.loaded.model.training  # the export must not leave dropout on for PyTorch eval/calibration
    for method in ("svd", "magnitude", "random"):
        orders = ctx.orders(method, 200)
        for k in (1, 7, 200):
            plan = build_plan(ctx.weights, ConvertConfig(method=method, k=k, block_size="16"))
            reused = build_plan(ctx.weights, ConvertConfig(method=method, k=k, block_size="16"), orders=orders)
            for name, lp in plan.layers.items():
                got = np.sort(orders[name][: min(k, lp.quant.codes.size)])
                assert np.array_equal(got, lp.quant.salient_index), (method, k, name)
                assert reused.layers[name].stats() == lp.stats()
                assert np.array_equal(reused.layers[name].quant.dequantize(), lp.quant.dequantize())


def test_sweep_resumes_without_recomputing(tiny, tmp_path):
    root, model = tiny
    settings = SweepSettings(str(model), "RTE", block_size="16")
    out = tmp_path / "sweep"
    methods, ks = ["svd", "random"], [0, 1, 64]
    first = run_sweep(settings, methods, ks, out, root / "glue", 1, True)
    assert sorted(first.computed) == sorted([FP32, INT4, "svd-k1", "svd-k64", "random-k1", "random-k64"])
    cells = first.cells
    fp32 = cells[FP32]
    assert fp32["correct"] == fp32["pytorch_correct"]  # exported FP32 graph == PyTorch on every example
    assert fp32["pytorch_same_predictions"] is True
    assert fp32["examples"] == 20 and len(fp32["predictions"]) == 20
    for c in cells.values():
        p = c["metrics"]["accuracy"]
        assert c["accuracy_se"] == pytest.approx(np.sqrt(p * (1 - p) / 20))
        assert c["correct"] == round(p * 20)
    for cid in ("svd-k64", "random-k1"):
        assert cells[cid]["linears"] == 14  # 2 layers × 6 + pooler + classifier, all rewritten
        assert cells[cid]["fp32_entries"] == sum(min(int(cid.split("k")[-1]), n) for n in
                                                 [64 * 64] * 4 * 2 + [128 * 64] * 2 * 2 + [64 * 64, 2 * 64])
        agree = np.mean([a == b for a, b in zip(cells[cid]["predictions"], fp32["predictions"])])
        assert cells[cid]["agreement"] == pytest.approx(agree)
    assert cells["svd-k64"]["recon_error_total"] < cells[INT4]["recon_error_total"]

    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    second = run_sweep(settings, methods, ks, out, root / "glue", 1, True)
    assert second.computed == [] and sorted(second.reused) == sorted(first.computed)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == mtimes

    # an interrupted sweep: a lost cell is recomputed, and only that one
    os.remove(out / "cells" / "random-k64.json")
    third = run_sweep(settings, methods, ks + [16], out, root / "glue", 1, True)
    assert sorted(third.computed) == ["random-k16", "random-k64", "svd-k16"]
    assert third.cells["random-k64"]["predictions"] == cells["random-k64"]["predictions"]

    with pytest.raises(UsageError, match="different sweep"):
        run_sweep(SweepSettings(str(model), "RTE", block_size="32"), methods, ks, out, root / "glue", 1, True)


def test_sweep_cli_writes_table_and_figure(tiny, tmp_path):
    root, model = tiny
    out = tmp_path / "t1"
    args = ["sweep", str(model), "--task", "RTE", "--methods", "svd,magnitude", "--k", "0,4,32",
            "--block-size", "per-channel", "--data-dir", str(root / "glue"), "--out", str(out), "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    for name in ("table1.md", "table1.csv", "table1.json", "figure1.png", "COMMAND"):
        assert (out / name).is_file(), name
    table = json.loads((out / "table1.json").read_text())
    assert [r["row"] for r in table["rows"]] == ["FP32", "int4", "svd", "svd", "magnitude", "magnitude"]
    assert [r["k"] for r in table["rows"]] == [None, 0, 4, 32, 4, 32]
    md = (out / "table1.md").read_text()
    assert "| FP32 |" in md and "agree w/ FP32" in md
    assert (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and "0 cells computed, 6 reused" in res.output

    res = CliRunner().invoke(main, args[:-3] + ["--methods", "awq", "--out", str(tmp_path / "t2")])
    assert res.exit_code == 2 and "--calib" in res.output
    res = CliRunner().invoke(main, args[:4] + ["--methods", "nope", "--out", str(tmp_path / "t3")])
    assert res.exit_code == 2 and "unknown saliency method" in res.output


def test_cell_ids_of_the_grid():
    from edgeq.research.cells import Variant, cell_ids, variants

    assert cell_ids(["svd"], [0, 16]) == [FP32, INT4, "svd-k16"]  # one variant at the defaults: today's ids
    assert Variant("32").suffix("32") == "" and Variant("per-channel").suffix("per-channel") == ""
    assert Variant("per-channel").suffix("32") == "-per-channel"
    assert Variant("64", "gptq").suffix("32") == "-gptq-b64"
    assert Variant("32", bits=8).suffix("32") == "-bits8" and Variant("32", grid="sym8").suffix("32") == "-sym8"
    grid = variants(["32", "per-tensor"], ["rtn", "gptq"], [4], ["sym7"])
    assert [v.suffix("32") for v in grid] == ["", "-gptq", "-per-tensor", "-gptq-per-tensor"]
    assert cell_ids(["svd"], [0, 16], ["", "-gptq"]) == [FP32, INT4, "svd-k16", "int4-k0-gptq", "svd-k16-gptq"]


def test_grid_sweep_cells_match_single_variant_sweeps(tiny, tmp_path):
    """Extra dimensions add suffixed cells; each equals the cell of a sweep run at that variant alone."""
    from edgeq.research.cells import variants

    root, model = tiny
    settings = SweepSettings(str(model), "RTE", block_size="16")
    grid = variants(["16", "per-channel"], ["rtn"], [4, 8], ["sym7", "sym8"])
    run = run_sweep(settings, ["svd"], [0, 4], tmp_path / "grid", root / "glue", 1, True, grid)
    sfx = ["", "-sym8", "-bits8", "-per-channel", "-sym8-per-channel", "-bits8-per-channel"]  # bits8 × sym8: skipped
    assert [v.suffix("16") for v in run.variants] == sfx
    assert sorted(run.computed) == sorted([FP32] + [c + s for s in sfx for c in (INT4, "svd-k4")])
    cells = run.cells
    for cid, c in cells.items():
        if cid != FP32:
            assert c["plan_parity"] <= 1e-4 and c["linears"] == 14
            assert 0 <= c["mean_abs_dlogit"] <= c["max_abs_dlogit"]
    assert cells["svd-k4-bits8"]["variant"] == {"block_size": "16", "quantizer": "rtn", "bits": 8, "grid": "sym7"}
    assert cells["svd-k4-bits8"]["recon_error_total"] < cells["svd-k4"]["recon_error_total"]
    assert cells["svd-k4"]["recon_error_total"] < cells[INT4]["recon_error_total"]

    # the default grid of the same settings reuses the unsuffixed cells
    again = run_sweep(settings, ["svd"], [0, 4], tmp_path / "grid", root / "glue", 1, True)
    assert again.computed == [] and again.reused == [FP32, INT4, "svd-k4"]
    # a per-channel sweep of its own computes what the grid's -per-channel cells hold
    alone = run_sweep(SweepSettings(str(model), "RTE", block_size="per-channel"), ["svd"], [0, 4], tmp_path / "pc",
                      root / "glue", 1, True)
    for cid in (INT4, "svd-k4"):
        a, g = alone.cells[cid], cells[cid + "-per-channel"]
        assert (a["predictions"], a["recon_error_total"], a["mean_abs_dlogit"]) == \
            (g["predictions"], g["recon_error_total"], g["mean_abs_dlogit"])


def test_low_bit_sweep_cells(tiny, tmp_path):
    """--bits 2,3 cells are compact files run by the 4-bit kernel: suffixed, exact plan parity, and coarser."""
    from edgeq.research.cells import variants

    root, model = tiny
    settings = SweepSettings(str(model), "RTE", block_size="16")
    grid = variants(["16"], ["rtn"], [4, 3, 2], ["sym7", "sym8"])
    run = run_sweep(settings, ["magnitude"], [0, 4], tmp_path / "lb", root / "glue", 1, True, grid)
    assert [v.suffix("16") for v in run.variants] == ["", "-sym8", "-bits3", "-bits2"]  # sym8: a 4-bit option
    cells = run.cells
    for cid in ("int4-k0-bits2", "magnitude-k4-bits2", "int4-k0-bits3", "magnitude-k4-bits3"):
        assert cells[cid]["plan_parity"] <= 1e-4 and cells[cid]["linears"] == 14
    errors = [cells[INT4 + s]["recon_error_total"] for s in ("", "-bits3", "-bits2")]
    assert errors[0] < errors[1] < errors[2]
    assert cells["magnitude-k4-bits2"]["recon_error_total"] < cells["int4-k0-bits2"]["recon_error_total"]


def test_calibrated_quantizer_cells(tiny, tmp_path):
    root, model = tiny
    calib = str(root / "glue" / "RTE" / "dev.tsv")  # a TSV file serves as calibration text
    with pytest.raises(UsageError, match="--calib"):
        run_sweep(SweepSettings(str(model), "RTE", block_size="16"), ["svd"], [4], tmp_path / "x", root / "glue",
                  1, True, [Variant("16", "gptq")])
    settings = SweepSettings(str(model), "RTE", block_size="16", calib=calib, calib_samples=12)
    run = run_sweep(settings, ["svd"], [0, 4], tmp_path / "q", root / "glue", 1, True,
                    [Variant("16"), Variant("16", "gptq"), Variant("16", "sarqc-gs", bits=8)])  # sarqc-gs × 8: skipped
    assert [v.quantizer for v in run.variants] == ["rtn", "gptq"]
    c = run.cells["svd-k4-gptq"]
    assert c["quantizer"]["name"] == "gptq" and c["calib"] == settings.calib_key()
    assert c["quantizer"]["calibration"]["samples"] == 12 and c["plan_parity"] <= 1e-4
    assert c["fp32_entries"] == run.cells["svd-k4"]["fp32_entries"]
    assert "quantizer" not in run.cells["svd-k4"]


def test_grid_dependent_selection_is_scored_on_each_variants_grid(tiny, tmp_path):
    """``error`` selects on the plan's own grid: a -bits2 / -per-channel cell must plan what convert would."""
    from edgeq.config import ConvertConfig
    from edgeq.quant.plan import build_plan

    root, model = tiny
    settings = SweepSettings(str(model), "RTE", block_size="16")
    grid = [Variant("16"), Variant("16", bits=2), Variant("per-channel")]
    run = run_sweep(settings, ["error"], [8], tmp_path / "e", root / "glue", 1, True, grid)
    ctx = _Context(settings, root / "glue", 1, True)
    for v, cid in zip(grid, ("error-k8", "error-k8-bits2", "error-k8-per-channel")):
        plan = build_plan(ctx.weights, ConvertConfig(method="error", k=8, block_size=v.block_size, bits=v.bits))
        assert run.cells[cid]["recon_error_total"] == pytest.approx(plan.total_recon_error, rel=1e-12), cid
    assert run.cells["error-k8"]["recon_error_total"] != run.cells["error-k8-bits2"]["recon_error_total"]
