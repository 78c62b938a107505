"""The one resolver of adapter arguments, used by probe, export, compose and train.

`resolve_adapter_arg(backbone, arg)` turns one argument into a :class:`System` (probe, export, `vlkit compose
run`, recipe `compose.base`); `source_dirs(items)` finds the adapter directories behind arguments without
loading anything (`vlkit compose`). An argument is:

- ``path/to/adapter``   an adapter directory (adapter_config.json + adapter_model.safetensors), loaded
                        onto the backbone under a free name;
- ``run-name``          a run directory under ``runs/`` (where `vlkit train` writes), when no such path exists;
- ``name``              an adapter already loaded on the backbone;
- ``a+b``               a stack of the parts (each a path or a loaded name): b on top of a;
- ``path/to/comp``      a composition directory (from `vlkit compose`, holding ``composition.json``) in any
                        mode: stack, average, parallel, fuse, route (per-input routing through its router
                        or domain gate; see :meth:`System.wrap`) or merge;
- ``backbone``/``none`` the frozen backbone.

An adapter directory named several times (``a,b,a+b``) is loaded once per resolver.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.files import read_adapter_config
from ..adapters.model import AdaptedModel
from ..errors import ConfigError, IncompatibleAdapterError
from .adapter_fusion import load_fusion
from .composition import (
    COMPOSITION_FILE,
    Composition,
    activation,
    adapter_entries,
    is_composition,
    read_composition,
    read_task,
    write_composition,
)
from .gate import is_gate, load_gate
from .router import load_router
from .sharing import tie_shared

ADAPTER_CONFIG = "adapter_config.json"
FROZEN_NAMES = ("backbone", "none", "frozen")
RUNS_DIR = Path("runs")


def find_source(text: str, base: Path | None = None) -> Path:
    """The directory an argument names: the path itself (relative to `base` when given), else `runs/<text>`."""
    path = Path(text).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.exists() and base is None and (RUNS_DIR / text).is_dir():
        return RUNS_DIR / text
    return path


def source_dirs(items: list[str] | str) -> list[tuple[str, Path]]:
    """(free name, adapter directory) for each argument, nothing loaded; a composition directory stands for
    its adapters (e.g. the per-task adapters of a multi-task run)."""
    if isinstance(items, str):
        items = [p.strip() for p in items.split(",") if p.strip()]
    out: list[tuple[str, Path]] = []
    taken: set[str] = set()
    for item in items:
        path = find_source(item)
        if not path.exists():
            raise ConfigError(f"adapter {item!r} not found: not a directory, nor a run under {RUNS_DIR}/")
        if is_composition(path) and not (path / ADAPTER_CONFIG).is_file():
            found = [
                (e.get("name") or Path(e["path"]).name, Path(e["path"]))
                for e in adapter_entries(path, read_composition(path))
                if e["path"] is not None
            ]
        elif (path / ADAPTER_CONFIG).is_file():
            found = [(str(read_adapter_config(path).get("name") or path.name), path)]
        else:
            raise ConfigError(f"{path} is neither an adapter directory ({ADAPTER_CONFIG}) nor a composition directory")
        for name, p in found:
            name = free_name(taken, name)
            taken.add(name)
            out.append((name, p))
    if not out:
        raise ConfigError("no adapters given to compose")
    return out


@dataclass
class System:
    """One configuration of the backbone: which adapters are active and how they combine."""

    label: str
    names: tuple[str, ...] = ()
    mode: str = "stack"  # stack | parallel | fuse | route (backbone activation modes, average resolved)
    weights: list[float] | None = None
    sources: list[str] = field(default_factory=list)
    slug: str = "backbone"
    fusion: str | None = None
    composition: Any = None  # vlkit.compose.Composition for composition directories

    def activate(self, backbone) -> None:
        model = AdaptedModel.of(backbone)
        if self.mode == "route":
            model.set_adapter()
            return
        model.set_adapter(*self.names, mode=self.mode, weights=self.weights, fusion=self.fusion)

    def wrap(self, backbone):
        """The backbone to run this system through: a routed view for route compositions with a router
        (each input through the adapter its router picks), else the backbone itself."""
        if self.mode == "route" and self.composition is not None and self.composition.router is not None:
            return self.composition.routed(backbone)
        return backbone

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "adapters": list(self.sources or self.names),
            "mode": self.mode,
            "weights": self.weights,
        }


def frozen_system() -> System:
    return System(label="backbone")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "x"


def free_name(taken, wanted: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_\-]+", "_", wanted).strip("_") or "adapter"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


class AdapterResolver:
    """Resolves adapter arguments on one backbone, loading each adapter directory once."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.model = AdaptedModel.of(backbone)
        self.loaded: dict[str, str] = {}  # resolved directory -> adapter name on the backbone

    def load_dir(self, path: Path, preferred: str | None = None) -> str:
        key = str(path.resolve())
        if key not in self.loaded:
            cfg = read_adapter_config(path)
            name = free_name(self.model.records, str(preferred or cfg.get("name") or path.name))
            self.model.load_adapter(path, name=name, activate=False)
            self.loaded[key] = name
        return self.loaded[key]

    def free_fusion_name(self, wanted: str) -> str:
        return free_name(self.model.fusions, wanted)

    def part(self, text: str, base: Path | None = None, preferred: str | None = None) -> tuple[str, str]:
        """(adapter name on the backbone, source) of one part: an adapter directory or a loaded name."""
        path = find_source(text, base)
        if path.is_dir():
            if (path / ADAPTER_CONFIG).is_file():
                return self.load_dir(path, preferred), os.path.normpath(str(path))
            raise ConfigError(f"{path} is not an adapter directory (no {ADAPTER_CONFIG})")
        if text in self.model.records:
            return text, text
        raise ConfigError(
            f"adapter {text!r} not found: not an adapter directory nor an adapter loaded on the "
            f"backbone" + (f" (loaded: {', '.join(self.model.records)})" if self.model.records else "")
        )

    def composition(self, path: Path, label: str) -> System:
        comp = load_composition(self.backbone, path, activate=False, resolver=self)
        mode, weights = activation(comp.mode, comp.weights, len(comp.names))
        if comp.mode == "route":
            mode, weights = "route", None
        sources = [str(p) for p in (t.get("dir") for t in comp.tasks.values()) if p is not None]
        return System(
            label=label,
            names=tuple(comp.names),
            mode=mode,
            weights=weights,
            sources=sources,
            slug=_slug(path.name),
            fusion=comp.fusion,
            composition=comp,
        )

    def resolve(self, arg: str) -> System:
        text = str(arg).strip()
        if not text:
            raise ConfigError("empty adapter argument")
        if text.lower() in FROZEN_NAMES:
            return frozen_system()
        path = find_source(text)
        if path.is_dir() and (path / COMPOSITION_FILE).is_file():
            return self.composition(path, text)
        parts = [text] if path.exists() or text in self.model.records else text.split("+")
        if len(parts) > 1 and not all(p.strip() for p in parts):
            raise ConfigError(
                f"adapter stack {arg!r} has an empty part: write A+B (each part an adapter directory or a loaded name)"
            )
        resolved = [self.part(p.strip()) for p in parts if p.strip()]
        if not resolved:
            raise ConfigError(f"empty adapter stack {arg!r}")
        names = tuple(n for n, _ in resolved)
        if len(set(names)) != len(names):
            raise ConfigError(f"adapter stack {arg!r} names the same adapter twice")
        slug = "+".join(_slug(Path(p.strip()).name) for p in parts if p.strip())
        return System(label=text, names=names, mode="stack", sources=[s for _, s in resolved], slug=slug)


def resolve_adapter_arg(backbone, arg: str, resolver: AdapterResolver | None = None) -> System:
    """One adapter argument as a :class:`System` (see the module docstring for the accepted forms)."""
    return (resolver or AdapterResolver(backbone)).resolve(arg)


# --- training on top of a composition (recipe `compose.base`) -------------------------------------------
def load_base_stack(backbone, base: str) -> list[tuple[str, Path]]:
    """Load `base` (an adapter dir, `a+b`, or a stack / merge composition) frozen under a new adapter;
    returns [(name on the backbone, adapter directory)] in stacking order."""
    resolver = AdapterResolver(backbone)
    system = resolver.resolve(str(base))
    if system.mode != "stack" or not system.names:
        raise ConfigError(
            f"compose.base {base!r} is a {system.mode} composition; a new adapter trains on top of "
            "an adapter, an a+b stack, or a stack or merge composition"
        )
    dirs = {name: Path(d) for d, name in resolver.loaded.items()}
    return [(n, dirs[n]) for n in system.names]


def load_base(backbone, base: str | None) -> list[tuple[str, Path]]:
    """A run's base (recipe `compose.base`, method `adapter`): loaded frozen before the new adapter is injected;
    the trainer then stacks the new adapter on it. Returns [(name, dir)] ([] without a base)."""
    if not base:
        return []
    stack = load_base_stack(backbone, base)
    AdaptedModel.of(backbone).base_stack = list(stack)
    return stack


def write_base_composition(out: Path, backbone, adapter: str) -> None:
    """After training on a base: `out` is also a stack composition (the base adapters copied in, then `.`)."""
    stack = AdaptedModel.of(backbone).base_stack
    if stack:
        write_composition(out, "stack", backbone, list(stack) + [(adapter, out)])


def load_composition(backbone, path: str | Path, *, activate: bool = True, resolver=None) -> Composition:
    """Load the composition at `path` onto `backbone` (adapters under free names) and activate it."""
    path = Path(path)
    spec = read_composition(path)
    fp = spec.get("backbone_fingerprint")
    if fp and fp != backbone.fingerprint():
        raise IncompatibleAdapterError(
            f"composition {path} was made for backbone {spec.get('backbone')!r} "
            f"(fingerprint {fp}), but this backbone is {backbone.spec!r} "
            f"(fingerprint {backbone.fingerprint()})"
        )
    resolver = resolver or AdapterResolver(backbone)
    names, tasks = [], {}
    for item in adapter_entries(path, spec):
        target = str(item["path"]) if item["path"] is not None else item["name"]
        name, _ = resolver.part(target, preferred=item.get("name"))
        names.append(name)
        tasks[name] = read_task(item["path"])
    if len(set(names)) != len(names):
        raise ConfigError(f"composition {path} lists the same adapter twice")
    mode = spec.get("mode", "stack")
    weights = spec.get("weights")
    if weights is not None and len(weights) != len(names):
        raise ConfigError(f"composition {path}: {len(weights)} weights for {len(names)} adapters")
    comp = Composition(
        path, mode, names, [float(w) for w in weights] if weights is not None else None, tasks=tasks, spec=spec
    )
    if mode == "fuse":
        fz = spec.get("fusion") or {}
        fusion = resolver.free_fusion_name(fz.get("name") or "fusion")
        load_fusion(
            backbone,
            fusion,
            names,
            path / fz.get("file", "fusion.safetensors"),
            temperature=float(fz.get("temperature", 1.0)),
        )
        comp.fusion = fusion
        if isinstance(spec.get("task"), dict) and spec["task"].get("meta"):
            comp.tasks["__fusion__"] = read_task(path)
    if mode == "route" and spec.get("router"):
        load = load_gate if is_gate(spec["router"]) else load_router
        comp.router = load(path, spec["router"], names)
    if spec.get("sharing") and spec["sharing"] != "per_task":
        tie_shared(backbone, names, spec["sharing"])
    if activate:
        comp.activate(backbone)
    return comp
