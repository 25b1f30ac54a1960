"""The import rule of docs/ARCHITECTURE.md, read from the source: every project import (top level
and inside functions) goes to the same layer or one before it, and no modules import each other
in a circle. A planted upward import and a planted circle show the check catches both."""
from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

# Lowest first. A module belongs to the longest prefix listed; peers of rank 0 are independent.
LAYERS = {
    "data_pipeline": 0, "kernels": 0,
    "model": 1,
    "pretrain.core": 2,
    "pretrain.tools": 3,
    "pretrain.bench": 4,
    "pretrain.research": 5,
    "pretrain": 6,                      # the command line (__main__) over everything
}
PACKAGES = ("data_pipeline", "kernels", "model", "pretrain")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> tuple[str, int]:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return prefix, LAYERS[prefix]


def import_graph(root: Path) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (``from a import b`` counts as a.b when
    b is a module, else as a)."""
    files = {module_name(root, p): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")
             if "__pycache__" not in p.parts}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = package[: len(package) - (node.level - 1)]
                    base = ".".join(here + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    graph[mod].add(target)
                    break   # the most specific module named
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for mod, targets in graph.items():
        (home, rank) = layer(mod)
        for target in targets:
            (there, target_rank) = layer(target)
            if target_rank > rank or (rank == target_rank == 0 and home != there):
                found.append(f"{mod} (layer {home}) imports {target} (layer {there})")
    return sorted(found)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_tree_imports_one_way_without_circles():
    graph = import_graph(ROOT)
    assert len(graph) > 50, "the project's modules were not found"
    assert upward_imports(graph) == []
    assert circles(graph) == []


def test_a_planted_upward_import_and_circle_are_caught(tmp_path):
    def write(name: str, text: str) -> None:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    for pkg in ("data_pipeline", "kernels", "model", "pretrain", "pretrain/core", "pretrain/tools"):
        write(f"{pkg}/__init__.py", "")
    write("pretrain/core/config.py", "X = 1\n")
    write("kernels/ops.py", "import data_pipeline\n")                       # a peer of rank 0
    write("model/net.py", "def build():\n    from pretrain.core.config import X\n    return X\n")
    write("pretrain/tools/a.py", "from . import b\n")                          # a <-> b
    write("pretrain/tools/b.py", "def f():\n    from pretrain.tools import a\n")
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == [
        "kernels.ops (layer kernels) imports data_pipeline (layer data_pipeline)",
        "model.net (layer model) imports pretrain.core.config (layer pretrain.core)"]
    assert circles(graph) == [["pretrain.tools.a", "pretrain.tools.b"]]
