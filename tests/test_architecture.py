"""The code's shape that docs/architecture.md promises: modules of at most 500 lines, functions of
at most 60 (the CLI's option list aside), and no import cycles between the library's modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "onnxprune"
SOURCES = sorted(LIBRARY.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """The onnxprune modules `path` imports when it is imported (not inside functions or under
    TYPE_CHECKING), resolved to module names."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if (LIBRARY.parent / (candidate.replace(".", "/") + ".py")).exists() else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("onnxprune")}


def test_no_module_over_500_lines():
    long = {module_name(p): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


@pytest.mark.parametrize("folder", ["onnxprune", "cli"])
def test_no_function_over_60_lines(folder):
    long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


def test_no_import_cycles():
    graph = {module_name(p): runtime_imports(p) for p in SOURCES}
    cycles, done, stack = [], set(), []

    def visit(module: str) -> None:
        if module in stack:
            cycles.append(" -> ".join([*stack[stack.index(module) :], module]))
            return
        if module in done:
            return
        stack.append(module)
        for imported in sorted(graph.get(module, ())):
            # a package's __init__ importing its own modules is how registries fill, not a cycle
            if not imported.startswith(module + "."):
                visit(imported)
        stack.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert cycles == []


def test_the_checker_finds_a_cycle(tmp_path):
    # the test above can fail: two modules importing each other are found
    assert "onnxprune.pipeline" in runtime_imports(LIBRARY / "sweeps.py")
    assert "onnxprune.job" in runtime_imports(LIBRARY / "searches.py")
