"""FP32 ONNX export of a loaded encoder with dynamic batch and sequence axes.

Exporter: ``torch.onnx.export(dynamo=False)`` (the TorchScript path) with transformers 4.57.
Why: it is in the pinned stack already (no optimum at convert time), it handles bare encoders
and heads alike, node names keep the module paths (``/m/bert/encoder/layer.0/.../MatMul``) and
the graph is deterministic; ``dynamo=True`` produced an invalid BERT graph here and renames
every node.  Linear weights are found again by content, not by these names (see rewrite.py).

Memory (results/memory.md): with its weights, the exporter's C++ side holds about three copies of
them for a moment (its ModelProto, the serialized string, the Python bytes) and its Python side
parses the bytes once more.  :func:`export_parts` runs the same export without the weights
(``export_params=False``: the weights become graph inputs) and keeps the exporter's own weight
tensors (``params_dict`` after tracing and constant folding, e.g. the folded Wᵀ of every Linear)
through a hook on the exporter's ``_model_to_graph``; :func:`attach_weights` then turns those
inputs back into initializers, in the exporter's order and encoding, one tensor at a time.  The
result is the ModelProto that ``export_params=True`` writes, byte for byte (``tests/onnx/test_export.py``).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.model.load import LoadedModel

TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")  # [batch, sequence, hidden]; the others [batch, ...]
_EXPORTER = "torch.onnx._internal.torchscript_exporter.utils"  # holds _model_to_graph (torch 2.9+)


@dataclass
class Fp32Parts:
    """The exported graph without its weights, and the weights by initializer name, in the exporter's order."""

    model: object  # onnx.ModelProto; the weights are graph inputs until attach_weights
    weights: dict[str, np.ndarray]  # exporter tensors (parameters or folded) or views (share_linear_weights)


def export_fp32(loaded: LoadedModel, opset: int = 17, external_data_threshold: int = 2_000_000_000):
    """Export ``loaded.model`` and return the ``onnx.ModelProto`` (FP32, dynamic axes, weights inside).

    ``external_data_threshold`` is accepted for the callers' sake: the proto is built in memory at
    any size; only saving it decides on external data.
    """
    return attach_weights(export_parts(loaded, opset))


def attach_weights(parts: Fp32Parts):
    """Move ``parts.weights`` into ``parts.model`` as initializers (emptying the dict) and return the model.

    As the exporter writes them: the graph keeps only the model's own inputs, the initializers
    follow the order of the weight inputs, each with its name, dims, data type and raw data.
    """
    import onnx

    model, weights = parts.model, parts.weights
    inputs = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    for name in list(weights):
        arr = weights.pop(name)
        t = model.graph.initializer.add()
        t.name = name
        t.dims.extend(arr.shape)
        t.data_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.raw_data = arr.tobytes()  # one tensor's bytes at a time; the exporter's tensor goes with ``arr``
        del arr
    return model


def share_linear_weights(parts: Fp32Parts, model) -> int:
    """Replace each folded weight of ``parts`` that is exactly Wᵀ of its ``nn.Linear`` by the view ``W.T``.

    The exporter's folded copies go (the model's own weights stand in: same values, and C-order bytes
    of the view are the folded tensor's bytes).  The Linear is the module of the MatMul that reads the
    weight (``/m/<module path>/MatMul``); a weight is replaced only when equal bit for bit.  Returns
    how many were replaced.
    """
    import torch

    modules = dict(model.named_modules())
    readers = {n.input[1]: n.name for n in parts.model.graph.node if n.op_type == "MatMul" and len(n.input) == 2}
    shared = 0
    for name, arr in list(parts.weights.items()):
        path = readers.get(name, "")
        module = modules.get(path[len("/m/"):-len("/MatMul")].replace("/", ".")) if path.startswith("/m/") \
            and path.endswith("/MatMul") else None
        if not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight.detach().numpy()
        if w.dtype == arr.dtype and w.T.shape == arr.shape and np.array_equal(w.T, arr):
            parts.weights[name] = w.T
            shared += 1
    return shared


def export_parts(loaded: LoadedModel, opset: int = 17) -> Fp32Parts:
    """The FP32 export of ``loaded.model`` with its weights apart (see the module docstring)."""
    import onnx
    import torch

    names = list(loaded.input_names)
    buf = io.BytesIO()
    with _params_hook() as captured:
        torch_export(loaded, buf, opset, export_params=False)
    model = onnx.load_model_from_string(buf.getvalue())
    params = captured.get("params")
    weight_inputs = [i.name for i in model.graph.input if i.name not in names]
    missing = [n for n in weight_inputs if params is None or n not in params]
    if missing:
        raise EdgeqError(f"the exporter's weight {missing[0]!r} was not captured: edgeq's export hooks "
                         f"{_EXPORTER}._model_to_graph, which torch {torch.__version__} does not call; "
                         "use the pinned torch or report this")
    weights = {n: np.ascontiguousarray(params[n].detach().cpu().numpy()) for n in weight_inputs}
    return Fp32Parts(model, weights)


@contextlib.contextmanager
def _params_hook():
    """Keep the ``params_dict`` that the exporter's ``_model_to_graph`` returns (its weights after folding)."""
    import importlib

    captured: dict = {}
    try:
        mod = importlib.import_module(_EXPORTER)
        real = mod._model_to_graph
    except (ImportError, AttributeError):  # another torch: export_parts then names what is missing
        yield captured
        return

    def hooked(*args, **kwargs):
        graph, params, out = real(*args, **kwargs)
        captured["params"] = params
        return graph, params, out

    mod._model_to_graph = hooked
    try:
        yield captured
    finally:
        mod._model_to_graph = real


def torch_export(loaded: LoadedModel, f, opset: int = 17, export_params: bool = True) -> None:
    """``torch.onnx.export`` (TorchScript) of ``loaded.model`` to ``f`` (a path or a buffer), as edgeq configures it."""
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
            f,
            dynamo=False,
            export_params=export_params,
            input_names=names,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )
    loaded.model.eval()
