"""Plugin manager: built-in plugins and installed entry points (group "vlkit"), filtered by VLKIT_PLUGINS.

Only entry points of installed distributions load (never a path or module name from a file). A name in
VLKIT_PLUGINS that is not installed gives a one-line warning, or a PluginError with VLKIT_PLUGINS_STRICT=1.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .registry import KINDS, Entry, Registry

ENTRY_POINT_GROUP = "vlkit"

BUILTIN_PLUGINS = (
    "vlkit.backbones.builtin",
    "vlkit.adapters.builtin",
    "vlkit.data.builtin",
    "vlkit.tasks.builtin",
    "vlkit.probe.builtin",
    "vlkit.export.builtin",
    "vlkit.world.plugin",
    "vlkit.train.builtin",
    "vlkit.cli.builtin",
)

HOOK_OF_KIND = {
    "backbone": "register_backbones",
    "adapter": "register_adapters",
    "task": "register_tasks",
    "dataset": "register_datasets",
    "probe": "register_probes",
    "exporter": "register_exporters",
    "method": "register_methods",
}


@dataclass
class PluginInfo:
    """What `vlkit plugins` shows for one plugin."""

    name: str
    version: str
    builtin: bool
    registers: dict[str, list[str]] = field(default_factory=dict)


def allowed_external() -> set[str] | None:
    """Names from VLKIT_PLUGINS (None when unset: every installed plugin loads; empty: none)."""
    raw = os.environ.get("VLKIT_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


class PluginSystem:
    """Owns the pluggy manager and the per-kind registries filled through the hooks."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager("vlkit")
        self.pm.add_hookspecs(hookspecs)
        self.versions: dict[str, str] = {}
        self.builtin: set[str] = set()
        self.warnings: list[str] = []  # one line each; the CLI prints them on stderr
        self._registries: dict[str, Registry] | None = None
        from . import __version__

        for modname in BUILTIN_PLUGINS:
            try:
                mod = importlib.import_module(modname)
            except ModuleNotFoundError as exc:
                if exc.name == modname:
                    continue
                raise
            self.pm.register(mod, name=modname)
            self.versions[modname] = __version__
            self.builtin.add(modname)
        if load_entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        allowed = allowed_external()
        eps = md.entry_points(group=ENTRY_POINT_GROUP)
        missing = sorted((allowed or set()) - {ep.name for ep in eps})
        if missing:
            installed = sorted({ep.name for ep in eps})
            msg = (
                f"VLKIT_PLUGINS names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                f"not installed (installed plugins: {', '.join(installed) or 'none'})"
            )
            if os.environ.get("VLKIT_PLUGINS_STRICT", "") not in ("", "0"):
                raise PluginError(msg)
            self.warnings.append(msg)
            logging.getLogger(__name__).warning(msg)  # for library users; the CLI prints self.warnings instead
        for ep in eps:
            if allowed is not None and ep.name not in allowed:
                continue
            if self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not hide which one it was
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
            self.pm.register(plugin, name=ep.name)
            version = "?"
            if ep.dist is not None:
                version = ep.dist.version
            self.versions[ep.name] = version

    def register_plugin(self, plugin: Any, name: str, version: str = "local") -> None:
        """Register an in-process plugin object (used by tests and notebooks)."""
        self.pm.register(plugin, name=name)
        self.versions[name] = version
        self._registries = None

    @property
    def registries(self) -> dict[str, Registry]:
        if self._registries is None:
            regs = {kind: Registry(kind) for kind in HOOK_OF_KIND}
            for kind, hookname in HOOK_OF_KIND.items():
                hook = getattr(self.pm.hook, hookname)
                for impl in reversed(hook.get_hookimpls()):
                    reg = regs[kind]

                    def register(name, obj, summary="", _reg=reg, _plugin=impl.plugin_name, **meta):
                        _reg.add(name, obj, _plugin, summary, **meta)

                    impl.function(register=register)
            self._registries = regs
        return self._registries

    def registry(self, kind: str) -> Registry:
        if kind not in HOOK_OF_KIND:
            raise ValueError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
        return self.registries[kind]

    def plugin_infos(self) -> list[PluginInfo]:
        infos = {
            name: PluginInfo(name, self.versions.get(name, "?"), name in self.builtin)
            for name, _ in self.pm.list_name_plugin()
        }
        for kind, reg in self.registries.items():
            for entry in reg:
                infos.setdefault(entry.plugin, PluginInfo(entry.plugin, "?", False))
                infos[entry.plugin].registers.setdefault(kind, []).append(entry.name)
        return sorted(infos.values(), key=lambda i: (not i.builtin, i.name))


_SYSTEM: PluginSystem | None = None


def get_plugins() -> PluginSystem:
    """The process-wide plugin system (created on first use)."""
    global _SYSTEM
    if _SYSTEM is None:
        _SYSTEM = PluginSystem()
    return _SYSTEM


def reset_plugins() -> None:
    """Forget the plugin system so the next call re-reads entry points and VLKIT_PLUGINS."""
    global _SYSTEM
    _SYSTEM = None


def registry(kind: str) -> Registry:
    return get_plugins().registry(kind)


def options_class(entry: Entry) -> type | None:
    """The dataclass that declares a registered object's options (`vlkit.options.option_specs` reads it): an
    adapter variant's `config_cls`; a task's, probe's, exporter's or training method's `options_cls` (a class
    attribute of `Task`, `Probe`, `Exporter` and `TrainingMethod`, None on each); a dataset kind's `options_cls`
    given at registration (`register(name, loader, summary, options_cls=...)`); None when it declares none."""
    if entry.kind == "adapter":
        return entry.obj.config_cls
    if entry.kind in ("task", "probe", "exporter", "method"):
        return entry.meta.get("options_cls") or entry.obj.options_cls
    return entry.meta.get("options_cls")
