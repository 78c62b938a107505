"""The `peft` bridge variant: any PEFT tuner that wraps an nn.Linear (LoRA, DoRA, LoHa, LoKr, (IA)^3, OFT, BOFT,
HRA, ...) applied per site to the backbone's projections, through vlkit's own injection core.

    adapter: {variant: peft, config: {peft_type: LORA, r: 8, use_dora: true, target_modules: [q_proj, v_proj]}}

How it fits the per-site contract: for every linear site (an hf `nn.Linear`, or one projection of an
nn.MultiheadAttention seen as a `LinearView` on open_clip / tiny) `create_layer` builds the PEFT tuner layer
around a stand-in linear (`_BaseProxy`) that holds no parameters: at each forward the proxy is bound to the
site's live base weight and bias, the tuner runs as PEFT runs it, and the layer returns its output,
so it stacks and runs in parallel like every vlkit layer (the tuner's call of its base layer returns the
site's output so far). The layer's `state_dict()` is exactly PEFT's adapter
tensors (`tuner.lora_A.default.weight`, ...), so save / load are bit-exact and `vlkit export --format peft`
writes them under PEFT's own names.

- `config` is PEFT's config for `peft_type` (the keys of `peft.LoraConfig`, `peft.LoHaConfig`, ...); it is
  checked by PEFT itself at `inject` time.
- `target_modules` is matched against vlkit's sites: a list entry is a module name or suffix (`q_proj`,
  `self_attn.v_proj`, `c_fc`) or a vlkit role (`attn.q`); the transformers names `q_proj`, `k_proj`, `v_proj`,
  `out_proj`, `fc1`, `fc2` also select the same projections of open_clip / tiny attention (which PEFT itself
  could only reach through its experimental nn.MultiheadAttention support); a string is a regular expression
  over the whole module path (PEFT's rule); `all-linear` targets every projection. vlkit's own `targets`,
  `towers`, `layers`, `exclude` work as for every variant (`targets` overrides `target_modules`);
  `layers_to_transform` and `exclude_modules` map to `layers` and `exclude`; `rank_pattern` / `alpha_pattern`
  are matched against each site's path.
- Refused with one line each: prompt-learning types (use vlkit's coop / vpt / maple), tuners with state shared
  across layers (VeRA and the like: PEFT's `inject_adapter_in_model` refuses them), `modules_to_save`
  (vlkit trains the task head itself), a trained base bias (`bias` other than "none", `lora_bias`), and
  initialisations that rewrite the base weights or need data (PiSSA, OLoRA, LoftQ, EVA, CorDA).
- Merging into the base (`merge_adapter`, `vlkit export`, `merge_and_unload`): PEFT's own `merge()` on a copy
  of the tuner bound to the base weights; every PEFT linear tuner merges.
- Adapter merges (`vlkit compose merge`): the elementwise methods over PEFT's tensors; `linear` is sound for
  every tuner, `task_arithmetic` / `ties` assume tensors whose neutral value is zero (LoRA's factors), so they
  are refused in one line for a DoRA magnitude (`use_dora`) or an (IA)^3 scale (`merge_limit`).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InjectionError
from .base import AdapterConfig, AdapterVariant

ADAPTER_NAME = "default"
LINEAR_ROLES = ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc1", "mlp.fc2")
# transformers' projection names -> vlkit roles, so one PEFT config targets the same projections everywhere
NAME_ROLES = {
    "q_proj": "attn.q",
    "k_proj": "attn.k",
    "v_proj": "attn.v",
    "out_proj": "attn.out",
    "o_proj": "attn.out",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
    "c_fc": "mlp.fc1",
    "c_proj": "mlp.fc2",
}
_PART_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}
DEFAULT_TARGETS = ["q_proj", "v_proj"]
# options of PEFT configs that vlkit handles itself or cannot honour: key -> None (dropped) or the reason
_HANDLED = (
    "target_modules",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
    "feedforward_modules",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_type",
)
_BAD_INIT = ("pissa", "olora", "loftq", "eva", "corda", "orthogonal")


def _peft():
    try:
        import peft
    except ImportError:  # a dependency of vlkit; only a broken install lands here
        raise ConfigError("the peft adapter variant needs the `peft` package: pip install peft") from None
    return peft


def peft_config_class(peft_type: str):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    key = str(peft_type).upper()
    cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(key)  # type: ignore[call-overload]  # PeftType is a str enum
    if cls is None:
        known = ", ".join(sorted(str(k) for k in PEFT_TYPE_TO_CONFIG_MAPPING))
        raise ConfigError(f"unknown peft_type {peft_type!r}; PEFT knows {known}")
    return cls


def _site_name(site) -> str:
    """The module path PEFT would see for this site (`attn#q` of a fused attention reads `attn.q_proj`)."""
    if "#" in site.path:
        host, part = site.path.split("#", 1)
        return f"{host}.{_PART_NAMES.get(part, part)}"
    return site.path


def _pattern_value(patterns: dict[str, Any], name: str):
    """PEFT's rule for rank_pattern / alpha_pattern keys: a regex matching the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _as_list(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


@dataclass
class PeftBridgeConfig(AdapterConfig):
    config: dict[str, Any] = field(
        default_factory=lambda: {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": list(DEFAULT_TARGETS)}
    )
    """PEFT's config as an object (or JSON): peft_type (LORA, LOHA, LOKR, IA3, OFT, ...) and that tuner's
    options (r, lora_alpha, use_dora, target_modules, ...); prompt-learning types and modules_to_save are
    refused."""

    def validate(self) -> None:
        super().validate()
        cfg = self.config
        if isinstance(cfg, str):
            try:
                cfg = json.loads(cfg)
            except json.JSONDecodeError:
                raise ConfigError(f"config must be an object of PEFT options, got {self.config!r}") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"config must be an object of PEFT options (peft_type, r, ...), got {cfg!r}")
        cfg = dict(cfg)
        cfg["peft_type"] = str(cfg.get("peft_type", "LORA")).upper()
        cfg.setdefault("target_modules", list(DEFAULT_TARGETS))
        self.config = cfg
        if cfg.get("modules_to_save"):
            raise ConfigError("peft config: modules_to_save is not supported; vlkit trains the task head itself")
        if str(cfg.get("bias", "none")) != "none" or cfg.get("lora_bias"):
            raise ConfigError(
                "peft config: a trained base bias (bias / lora_bias) is not supported; adapters "
                "keep the backbone frozen"
            )
        init = cfg.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().split("_")[0] in _BAD_INIT:
            raise ConfigError(
                f"peft config: init_lora_weights={init!r} rewrites the base weights or needs data; "
                "use true, false or 'gaussian'"
            )
        if cfg.get("layers_pattern") and not cfg.get("layers_to_transform"):
            raise ConfigError("peft config: layers_pattern needs layers_to_transform (or use vlkit's `layers`)")
        if cfg.get("layers_to_transform") is not None and self.layers is None:
            ltt = cfg["layers_to_transform"]
            self.layers = [int(ltt)] if isinstance(ltt, int) else [int(i) for i in ltt]
        peft_config_class(cfg["peft_type"])  # an unknown peft_type is a ConfigError here
        probe = _peft_config(cfg, feedforward=False)
        if probe.is_prompt_learning:
            raise ConfigError(
                f"peft_type {cfg['peft_type']} is a prompt-learning method, not a tuner of layers; "
                "vlkit's coop, vpt and maple variants learn prompts"
            )
        try:  # one throw-away layer: PEFT says now (not half-way through injection) if it cannot wrap a linear
            _make_tuner(cfg, torch.zeros(4, 4), None, feedforward=False)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"peft_type {cfg['peft_type']} cannot wrap a linear projection here: {type(exc).__name__}: {exc}"
            ) from None


def _peft_config(cfg: dict[str, Any], feedforward: bool, r=None, alpha=None):
    """PEFT's config object for one site: its options, targeting the proxy child `base`."""
    cls = peft_config_class(cfg["peft_type"])
    opts = {k: v for k, v in cfg.items() if k not in _HANDLED}
    if r is not None:
        opts["r"] = r
    if alpha is not None:
        opts["lora_alpha"] = alpha
    opts["target_modules"] = ["base"]
    if cfg["peft_type"] == "IA3":
        opts["feedforward_modules"] = ["base"] if feedforward else []
    try:
        return cls(**opts)
    except TypeError as exc:
        raise ConfigError(f"peft config: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"peft config: {exc}") from None


class _BaseProxy(nn.Linear):
    """The stand-in base layer a PEFT tuner wraps: an nn.Linear without parameters of its own, bound to the
    site's live weight / bias while the tuner runs (so nothing of the backbone is saved, trained or copied)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        # PEFT reads device, dtype and (DoRA) the weight norm from real parameters while it builds the layer
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)  # type: ignore[assignment]

    def release(self) -> None:
        self._parameters.pop("weight", None)
        self._parameters.pop("bias", None)
        self.bind(None, None)

    def bind(self, weight, bias, x=None, y=None) -> None:
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "_xy", None if x is None else (x, y))
        object.__setattr__(self, "called", False)

    def forward(self, x):
        xy = self.__dict__.get("_xy")
        if xy is not None and x is xy[0]:  # the tuner asks for the base output of the site's input: it is y
            object.__setattr__(self, "called", True)
            return xy[1]
        return F.linear(x, self.weight, self.bias)

    def __deepcopy__(self, memo):
        new = _BaseProxy.__new__(_BaseProxy)
        nn.Module.__init__(new)
        new.out_features, new.in_features = self.out_features, self.in_features
        new.bind(None, None)
        return new


class _Box(nn.Module):
    def __init__(self, proxy: nn.Module):
        super().__init__()
        self.base = proxy


def _make_tuner(cfg: dict[str, Any], weight, bias, feedforward: bool, r=None, alpha=None) -> Any:
    peft = _peft()
    box = _Box(_BaseProxy(weight, bias))
    try:
        peft.inject_adapter_in_model(_peft_config(cfg, feedforward, r, alpha), box, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        raise ConfigError(f"peft_type {cfg['peft_type']}: {exc}") from None
    tuner = box.base
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(tuner, BaseTunerLayer):
        raise ConfigError(f"peft_type {cfg['peft_type']} did not wrap the linear projection")
    cast(_BaseProxy, tuner.get_base_layer()).release()
    return tuner


class PeftSiteLayer(nn.Module):
    """One PEFT tuner layer at one linear site. The tuner's call of its base layer on x returns y (the site's
    output so far), so an additive tuner gives `y + delta(x)` exactly as PEFT computes it; a tuner that
    recomputes the projection with changed weights (OFT, HRA) gives `y + (tuner(x) - F.linear(x, weight, bias))`."""

    def __init__(self, cfg: dict[str, Any], weight, bias, feedforward: bool, r=None, alpha=None):
        super().__init__()
        self.tuner = _make_tuner(cfg, weight, bias, feedforward, r, alpha)
        self.merged = False

    def forward(self, x, y, weight, bias=None):
        proxy = self.tuner.get_base_layer()
        proxy.bind(weight, bias, x, y)
        try:
            out = self.tuner(x)
            called = proxy.called
        finally:
            proxy.bind(None, None)
        if called:  # the tuner built its output on the base output (LoRA, DoRA, LoHa, (IA)^3, ...): y stands for it
            return out
        return y + (out - F.linear(x, weight, bias))  # a tuner that recomputes the projection (OFT, HRA, ...)


class PeftVariant(AdapterVariant[PeftBridgeConfig]):
    """The PEFT bridge (see the module docstring)."""

    name = "peft"
    summary = "any PEFT tuner of linear layers (LoRA, DoRA, LoHa, LoKr, IA3, OFT, ...) per projection; mergeable"
    config_cls = PeftBridgeConfig
    kinds = ("linear",)

    def roles(self, config: PeftBridgeConfig) -> tuple[str, ...]:
        targets = config.config.get("target_modules")
        if isinstance(targets, str):
            if targets == "all-linear":
                return LINEAR_ROLES
            return (f"re:^(?:{targets})$",)
        out: list[str] = []
        for t in _as_list(targets) or DEFAULT_TARGETS:
            out.append(t)
            if t in NAME_ROLES:
                out.append(NAME_ROLES[t])
        return tuple(dict.fromkeys(out))

    def make_config(self, **options: Any) -> PeftBridgeConfig:
        config = super().make_config(**options)
        excl = _as_list(config.config.get("exclude_modules"))
        if excl:
            config.exclude = list(dict.fromkeys(list(config.exclude) + excl))
        return config

    def create_layer(self, site, config: PeftBridgeConfig, base=None) -> nn.Module:
        if base is None:
            raise InjectionError("the peft variant needs the base projection of each site")
        cfg = config.config
        name = _site_name(site)
        ff = _as_list(cfg.get("feedforward_modules")) or []
        feedforward = any(name == f or name.endswith("." + f) or NAME_ROLES.get(f) == site.role for f in ff)
        r = _pattern_value(cfg.get("rank_pattern") or {}, name)
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name)
        return PeftSiteLayer(cfg, base.weight, base.bias, feedforward, r, alpha)

    def merge_limit(self, method: str, config: dict[str, Any]) -> str | None:
        if method not in ("task_arithmetic", "ties"):
            return super().merge_limit(method, config)
        cfg = config.get("config") or {}
        kind = str(cfg.get("peft_type", "")).upper()
        if kind == "IA3":
            return "(IA)^3 scales have neutral value 1, not 0: they are no task vector (use --method linear)"
        if cfg.get("use_dora"):
            return "a DoRA magnitude is an absolute row norm, not a task vector (use --method linear)"
        return super().merge_limit(method, config)

    def merged_weight(self, layer: nn.Module, weight, bias):
        tuner = copy.deepcopy(cast(PeftSiteLayer, layer).tuner)  # a variant is only handed its own layers
        proxy = tuner.get_base_layer()
        proxy.bind(weight.clone(), None if bias is None else bias.clone())
        try:
            with torch.no_grad():
                tuner.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
        except Exception as exc:
            raise InjectionError(
                f"PEFT cannot merge this tuner into the weights: {type(exc).__name__}: {exc}"
            ) from None
        return proxy.weight.detach(), (None if bias is None else proxy.bias.detach())
