"""The real all-mpnet-base-v2 (MPNet, 438 MB FP32): export parity, and a default convert at k=256 that validates
within the memory budget of issue 13 (peak RSS ≤ 4 × the FP32 weights).  Opt-in (``bigmodel``): set
EDGEQ_MPNET_DIR to the folder that ``tools/fetch_mpnet.py`` fetched.

    EDGEQ_MPNET_DIR=$MPNET_DIR pytest -q tests/pipeline/test_mpnet.py

The folder is a sentence-transformers layout with the transformer at its root (config.json says
MPNetForMaskedLM over encoder-only weights): edgeq converts it as a plain Hugging Face directory.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.bigmodel


def test_fp32_export_matches_pytorch(mpnet_dir):
    from edgeq.config import ConvertConfig
    from edgeq.model.load import load_model
    from edgeq.pipeline.convert import EXPORT_TOLERANCE, export_checked, reference_outputs
    from edgeq.pipeline.core import Timer

    loaded = load_model(mpnet_dir)
    assert (loaded.model_type, loaded.head, loaded.input_names) == ("mpnet", "sentence-embedding",
                                                                     ("input_ids", "attention_mask"))
    ref = reference_outputs(loaded, None, None)
    _, diff = export_checked(loaded, ConvertConfig(), ref, 0, Timer())
    # convert's own gate: max|Δ| ≤ 1e-4 · max(1, max|ref|).  On these single sentences it holds relative to
    # max|ref| alone too; on the built-in sentence pairs as one sequence ORT vs PyTorch is 1.1e-4 · max|ref|,
    # and there PyTorch FP32 is the side farther from a float64 forward (results/memory.md, "FP32 export parity").
    for name, d in diff.items():
        assert d <= EXPORT_TOLERANCE * max(1.0, float(np.max(np.abs(ref.outputs[name])))), (name, d)


def test_convert_k256_validates_within_4x_the_weights(mpnet_dir, tmp_path):
    """In a fresh process, so that its peak RSS is the convert's alone."""
    out = tmp_path / "mpnet.onnx"
    proc = subprocess.run([sys.executable, "-m", "edgeq", "convert", "-q", "--k", "256", str(mpnet_dir), str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["parity"]["ok"] and report["model_type"] == "mpnet"
    assert report["linears_quantized"] == report["linears_total"] == 12 * 6  # the sentence encoder drops the pooler
    assert all(layer["k"] == 256 for layer in report["layers"].values())
    # issue 13: peak RSS (VmHWM of the whole convert, libraries included) ≤ 4 × the FP32 weights; before
    # results/memory.md's "Below 4×" it was 5.2 ×, the TorchScript exporter's own serialization
    weights = (mpnet_dir / "model.safetensors").stat().st_size
    memory = report["memory"]
    assert memory["peak_rss_bytes"] <= 4 * weights, (memory["peak_rss_bytes"] / weights, memory)
