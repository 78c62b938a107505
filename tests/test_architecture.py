"""The package-level import graph (module-level and function-level imports alike) has no cycles, and library
code does not depend on the CLI."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "vlkit"


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PKG / parts[1]).is_dir() else "<top>"


def import_graph() -> dict[str, dict[str, set[str]]]:
    """{package: {imported package: files}} over every import statement under vlkit/."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if f.name == "__init__.py" else rel.parts)
        src = _package(module)
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")
                    keep = len(base) - node.level + (1 if f.name == "__init__.py" else 0)
                    target = ".".join(base[:keep] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if t.startswith("vlkit.") and _package(t) not in (src, "<top>"):
                    graph[src][_package(t)].add(str(f.relative_to(PKG)))
    return graph


def _cycles(graph) -> set[frozenset]:
    def reaches(a, b):
        seen, stack = set(), [a]
        while stack:
            x = stack.pop()
            if x == b:
                return True
            if x not in seen:
                seen.add(x)
                stack.extend(graph.get(x, {}))
        return False

    return {frozenset({a, b}) for a in graph for b in graph[a] if reaches(b, a)}


def test_no_package_cycles():
    found = _cycles(import_graph())
    assert not found, f"import cycles between packages: {sorted(map(sorted, found))}"


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b": {"x"}}, "b": {"a": {"y"}}}) == {frozenset({"a", "b"})}
    assert _cycles({"a": {"b": {"x"}}, "b": {}}) == set()


def test_library_does_not_import_the_cli():
    graph = import_graph()
    users = {src for src, deps in graph.items() if "cli" in deps and src not in ("cli", "<top>")}
    assert not users, f"library packages importing vlkit.cli: {sorted(users)}"
