"""edgeq.onnx.graph: the proto bookkeeping shared by the rewrites and convert (consumers, names, metadata, opset)."""

import onnx
from onnx import TensorProto, helper

from edgeq.onnx.graph import (
    MS_DOMAIN,
    attr,
    consumers,
    ensure_opset,
    metadata,
    set_meta,
    unique_names,
)


def small_model():
    """x → MatMul(w) → h → Add(h, b) → y (output); h is also an output; one unnamed and two same-named nodes."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["y"], name="dup"),
        helper.make_node("Relu", ["y"], ["r"], name="dup"),
        helper.make_node("Neg", ["r"], ["z"]),
        helper.make_node("Gather", ["w", "x"], ["g"], name="gather", axis=1),
    ]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("h", "z", "g")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], vi)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_consumers_lists_nodes_in_order_and_graph_outputs_as_none():
    m = small_model()
    uses = consumers(m.graph)
    assert [n.name for n in uses["w"]] == ["mm", "gather"]
    assert [n and n.name for n in uses["h"]] == ["dup", None]  # read by the Add, and a graph output
    assert len(uses["b"]) == 1 and uses["z"] == [None]
    assert "g_unused" not in uses


def test_unique_names_excludes_empty_and_shared_names():
    assert unique_names(small_model().graph) == {"mm", "gather"}


def test_set_meta_replaces_in_place_and_appends_in_first_set_order():
    m = small_model()
    set_meta(m, "b.key", "1")
    set_meta(m, "a.key", "2")
    set_meta(m, "b.key", "3")  # replaced where it is, not moved to the end
    assert [(p.key, p.value) for p in m.metadata_props] == [("b.key", "3"), ("a.key", "2")]
    assert metadata(m) == {"b.key": "3", "a.key": "2"}


def test_set_meta_bytes_equal_a_plain_append():
    """The written bytes: a new key via set_meta serializes exactly like appending the entry by hand."""
    a, b = small_model(), small_model()
    for key, value in (("edgeq.layers", "[]"), ("edgeq.version", "0")):
        set_meta(a, key, value)
        b.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    assert a.SerializeToString() == b.SerializeToString()


def test_ensure_opset_adds_once_and_keeps_an_existing_version():
    m = small_model()
    ensure_opset(m)
    ensure_opset(m)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 17), (MS_DOMAIN, 1)]
    m.opset_import[1].version = 3
    ensure_opset(m, MS_DOMAIN, 1)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 17), (MS_DOMAIN, 3)]


def test_attr_reads_a_value_or_the_default():
    gather = small_model().graph.node[4]
    assert attr(gather, "axis", 0) == 1
    assert attr(gather, "batch_dims", 0) == 0
