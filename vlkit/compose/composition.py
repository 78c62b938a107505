"""Composition directories: several adapters on one frozen backbone, and how they combine.

Layout of a composition directory (self-contained: the adapters are copied in):

    composition.json            {"format": "vlkit.composition", "format_version": 1, "mode": ...,
                                 "backbone", "backbone_fingerprint", "adapters": [{"name", "path", "task"}],
                                 "weights", plus mode-specific entries}
    adapters/<name>/            adapter_config.json, adapter_model.safetensors (+ task.json,
                                head.safetensors, recipe.yaml when the source had them)
    fusion.safetensors          mode "fuse": the AdapterFusion layers  ("fusion": {"name", "file"})
    router.safetensors          mode "route": the router               ("router": {"file", "names", ...})

Modes: `stack` (each adapter on the output of the previous, in order), `average` (outputs averaged
with weights normalised to sum 1), `parallel` (the adapters' changes summed with weights), `fuse`
(AdapterFusion), `route` (one adapter per input: chosen explicitly by name or task, or by the router),
`merge` (the directory is itself one merged adapter; adapters = [{"path": "."}]), `wise` (WiSE-FT: one
adapter interpolated towards the frozen backbone, weights = [α]: at every site y + α·(adapter(y) − y), which
for a variant whose change is a weight delta (LoRA, VeRA, ...) is the delta scaled by α, and otherwise the
adapter's output interpolated; α = 0 is the frozen backbone, α = 1 the adapter).

`load_composition(backbone, dir)` loads everything onto a backbone and activates it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.files import read_adapter_config
from ..adapters.model import AdaptedModel
from ..errors import ConfigError, IncompatibleAdapterError
from ..io import write_json

COMPOSITION_FILE = "composition.json"
FORMAT = "vlkit.composition"
FORMAT_VERSION = 1
MODES = ("stack", "average", "parallel", "fuse", "route", "merge", "wise")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "task.json", "head.safetensors", "recipe.yaml")


def is_composition(path: str | Path) -> bool:
    return (Path(path) / COMPOSITION_FILE).is_file()


def copy_adapter(src: Path, dst: Path) -> Path:
    """Copy the files that make an adapter (and its task head and recipe) from `src` into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for fname in ADAPTER_FILES:
        if (src / fname).is_file() and (src / fname).resolve() != (dst / fname).resolve():
            shutil.copy2(src / fname, dst / fname)
    return dst


def read_composition(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / COMPOSITION_FILE
    try:
        spec = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read composition {file}: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("adapters"), list) or not spec["adapters"]:
        raise ConfigError(f"composition {file} needs a non-empty 'adapters' list of {{name, path}}")
    mode = spec.get("mode", "stack")
    if mode not in MODES:
        raise ConfigError(f"composition {file}: mode {mode!r} is not one of {', '.join(MODES)}")
    if int(spec.get("format_version", 1)) > FORMAT_VERSION:
        raise ConfigError(
            f"composition {file} has format version {spec['format_version']}; this vlkit reads up to {FORMAT_VERSION}"
        )
    return spec


def adapter_entries(path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The composition's adapters as [{"name", "path" (absolute, or None for a loaded name), "task"}]."""
    out = []
    for item in spec["adapters"]:
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or not (item.get("path") or item.get("name")):
            raise ConfigError(
                f"composition {path / COMPOSITION_FILE}: each adapter needs a path (or a loaded name): {item!r}"
            )
        p = item.get("path")
        out.append({**item, "path": (path / p) if p is not None else None})
    return out


def write_composition(
    out: str | Path,
    mode: str,
    backbone_or_cfg,
    sources: list[tuple[str, Path]],
    weights: list[float] | None = None,
    extra: dict[str, Any] | None = None,
    copy: bool = True,
) -> Path:
    """Write `out/composition.json`, copying each (name, adapter dir) source into `out/adapters/<name>`.

    `backbone_or_cfg`: a backbone, or the adapter config dict of one source (spec and fingerprint).
    """
    if mode not in MODES:
        raise ConfigError(f"composition mode {mode!r} is not one of {', '.join(MODES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(backbone_or_cfg, "fingerprint"):
        spec_name, fingerprint = backbone_or_cfg.spec, backbone_or_cfg.fingerprint()
    else:
        spec_name, fingerprint = backbone_or_cfg.get("backbone"), backbone_or_cfg["backbone_fingerprint"]
    entries = []
    for name, src in sources:
        cfg = read_adapter_config(src)
        if cfg["backbone_fingerprint"] != fingerprint:
            raise IncompatibleAdapterError(
                f"adapter {src} was made for backbone {cfg.get('backbone')!r} (fingerprint "
                f"{cfg['backbone_fingerprint']}), but the composition is for {spec_name!r} ({fingerprint})"
            )
        if copy and Path(src).resolve() != out.resolve():
            dst = copy_adapter(Path(src), out / "adapters" / name)
            rel = dst.relative_to(out).as_posix()
        else:
            rel = Path(src).resolve().relative_to(out.resolve()).as_posix() if copy else str(Path(src).resolve())
        entries.append(
            {"name": name, "path": rel, "variant": cfg["variant"], "task": (cfg.get("task") or {}).get("name")}
        )
    spec = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mode": mode,
        "backbone": spec_name,
        "backbone_fingerprint": fingerprint,
        "adapters": entries,
        "weights": [float(w) for w in weights] if weights is not None else None,
    }
    spec.update(extra or {})
    write_json(out / COMPOSITION_FILE, spec)
    return out


def activation(mode: str, weights: list[float] | None, n: int) -> tuple[str, list[float] | None]:
    """The backbone mode and weights a composition mode activates with (average: normalised parallel)."""
    if mode == "average":
        w = [1.0] * n if weights is None else [float(x) for x in weights]
        total = sum(w)
        if total == 0:
            raise ConfigError("average weights sum to zero")
        return "parallel", [x / total for x in w]
    if mode in ("stack", "parallel", "fuse"):
        return mode, weights
    if mode == "wise":
        return "parallel", [float(x) for x in (weights or [1.0])]
    return "stack", None


@dataclass
class Composition:
    """A composition loaded on a backbone: adapter names as loaded, mode, weights, fusion and router."""

    path: Path
    mode: str
    names: list[str]
    weights: list[float] | None = None
    fusion: str | None = None
    router: Any = None
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # adapter name -> {"meta", "head", "dir"}
    spec: dict[str, Any] = field(default_factory=dict)

    def activate(self, backbone, adapter: str | None = None, task: str | None = None) -> None:
        """Activate the composition; in route mode `adapter` (a name) or `task` (a task name) picks one."""
        model = AdaptedModel.of(backbone)
        if adapter is not None or task is not None:
            model.set_adapter(self.pick(adapter, task))
            return
        if self.mode == "route":
            model.set_adapter()  # per-input routing: see `route` / `routed`
            return
        mode, weights = activation(self.mode, self.weights, len(self.names))
        model.set_adapter(*self.names, mode=mode, weights=weights, fusion=self.fusion)

    def pick(self, adapter: str | None = None, task: str | None = None) -> str:
        if adapter is not None:
            if adapter in self.names:
                return adapter
            aliases = {e.get("name"): n for e, n in zip(self.spec.get("adapters", []), self.names)}
            if adapter in aliases:
                return aliases[adapter]
            raise ConfigError(f"adapter {adapter!r} is not in composition {self.path}; it has {', '.join(self.names)}")
        matches = [n for n in self.names if (self.tasks.get(n, {}).get("meta") or {}).get("name") == task]
        if not matches:
            have = sorted(str(n) for n in {(t.get("meta") or {}).get("name") for t in self.tasks.values()} - {None})
            raise ConfigError(f"no adapter for task {task!r} in composition {self.path}; tasks: {', '.join(have)}")
        return matches[0]

    def routed(self, backbone):
        """A view of `backbone` whose encoders send each input through the adapter the router picks."""
        if self.router is None:
            raise ConfigError(
                f"composition {self.path} has no router", hint="train one with `vlkit compose A,B --mode route -o DIR`"
            )
        return self.router.view(backbone)


def read_task(d: Path | None) -> dict[str, Any]:
    if d is None:
        return {}
    meta = json.loads((d / "task.json").read_text()) if (d / "task.json").is_file() else None
    head = d / "head.safetensors"
    return {"meta": meta, "head": head if head.is_file() else None, "dir": d}


@contextlib.contextmanager
def frozen(backbone):
    """Within the block the backbone runs with no adapter; the activation state is restored after."""
    with AdaptedModel.of(backbone).disabled():
        yield backbone
