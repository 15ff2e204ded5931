"""The cells of a sweep: the grid they sit on, their ids, and their stored records.

A cell is one point of the grid ``method × k × variant``, a variant being the remaining
dimensions (``--quantizers``, ``--bits``, ``--grid``, ``--block-size``).  Its id is

    fp32 | int4-k0<suffix> | <method>-k<k><suffix>

where the suffix names every dimension that differs from the sweep's own defaults, in this order:
``-<quantizer>`` (≠ rtn), ``-bits8`` (bits ≠ 4), ``-sym8`` (grid ≠ sym7), ``-b<N>`` /
``-per-channel`` / ``-per-tensor`` (a granularity other than the sweep's first ``--block-size``,
which is the one in its settings).  A sweep with one value per dimension at those defaults has
today's ids (``fp32``, ``int4-k0``, ``svd-k256``), so older result directories still resume.

Every finished cell is one JSON file ``OUT/cells/<id>.json`` with the settings that make cells
comparable (``SweepSettings.key``); a rerun loads those instead of recomputing them and refuses a
directory whose cells were made with other settings.  Statistics: binomial standard errors
``sqrt(p(1−p)/n)`` of the accuracy and of the agreement with FP32.  An STS-B cell (an embedding
model, :func:`make_sts_cell`) records Spearman/Pearson and cosines to FP32 instead of labels.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeq.config import ConvertConfig
from edgeq.errors import UsageError
from edgeq.evaluation import metrics

logger = logging.getLogger(__name__)
FP32, INT4 = "fp32", "int4-k0"
CALIB_FIELDS = ("calib", "calib_samples", "percdamp")
# a cell id names only the dimensions that differ from the convert defaults (ConvertConfig, one source)
DEFAULT_BITS, DEFAULT_QUANTIZER, DEFAULT_GRID = (ConvertConfig.__dataclass_fields__[f].default
                                                 for f in ("bits", "quantizer", "grid"))


@dataclass(frozen=True)
class SweepSettings:
    """What makes two sweeps' cells comparable (methods, k and the variants may grow between runs)."""

    model_dir: str
    task: str
    block_size: str = "32"  # the sweep's own granularity (cells at other --block-size values get a suffix)
    rank: int = 8
    seed: int = 0
    exclude_salient_from_scale: bool = False
    limit: int | None = None
    max_length: int = 128
    accuracy_level: int = 0
    # calibration (only cells of methods/quantizers that need it depend on these; recorded per cell)
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


@dataclass(frozen=True)
class Variant:
    """A cell's coordinates besides method and k."""

    block_size: str
    quantizer: str = DEFAULT_QUANTIZER
    bits: int = DEFAULT_BITS
    grid: str = DEFAULT_GRID

    def suffix(self, home_block: str) -> str:
        parts = [self.quantizer] if self.quantizer != DEFAULT_QUANTIZER else []
        parts += [f"bits{self.bits}"] if self.bits != DEFAULT_BITS else []
        parts += [self.grid] if self.grid != DEFAULT_GRID else []
        if self.block_size != home_block:
            parts.append(self.block_size if self.block_size.startswith("per-") else f"b{self.block_size}")
        return "".join(f"-{p}" for p in parts)

    def record(self) -> dict:
        return asdict(self)


def variants(block_sizes: Sequence[str], quantizers: Sequence[str] = (DEFAULT_QUANTIZER,),
             bits: Sequence[int] = (DEFAULT_BITS,), grids: Sequence[str] = (DEFAULT_GRID,)) -> list[Variant]:
    """The product of the dimensions, granularity outermost (the first value of each comes first)."""
    return [Variant(b, q, n, g) for b, q, n, g in itertools.product(block_sizes, quantizers, bits, grids)]


def usable_variants(settings: SweepSettings, grid: Sequence[Variant]) -> list[Variant]:
    """``grid`` without the combinations the config refuses (e.g. sarqc-gs or lsi at 8 bits or on another grid)
    and the duplicates: any grid but sym7 at 8 bits (Q8-sym-127), sym8 at 2/3 bits (every symmetric grid there is
    the signed-max one, the same cells as sym7)."""
    out = []
    for v in grid:
        if (v.bits == 8 and v.grid != "sym7") or (v.bits in (2, 3) and v.grid == "sym8"):
            logger.warning(f"skipping grid {v.grid} at {v.bits} bits: the same cells as sym7")
            continue
        try:
            ConvertConfig(block_size=v.block_size, bits=v.bits, grid=v.grid, quantizer=v.quantizer,
                          calib=settings.calib, calib_samples=settings.calib_samples)
        except ValueError as e:
            if v.quantizer != "rtn" and (v.bits != 4 or v.grid != "sym7"):
                logger.warning(f"skipping {v.quantizer} at {v.bits} bits, grid {v.grid}: {e}")
                continue
            raise UsageError(str(e).replace("--quantizer ", "--quantizers ")) from None
        out.append(v)
    return out


def cell_id(method: str | None, k: int, suffix: str = "") -> str:
    return (INT4 if k == 0 else f"{method}-k{k}") + suffix


def cell_ids(methods: Sequence[str], ks: Sequence[int], suffixes: Sequence[str] = ("",)) -> list[str]:
    ids = [FP32]
    for s in suffixes:
        ids += ([cell_id(None, 0, s)] if 0 in ks else []) + [cell_id(m, k, s) for m in methods for k in ks if k > 0]
    return ids


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_cells(out: Path, settings: SweepSettings, wanted: Collection[str] = ()) -> dict[str, dict]:
    """Finished cells in ``out/cells``; a calibrated cell made with other --calib settings is redone.

    Refuses (UsageError) cells of other settings, and a ``wanted`` calibrated cell made with other
    calibration settings (pass the same ones or choose another directory).
    """
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
            if c.get("cell") in wanted:
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


def make_sts_cell(cell: str, method: str | None, k: int, result, extra: dict) -> dict:
    """The stored record of one STS-B cell: Spearman and Pearson (fractions, as ``edgeq eval --json`` gives them;
    the tables print ×100) and the predicted similarity of each pair (cosine, file order, 6 decimals)."""
    return {"cell": cell, "method": method, "k": k, "examples": result.examples, "metrics": result.metrics,
            "predictions": [round(x, 6) for x in result.predictions], "eval_seconds": result.seconds, **extra}
