"""`AdaptedModel`: the one owner of a frozen backbone and its adapters (PEFT's `PeftModel`, for vlkit).

It injects, loads, saves, activates, routes, merges and deletes adapters, and reports parameters. The backbone
keeps only its encoders and adapter sites; the hosts at those sites read the runtime switchboard
(`backbone.adapter_state`: what is active, how, per-sample routes), which only this class writes.

    m = vlkit.load("open_clip:ViT-B-32")
    m.add_adapter("med", "lora", rank=8)
    m.load_adapter("runs/sat")
    m.set_adapter(["med", "sat"])
    m.merge_and_unload()

One backbone has one owner: `AdaptedModel.of(backbone)` returns it (creating it on first use), so a function
handed a bare backbone reaches the same adapter state as the code that loaded it. Attributes the owner does not
define (encoders, tokenizer, preprocessing, blocks) are the backbone's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .. import __version__
from ..backbones.base import Backbone
from ..backbones.loading import load_backbone
from ..backbones.state import check_adapter_name
from ..errors import ConfigError, IncompatibleAdapterError, InjectionError, UnknownNameError
from ..io import save_safetensors, write_json
from ..plugins import registry
from .base import AdapterVariant
from .files import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_NOTE,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    check_compatible,
    read_adapter_config,
    read_adapter_weights,
)
from .peft_format import is_peft_dir, read_peft_dir
from .report import parameter_report
from .sites import (
    InjectionRecord,
    create_layer,
    host_for,
    host_of,
    reference_tensor,
    select_sites,
    site_weights,
    unwrap_empty_hosts,
)
from .weights import base_for_site

_OWNER = "_vlkit_owner"


@dataclass(frozen=True)
class AdapterHandle:
    """A loaded adapter: its name on the model and what the model knows of it."""

    model: AdaptedModel
    name: str

    @property
    def record(self) -> InjectionRecord:
        return self.model.records[self.name]

    @property
    def variant(self) -> str:
        return self.record.variant

    @property
    def config(self) -> dict[str, Any]:
        return self.record.config

    @property
    def sites(self) -> list:
        return self.record.sites

    @property
    def extra(self) -> dict[str, nn.Parameter]:
        return self.record.extra

    @property
    def task(self) -> dict[str, Any]:
        return self.record.task

    @property
    def config_obj(self) -> Any:
        return self.record.config_obj

    @property
    def targets(self) -> list[str]:
        return self.record.targets

    def activate(self) -> None:
        self.model.set_adapter(self.name)

    def save(self, path: str | Path, **kw: Any) -> Path:
        return self.model.save_adapter(path, self.name, **kw)

    def parameters(self) -> dict[str, torch.Tensor]:
        return self.model.adapter_parameters(self.name)

    def delete(self) -> None:
        self.model.delete_adapter(self.name)


@dataclass
class Added:
    """What was added to a model inside `AdaptedModel.track()`: adapter and fusion names, in order."""

    adapters: list[str] = field(default_factory=list)
    fusions: list[str] = field(default_factory=list)


class AdaptedModel:
    """A frozen backbone with its adapters, and the only code that changes them."""

    def __init__(self, backbone: Backbone):
        if _OWNER in backbone.__dict__:
            raise ConfigError("this backbone already has an AdaptedModel; use AdaptedModel.of(backbone)")
        self.backbone = backbone
        self.records: dict[str, InjectionRecord] = {}
        self.fusions: dict[str, Any] = {}
        self.base_stack: list[tuple[str, Path]] = []
        self._tracking: list[Added] = []
        backbone.__dict__[_OWNER] = self

    @classmethod
    def of(cls, backbone: Any) -> AdaptedModel:
        """The owner of `backbone` (itself when given an owner), created on first use."""
        if isinstance(backbone, AdaptedModel):
            return backbone
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"AdaptedModel.of takes a backbone, got {type(backbone).__name__}")
        owner = backbone.__dict__.get(_OWNER)
        if owner is None or owner.backbone is not backbone:  # a deep copy carries its original's owner
            backbone.__dict__.pop(_OWNER, None)
            owner = cls(cast(Backbone, backbone))  # a Backbone, or a module with its interface
        return owner

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("backbone", "records", "fusions", "base_stack", "_tracking"):
            raise AttributeError(name)
        return getattr(self.backbone, name)

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.backbone(*args, **kw)

    def __repr__(self) -> str:
        return (
            f"AdaptedModel({self.backbone.spec!r}, adapters={list(self.records)}, active={list(self.active_adapters)})"
        )

    # --- what is loaded and active -------------------------------------------------------------------------
    @property
    def state(self):
        """The sites' runtime switchboard (active adapters, mode, weights, routes); read-only outside this class."""
        return self.backbone.adapter_state

    @property
    def active_adapters(self) -> tuple[str, ...]:
        return tuple(self.state.active)

    @property
    def active_mode(self) -> str:
        return self.state.mode

    def adapter(self, name: str) -> AdapterHandle:
        if name not in self.records:
            raise UnknownNameError("adapter", name, list(self.records))
        return AdapterHandle(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self.records

    @contextlib.contextmanager
    def track(self) -> Iterator[Added]:
        """Collect the names of the adapters and fusions added inside the block (what a load brought)."""
        added = Added()
        self._tracking.append(added)
        try:
            yield added
        finally:
            self._tracking.remove(added)

    # --- injection -----------------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str = "default",
        variant: str = "bottleneck",
        *,
        trainable: bool = True,
        activate: bool = True,
        **options: Any,
    ) -> AdapterHandle:
        """Freeze the backbone and add adapter `name` of `variant`. Options are the variant's config fields
        (towers, layers, targets, exclude and the variant's own, e.g. reduction or rank)."""
        check_adapter_name(name)
        var = registry("adapter").get(variant)
        config = var.make_config(**options)
        if name in self.records:
            raise ConfigError(f"an adapter named {name!r} is already on this backbone; pick another name")
        bb = self.backbone
        if bb.kind not in var.backbone_kinds:
            raise InjectionError(
                f"adapter variant {variant!r} adapts {' and '.join(var.backbone_kinds)} backbones; "
                f"{bb.spec} is a {bb.kind} one"
            )
        sites = [var.place(s, config) for s in select_sites(bb, var, config)]
        config = var.prepare_config(bb, config, sites)
        for p in bb.parameters():
            p.requires_grad_(False)
        for site in sites:
            host = host_for(bb, site)
            layer: Any = create_layer(var, site, config, base_for_site(host.base, site))
            if hasattr(layer, "bind_state"):
                layer.bind_state(bb.adapter_state)
            ref = reference_tensor(host.base)
            if ref is not None:
                layer.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
            host.add_layer(name, site.key, site.kind, layer)
            for p in layer.parameters():
                p.requires_grad_(trainable)
        extra = var.extra_trainable(bb, config, sites)
        for p in extra.values():
            p.requires_grad_(trainable)
        record = InjectionRecord(name, variant, config.to_dict(), sites, extra)
        record.config_obj = config
        self.records[name] = record
        if var.joint:
            self.state.joint = self.state.joint | {name}
        for added in self._tracking:
            added.adapters.append(name)
        if activate:
            self.set_adapter(name)
        return AdapterHandle(self, name)

    def adapter_layers(self, name: str) -> dict[str, nn.Module]:
        """Site path -> the layer of adapter `name` at that site."""
        record = self.adapter(name).record
        return {s.path: host_of(self.backbone, s).adapter_group(name)[s.key] for s in record.sites}

    def adapter_parameters(self, name: str) -> dict[str, torch.Tensor]:
        """Every tensor that makes up adapter `name`, under the keys used in adapter_model.safetensors."""
        out: dict[str, torch.Tensor] = {}
        for path, layer in self.adapter_layers(name).items():
            for pname, t in layer.state_dict().items():
                out[f"{path}.{pname}"] = t
        for pname, p in self.records[name].extra.items():
            out[f"base::{pname}"] = p.data
        return out

    def delete_adapter(self, name: str) -> None:
        """Take adapter `name` off the backbone (its hosts stay, empty, and pass through). A merged adapter is
        unmerged first, so the base weights are restored exactly."""
        self.unmerge_adapter(name)
        record = self.records.pop(name)
        for site in record.sites:
            host_of(self.backbone, site).remove_adapter(name)
        self._forget(name)

    def _forget(self, name: str) -> None:
        st = self.state
        st.active = tuple(n for n in st.active if n != name)
        st.joint = st.joint - {name}
        if st.route is not None and name in st.route_names:
            st.clear_route()

    # --- activation ----------------------------------------------------------------------------------------
    def set_adapter(
        self,
        *names: str | Sequence[str] | None,
        mode: str = "stack",
        weights: Sequence[float] | None = None,
        fusion: str | None = None,
    ) -> None:
        """Activate loaded adapters (none: the frozen backbone). Switching copies nothing.

        `set_adapter("a")`, `set_adapter("a", "b")` or `set_adapter(["a", "b"])`. Modes: "stack" (each on the
        output of the previous), "parallel" (weighted sum of the adapters' changes), "fuse" (the AdapterFusion
        layers named `fusion` weigh the adapters' outputs; see vlkit.compose)."""
        flat: list[str] = []
        for n in names:
            if n is None:
                continue
            flat.extend([n] if isinstance(n, str) else [x for x in n if x])
        if mode == "fuse" and fusion not in self.fusions:
            raise UnknownNameError("adapter fusion", str(fusion), list(self.fusions))
        live = [n for n in flat if n]
        if len(live) > 1 and mode in ("stack", "parallel"):
            reg = registry("adapter")
            variants = [self.records[n].variant for n in live if n in self.records]
            for v in dict.fromkeys(variants):
                reason = reg.get(v).composition_limits.get(mode) if v in reg else None
                if reason and variants.count(v) > 1:
                    raise ConfigError(f"{v} adapters cannot be activated together in mode {mode!r}: {reason}")
        self.state.activate(
            flat, self.records, mode=mode, weights=None if weights is None else list(weights), fusion=fusion
        )

    def disable_adapters(self) -> None:
        """The frozen backbone's forward (adapters stay loaded)."""
        self.set_adapter()

    @contextlib.contextmanager
    def preserved(self) -> Iterator[AdaptedModel]:
        """Whatever the block activates or routes, what was active before is again afterwards."""
        st = self.state
        saved = (st.active, st.mode, dict(st.weights), st.fusion, st.route, st.route_names)
        try:
            yield self
        finally:
            st.active, st.mode, st.weights, st.fusion, st.route, st.route_names = saved
            st.clear_groups()

    @contextlib.contextmanager
    def activated(
        self, *names: str, mode: str = "stack", weights: Sequence[float] | None = None, fusion: str | None = None
    ) -> Iterator[AdaptedModel]:
        """Within the block, `names` are active; afterwards what was active before is again."""
        with self.preserved():
            self.set_adapter(*names, mode=mode, weights=weights, fusion=fusion)
            yield self

    @contextlib.contextmanager
    def disabled(self) -> Iterator[AdaptedModel]:
        """Within the block the backbone runs with no adapter (no route either); the state is restored after."""
        with self.preserved():
            self.set_adapter()
            yield self

    def route(self, names: Sequence[str | None], index: Sequence[int] | torch.Tensor | None = None) -> None:
        """Per-sample routing for the next forwards: sample i goes through adapter `names[index[i]]` (index -1 or a
        None name: the frozen backbone), all in one forward pass. With `index` None, `names` lists one adapter
        name (or None) per sample. Lasts until `clear_route` or `set_adapter`."""
        if index is None:
            order = list(dict.fromkeys(n for n in names if n is not None))
            index = [order.index(n) if n is not None else -1 for n in names]
            names = order
        self.state.set_route(list(names), index, self.records)

    def clear_route(self) -> None:
        self.state.clear_route()

    def routes_per_sample(self, names: Sequence[str | None]) -> bool:
        """Whether `route` can send samples to `names` in one forward: not when one of them puts tokens into a
        tower (a prompt: sequence, tokens or prefix sites), which acts on the whole batch; run such adapters
        per group of samples instead (`activated` on each group)."""
        whole_batch = {"sequence", "tokens", "prefix"}
        return not any(s.kind in whole_batch for n in names if n is not None for s in self.adapter(n).record.sites)

    # --- merging -------------------------------------------------------------------------------------------
    def _mergeable(self, name: str):
        record = self.adapter(name).record
        var = registry("adapter").get(record.variant)
        if type(var).merged_weight is AdapterVariant.merged_weight:
            raise InjectionError(
                f"adapter variant {record.variant!r} cannot be merged into the weights "
                f"({var.summary or 'it is not a weight update'})"
            )
        return record, var

    def merge_adapter(self, name: str) -> None:
        """Fold adapter `name` into the base weights (LoRA-like variants); `unmerge_adapter` restores them exactly."""
        record, var = self._mergeable(name)
        for site in record.sites:
            host = host_of(self.backbone, site)
            layer: Any = host.adapter_group(name)[site.key]  # merged / _saved_base: set here
            if getattr(layer, "merged", False):
                continue
            weight, bias = site_weights(host, site)
            w = weight.detach()
            b = bias.detach() if bias is not None else None
            merged = var.merged_weight(layer, w, b)
            if merged is None:
                raise InjectionError(f"adapter variant {record.variant!r} cannot be merged into the weights")
            layer._saved_base = (w.clone(), None if b is None else b.clone())
            with torch.no_grad():
                weight.copy_(merged[0])
                if bias is not None and merged[1] is not None:
                    bias.copy_(merged[1])
            layer.merged = True

    def unmerge_adapter(self, name: str) -> None:
        record = self.adapter(name).record
        for site in record.sites:
            host = host_of(self.backbone, site)
            layer: Any = host.adapter_group(name)[site.key]
            if not getattr(layer, "merged", False):
                continue
            weight, bias = site_weights(host, site)
            w, b = layer._saved_base
            with torch.no_grad():
                weight.copy_(w)
                if bias is not None and b is not None:
                    bias.copy_(b)
            del layer._saved_base
            layer.merged = False

    def merge_and_unload(self, *names: str) -> list[str]:
        """Fold adapters into the base weights for good and take them off, keeping no copy of the original
        weights (PEFT's `merge_and_unload`): afterwards the backbone holds the memory and runs the forward of a
        plain frozen backbone. Without names: the active adapters, in activation order. Only plain stacking of
        variants that merge; nothing changes when one cannot. Returns the names merged."""
        st = self.state
        names = tuple(names) or tuple(st.active)
        if st.route is not None or st.mode != "stack" or st.fusion or any(w != 1.0 for w in st.weights.values()):
            raise InjectionError(
                "merge_and_unload folds plainly stacked adapters; this backbone is set to "
                f"{'per-sample routing' if st.route is not None else st.mode}"
            )
        for name in names:
            if name not in self.records:
                raise ConfigError(f"no adapter named {name!r} on this backbone")
            record = self.records[name]
            var = registry("adapter").get(record.variant)
            if type(var).merged_weight is AdapterVariant.merged_weight or any(s.kind != "linear" for s in record.sites):
                raise InjectionError(
                    f"adapter {name!r} ({record.variant}) cannot be merged into the weights; nothing was merged"
                )
        for name in names:
            record = self.records[name]
            var = registry("adapter").get(record.variant)
            for site in record.sites:
                host = host_of(self.backbone, site)
                layer = host.adapter_group(name)[site.key]
                if getattr(layer, "merged", False):  # already folded: only its saved copy goes
                    layer.__dict__.pop("_saved_base", None)
                    continue
                weight, bias = site_weights(host, site)
                with torch.no_grad():
                    merged = var.merged_weight(layer, weight.detach(), None if bias is None else bias.detach())
                    weight.copy_(merged[0])
                    if bias is not None and merged[1] is not None:
                        bias.copy_(merged[1])
                del merged
            for site in record.sites:
                host_of(self.backbone, site).remove_adapter(name)
            self.records.pop(name)
            self._forget(name)
        unwrap_empty_hosts(self.backbone)
        return list(names)

    # --- fusion layers (vlkit.compose.adapter_fusion builds them; the owner keeps their records) ---------------
    def add_fusion(self, name: str, record: Any) -> None:
        self.fusions[name] = record
        for added in self._tracking:
            added.fusions.append(name)

    def remove_fusion(self, name: str) -> Any:
        record = self.fusions.pop(name, None)
        if record is not None and self.state.fusion == name:
            self.set_adapter()
        return record

    # --- files ---------------------------------------------------------------------------------------------
    def adapter_config(self, name: str, task: dict | None = None, extra: dict | None = None) -> dict[str, Any]:
        """The adapter_config.json of adapter `name`."""
        record = self.adapter(name).record
        bb = self.backbone
        entry = registry("adapter").entry(record.variant)
        params = self.adapter_parameters(name)
        cfg = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "format_note": FORMAT_NOTE,
            "vlkit_version": __version__,
            "name": name,
            "variant": record.variant,
            "variant_plugin": entry.plugin,
            "config": record.config,
            "backbone": bb.spec,
            "backbone_family": bb.family,
            "backbone_fingerprint": bb.fingerprint(),
            "targets": record.targets,
            "sites": [{"path": x.path, "tower": x.tower, "layer": x.layer, "role": x.role} for x in record.sites],
            "extra_trainable": sorted(record.extra),
            "num_parameters": int(sum(t.numel() for t in params.values())),
            "task": task if task is not None else record.task,
        }
        if extra:
            cfg.update(extra)
        return cfg

    def save_adapter(
        self, path: str | Path, name: str = "default", *, task: dict | None = None, extra: dict | None = None
    ) -> Path:
        """Write adapter `name` to directory `path` (safetensors + adapter_config.json); returns the directory."""
        self.adapter(name)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.adapter_parameters(name).items()}
        bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
        if bad:
            raise ConfigError(
                f"adapter {name!r} holds NaN or inf values in {len(bad)} tensor(s), e.g. {bad[0]} "
                "(training diverged?); nothing was written"
            )
        save_safetensors(tensors, path / WEIGHTS_NAME, metadata={"format": "pt", "vlkit_adapter": name})
        write_json(path / CONFIG_NAME, self.adapter_config(name, task, extra))
        return path

    def load_adapter(
        self, path: str | Path, name: str | None = None, *, activate: bool = True, trainable: bool = False
    ) -> AdapterHandle:
        """Load an adapter directory under `name` (default: its saved name); several load side by side.

        A PEFT LoRA directory (`PeftModel.save_pretrained`, adapter_config.json with `peft_type`) loads too, as
        vlkit's `lora` layers (DoRA: the `peft` bridge); see vlkit.adapters.peft_format."""
        bb = self.backbone
        if is_peft_dir(path):
            cfg, weights = read_peft_dir(bb, path)
        else:
            cfg = read_adapter_config(path)
            check_compatible(bb, cfg, str(path))
            weights = None
        variant = cfg["variant"]
        if variant not in registry("adapter"):
            raise UnknownNameError("adapter variant", variant, registry("adapter").names())
        weights = read_adapter_weights(path) if weights is None else weights
        name = name or cfg.get("name") or "default"
        if name in self.records:
            raise ConfigError(f"an adapter named {name!r} is already loaded; pass another name")
        previous = self.state.active
        handle = self.add_adapter(name, variant, trainable=trainable, **cfg["config"])
        try:
            expected: dict[str, torch.Tensor] = {}
            for spath, layer in self.adapter_layers(name).items():
                for pname, t in layer.state_dict().items():
                    expected[f"{spath}.{pname}"] = t
            for pname, p in handle.extra.items():
                expected[f"base::{pname}"] = p.data
            missing = sorted(set(expected) - set(weights))
            unexpected = sorted(set(weights) - set(expected))
            if missing or unexpected:
                raise IncompatibleAdapterError(
                    f"adapter {path} does not fit: {len(missing)} tensors missing (e.g. {missing[:2]}), "
                    f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
                )
            for key, t in expected.items():
                if tuple(weights[key].shape) != tuple(t.shape):
                    raise IncompatibleAdapterError(
                        f"adapter {path}: tensor {key} has shape {tuple(weights[key].shape)}, expected {tuple(t.shape)}"
                    )
            with torch.no_grad():
                for key, t in expected.items():
                    t.copy_(weights[key].to(dtype=t.dtype, device=t.device))
        except Exception:
            self.delete_adapter(name)
            self.state.active = previous
            for added in self._tracking:
                if name in added.adapters:
                    added.adapters.remove(name)
            raise
        handle.record.task = cfg.get("task") or {}
        if not activate:
            self.state.active = previous
        return handle

    # --- reports -------------------------------------------------------------------------------------------
    def parameter_report(self) -> dict[str, Any]:
        """Total and trainable parameters of the backbone with its adapters, per tower and per adapter."""
        return parameter_report(self.backbone, self.records)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.backbone.named_parameters() if p.requires_grad}


def load(spec: str, **options: Any) -> AdaptedModel:
    """The backbone `spec` (`tiny`, `open_clip:ViT-B-32`, `hf:/path/to/dir`, ...) with no adapters, as its owner."""
    return AdaptedModel.of(load_backbone(spec, **options))
