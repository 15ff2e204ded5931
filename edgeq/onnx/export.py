"""FP32 ONNX export of a loaded encoder with dynamic batch and sequence axes.

Exporter: ``torch.onnx.export(dynamo=False)`` (the TorchScript path) with transformers 4.57.
Why: it is in the pinned stack already (no optimum at convert time), it handles bare encoders
and heads alike, node names keep the module paths (``/m/bert/encoder/layer.0/.../MatMul``) and
the graph is deterministic; ``dynamo=True`` produced an invalid BERT graph here and renames
every node.  Linear weights are found again by content, not by these names (see rewrite.py).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from edgeq.model.load import LoadedModel

TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")  # [batch, sequence, hidden]; the others [batch, ...]


def export_fp32(loaded: LoadedModel, opset: int = 17, external_data_threshold: int = 2_000_000_000):
    """Export ``loaded.model`` and return the ``onnx.ModelProto`` (FP32, dynamic axes).

    Written to a temporary file (:func:`export_fp32_file`) and loaded back with its external data:
    the exporter writes external data above 2 GB, which an in-memory buffer cannot hold, and a file
    spares a buffer's copy and its ``getvalue()`` copy of the whole model.  ``external_data_threshold``
    is accepted for the callers' sake; the exporter alone decides when it needs external data.
    """
    import onnx

    with tempfile.TemporaryDirectory(prefix="edgeq-export-") as tmp:
        path = export_fp32_file(loaded, Path(tmp) / "fp32.onnx", opset)
        return onnx.load(str(path), load_external_data=True)  # exporter-written, trusted locations


def export_fp32_file(loaded: LoadedModel, path: Path, opset: int = 17) -> Path:
    """Export ``loaded.model`` to the ONNX file ``path`` (FP32, dynamic axes) and return ``path``.

    Models above 2 GB get their weights in external data files beside ``path`` (the exporter's own
    layout), so ``path``'s directory should be private.
    """
    import torch

    names = list(loaded.input_names)
    outputs = list(loaded.output_names)

    class _Wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.m = model

        def forward(self, *args):
            out = self.m(**dict(zip(names, args)), return_dict=True)
            seen: set[int] = set()  # one tensor under two output names (token_embeddings, last_hidden_state):
            res = []                # the second is a copy, so that each graph output has its own node
            for o in outputs:
                res.append(out[o] if id(out[o]) not in seen else out[o] * 1.0)
                seen.add(id(out[o]))
            return tuple(res)

    enc = loaded.tokenizer(
        ["edgeq exports this sentence.", "and this one, which is a little longer than the first."],
        ["a second segment", "another"],
        padding=True,
        return_tensors="pt",
    )
    args = tuple(enc[n] for n in names)
    dynamic_axes = {n: {0: "batch", 1: "sequence"} for n in names}
    for o in outputs:
        dynamic_axes[o] = {0: "batch", 1: "sequence"} if o in TOKEN_OUTPUTS else {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Wrapper(loaded.model).eval(),  # export restores the wrapper's mode afterwards: keep it eval
            args,
            str(path),  # the exporter writes the same bytes to a path as to a buffer (> 2 GB: external data)
            dynamo=False,
            input_names=names,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )
    loaded.model.eval()
    return path
