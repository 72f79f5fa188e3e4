"""The house's shape, checked from the source: no import circle among the package's or the
benchmarks' modules (imports inside functions counted too), and the serving commands leave the
run's kind and fusion to the run (issue 40)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT


def _modules(*packages: str) -> dict[str, Path]:
    found = {}
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            if "work" in path.relative_to(ROOT).parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that `path` imports anywhere (at its top or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                      for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name in modules}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return circles


@pytest.mark.parametrize("package", ["pipeline", "bench"])
def test_no_import_circle(package: str) -> None:
    modules = _modules(package)
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    assert _circles(graph) == []


def test_the_circle_finder_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", ["serving/predict.py", "serving/export.py", "serving/agreement.py",
                                    "serving/formats/keras_file.py", "serving/formats/saved_model.py",
                                    "serving/formats/tflite.py", "serving/formats/onnx.py"])
def test_serving_leaves_the_runs_kind_and_fusion_to_the_run(module: str) -> None:
    """predict and export never test what kind a run is or whether it fuses caches: Run.classifier,
    Run.caches and Run.images decide (export.json records the kind, as data)."""
    tree = ast.parse((ROOT / "pipeline" / module).read_text(encoding="utf-8"))
    tested = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute)
              and node.attr in ("kind", "fused", "fused_features") and isinstance(node.ctx, ast.Load)]
    assert tested == [], f"pipeline/{module} reads a run's kind or fusion at lines {tested}"


def test_evaluate_leaves_the_runs_kind_and_fusion_to_the_run() -> None:
    tree = ast.parse((ROOT / "pipeline" / "training" / "train.py").read_text(encoding="utf-8"))
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("evaluate")]
    assert {f.name for f in functions} == {"evaluate_run", "evaluate_with_views"}
    tested = [(f.name, node.lineno) for f in functions for node in ast.walk(f) if isinstance(node, ast.Attribute)
              and node.attr in ("kind", "fused", "fused_features")]
    assert tested == []
