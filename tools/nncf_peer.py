#!/usr/bin/env python
"""NNCF's ONNX ``compress_weights`` (INT4_SYM, group 32) on an FP32 export: a peer of results/lowbit/.

Runs in its own virtual environment (NNCF is not an edgeq dependency), so it imports nothing
from edgeq:

    python3 -m venv ../venv-nncf
    ../venv-nncf/bin/pip install nncf==3.4.0 onnx==1.23.2 onnxruntime==1.32.0 numpy tokenizers
    python tools/export_fp32.py ../shared/models/minilm-l6-sst2 fp32.onnx
    ../venv-nncf/bin/python tools/nncf_peer.py fp32.onnx out.onnx --mode data-free|awq-se \\
        --tokenizer ../shared/models/minilm-l6-sst2 --calib ../shared/data/glue/SST-2/train.tsv

The configuration that works here (../shared/docs/PEERS.md, "Peers re-measured"): the graph is
raised to opset 21 so NNCF writes the DequantizeLinear (DQ) form (at opset 20 its MatMulNBits takes
the following Add's bias while keeping the Add: the bias counts twice); the Gemms (pooler,
classifier) and the embedding Gathers are ignored (ONNX Runtime refuses NNCF's blocked
DequantizeLinear with axis 0 on a transposed Gemm or a Gather, and scale estimation fails on a
Gemm); every MatMul is INT4 (``ratio=1``, ``all_layers=True``).  ``awq-se`` adds AWQ and scale
estimation on ``--samples`` training sentences (AWQ finds no pattern on BERT and changes nothing).
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path


def calibration_feeds(model, tokenizer_dir: Path, tsv: Path, samples: int, seed: int = 0, max_length: int = 128):
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.no_padding()
    with tsv.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    text_cols = [c for c in ("sentence", "sentence1", "sentence2", "question") if c in rows[0]]
    random.Random(seed).shuffle(rows)
    names = {i.name for i in model.graph.input}
    feeds = []
    for row in rows[:samples]:
        enc = tok.encode(*[row[c] for c in text_cols[:2]])
        feed = {"input_ids": np.array([enc.ids], np.int64),
                "attention_mask": np.array([enc.attention_mask], np.int64),
                "token_type_ids": np.array([enc.type_ids], np.int64)}
        feeds.append({k: v for k, v in feed.items() if k in names})
    return feeds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--mode", choices=("data-free", "awq-se"), default="data-free")
    ap.add_argument("--tokenizer", type=Path, help="model directory with tokenizer.json (awq-se)")
    ap.add_argument("--calib", type=Path, help="GLUE train.tsv (awq-se)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=32)
    args = ap.parse_args(argv)

    import nncf
    import onnx
    from onnx import version_converter

    model = version_converter.convert_version(onnx.load(str(args.fp32)), 21)
    kwargs = dict(mode=nncf.CompressWeightsMode.INT4_SYM, group_size=args.group_size, ratio=1.0, all_layers=True,
                  ignored_scope=nncf.IgnoredScope(types=["Gemm", "Gather"]))
    if args.mode == "awq-se":
        if not (args.tokenizer and args.calib):
            ap.error("--mode awq-se needs --tokenizer and --calib")
        kwargs.update(dataset=nncf.Dataset(calibration_feeds(model, args.tokenizer, args.calib, args.samples)),
                      awq=True, scale_estimation=True)
    out = nncf.compress_weights(model, **kwargs)
    onnx.save(out, str(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
