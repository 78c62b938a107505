"""The plugin docs (docs/plugins/*.md) cannot rot: their code blocks marked ```python test=GROUP``` run here.

Blocks of one group of one page share a namespace and run in document order, in a fresh plugin system and a
temporary working directory. A block with ``file=PATH`` in its info string (``python``, ``toml``, ...) is not
run but written to PATH under that directory, which is put on ``sys.path``: the quick start's package files
are imported from there, and a ``pyproject.toml`` so written must name, in ``[project.entry-points.vlkit]``,
modules of the group that carry vlkit hook implementations. Every page opens with its smallest complete
example, and every relative link of the docs, the README and CONTRIBUTING.md points at a file and heading
that exist.
"""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "plugins"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
#: page -> the tested example groups it must keep (the first one opens the page)
PAGES = {
    "index": ("quickstart",),
    "variants": ("variant", "dora", "prompt", "gain"),
    "tasks": ("task",),
    "datasets": ("dataset",),
    "backbones": ("backbone",),
    "probes": ("probe", "caption-probe"),
    "exporters": ("exporter",),
    "methods": ("method",),
    "commands": ("command",),
    "serving": ("serve-engine",),
}


def doc_blocks(page: str) -> list[dict]:
    """Every fenced block of `page` whose info string has `test=GROUP`: language, group, file (or None), code,
    line."""
    text = (DOCS / f"{page}.md").read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        words = m.group(1).split()
        opts = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        if "test" not in opts:
            continue
        out.append({"lang": words[0] if words else "", "group": opts["test"], "file": opts.get("file"),
                    "code": m.group(2), "line": text.count("\n", 0, m.start()) + 1})
    return out


def cases() -> list[tuple[str, str]]:
    """(page, group) of every tested example in the docs."""
    pages = sorted(p.stem for p in DOCS.glob("*.md")) if DOCS.is_dir() else []
    return [(page, group) for page in pages for group in dict.fromkeys(b["group"] for b in doc_blocks(page))]


def test_every_page_keeps_its_tested_examples():
    for page, needed in PAGES.items():
        assert (DOCS / f"{page}.md").is_file(), f"docs/plugins/{page}.md is missing"
        found = {b["group"] for b in doc_blocks(page)}
        for group in needed:
            assert group in found, f"docs/plugins/{page}.md lost its tested `{group}` example"
        for b in doc_blocks(page):
            assert b["file"] or b["lang"] == "python", f"{page}.md:{b['line']}: only python blocks run (or file=)"


def test_each_page_opens_with_a_complete_example():
    """The first python block of a page runs in the tests and sits in the page's first section."""
    for page in PAGES:
        text = (DOCS / f"{page}.md").read_text(encoding="utf-8")
        first = next((m for m in FENCE.finditer(text) if m.group(1).split()[:1] == ["python"]), None)
        assert first is not None and "test=" in first.group(1), f"{page}.md: its first python block is not tested"
        sections = [m.start() for m in re.finditer(r"^## ", text, re.M)]
        assert len(sections) < 2 or first.start() < sections[1], f"{page}.md: the first example comes too late"


def test_the_old_single_page_only_points_to_the_new_ones():
    old = ROOT / "docs" / "plugins.md"
    if old.exists():
        text = old.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 5 and "plugins/index.md" in text


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", text, re.M):
        slug = _slug(m.group(1))
        k = seen.get(slug, 0)
        seen[slug] = k + 1
        out.add(slug if k == 0 else f"{slug}-{k}")
    return out


def test_relative_links_resolve():
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted(DOCS.glob("*.md")), *sorted((ROOT / "plugins").glob("*/README.md"))]
    bad = []
    for md in files:
        if not md.is_file():
            continue
        text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", md.read_text(encoding="utf-8")))
        if re.search(r"\]\(\s", text):
            bad.append(f"{md.relative_to(ROOT)}: a link target starts with a space or line break")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http:, mailto:, ...
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                bad.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


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


@pytest.mark.parametrize("page,group", cases(), ids=[f"{p}-{g}" for p, g in cases()])
def test_doc_example(page, group, isolated):
    doc = DOCS / f"{page}.md"
    blocks = [b for b in doc_blocks(page) if b["group"] == group]
    for b in blocks:
        if b["file"]:
            dest = isolated / b["file"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(b["code"], encoding="utf-8")
    if (isolated / "pyproject.toml").is_file():
        _check_entry_points(isolated)
    module = type(sys)(f"vlkit_docs_{page}_{re.sub(r'[^A-Za-z0-9_]', '_', group)}")
    sys.modules[module.__name__] = module  # so `sys.modules[__name__]` works as in a plugin module
    try:
        for b in blocks:
            if b["file"]:
                continue
            code = compile("\n" * (b["line"]) + b["code"], str(doc), "exec")  # tracebacks point into the doc
            exec(code, module.__dict__)
    finally:
        sys.modules.pop(module.__name__, None)
