"""The graph bookkeeping shared by the rewrites (Linears, embeddings) and ``convert``, on ``onnx`` protos.

* :func:`consumers`: value name → the nodes that read it (``None`` for a graph output), so
  "b has one consumer" is ``len(uses[b]) == 1`` and a value is private to the node that reads it.
* :func:`unique_names`: node names that occur once; the rewrites key nodes by name and refuse
  (with a reason) a candidate whose name is empty or shared.  ONNX Runtime refuses a graph with
  two nodes of one name ("two nodes with same node name"), and the exporter names every node.
* :func:`set_meta` / :func:`metadata`: ``metadata_props`` by key; a new key is appended, so the
  keys stay in the order they were first set (the written bytes depend on that order).
* :func:`ensure_opset`: add ``com.microsoft`` (version 1) to ``opset_import`` unless present.
"""

from __future__ import annotations

import os
from collections import Counter

import onnx
from onnx import helper

MS_DOMAIN = "com.microsoft"


def group_name(layers: list[str]) -> str:
    """``a.b.query``, ``a.b.key``, ``a.b.value`` → ``a.b.query+key+value``."""
    prefix = os.path.commonprefix(layers)
    prefix = prefix[: prefix.rfind(".") + 1]
    return prefix + "+".join(name[len(prefix):] for name in layers)


def attr(node: onnx.NodeProto, name: str, default):
    """The value of ``node``'s attribute ``name``, or ``default`` when it is not set."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto | None]]:
    """Value name → the nodes reading it, in graph order, plus ``None`` when it is a graph output."""
    uses: dict[str, list[onnx.NodeProto | None]] = {}
    for n in graph.node:
        for i in n.input:
            uses.setdefault(i, []).append(n)
    for o in graph.output:
        uses.setdefault(o.name, []).append(None)
    return uses


def unique_names(graph: onnx.GraphProto) -> set[str]:
    """Names carried by exactly one node (the empty name never counts)."""
    return {name for name, c in Counter(n.name for n in graph.node).items() if name and c == 1}


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def set_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set ``key`` in place if present, else append it (first-set order is kept)."""
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def ensure_opset(model: onnx.ModelProto, domain: str = MS_DOMAIN, version: int = 1) -> None:
    """Import ``domain`` at ``version`` unless the model already imports it (at any version)."""
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))
