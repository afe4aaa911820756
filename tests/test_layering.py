"""The package's layering, read from its source with ast: no import cycle among bn_onnx's
modules (imports at module level and inside functions both count; `if TYPE_CHECKING:` imports
do not run, but a reader follows them too, so a test of their own counts them as well), and the
numeric core never imports torch: none of its modules imports torch anywhere, and nothing it
imports at module level does, directly or through other bn_onnx modules (a function of it may
call into `bn_onnx.checkpoint`'s numpy reader, whose module imports torch only inside the
functions that build a network)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bn_onnx"
TORCH_FREE = (
    "bn_onnx.fold",
    "bn_onnx.runtime",
    "bn_onnx.compare",
    "bn_onnx.verify",
    "bn_onnx.float64_kernels",
    "bn_onnx.checkpoint_forward",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(
    path: Path, modules: set[str], top_only: bool = False, type_checking: bool = False
) -> set[str]:
    """The modules `path` imports when it runs (resolved to bn_onnx modules where they are
    one; other top-level names such as "torch" kept as they are); `top_only`: only those it
    imports at module level, not inside a function; `type_checking`: those under
    `if TYPE_CHECKING:` too."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not type_checking:
            for child in node.orelse:
                visit(child)
            return
        if top_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            for alias in node.names:  # `from bn_onnx.fold import cleanup` imports a module
                if f"{base}.{alias.name}" in modules:
                    found.add(f"{base}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


@functools.cache
def _graph(top_only: bool = False, type_checking: bool = False) -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {}
    for name, path in paths.items():
        edges = set()
        for imported in _imports(path, modules, top_only, type_checking):
            # importing a.b.c runs a and a.b too
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                    edges.add(prefix)
            if not imported.startswith("bn_onnx"):
                edges.add(parts[0])
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_checker_finds_a_cycle_and_a_package_parent() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_bn_onnx_modules() -> None:
    assert _cycles(_graph()) == []


def test_no_import_cycle_even_through_type_checking_imports() -> None:
    # A cycle only a type checker follows still ties the modules together for a reader.
    assert _cycles(_graph(type_checking=True)) == []


def test_the_checker_sees_type_checking_imports() -> None:
    context = PACKAGE / "fold" / "rules.py"  # imports FoldContext for type checking only
    modules = set(_graph())
    assert "bn_onnx.fold.context" not in _imports(context, modules)
    assert "bn_onnx.fold.context" in _imports(context, modules, type_checking=True)


@pytest.mark.parametrize("layer", TORCH_FREE)
def test_the_numeric_core_never_imports_torch(layer: str) -> None:
    inside = [m for m in _graph() if m == layer or m.startswith(layer + ".")]
    assert inside, layer
    anywhere = _graph()
    assert not [m for m in inside if {"torch", "torchvision"} & anywhere[m]]
    graph = _graph(top_only=True)
    reached, todo = set(), list(inside)
    while todo:  # what the layer imports, directly or through other bn_onnx modules
        module = todo.pop()
        if module in reached:
            continue
        reached.add(module)
        todo.extend(graph.get(module, ()))
    assert not {"torch", "torchvision"} & reached, sorted(
        m for m in reached if m in graph and {"torch", "torchvision"} & graph[m]
    )
