"""The adapter-variant interface: a variant says how to wrap one site; the core does the rest."""
from __future__ import annotations

import dataclasses
import json
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import ConfigError

TOWER_CHOICES = ("both", "vision", "text")


@dataclass
class AdapterConfig:
    """Options every variant shares: which towers, layers and sites to target."""

    towers: str = "both"
    layers: list[int] | None = None
    targets: list[str] | None = None
    exclude: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.towers not in TOWER_CHOICES:
            raise ConfigError(f"towers must be one of {', '.join(TOWER_CHOICES)}, got {self.towers!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a value (possibly a CLI string) into the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as exc:
                last = exc
        raise last or ConfigError(f"bad value {value!r} for {key}")
    if origin is list:
        (inner,) = args or (Any,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    raise ConfigError(f"{key} must be a list, got {value!r}") from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def build_config(cls: type, options: dict[str, Any], what: str = "adapter") -> Any:
    """Instantiate dataclass `cls` from options, with unknown keys and bad types as ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    values = {k: _coerce(v, hints[k], k) for k, v in options.items()}
    cfg = cls(**values)
    cfg.validate()
    return cfg


class AdapterVariant(ABC):
    """How one kind of adapter wraps a site. Subclasses set name, config_cls, default_roles, kinds."""

    name: str = ""
    summary: str = ""
    config_cls: type = AdapterConfig
    default_roles: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("linear",)
    joint: bool = False

    def make_config(self, **options: Any) -> AdapterConfig:
        return build_config(self.config_cls, options, what=f"{self.name} adapter")

    def roles(self, config: AdapterConfig) -> tuple[str, ...]:
        """The site roles targeted when the config names no explicit targets."""
        return self.default_roles

    def place(self, site, config: AdapterConfig):
        """The site a layer is made for; a variant may move it (e.g. to a sub-layer's input). Default: as is."""
        return site

    def prepare_config(self, backbone, config: AdapterConfig, sites) -> AdapterConfig:
        """Fill in what depends on the backbone (e.g. a layer pairing) before layers are made; saved with the adapter."""
        return config

    @abstractmethod
    def create_layer(self, site, config: AdapterConfig) -> nn.Module:
        """A new module for `site`: forward(y) for output sites, forward(x, y, weight, bias) for linear ones."""

    def merged_weight(self, layer: nn.Module, weight, bias):
        """(weight, bias) with the layer folded in, or None when the variant cannot merge."""
        return None

    def extra_trainable(self, backbone, config: AdapterConfig, sites) -> dict[str, nn.Parameter]:
        """Backbone parameters this variant trains too (e.g. layer norms), by unwrapped name."""
        return {}
