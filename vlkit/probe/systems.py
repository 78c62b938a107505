"""What a probe compares: the frozen backbone and adapter configurations ("systems"), and how they score.

`resolve_adapter_arg(backbone, arg)` turns one item of ``--adapters`` into a :class:`System`:

- ``path/to/adapter``   an adapter directory (adapter_config.json + adapter_model.safetensors), loaded onto
                        the backbone under a free name;
- ``name``              an adapter already loaded on the backbone;
- ``a+b``               a stack of the parts (each a path or a loaded name), ``set_active(a, b, mode="stack")``;
- ``path/to/comp``      a composition directory (from `vlkit compose`) holding ``composition.json``:
                        ``{"mode": "stack"|"parallel", "adapters": [{"name": ..., "path": ...}], "weights": [...]}``
                        (paths relative to the directory);
- ``backbone``/``none`` the frozen backbone.

An adapter directory named several times (``a,b,a+b``) is loaded once. `score_examples` scores examples of
``t`` captions and ``m`` images under each system through `vlkit.scoring` (dual encoders: one embedding
per image and caption; fusion adapters: every (caption, image) pair jointly), preprocessing each batch once.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

COMPOSITION_FILE = "composition.json"
ADAPTER_CONFIG = "adapter_config.json"
FROZEN_NAMES = ("backbone", "none", "frozen")


@dataclass
class System:
    """One configuration of the backbone to evaluate: which adapters are active and how they combine."""

    label: str
    names: tuple[str, ...] = ()
    mode: str = "stack"
    weights: list[float] | None = None
    sources: list[str] = field(default_factory=list)
    slug: str = "backbone"

    def activate(self, backbone) -> None:
        backbone.set_active(*self.names, mode=self.mode, weights=self.weights)

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "adapters": list(self.sources or self.names), "mode": self.mode,
                "weights": self.weights}


def frozen_system() -> System:
    return System(label="backbone")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "x"


def _free_name(backbone, wanted: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_\-]+", "_", wanted).strip("_") or "adapter"
    name, k = base, 2
    while name in backbone.adapter_records:
        name, k = f"{base}_{k}", k + 1
    return name


class AdapterResolver:
    """Resolves --adapters items on one backbone, loading each adapter directory once."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.loaded: dict[str, str] = {}  # resolved directory -> adapter name on the backbone

    def load_dir(self, path: Path) -> str:
        from ..adapters.files import load_adapter, read_adapter_config

        key = str(path.resolve())
        if key not in self.loaded:
            cfg = read_adapter_config(path)
            name = _free_name(self.backbone, str(cfg.get("name") or path.name))
            load_adapter(self.backbone, path, name=name, activate=False)
            self.loaded[key] = name
        return self.loaded[key]

    def part(self, text: str, base: Path | None = None) -> tuple[str, str]:
        """(adapter name on the backbone, source) of one part: an adapter directory or a loaded name."""
        path = Path(text).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        if path.is_dir():
            if (path / ADAPTER_CONFIG).is_file():
                return self.load_dir(path), os.path.normpath(str(path))
            raise ConfigError(f"{path} is not an adapter directory (no {ADAPTER_CONFIG})")
        if text in self.backbone.adapter_records:
            return text, text
        raise ConfigError(f"adapter {text!r} not found: not an adapter directory nor an adapter loaded on the "
                          f"backbone" + (f" (loaded: {', '.join(self.backbone.adapter_records)})"
                                         if self.backbone.adapter_records else ""))

    def composition(self, path: Path, label: str) -> System:
        file = path / COMPOSITION_FILE
        try:
            spec = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read composition {file}: {exc}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("adapters"), list) or not spec["adapters"]:
            raise ConfigError(f"composition {file} needs a non-empty 'adapters' list of {{name, path}}")
        mode = spec.get("mode", "stack")
        if mode not in ("stack", "parallel"):
            raise ConfigError(f"composition {file}: mode {mode!r} is not stack or parallel")
        names, sources = [], []
        for item in spec["adapters"]:
            if isinstance(item, str):
                item = {"path": item}
            if not isinstance(item, dict) or not (item.get("path") or item.get("name")):
                raise ConfigError(f"composition {file}: each adapter needs a path (or a loaded name): {item!r}")
            name, source = self.part(str(item.get("path") or item["name"]), base=path if item.get("path") else None)
            names.append(name)
            sources.append(source)
        weights = spec.get("weights")
        if weights is not None:
            if not isinstance(weights, list) or len(weights) != len(names):
                raise ConfigError(f"composition {file}: {len(weights) if isinstance(weights, list) else weights!r} "
                                  f"weights for {len(names)} adapters")
            weights = [float(w) for w in weights]
        return System(label=label, names=tuple(names), mode=mode, weights=weights, sources=sources,
                      slug=_slug(path.name))

    def resolve(self, arg: str) -> System:
        text = str(arg).strip()
        if not text:
            raise ConfigError("empty item in --adapters")
        if text.lower() in FROZEN_NAMES:
            return frozen_system()
        path = Path(text).expanduser()
        if path.is_dir() and (path / COMPOSITION_FILE).is_file():
            return self.composition(path, text)
        parts = [text] if path.exists() or text in self.backbone.adapter_records else text.split("+")
        resolved = [self.part(p.strip()) for p in parts if p.strip()]
        if not resolved:
            raise ConfigError(f"empty adapter stack {arg!r}")
        names = tuple(n for n, _ in resolved)
        if len(set(names)) != len(names):
            raise ConfigError(f"adapter stack {arg!r} names the same adapter twice")
        slug = "+".join(_slug(Path(p.strip()).name) for p in parts if p.strip())
        return System(label=text, names=names, mode="stack", sources=[s for _, s in resolved], slug=slug)


def resolve_adapter_arg(backbone, arg: str, resolver: AdapterResolver | None = None) -> System:
    """One ``--adapters`` item as a :class:`System` (see the module docstring for the accepted forms)."""
    return (resolver or AdapterResolver(backbone)).resolve(arg)


def parse_adapters(value: str | Sequence[str] | None) -> list[str]:
    """``"a,b,a+b"`` (or a list of such strings) to its items."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [p.strip() for item in items for p in str(item).split(",") if p.strip()]


def resolve_systems(backbone, adapters: str | Sequence[str] | None) -> list[System]:
    """The frozen backbone followed by one system per ``--adapters`` item (labels must be distinct)."""
    resolver = AdapterResolver(backbone)
    systems = [frozen_system()]
    for item in parse_adapters(adapters):
        system = resolver.resolve(item)
        if system.names:
            systems.append(system)
    labels = [s.label for s in systems]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup is not None:
        raise ConfigError(f"--adapters names {dup!r} twice")
    return systems


# ----------------------------------------------------------------------------------------- scoring

Batch = Callable[[int, int], tuple[list[list[Any]], list[list[str]]]]


def _device(backbone):
    import torch

    for p in backbone.parameters():
        return p.device
    return torch.device("cpu")


def score_examples(backbone, systems: Sequence[System], n: int, get_batch: Batch, *, batch_size: int = 32,
                   progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Scores of each system: ``{label: array (n, t, m)}`` with ``[example, caption, image]``.

    ``get_batch(start, stop)`` returns, for examples ``start..stop-1``, their images (a list of ``m`` PIL
    images each) and captions (``t`` strings each). The backbone's active adapters are restored afterwards.
    """
    import torch

    from ..scoring import pair_scores, paired_scores, uses_joint_scoring

    state = backbone.adapter_state
    previous = (state.active, state.mode, dict(state.weights))
    device = _device(backbone)
    out: dict[str, list[np.ndarray]] = {s.label: [] for s in systems}
    try:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            images, captions = get_batch(start, stop)
            k = stop - start
            m, t = len(images[0]), len(captions[0])
            if any(len(x) != m for x in images) or any(len(c) != t for c in captions):
                raise ValueError("every example needs the same number of images and of captions")
            with torch.no_grad():
                pixels = backbone.preprocess_batch([im for ims in images for im in ims]).to(device)
                tokens = backbone.tokenize([c for cs in captions for c in cs]).to(device)
                ex = torch.arange(k).repeat_interleave(t * m)
                cap = torch.arange(t).repeat_interleave(m).repeat(k)
                img = torch.arange(m).repeat(k * t)
                rows, cols = (ex * t + cap).to(device), (ex * m + img).to(device)
                for system in systems:
                    system.activate(backbone)
                    if uses_joint_scoring(backbone):  # fusion: only the pairs needed, each scored jointly
                        s = paired_scores(backbone, pixels[cols], tokens[rows])
                    else:
                        s = pair_scores(backbone, pixels, tokens)[rows, cols]
                    out[system.label].append(s.float().cpu().numpy().reshape(k, t, m))
            if progress is not None:
                progress(k)
    finally:
        backbone.set_active(*previous[0], mode=previous[1],
                            weights=[previous[2][n_] for n_ in previous[0]] if previous[2] else None)
    return {label: np.concatenate(parts) if parts else np.zeros((0, 0, 0)) for label, parts in out.items()}
