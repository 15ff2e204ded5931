"""The package's shape: no import cycle among edgeq's modules, layers import downward, files fit one sitting.

Every ``import``/``from … import`` counts, including those inside functions (lazy imports are
still dependencies); an edge goes to the module named, or to the package when the name is not a
module of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgeq"
MAX_LINES = 350
# modules allowed past MAX_LINES, with the reason
LONG_MODULES: dict[str, str] = {}
# top to bottom; a module never imports a layer above its own.  Below the last: the pure core
# (edgeq.config, edgeq.errors, edgeq.quant, edgeq.saliency), which imports none of these.
LAYERS = ["edgeq.cli", "edgeq.research", "edgeq.bench", "edgeq.pipeline", "edgeq.evaluation", "edgeq.onnx",
          "edgeq.model"]
# the only upward edges, each with its reason
ALLOWED_UPWARD = {
    ("edgeq.__main__", "edgeq.cli"): "the `python -m edgeq` entry point",
    ("edgeq.config", "edgeq.onnx.corrections"): "the config validates --correction against its registry "
                                                "(corrections imports only edgeq.quant)",
    ("edgeq.config", "edgeq.onnx.storage"): "the config validates --storage/--kernel against that module's names "
                                            "(storage imports only edgeq.quant and edgeq.onnx.graph)",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """edgeq module → the edgeq modules it imports (anywhere in the file)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import edgeq.x.y` names a module; attributes fall back
                    t = t.rpartition(".")[0]
                if t.startswith("edgeq") and t != name:
                    graph[name].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert find_cycles(import_graph()) == []


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def _layer(module: str) -> int | None:
    return next((i for i, p in enumerate(LAYERS) if module == p or module.startswith(p + ".")), None)


def test_layers_import_downward():
    """A module never imports a layer above its own (e.g. onnx/ never imports pipeline/ or cli/)."""
    upward = []
    for src, targets in import_graph().items():
        ls = _layer(src)
        for t in targets:
            lt = _layer(t)
            if lt is not None and (ls is None or lt < ls) and (src, t) not in ALLOWED_UPWARD:
                upward.append(f"{src} -> {t}")
    assert upward == []


def test_modules_fit_one_sitting():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert set(long) <= set(LONG_MODULES), {m: n for m, n in long.items() if m not in LONG_MODULES}


def test_cli_imports_no_heavy_library():
    """`edgeq --help` must stay fast: importing the CLI pulls in neither torch nor transformers nor onnxruntime."""
    import subprocess
    import sys

    code = ("import sys, edgeq.cli; heavy = [m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
