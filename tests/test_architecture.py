"""The package-level import graph (module-level and function-level imports alike) has no cycles, library
code does not depend on the CLI, and no module outside vlkit/world reaches the embedded world."""
from __future__ import annotations

import ast
import re
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


WORLD = "vlkit.world"
WORLD_NAME = re.compile(r"vlkit\.world(\.\w+)*")


def _module_of(f: Path, root: Path = PKG) -> str:
    rel = f.relative_to(root.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if f.name == "__init__.py" else rel.parts)


def _resolve(module: str, is_init: bool, node: ast.ImportFrom) -> list[str]:
    if node.level:
        base = module.split(".")
        keep = len(base) - node.level + (1 if is_init else 0)
        target = ".".join(base[:keep] + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target, *(f"{target}.{a.name}" for a in node.names)]


def world_uses(root: Path = PKG) -> list[str]:
    """Every place outside vlkit/world that reaches vlkit.world: an import statement (module level or inside a
    function), a string naming the module (importlib.import_module, __import__, a plugin list), or the
    attribute `vlkit.world`. The plugin manager's BUILTIN_PLUGINS, which loads the world as a plugin through
    the hooks, is the one allowed place."""
    found = []
    for f in sorted(root.rglob("*.py")):
        module = _module_of(f, root)
        if module == WORLD or module.startswith(WORLD + "."):
            continue
        tree = ast.parse(f.read_text(encoding="utf-8"))
        allowed: set[int] = set()
        if module == "vlkit.plugins":
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "BUILTIN_PLUGINS"
                                                        for t in node.targets):
                    allowed |= {id(c) for c in ast.walk(node.value)}
        where = f.relative_to(root.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(module, f.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in allowed:
                targets = [node.value.strip()] if WORLD_NAME.fullmatch(node.value.strip()) else []
            elif isinstance(node, ast.Attribute) and node.attr == "world" and getattr(node.value, "id", None) == "vlkit":
                targets = [WORLD]
            else:
                continue
            for t in targets:
                if t == WORLD or t.startswith(WORLD + "."):
                    found.append(f"{where}:{node.lineno}: {t}")
                    break
    return found


def test_no_production_module_imports_the_world():
    found = world_uses()
    assert not found, "modules outside vlkit/world reach the world (use the plugin registry):\n" + "\n".join(found)


def test_world_finder_sees_every_form(tmp_path):
    pkg = tmp_path / "vlkit"
    (pkg / "world").mkdir(parents=True)
    (pkg / "data").mkdir()
    (pkg / "world" / "__init__.py").write_text("from ..data import x\n")
    (pkg / "plugins.py").write_text('BUILTIN_PLUGINS = ("vlkit.world.plugin",)\nOTHER = "vlkit.world"\n')
    (pkg / "data" / "a.py").write_text(
        "import importlib\nimport vlkit\nfrom .. import world\n\n"
        "def f():\n    from ..world.tasks import generate\n    import vlkit.world.io\n"
        "    importlib.import_module('vlkit.world')\n    return vlkit.world\n")
    found = world_uses(pkg)
    assert sorted(int(line.split(": ", 1)[0].rsplit(":", 1)[1]) for line in found if "a.py" in line) == [
        3, 6, 7, 8, 9]
    assert [line for line in found if "plugins.py" in line] == ["vlkit/plugins.py:2: vlkit.world"]


def _third_party_importers(name: str) -> set[str]:
    """Files under vlkit/ that import the third-party package `name` (module or function level)."""
    found = set()
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(m == name or m.startswith(name + ".") for m in mods):
                found.add(str(f.relative_to(PKG)))
    return found


def test_only_the_cli_uses_rich():
    outside = sorted(f for f in _third_party_importers("rich") if not f.startswith("cli/"))
    assert outside == [], f"library modules import rich (progress goes through callbacks): {outside}"


def test_task_and_variant_names_stay_in_their_own_modules():
    """No built-in task or variant name is written as a string outside the module that defines it (and the
    built-in registration, the recipe defaults and the world plugin, which name what they register)."""
    import vlkit  # noqa: F401
    from vlkit.plugins import PluginSystem

    system = PluginSystem(load_entry_points=False)
    owners = {}
    for kind in ("task", "adapter"):
        for entry in system.registry(kind):
            owners[entry.name] = kind
    owners.pop("fusion", None)
    for entry in system.registry("dataset"):  # a dataset kind may share a variant's name (coop)
        owners.pop(entry.name, None)  # also the key of AdapterFusion layers in composition.json (a file format kept as is)
    allowed = {"tasks/", "adapters/", "world/", "train/recipe.py", "train/adapt.py", "train/fewshot.py",
               "train/fewshot_run.py", "cli/",
               "export/peft.py"}  # PEFT's format holds the lora and peft variants by name
    offenders = []
    for f in PKG.rglob("*.py"):
        rel = str(f.relative_to(PKG))
        if any(rel.startswith(a) for a in allowed):
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in owners:
                offenders.append(f"{rel}:{node.lineno} {node.value!r}")
    assert offenders == [], "task/variant names outside their modules: " + ", ".join(offenders)


def module_graph(root: Path = PKG) -> dict[str, set[str]]:
    """{module: vlkit modules it imports}, every import statement counted (module top and inside functions)."""
    modules = {_module_of(f, root): f for f in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, f in modules.items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(module, f.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if t in modules and t != module and not module.startswith(t + "."):
                    graph[module].add(t)
    return graph


def module_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_cycles():
    found = module_cycles(module_graph())
    assert found == [], "module import cycles (module top or inside functions): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_module_cycle_finder_sees_a_cycle():
    assert module_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert module_cycles({"a": {"b"}, "b": set()}) == []


def own_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's own lines: its body, less the functions defined inside it (counted on their own), and less its
    signature (a command's options, one per line as the formatter writes them, are declarations, not logic)."""
    lines = set(range(fn.body[0].lineno, fn.end_lineno + 1))
    for node in ast.walk(fn):
        if node is not fn and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines -= set(range(node.lineno, node.end_lineno + 1))
    return len(lines)


def test_few_long_functions():
    """Functions over 100 lines of their own stay at most 3."""
    long = []
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and own_lines(node) > 100:
                long.append(f"{f.relative_to(PKG)}:{node.lineno} {node.name} ({own_lines(node)})")
    assert len(long) <= 3, "functions over 100 lines: " + ", ".join(sorted(long))


def test_own_lines_counts_the_body_without_nested_functions():
    tree = ast.parse("def f(\n    a,\n    b,\n):\n    x = 1\n    def g():\n        return 2\n    return x\n")
    assert own_lines(tree.body[0]) == 2


OWNER_ONLY = re.compile(r"\b(adapter_records|adapter_state)\b")
OWNER_FILES = {"adapters/model.py", "adapters/sites.py"}  # the owner, and the injection mechanics it calls


def test_adapter_state_has_one_owner():
    """Outside the owner (`AdaptedModel`) and the backbone's own site code, nothing reads or writes the adapter
    records or the sites' switchboard."""
    offenders = []
    for f in PKG.rglob("*.py"):
        rel = str(f.relative_to(PKG))
        if rel in OWNER_FILES or rel.startswith("backbones/"):
            continue
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if OWNER_ONLY.search(line):
                offenders.append(f"{rel}:{i}")
    assert offenders == [], "adapter state reached outside its owner: " + ", ".join(offenders)


LAZY_ALLOWED = ("cli/", "plugins.py", "world/plugin.py")
"""Where vlkit's own modules may still be imported inside functions: the CLI (a command's implementation loads when
the command runs, so `vlkit --help` stays fast) and the plugin registration modules (`*/builtin.py`,
`world/plugin.py`, `plugins.py`), which run when plugins load and register names without importing what they name."""


def test_own_modules_are_imported_at_module_top():
    found = []
    for f in PKG.rglob("*.py"):
        rel = str(f.relative_to(PKG))
        if rel.startswith(LAZY_ALLOWED) or rel.endswith("builtin.py") or f.name == "__init__.py":
            continue
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("vlkit")):
                    found.append(f"{rel}:{node.lineno}")
    assert found == [], "vlkit modules imported inside functions (hides the graph): " + ", ".join(sorted(set(found)))
