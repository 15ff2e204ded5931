"""The FP32 export without serialized weights (edgeq.onnx.export.export_parts + attach_weights) is the
exporter's own file, byte for byte, on every architecture; and ONNX Runtime reading the weights in place
(edgeq.onnx.session.session_with_weights) computes what a session of that file computes."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest

from edgeq.model.load import load_model
from edgeq.onnx.export import attach_weights, export_parts, torch_export
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
    assert [i.name for i in parts.model.graph.input] == list(loaded.input_names) + list(parts.weights)
    assert not parts.model.graph.initializer

    batches = reference_outputs(loaded, None, None).batches
    got = run_onnx(session_with_weights(parts.model, parts.weights, 1), batches)
    model = attach_weights(parts)
    assert parts.weights == {}  # moved, not copied
    assert model.SerializeToString() == expected.SerializeToString()
    want = run_onnx(make_session(buf.getvalue(), 1), batches)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
