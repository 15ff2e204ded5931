"""The suite's own rules (tests/conftest.py): markers say what a test needs, and it is enforced."""

from __future__ import annotations

import ast

import pytest

from tests import conftest
from tests.helpers import REPO


class FakeItem:
    def __init__(self, fixtures=(), markers=()):
        self.nodeid = "tests/fake.py::test_fake"
        self.fixturenames = list(fixtures)
        self._markers = set(markers)

    def get_closest_marker(self, name):
        return name if name in self._markers else None


def setup(item):
    conftest.pytest_runtest_setup(item)


@pytest.mark.parametrize("fixtures,markers,message", [
    (["shared_path"], [], "not marked real"),
    (["rte_k256", "shared_path"], [], "not marked real"),  # a fixture reading ../shared counts too
    ([], ["real"], "is marked real but does not read"),
    (["node"], [], "not marked deploy"),
    (["optimum_ort"], [], "not marked deploy"),
    ([], ["deploy"], "is marked deploy but"),
    (["mpnet_dir"], [], "not marked bigmodel"),
    ([], ["bigmodel"], "is marked bigmodel but"),
], ids=["shared-unmarked", "via-fixture-unmarked", "real-unused", "node-unmarked", "optimum-unmarked",
        "deploy-unused", "mpnet-unmarked", "bigmodel-unused"])
def test_marker_mismatch_fails_before_setup(fixtures, markers, message):
    with pytest.raises(pytest.fail.Exception, match=message):
        setup(FakeItem(fixtures, markers))


def test_fixture_closure_is_what_the_hook_sees(tiny_bert, request):
    """pytest lists fixtures requested through other fixtures in ``fixturenames`` (what the rule relies on)."""
    assert {"tiny_bert", "tiny_model"} <= set(request.node.fixturenames)
    assert "shared_path" not in request.node.fixturenames


@pytest.mark.parametrize("ci,outcome", [("", pytest.skip.Exception), ("1", pytest.fail.Exception)],
                         ids=["local-skips", "ci-fails"])
def test_missing_resources_skip_locally_and_fail_under_ci(monkeypatch, tmp_path, ci, outcome):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(conftest, "SHARED", tmp_path / "no-shared")
    with pytest.raises(outcome, match="no-shared is missing"):
        setup(FakeItem(["shared_path"], ["real"]))
    monkeypatch.setattr(conftest.shutil, "which", lambda name: None)
    with pytest.raises(outcome, match="node is not on PATH"):
        setup(FakeItem(["node"], ["deploy"]))
    monkeypatch.setattr(conftest, "NODE_DIR", tmp_path)
    monkeypatch.setattr(conftest.shutil, "which", lambda name: "/usr/bin/node")
    with pytest.raises(outcome, match="node_modules/onnxruntime-node is missing"):
        setup(FakeItem(["node"], ["deploy"]))


def test_no_implicit_glue_default_outside_real_tests():
    import os

    from edgeq.model.texts import default_glue_dir

    assert not default_glue_dir().exists()  # EDGEQ_GLUE_DIR points nowhere
    assert os.environ["EDGEQ_GLUE_DIR"].endswith("no-glue-outside-real-tests")


def _shared_references(tree):
    """``SHARED``, ``x / "shared"`` and string constants holding ``../shared`` (docstrings aside)."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and n.id == "SHARED" or isinstance(n, ast.Attribute) and n.attr == "SHARED":
            yield "SHARED"
        elif isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div) and getattr(n.right, "value", None) == "shared":
            yield '/ "shared"'
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and "../shared" in n.value \
                and id(n) not in docstrings:
            yield n.value


def test_only_the_fixture_reaches_shared():
    """No test module builds a ../shared path itself (that would bypass the real marker)."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        if path.name in ("conftest.py", "helpers.py", "test_markers.py") or "node_modules" in path.parts:
            continue
        offenders += [
            f"{path.relative_to(REPO)}: {ref}" for ref in _shared_references(ast.parse(path.read_text("utf-8")))
        ]
    assert not offenders, offenders
    # the check itself finds what it should
    found = list(_shared_references(ast.parse('from tests.helpers import SHARED\nx = SHARED / "models"\n'
                                              'y = REPO.parent / "shared"\nz = Path("../shared/data")')))
    assert sorted(found) == ['../shared/data', '/ "shared"', 'SHARED'], found


@pytest.mark.parametrize("ci", ["", "1"])
def test_bigmodel_is_opt_in_even_under_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    monkeypatch.delenv(conftest.MPNET_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="opt-in: set EDGEQ_MPNET_DIR"):
        setup(FakeItem(["mpnet_dir"], ["bigmodel"]))
