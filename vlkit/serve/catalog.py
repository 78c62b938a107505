"""The adapters a torch server holds on its one backbone: what `--adapters` names, hot loads and unloads.

`--adapters` takes a comma-separated list (or a list) of:

- an adapter directory or a run name under `runs/` (`NAME=DIR` picks the served name; default: the adapter's
  own name, made unique), served with the task it was trained for (`task.json` + `head.safetensors`);
- a route composition (`vlkit compose A,B --mode route`): each of its adapters is served by name and its router
  answers requests for adapter `auto`;
- another composition (stack, average, parallel, fuse, merge): served as one name (the directory's name).

Adapters are never copied: they are loaded side by side and a batch picks per sample (`AdaptedModel.route`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.files import read_adapter_config
from ..adapters.model import AdaptedModel
from ..backbones.state import check_adapter_name
from ..compose.composition import activation, is_composition
from ..compose.predict import _task_for, load_task
from ..compose.resolve import find_source, free_name, load_composition
from ..errors import AdapterFileError, RequestError
from ..plugins import registry
from .guards import RESERVED_NAMES, check_served_name

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Entry:
    """One served name."""

    name: str
    kind: str  # "adapter" (one adapter: routable per sample) or "composition" (several active together)
    source: str
    task: Any = None
    variant: str | None = None
    parameters: int = 0
    names: tuple[str, ...] = ()  # backbone adapter names (kind "composition")
    mode: str = "stack"
    weights: list[float] | None = None
    fusion: str | None = None
    routable: bool = True
    joint: bool = False
    member_of: str | None = None  # the route composition it came with
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        task = self.task
        out = {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "variant": self.variant,
            "task": getattr(task, "name", None) or None,
            "parameters": self.parameters,
            "joint": self.joint,
        }
        if self.kind == "composition":
            out.update(mode=self.mode, adapters=list(self.names))
        if self.member_of:
            out["composition"] = self.member_of
        classes = getattr(task, "class_names", None)
        if classes:
            out["labels"] = list(classes)
        return out


def _read_task_files(backbone, d: Path):
    """The task an adapter directory was trained for (None without task.json)."""

    meta_file, head = d / "task.json", d / "head.safetensors"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise AdapterFileError(f"{meta_file} is not valid JSON: {exc}") from None
    try:
        return load_task(backbone, meta, head if head.is_file() else None)
    except (RuntimeError, ValueError, KeyError, TypeError, OSError) as exc:
        raise AdapterFileError(f"the task files of {d} cannot be used: {' '.join(str(exc).split())[:200]}") from None


def name_and_path(text: str) -> tuple[str | None, Path]:
    """(the served name of `NAME=DIR`, or None; the directory) of one `--adapters` item."""

    name, sep, rest = text.partition("=")
    if sep and name and "/" not in name:
        return name.strip(), find_source(rest.strip())
    return None, find_source(text)


class TorchCatalog:
    """Served names -> entries on one backbone, the router for `auto`, and cached class embeddings."""

    def __init__(self, backbone, device=None):
        self.backbone = backbone
        self.model = AdaptedModel.of(backbone)
        self.device = device
        self.entries: dict[str, Entry] = {}
        self.router = None
        self.router_source: str | None = None
        self.text_cache: dict[tuple, Any] = {}

    # --- what a request names -----------------------------------------------------------------
    def get(self, name: str) -> Entry:
        if name not in self.entries:
            known = ", ".join(sorted(self.entries)) or "none loaded"
            raise RequestError(
                f"unknown adapter {name!r}; loaded: {known} (or 'auto', or none for the frozen backbone)", status=404
            )
        return self.entries[name]

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.spec,
            "adapters": [e.describe() for e in self.entries.values()],
            "router": None
            if self.router is None
            else {"source": self.router_source, "routes_to": [n or "none" for n in self.router.names]},
        }

    # --- loading ------------------------------------------------------------------------------
    def add_many(self, items) -> list[str]:
        if isinstance(items, str):
            items = [p.strip() for p in items.split(",") if p.strip()]
        added = []
        for item in items or []:
            added += self.add(str(item))
        return added

    def _name_and_path(self, text: str) -> tuple[str | None, Path]:
        return name_and_path(text)

    def add(self, text: str, name: str | None = None, *, adapters_only: bool = False, resolver=None) -> list[str]:
        """Load one `--adapters` item (or a hot-loaded directory); returns the served names it added.
        `resolver` (a `vlkit.compose.resolve.AdapterResolver`) names a composition's adapters on the backbone."""

        given, path = self._name_and_path(text)
        name = name or given
        if name is not None:
            check_served_name(check_adapter_name(name), self.backbone.spec)
            if name in self.entries or name in self.model:
                raise RequestError(f"an adapter named {name!r} is already loaded; unload it first", status=409)
        if not path.exists():
            raise AdapterFileError(f"adapter {text!r} not found: not a directory, nor a run under runs/")
        if (path / ADAPTER_CONFIG).is_file():
            return [self._add_adapter(path, name)]
        if is_composition(path) and not adapters_only:
            return self._add_composition(path, name, resolver)
        raise AdapterFileError(
            f"{path} is not an adapter directory (no {ADAPTER_CONFIG})"
            + ("" if adapters_only else " nor a composition directory")
        )

    def _entry_for(self, name: str, source: Path, task, member_of: str | None = None) -> Entry:

        rec = self.model.records[name]
        var = registry("adapter").get(rec.variant) if rec.variant in registry("adapter") else None
        routable = all(s.kind != "sequence" for s in rec.sites)
        params = int(sum(t.numel() for t in self.model.adapter_parameters(name).values()))
        if task is not None and self.device is not None:
            task.head.to(self.device)
        return Entry(
            name,
            "adapter",
            str(source),
            task=task,
            variant=rec.variant,
            parameters=params,
            names=(name,),
            routable=routable,
            joint=bool(var is not None and var.joint),
            member_of=member_of,
        )

    def _add_adapter(self, path: Path, name: str | None) -> str:

        cfg = read_adapter_config(path)
        if name is None:
            taken = set(self.entries) | set(self.model.records) | set(RESERVED_NAMES) | {self.backbone.spec}
            name = free_name(taken, str(cfg.get("name") or path.name))
        self.model.load_adapter(path, name=name, activate=False)
        try:
            if self.device is not None:
                self.backbone.to(self.device)
            task = _read_task_files(self.backbone, path)
            entry = self._entry_for(name, path, task)
        except BaseException:
            self.model.delete_adapter(name)
            raise
        self.entries[name] = entry
        return name

    def _add_composition(self, path: Path, name: str | None, resolver=None) -> list[str]:

        with self.model.track() as loaded:
            comp = load_composition(self.backbone, path, activate=False, resolver=resolver)
        if self.device is not None:
            self.backbone.to(self.device)
            if comp.router is not None:
                comp.router.to(self.device)
        label = name or free_name(set(self.entries) | set(RESERVED_NAMES), path.name)
        if comp.mode == "route":
            added = []
            for n in comp.names:
                info = comp.tasks.get(n) or {}
                task = _task_for(comp, self.backbone, n, {})
                self.entries[n] = self._entry_for(n, Path(info.get("dir") or path), task, member_of=label)
                added.append(n)
            if comp.router is not None and self.router is None:
                self.router, self.router_source = comp.router, str(path)
            return added
        mode, weights = activation(comp.mode, comp.weights, len(comp.names))
        task = _task_for(comp, self.backbone, None, {})
        if task is not None and self.device is not None:
            task.head.to(self.device)
        params = int(sum(t.numel() for n in loaded.adapters for t in self.model.adapter_parameters(n).values()))
        self.entries[label] = Entry(
            label,
            "composition",
            str(path),
            task=task,
            parameters=params,
            names=tuple(comp.names),
            mode=mode,
            weights=weights,
            fusion=comp.fusion,
            routable=False,
            joint=False,
            extra={"composition_mode": comp.mode},
        )
        return [label]

    def remove(self, name: str) -> None:
        entry = self.get(name)
        if self.router is not None and name in self.router.names:
            raise RequestError(
                f"adapter {name!r} is a route of the router of {self.router_source}; "
                "it cannot be unloaded while the router serves 'auto'",
                status=409,
            )
        if entry.kind != "adapter":
            raise RequestError(
                f"{name!r} is a composition loaded with --adapters; only adapters loaded one by one can be unloaded",
                status=409,
            )
        users = [e.name for e in self.entries.values() if e.kind == "composition" and name in e.names]
        if users:
            raise RequestError(f"adapter {name!r} is part of {', '.join(users)}", status=409)
        del self.entries[name]
        self.text_cache = {k: v for k, v in self.text_cache.items() if k[0] != name}
        self.model.delete_adapter(name)

    # --- activation ---------------------------------------------------------------------------
    def activate(self, name: str | None) -> None:
        model = self.model
        model.clear_route()
        if name is None:
            model.set_adapter()
            return
        e = self.entries[name]
        if e.kind == "composition":
            model.set_adapter(*e.names, mode=e.mode, weights=e.weights, fusion=e.fusion)
        else:
            model.set_adapter(name)

    def text_features(self, name: str | None, tokens, key=None):
        """Unnormalised text features of `tokens` through `name` alone (class prompts), cached by `key`."""
        import torch

        ck = (name, key) if key is not None else None
        if ck is not None and ck in self.text_cache:
            return self.text_cache[ck]
        self.activate(name)
        try:
            with torch.no_grad():
                out = self.backbone.encode_text(tokens.to(self.device or "cpu"))
        finally:
            self.activate(None)
        if ck is not None:
            self.text_cache[ck] = out
        return out
