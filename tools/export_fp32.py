#!/usr/bin/env python
"""Write the plain FP32 ONNX export of a model directory (the graph edgeq convert starts from).

    python tools/export_fp32.py ../shared/models/minilm-l6-rte /tmp/rte-fp32.onnx
    edgeq eval /tmp/rte-fp32.onnx --task RTE --tokenizer ../shared/models/minilm-l6-rte

Used to check that FP32 on ONNX Runtime and FP32 in PyTorch score the same dev examples.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or not argv[1].endswith(".onnx"):
        print(__doc__, file=sys.stderr)
        return 2
    import onnx

    from edgeq.model.load import load_model
    from edgeq.onnx.export import export_fp32

    model_dir, out = Path(argv[0]), Path(argv[1])
    onnx.save(export_fp32(load_model(model_dir)), str(out))
    # the report edgeq eval reads to find the tokenizer and id2label
    out.with_suffix(".json").write_text(json.dumps({"model_dir": str(model_dir)}) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
