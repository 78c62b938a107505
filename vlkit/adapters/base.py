"""The adapter-variant interface: a variant says how to wrap one site; the core does the rest."""

from __future__ import annotations

import dataclasses
import json
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from ..errors import ConfigError

TOWER_CHOICES = ("both", "vision", "text", "all", "projector", "encoder", "decoder", "lm")
"""`towers:` values: a CLIP backbone's `vision` / `text` / `both`; a generative one's `vision`, `projector`,
`encoder`, `decoder`, `lm` (its language model) and `all` / `both` (every part). The backbone checks the choice
(`resolve_towers`)."""


@dataclass
class AdapterConfig:
    """Options every variant shares: which towers, layers and sites to target."""

    towers: str = "both"
    """Towers to adapt: both, vision or text."""
    layers: list[int] | None = None
    """Block indices to adapt in each chosen tower (negative ones count from the end, -1 the last); None: every
    block."""
    targets: list[str] | None = None
    """Sites to wrap, each a role (attn.q, mlp, ...), a module path or path suffix, or re:REGEX; None: the
    variant's default roles."""
    exclude: list[str] = field(default_factory=list)
    """Sites to leave out of the targeted ones, matched like targets (role, path or suffix, re:REGEX)."""

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


ConfigT = TypeVar("ConfigT", bound=AdapterConfig)
"""A variant's own config dataclass: `class LoraVariant(AdapterVariant[LoraConfig])`."""


class AdapterVariant(ABC, Generic[ConfigT]):
    """How one kind of adapter wraps a site. The core (vlkit.adapters.inject) does the rest: it selects the
    sites, wraps their modules in hosts, freezes the backbone, creates one layer per site through
    `create_layer`, saves / loads the layers' `state_dict()`, merges, shares and composes them.

    A plugin registers an instance through the `register_adapters` hook (see vlkit.hookspecs):
    `register("dora", DoraVariant(), summary)`. The registered name is the variant's identity in adapter
    files; keep it equal to `name`.

    **Sites.** A backbone describes each transformer block as a set of `vlkit.backbones.base.Site`s. Each has
    `tower` ("vision" or "text"), `layer` (block index), `role`, `path` (unique; `<module path>` or
    `<attention module path>#q` for a projection inside an nn.MultiheadAttention), `host_path` (the module that
    gets wrapped), `kind`, `in_features`, `out_features`, and `key` (the role with "." replaced by "_").
    Roles:

    - `embed`: the token sequence entering a tower's first block (kind "output", block 0 only);
    - `attn`, `mlp`: the output of a block's attention / MLP sub-layer (kind "output");
    - `attn.q`, `attn.k`, `attn.v`, `attn.out`: the attention's query / key / value / output projections
      (kind "linear"), whether the backbone fuses them (nn.MultiheadAttention's `in_proj_weight`, as
      open_clip and tiny do) or keeps separate modules (transformers' `q_proj`, ...);
    - `attn.qkv`: one module projecting query, key and value at once (GPT-2's `c_attn`, kind "linear"), one
      site, which a target naming any of its parts (`attn.q`, `attn.k`, `attn.v`) selects, as PEFT does;
    - `mlp.fc1`, `mlp.fc2`: the MLP's first and second projection (kind "linear").

    A linear site's weight is always (out_features, in_features): a transformers `Conv1D` (GPT-2), which stores
    its parameter as (in, out), is seen transposed, and merges are written back transposed.

    Kinds: "output" (the layer maps a sub-layer's output tensor to a new one), "linear" (the layer sees a
    projection's input, base output and base weights), "input" (like "output", but on the sub-layer's
    input; a variant creates these by moving a site in `place`, e.g. role `attn.in`). A variant lists the
    kinds it wraps in `kinds`; sites of other kinds are never offered to it. Backbones may add kinds.

    **Layer contract.** `create_layer` returns an nn.Module (the core moves it to the base's device and
    dtype, and sets `requires_grad` on all its parameters):

    - output / input sites: `forward(y) -> y'`, y of shape (batch, tokens, width) or (tokens, batch, width)
      (sequence-first open_clip towers); y' has the same shape;
    - linear sites: `forward(x, y, weight, bias) -> y'` with x the projection's input (..., in_features),
      y = F.linear(x, weight, bias) the base output (..., out_features), and the live base weight
      (out_features, in_features) / bias (out_features or None). Return y' of y's shape. Prefer
      `y + delta(x)` forms: several adapters may be stacked at one site (each then gets the previous one's
      output as y) or run in parallel (their y' - y are weighted and summed);
    - at init the layer should be the identity (y' == y), so injecting leaves the model unchanged;
    - everything in the layer's `state_dict()` is the adapter (saved as `<site path>.<name>`). Do not keep
      the base module as a submodule attribute (that would save and train the base): read what you need
      from `base` when creating the layer, or keep a `LinearView` (not an nn.Module);
    - optional shortcuts for linear sites, used by the host only for the first layer of a plain stack (no
      routing, mode "stack"), where `y` is exactly the base output; each must give what `forward` gives:
      `input_transform` (a callable x -> x', or None) for a layer whose whole effect is a change of the
      projection's input (y' = W x' + b: the host projects x' once instead of the layer projecting again,
      as (IA)^3's input scaling does), and `from_base(x, y, weight, bias)` for a layer that can reuse the
      base output instead of recomputing `F.linear(x, weight)` (DoRA). Define them on the class (a property
      may return None per instance);
    - optional `bind_state(state)`: called once with the backbone's AdapterState (joint / cross-modal
      layers read `state.context`);
    - `merged` (bool attribute, default False): set by the core while the layer is folded into the base
      weights (`merge_adapter`); a merged layer is skipped in forward. Layers that can merge should
      define `self.merged = False`.

    **Merging into the base** (`merge_adapter` / export): `merged_weight(layer, weight, bias)` returns the
    folded (weight, bias); the core saves the originals and restores them bit-exactly on unmerge.

    **Sharing across task adapters** (multi-task `sharing`, vlkit.compose.sharing): `shareable` maps a
    scheme to the layer attributes (submodules or parameters) tied across tasks.

    **Merging adapters** (`vlkit compose merge`, vlkit.compose.merge): every variant gets the elementwise
    methods `linear`, `task_arithmetic` and `ties` over its saved tensors (which assumes each tensor's
    neutral value is zero or, for `linear`, that averaging is meaningful); `merge_free_options` names the
    options sources may differ in. A variant adds its own methods (LoRA's `concat`, `svd`) by listing them
    in `merge_methods` and implementing `merge`.
    """

    name: str = ""
    summary: str = ""
    config_cls: type = AdapterConfig
    default_roles: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("linear",)
    joint: bool = False
    shareable: dict[str, tuple[str, ...]] = {}
    """Sharing scheme -> names of layer attributes tied across task adapters, e.g. a bottleneck's
    `{"half_shared_down": ("down",), "half_shared_up": ("up",), "shared": ("down", "up")}`. An attribute may
    be a submodule or an nn.Parameter of the layer. Schemes: `half_shared_down`, `half_shared_up` (the
    variant says what "down" / "up" are) and `shared`; `per_task` is always available (nothing tied), and
    `shared` without an entry ties the whole layer."""
    merge_methods: tuple[str, ...] = ()
    """This variant's own adapter-merge methods beyond the elementwise ones (implemented in `merge`)."""
    backbone_kinds: tuple[str, ...] = ("contrastive", "generative")
    """The kinds of backbone (`Backbone.kind`: "contrastive" CLIP-style dual encoders, "generative" models that
    write text) this variant adapts; injecting it into another kind is refused in one line."""
    identity_at_init: bool = True
    """False for variants whose layers change the outputs even at init (prompt tokens join every attention
    softmax: `vpt`, `maple`, `prompt`); every other variant's layers start as the identity."""
    training_free: bool = False
    """True for a variant built from data rather than trained (Tip-Adapter's cache): its layers hold buffers,
    no parameters; `vlkit train` builds it through `init_from_data` only with `optim.steps=0`."""
    composition_limits: dict[str, str] = {}
    """Compositions this variant refuses, each with the one-line reason shown to the user. Keys: `stack`,
    `parallel` (activating two adapters of this variant together in that mode), `merge` (every adapter-merge method) or
    the name of one merge method (`task_arithmetic`, ...)."""

    def make_config(self, **options: Any) -> ConfigT:
        return build_config(self.config_cls, options, what=f"{self.name} adapter")

    def roles(self, config: ConfigT) -> tuple[str, ...]:
        """The site roles targeted when the config names no explicit targets."""
        return self.default_roles

    def place(self, site, config: ConfigT):
        """The site a layer is made for; a variant may move it (e.g. to a sub-layer's input: a copy with
        kind "input" and a role like `attn.in`). Default: as is."""
        return site

    def prepare_config(self, backbone, config: ConfigT, sites) -> ConfigT:
        """Fill in what depends on the backbone (e.g. a layer pairing) before layers are made; saved with the
        adapter."""
        return config

    def options_from_data(self, backbone, task, train_data, options: dict[str, Any]) -> dict[str, Any]:
        """Adapter options that depend on the task or the training data, before the layers are made.

        Called by the `adapter` training method (`vlkit train`) with the built task, the training dataset
        (a `datasets.Dataset`, or an IterableDataset for a streaming source) and the recipe's adapter options
        (without `variant` / `name`); returns the options to inject with (e.g. the class names, a cache
        size). They are saved in the adapter's config, so keep them JSON values. Default: unchanged."""
        return options

    def init_from_data(self, backbone, name: str, task, train_data) -> None:
        """Fill the new adapter `name` (already injected and active) from the training data, before
        training starts (e.g. Tip-Adapter-F's cache keys are the training images' features). Default: nothing."""
        return None

    @abstractmethod
    def create_layer(self, site, config: ConfigT, base=None) -> nn.Module:
        """A new layer for `site` (see the class docstring for the layer contract).

        `base` is the frozen base behind the site: for a linear site an object with `weight`
        (out_features, in_features), `bias` (out_features or None), `in_features` and `out_features` (the
        nn.Linear itself, or a `vlkit.adapters.LinearView` of the role's rows of an nn.MultiheadAttention);
        for every other kind the wrapped module (the attention, the MLP, the embedding). Its tensors are the
        live base parameters: read them, do not modify them; `vlkit.adapters.linear_weights(base, role)`
        gives a sub-projection of an output site's module.

        The core always passes `base` as a keyword: keep the parameter in an override's signature."""

    def merged_weight(self, layer: nn.Module, weight, bias):
        """(weight, bias) with the layer folded in, or None when the variant cannot merge.

        weight / bias are detached copies of the base's current values (bias may be None); return new
        tensors of the same shapes (a bias of None keeps the base's bias). Only linear sites merge."""
        return None

    def describe_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Iterable[tuple[str, str]]:
        """(label, value) lines `vlkit inspect` prints for a saved adapter of this variant (its `config` as saved
        and its tensors by saved key). Default: none."""
        return ()

    def plain_equivalent_parameters(self, config: ConfigT, sites) -> int | None:
        """Parameters of a plain bottleneck on the same sites, for variants whose overhead over one is worth
        reporting (`vlkit inject` prints it); None: not reported."""
        return None

    def extra_trainable(self, backbone, config: ConfigT, sites) -> dict[str, nn.Parameter]:
        """Backbone parameters this variant trains too (e.g. layer norms), by unwrapped name.

        They are saved as `base::<name>`; they are absolute weights, so adapter merges other than `linear`
        refuse them."""
        return {}

    # --- merging adapters (vlkit.compose.merge) --------------------------------------------------------
    def merge_limit(self, method: str, config: dict[str, Any]) -> str | None:
        """Why adapters with this variant `config` (a dict, as saved) cannot be merged with `method`, in one
        line, or None. Default: `composition_limits[method]`, else `composition_limits["merge"]`; override it
        where the answer depends on the config (the `peft` bridge: an (IA)^3 or DoRA tuner is no task vector)."""
        return self.composition_limits.get(method) or self.composition_limits.get("merge")

    def merge_free_options(self, method: str) -> tuple[str, ...]:
        """Config options the merged sources may differ in under `method` (all others must be equal).

        Default: `dropout` (training-only) for every method."""
        return ("dropout",)

    def merge(
        self,
        method: str,
        configs: list[dict[str, Any]],
        tensors: list[dict[str, Any]],
        weights: list[float],
        options: dict[str, Any],
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Merge adapters of this variant with one of `merge_methods`.

        `configs`: each source's variant config (the `config` of adapter_config.json, a dict);
        `tensors`: each source's tensors `{"<site path>.<layer state name>": tensor}` (as saved);
        `weights`: one float per source; `options`: the merge's generic options (`density`, `rank`, may be
        None). One source is allowed. Return (merged tensors with the same keys a layer of the returned
        config loads, the merged variant config, info): `info` is recorded in the merged adapter's
        `composition` (e.g. an error measure or the rank chosen)."""
        raise ConfigError(
            f"adapter variant {self.name!r} has no merge method {method!r}; "
            f"its methods: {', '.join(self.merge_methods) or 'the elementwise ones only'}"
        )
