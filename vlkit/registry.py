"""Name registries for every plugin kind (backbones, adapter variants, tasks, datasets, probes, exporters,
training methods)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import PluginError, UnknownNameError

KINDS = ("backbone", "adapter", "task", "dataset", "probe", "exporter", "method", "command")


@dataclass
class Entry:
    """One registered object: its name, the object itself, the plugin that gave it, a one-line summary."""

    kind: str
    name: str
    obj: Any
    plugin: str
    summary: str = ""
    meta: dict = field(default_factory=dict)


class Registry:
    """Holds the entries of one kind. Registering a name twice raises a PluginError naming both plugins."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, obj: Any, plugin: str, summary: str = "", **meta: Any) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {self.kind} with an empty or non-string name")
        if name in self._entries:
            other = self._entries[name].plugin
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by plugin {other!r} and by plugin {plugin!r}",
                hint="uninstall one of them or restrict plugins with VLKIT_PLUGINS",
            )
        self._entries[name] = Entry(self.kind, name, obj, plugin, summary, dict(meta))

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, list(self._entries)) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
