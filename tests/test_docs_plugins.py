"""docs/plugins.md cannot rot: its code blocks marked ```python test=GROUP``` run here.

Blocks of one group share a namespace and run in document order, in a fresh plugin system and a temporary
working directory. A block with ``file=PATH`` in its info string (``python``, ``toml``, ...) is not run but
written to PATH under that directory, which is put on ``sys.path``: the quick start's package files are
imported from there, and a ``pyproject.toml`` so written must name, in ``[project.entry-points.vlkit]``,
modules of the group that carry vlkit hook implementations.
"""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def doc_blocks() -> list[dict]:
    """Every fenced block whose info string has `test=GROUP`: language, group, file (or None), code, line."""
    text = DOC.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        words = m.group(1).split()
        opts = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        if "test" not in opts:
            continue
        out.append({"lang": words[0] if words else "", "group": opts["test"], "file": opts.get("file"),
                    "code": m.group(2), "line": text.count("\n", 0, m.start()) + 1})
    return out


def groups() -> list[str]:
    return list(dict.fromkeys(b["group"] for b in doc_blocks())) if DOC.is_file() else []


def test_the_doc_has_tested_examples():
    assert DOC.is_file(), f"{DOC} is missing"
    found = groups()
    for needed in ("quickstart", "dora", "task", "probe", "exporter", "dataset", "backbone", "method", "command"):
        assert needed in found, f"docs/plugins.md lost its tested `{needed}` example"
    for b in doc_blocks():
        assert b["file"] or b["lang"] == "python", f"line {b['line']}: only python blocks run (or give file=)"


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A temporary working directory on sys.path, a fresh plugin system without installed plugins, and no
    modules left behind."""
    from vlkit.plugins import reset_plugins

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("VLKIT_PLUGINS", "")  # installed plugins stay out: the examples register their own
    before = set(sys.modules)
    reset_plugins()
    yield tmp_path
    reset_plugins()
    for name in set(sys.modules) - before:
        mod = sys.modules.get(name)
        if str(getattr(mod, "__file__", "") or "").startswith(str(tmp_path)):
            del sys.modules[name]


def _check_entry_points(root: Path) -> None:
    import importlib

    meta = tomllib.loads((root / "pyproject.toml").read_text())
    eps = meta.get("project", {}).get("entry-points", {}).get("vlkit", {})
    assert eps, "pyproject.toml declares no [project.entry-points.vlkit]"
    for ep_name, value in eps.items():
        module, _, attr = value.partition(":")
        obj = importlib.import_module(module)
        if attr:
            obj = getattr(obj, attr)
        impls = [n for n in dir(obj) if hasattr(getattr(obj, n, None), "vlkit_impl")]  # pluggy's marker
        assert impls, f"entry point {ep_name} = {value!r} has no @hookimpl functions"


@pytest.mark.parametrize("group", groups())
def test_doc_example(group, isolated):
    blocks = [b for b in doc_blocks() if b["group"] == group]
    for b in blocks:
        if b["file"]:
            dest = isolated / b["file"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(b["code"], encoding="utf-8")
    if (isolated / "pyproject.toml").is_file():
        _check_entry_points(isolated)
    module = type(sys)(f"vlkit_docs_{re.sub(r'[^A-Za-z0-9_]', '_', group)}")
    sys.modules[module.__name__] = module  # so `sys.modules[__name__]` works as in a plugin module
    try:
        for b in blocks:
            if b["file"]:
                continue
            code = compile("\n" * (b["line"]) + b["code"], str(DOC), "exec")  # tracebacks point into the doc
            exec(code, module.__dict__)
    finally:
        sys.modules.pop(module.__name__, None)
