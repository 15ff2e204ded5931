"""The FP32 export without serialized weights (edgeq.onnx.export.export_parts + attach_weights) is the
exporter's own file, byte for byte, on every architecture, also with the folded Linear weights replaced by
views of the model's (share_linear_weights); ONNX Runtime given the arrays as external data
(edgeq.onnx.session.session_with_weights) computes what a session of that file computes; and convert's
carry_planned gives the PyTorch model its Ŵ in place."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest

from edgeq.model.load import load_model
from edgeq.onnx.export import attach_weights, export_parts, share_linear_weights, torch_export
from edgeq.onnx.session import make_session, session_with_weights
from edgeq.pipeline.convert import reference_outputs
from edgeq.pipeline.parity import run_onnx
from tests.helpers import TINY_ARCHS

# every model type once, both heads among them (the export of each is the slow part)
CASES = [a for a in TINY_ARCHS if a[0].endswith("Model") == (a[1] in ("distilbert", "xlm-roberta", "mpnet"))]


@pytest.mark.parametrize("arch,model_type", CASES)
def test_parts_rebuild_the_exporters_file_and_session(tiny_model, arch, model_type):
    loaded = load_model(tiny_model(arch, model_type))
    buf = io.BytesIO()
    torch_export(loaded, buf, export_params=True)  # torch's own export, weights serialized by its C++ side
    expected = onnx.load_model_from_string(buf.getvalue())

    parts = export_parts(loaded)
    assert parts.weights and all(a.flags.c_contiguous for a in parts.weights.values())
    params = [p.detach().numpy() for p in loaded.model.parameters()]
    folded = {n for n, a in parts.weights.items() if not any(np.shares_memory(a, p) for p in params)}
    assert share_linear_weights(parts, loaded.model) == len(folded) > 0  # every folded weight is a Linear's Wᵀ
    assert all(any(np.shares_memory(parts.weights[n], p) for p in params) for n in folded)  # now views of W

    batches = reference_outputs(loaded, None, None).batches
    got = run_onnx(session_with_weights(parts.model, parts.weights, 1), batches)
    model = attach_weights(parts)
    assert parts.weights == {}  # moved, not copied
    assert model.SerializeToString() == expected.SerializeToString()
    want = run_onnx(make_session(buf.getvalue(), 1), batches)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_carry_planned_gives_the_model_its_w_hat_in_place_ties_included(tiny_model):
    from edgeq.pipeline.parity import carry_planned, reference_model, run_torch

    loaded = load_model(tiny_model("BertModel", "bert"))
    modules = dict(loaded.model.named_modules())
    query, key = "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key"
    modules[key].weight = modules[query].weight  # a tied pair: one Ŵ for both
    rng = np.random.default_rng(0)
    planned = {n: (w + rng.normal(size=w.shape)).astype(np.float32)
               for n, w in loaded.linear_weights().items() if n != key}
    batches = reference_outputs(loaded, None, None).batches
    want = run_torch(reference_model(loaded, planned), loaded, batches)
    carry_planned(loaded, planned)
    for name, w_hat in planned.items():
        assert np.shares_memory(modules[name].weight.detach().numpy(), w_hat)  # Ŵ itself, no copy
    assert modules[key].weight is modules[query].weight
    got = run_torch(loaded.model, loaded, batches)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_export_parts_refuses_a_torch_whose_exporter_it_cannot_hook(tiny_model, monkeypatch):
    from edgeq.errors import EdgeqError
    from edgeq.onnx import export

    loaded = load_model(tiny_model("BertModel", "bert"))
    monkeypatch.setattr(export, "_EXPORTER", "torch.onnx._no_such_exporter")  # as if torch had moved it
    with pytest.raises(EdgeqError, match=r"was not captured: .*_no_such_exporter\._model_to_graph"):
        export.export_parts(loaded)
