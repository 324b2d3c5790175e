"""Tests of the source tree's architecture (docs/architecture.md): few modules at the root, no
import circle, imports pointing down the layers, and the public API's names."""

import ast
from pathlib import Path

import misalign

SRC = Path(__file__).resolve().parent
LAYERS = [
    {"runtime"},
    {"config"},
    {"model"},
    {"agents"},
    {"llm"},
    {"api"},
    {"outputs"},
    {"experiments"},
    {"workflows"},
    {"cli"},
]
"""The packages from the bottom up: a module imports only from its own layer or below
(``misalign/__init__`` re-exports the public API and is outside the layers)."""
PUBLIC = {
    "ConfigError",
    "Game",
    "PlayConfig",
    "batch",
    "fit",
    "load_config",
    "parse_config",
    "plot_batch",
    "plot_play",
    "predict",
    "report",
    "setup",
    "simulate",
    "to_json",
}


def _modules() -> dict[str, Path]:
    """Every source module (tests left out), by dotted name."""
    found = {}
    for path in SRC.rglob("*.py"):
        if path.name.endswith("_test.py"):
            continue
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The misalign modules ``path`` imports, anywhere in it (lazy imports count)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # misalign itself
    for k, layer in enumerate(LAYERS):
        if parts[1] in layer:
            return k
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")


def test_the_root_holds_few_modules():
    root = [p.name for p in SRC.glob("*.py") if not p.name.endswith("_test.py")]
    assert len(root) <= 8, sorted(root)


LONG = 500
"""A module longer than this says why it is one module (``Why one module:`` in its docstring)."""


def test_a_long_module_says_why_it_is_one():
    unexplained = [
        name
        for name, path in _modules().items()
        if len(path.read_text().splitlines()) > LONG
        and "Why one module:" not in (ast.get_docstring(ast.parse(path.read_text())) or "")
    ]
    assert unexplained == []


def test_no_module_imports_one_that_imports_it():
    graph = _graph()
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert circles == []


def test_imports_point_down_the_layers():
    upward = []
    for module, imported in _graph().items():
        mine = _layer(module)
        for other in imported:
            theirs = _layer(other)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} -> {other}")
    assert upward == []


def test_the_public_api_keeps_its_names():
    assert set(misalign.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(misalign, name) is not None
