"""Fixtures and marker rules of the suite.

Markers mean what they say, and a hook holds them to it (before any fixture runs):

* ``real``   ⇔ the test reads ../shared: it requests ``shared_path`` (directly or through a fixture
  such as ``rte_k256``).  A test with one but not the other fails.
* ``deploy`` ⇔ the test needs the deploy extra or Node: it requests ``optimum_ort``,
  ``sentence_transformers`` or ``node``.
* ``bigmodel`` ⇔ the test converts the real all-mpnet-base-v2 (438 MB): it requests ``mpnet_dir``.  Opt-in:
  skipped (under CI too) unless ``EDGEQ_MPNET_DIR`` names the folder (``python tools/fetch_mpnet.py``).

Availability is checked in the same hook, so a test skips *before* any conversion runs.  Under
``CI`` (set by ``.ci/run``) a missing ../shared, optimum, node or tests/node/node_modules fails
instead of skipping.  ``pytest -m "not real and not deploy"`` is the fast subset.

Tiny random models come from the session-scoped ``tiny_model`` factory (built once per argument set,
shared read-only; pass ``copy_to=`` for a private copy to edit).  Real-model conversions used by
several files are session fixtures here (``rte_k256``), converted once per session.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO, SHARED, make_tiny_model, model_type_of

# PyTorch's OpenMP workers sleep instead of spinning while they wait (set before torch is imported).
# On a busy 2-core machine a spinning worker stalls the one it waits for: measured at load ~5 with 2
# threads, torch.linalg.svd of a 128x64 matrix took 60-170 ms spinning, 1.8-2.7 ms passive (1.1-2.0 ms
# with 1 thread), and the svd plan of the RTE model 17-65 s instead of ~5 s.  Results are unchanged.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

NODE_DIR = REPO / "tests" / "node"
REAL_FIXTURE = "shared_path"
DEPLOY_FIXTURES = ("optimum_ort", "sentence_transformers", "node")
BIG_FIXTURE = "mpnet_dir"
MPNET_ENV = "EDGEQ_MPNET_DIR"


def unavailable(reason: str):
    """Skip locally; under CI the environment is expected to be complete, so fail."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI needs it: ../shared beside the repo, the deploy extra, node + tests/node)",
                    pytrace=False)
    pytest.skip(reason)


def _deploy_missing(name: str) -> str | None:
    if name == "optimum_ort":
        try:
            found = importlib.util.find_spec("optimum.onnxruntime") is not None
        except ImportError:
            found = False
        return None if found else "optimum.onnxruntime is not installed (pip install -e '.[deploy]')"
    if name == "sentence_transformers":
        found = importlib.util.find_spec("sentence_transformers") is not None
        return None if found else "sentence-transformers is not installed (pip install -e '.[deploy]')"
    if shutil.which("node") is None:
        return "node is not on PATH"
    for pkg in ("onnxruntime-node", "onnxruntime-web"):
        if not (NODE_DIR / "node_modules" / pkg).is_dir():
            return f"tests/node/node_modules/{pkg} is missing (cd tests/node && npm ci --ignore-scripts)"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Enforce the marker rules, then skip (or fail under CI) before any fixture does work."""
    uses = set(getattr(item, "fixturenames", ()))
    wants_real, marked_real = REAL_FIXTURE in uses, item.get_closest_marker("real") is not None
    deploy_needs = [f for f in DEPLOY_FIXTURES if f in uses]
    marked_deploy = item.get_closest_marker("deploy") is not None
    if wants_real != marked_real:
        pytest.fail(f"{item.nodeid}: " + ("reads ../shared (shared_path) but is not marked real; add @pytest.mark.real"
                                          if wants_real else "is marked real but does not read ../shared through "
                                          "the shared_path fixture; drop the marker or request the fixture"),
                    pytrace=False)
    if bool(deploy_needs) != marked_deploy:
        pytest.fail(f"{item.nodeid}: " + (f"needs {', '.join(deploy_needs)} but is not marked deploy; add "
                                          "@pytest.mark.deploy" if deploy_needs else "is marked deploy but requests "
                                          "none of optimum_ort, sentence_transformers, node"), pytrace=False)
    wants_big, marked_big = BIG_FIXTURE in uses, item.get_closest_marker("bigmodel") is not None
    if wants_big != marked_big:
        pytest.fail(f"{item.nodeid}: " + ("requests mpnet_dir but is not marked bigmodel; add @pytest.mark.bigmodel"
                                          if wants_big else "is marked bigmodel but does not request mpnet_dir"),
                    pytrace=False)
    if wants_big and not os.environ.get(MPNET_ENV):
        pytest.skip(f"opt-in: set {MPNET_ENV} to the all-mpnet-base-v2 folder (python tools/fetch_mpnet.py)")
    if wants_real and not SHARED.is_dir():
        unavailable(f"{SHARED} is missing")
    for name in deploy_needs:
        missing = _deploy_missing(name)
        if missing:
            unavailable(missing)


@pytest.fixture(autouse=True)
def _no_implicit_shared(request, monkeypatch, tmp_path_factory):
    """Outside ``real`` tests the ../shared GLUE default (EDGEQ_GLUE_DIR unset) points nowhere."""
    if request.node.get_closest_marker("real") is None:
        monkeypatch.setenv("EDGEQ_GLUE_DIR", str(tmp_path_factory.getbasetemp() / "no-glue-outside-real-tests"))


@pytest.fixture(autouse=True)
def _torch_threads(request):
    """PyTorch's intra-op thread count: 1 during tests not marked ``real``, and given back after every test.

    Given back: some code under test sets it for the rest of the process (``evaluate_path(threads=1)``
    does), which made every later real-model conversion single-threaded (measured at load ~1: the full
    RTE ``validate`` 39 s with 1 thread, 26 s with 2).  One thread for tiny models: their matrices gain
    nothing from a second one (see OMP_WAIT_POLICY above for what it can cost).  Tests that set the
    count themselves still can.
    """
    import torch

    before = torch.get_num_threads()
    if request.node.get_closest_marker("real") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- ../shared, optimum, node


@pytest.fixture(scope="session")
def shared_path():
    """``shared_path(*parts)``: a path under ../shared (skips, or fails under CI, when missing).

    Only tests marked ``real`` may request it (see :func:`pytest_runtest_setup`).
    """
    def get(*parts: str) -> Path:
        p = SHARED.joinpath(*parts)
        if not p.exists():
            unavailable(f"{p} is missing")
        return p
    return get


@pytest.fixture(scope="session")
def mpnet_dir() -> Path:
    """The all-mpnet-base-v2 folder named by EDGEQ_MPNET_DIR; only tests marked ``bigmodel``."""
    p = Path(os.environ[MPNET_ENV])
    if not (p / "model.safetensors").is_file():
        pytest.fail(f"{MPNET_ENV}={p} holds no model.safetensors; fetch it with python tools/fetch_mpnet.py --dest {p}",
                    pytrace=False)
    return p


@pytest.fixture(scope="session")
def optimum_ort():
    """``optimum.onnxruntime`` (the deploy extra); only tests marked ``deploy``."""
    return importlib.import_module("optimum.onnxruntime")


@pytest.fixture(scope="session")
def sentence_transformers():
    """``sentence_transformers`` (the deploy extra); only tests marked ``deploy``."""
    return importlib.import_module("sentence_transformers")


@pytest.fixture(scope="session")
def node() -> str:
    """The node executable, with tests/node/node_modules installed; only tests marked ``deploy``."""
    return shutil.which("node")


# ---------------------------------------------------------------- tiny random models


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(arch=..., *, dtype, num_labels, hidden, seed, copy_to=None) -> Path``.

    Each argument set is built once per session and shared: treat it as read-only (checked at the
    end of the session).  ``copy_to=path`` returns a private copy at ``path`` to edit.
    """
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[tuple, tuple[Path, str]] = {}

    def get(arch: str = "BertForSequenceClassification", model_type: str | None = None, *,
            copy_to: Path | None = None, **kw) -> Path:
        key = (arch, model_type or model_type_of(arch), tuple(sorted(kw.items())))
        if key not in built:
            path = make_tiny_model(root / f"{len(built)}-{arch}", arch, key[1], **kw)
            built[key] = path, _digest(path)
        path = built[key][0]
        if copy_to is None:
            return path
        shutil.copytree(path, copy_to)
        return copy_to

    yield get
    changed = [str(path) for path, digest in built.values() if _digest(path) != digest]
    assert not changed, f"a test edited a shared tiny model (use tiny_model(..., copy_to=tmp_path / ...)): {changed}"


@pytest.fixture(scope="session")
def tiny_bert(tiny_model) -> Path:
    """The default tiny BertForSequenceClassification (hidden 48, 2 labels, seed 0); read-only."""
    return tiny_model()


# ---------------------------------------------------------------- real models, converted once per session


@dataclass(frozen=True)
class Converted:
    model_dir: Path
    data: Path
    out: Path  # the output folder (Hugging Face layout)
    onnx: Path
    report: dict


@pytest.fixture(scope="session")
def rte_k256(shared_path, tmp_path_factory) -> Converted:
    """The shared MiniLM RTE model at k=256 as a Hugging Face folder with ``--ort-format``, checked by
    convert on the first 32 RTE dev examples: the one conversion behind tests/pipeline/test_real_models.py
    (which validates it on the full dev set with ``edgeq validate``) and the RTE half of
    tests/pipeline/test_deploy.py.  Read-only.

    (Not converted on the full dev set: with ``--ort-format`` convert also runs the .ort check on every
    example, two more passes than the whole conversion costs at 32.)"""
    import json

    from click.testing import CliRunner

    from edgeq.cli import main

    model_dir = shared_path("models", "minilm-l6-rte")  # availability first: skip before converting
    dev = shared_path("data", "glue", "RTE", "dev.tsv")
    out = tmp_path_factory.mktemp("rte-k256") / "minilm-l6-rte-int4"
    res = CliRunner().invoke(main, ["convert", "-q", "--k", "256", "--ort-format", "--data", str(dev), "--limit", "32",
                                    str(model_dir), str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return Converted(model_dir, dev, out, out / "model.onnx", json.loads((out / "edgeq_report.json").read_text()))
