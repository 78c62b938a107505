"""Which adapters are active on a backbone, how they combine, and per-sample routing; shared by all hosts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, UnknownNameError

NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
MODES = ("stack", "parallel", "fuse")


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"adapter name {name!r} is not valid: use letters, digits, '_' and '-'")
    return name


@dataclass
class AdapterState:
    """The adapter sites' runtime switchboard: which loaded adapters are active, how they combine, per-sample
    routes and the forward-time `context`, read by every adapter host (switching touches nothing else).

    Only the owner of the adapters (`vlkit.adapters.model.AdaptedModel`) writes it; `joint` names the active-able
    adapters whose variant fuses the towers, so joint scoring knows when to run."""

    active: tuple[str, ...] = ()
    mode: str = "stack"
    weights: dict[str, float] = field(default_factory=dict)
    route: Any = None  # LongTensor (batch,) of indices into route_names, -1 = no adapter
    route_names: tuple[str, ...] = ()
    context: dict[str, Any] = field(default_factory=dict)
    fusion: str | None = None  # mode "fuse": name of the AdapterFusion layers (host.fusions[fusion])
    joint: frozenset = frozenset()

    def activate(self, names, known, mode: str = "stack", weights=None, fusion: str | None = None) -> None:
        names = tuple(n for n in names if n)
        for n in names:
            if n not in known:
                raise UnknownNameError("adapter", n, list(known))
        if mode not in MODES:
            raise ConfigError(f"composition mode {mode!r} is not one of {', '.join(MODES)}")
        if weights is not None and len(weights) != len(names):
            raise ConfigError(f"{len(weights)} weights given for {len(names)} adapters")
        if mode == "fuse" and not fusion:
            raise ConfigError("composition mode 'fuse' needs the name of the fusion layers (fusion=...)")
        self.active = names
        self.mode = mode
        self.weights = {n: float(w) for n, w in zip(names, weights)} if weights is not None else {}
        self.fusion = fusion if mode == "fuse" else None
        self.route = None
        self.route_names = ()

    def set_route(self, names, index, known) -> None:
        """Route sample i of the next batches to adapter names[index[i]] (index -1: frozen backbone)."""
        for n in names:
            if n is not None and n not in known:
                raise UnknownNameError("adapter", n, list(known))
        import torch

        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if len(index) and (int(index.min()) < -1 or int(index.max()) >= len(names)):
            raise ConfigError(f"route indices must be in -1..{len(names) - 1} (-1: no adapter)")
        self.route_names = tuple(names)
        self.route = index
        self._groups: dict[str, list[torch.Tensor]] = {}

    def clear_route(self) -> None:
        self.route = None
        self.route_names = ()
        self._groups = {}

    def clear_groups(self) -> None:
        """Forget the per-device sample groups of the route (after the route itself was put back)."""
        self._groups = {}

    def route_groups(self, device) -> list:
        """Per route name, the LongTensor of its sample indices (on `device`), computed once per route."""
        groups = getattr(self, "_groups", None)
        if groups is None:
            groups = self._groups = {}
        key = str(device)
        if key not in groups:
            route = self.route.to(device)
            groups[key] = [(route == i).nonzero().flatten() for i in range(len(self.route_names))]
        return groups[key]
