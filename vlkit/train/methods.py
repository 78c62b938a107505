"""Training methods as a registry (plugin kind `method`): which parameters train, what a run writes.

A method is an object with a `name` and the hooks below; the engine looks `cfg.method` up in
`registry("method")` and calls them, so a plugin adds a method with `register_methods(register)`:

- `check(cfg, source)`: recipe checks that need no weights or data (raise ConfigError naming the key);
- `task_options(task_cls, options)`: task options this method implies (`linear` asks for the task's
  `linear_probe_options`, e.g. classification's `head: linear`);
- `prepare(backbone, task, cfg, adapter_options)`: set `requires_grad` on the backbone (everything starts
  frozen) and return the adapter's name when the method trains one, else None; a `prepare` with a
  `train_data` keyword also gets the training dataset (the `adapter` method hands it to the variant's
  `options_from_data` / `init_from_data`);
- `save(cfg, out, backbone, task, adapter)`: write what the method produced besides task.json, head and metrics;
- `solve(backbone, task, cfg, train_data)`: for a method with `solves = True`, the fit itself instead of the
  engine's optimiser loop (the `linear` probe's L-BFGS logistic regression); returns what the run records of it.

`fits` is False for a method that evaluates without training (zeroshot); `trains_head` says whether the task
head's parameters train; `solves` that the method fits them itself (`optim` then does not apply). A method
that reads options from the recipe's `compose` mapping declares them as one dataclass with field help,
`options_cls`: recipe checking refuses a key it does not declare (`check_options`) and `vlkit plugins --json`
lists them.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..adapters.base import AdapterVariant
from ..adapters.model import AdaptedModel
from ..compose.adapter_fusion import prepare_fuse, write_fuse_outputs
from ..compose.resolve import load_base, write_base_composition
from ..data.api import load_data
from ..errors import ConfigError
from ..io import atomic_path
from ..options import option_names
from ..plugins import registry
from .baselines import fit_linear_head, validation_split
from .recipe import plain


def adapter_name_for(run_name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_\-]+", "-", run_name).strip("-")
    return name or "default"


class TrainingMethod:
    """The base method: the backbone stays frozen, the head trains, nothing else is written."""

    name = ""
    summary = ""
    fits = True
    trains_head = True
    #: True: `solve` fits the trainable parameters instead of the engine's optimiser loop
    solves = False
    #: the options the method reads from the recipe's `compose` mapping, as a dataclass (None: it reads none)
    options_cls: type | None = None
    #: the kinds of backbone (`Backbone.kind`) the method trains: "contrastive" dual encoders, "generative" ones
    backbone_kinds: tuple[str, ...] = ("contrastive", "generative")

    def check_options(self, options: dict[str, Any], source: str) -> None:
        """The recipe's `compose` mapping, checked against `options_cls`: a key it does not declare is a
        ConfigError naming the declared ones (a method without `options_cls` is not checked)."""
        if self.options_cls is None:
            return
        declared = option_names(self.options_cls)
        unknown = sorted(k for k in options if k not in declared)
        if unknown:
            raise ConfigError(
                f"{source}: key 'compose.{unknown[0]}': method {self.name!r} does not take "
                f"{', '.join(unknown)}; its compose options: {', '.join(declared)}"
            )

    def check(self, cfg, source: str) -> None:
        return None

    def task_options(self, task_cls, options: dict[str, Any]) -> dict[str, Any]:
        return options

    def prepare(self, backbone, task, cfg, adapter_options: dict[str, Any]) -> str | None:
        return None

    def save(self, cfg, out: Path, backbone, task, adapter: str | None) -> None:
        return None

    def solve(self, backbone, task, cfg, train_data) -> dict[str, Any]:
        """Fit what trains (a method with `solves`), given the task and its training dataset; returns a record of
        the fit for the run's result (`solver`)."""
        raise TypeError(f"method {self.name!r} has solves = False: the engine's optimiser trains it, not solve()")


@dataclass
class AdapterMethodOptions:
    """The `compose` options of method `adapter`."""

    base: str | None = None
    """A frozen adapter or composition directory (A, or A+B to stack) the new adapter trains on top of."""


@dataclass
class FullOptions:
    """The `compose` options of method `full`."""

    towers: list[str] | None = None
    """The backbone's towers that train (e.g. [projector, encoder, decoder] to keep a generative backbone's image
    tower frozen); None: every weight."""


@dataclass
class LinearOptions:
    """The `compose` options of method `linear` (the L-BFGS linear probe)."""

    C: float | None = None
    """The inverse L2 strength (scikit-learn's C); None: searched on the validation split (CoOp's search), C = 1
    where there is none."""
    val: dict[str, Any] | None = None
    """A data spec of the validation set the C search scores on; None: the training source's val split (the
    embedded world: a fresh draw), min(shots, 4) per class for a few-shot source (`data.train.shots`)."""


@dataclass
class FuseOptions:
    """The `compose` options of method `fuse` (`vlkit compose A,B --mode fuse --recipe R` fills them in)."""

    adapters: list[dict[str, str]] = field(default_factory=list)
    """The frozen adapters to fuse, at least one: a list of {name, path} (an adapter directory; name defaults
    to the directory's name)."""
    fusion: str = "fusion"
    """Name of the fusion layers in the written adapter."""
    temperature: float = 1.0
    """Softmax temperature of the fusion attention over the adapters (> 0)."""


class AdapterMethod(TrainingMethod):
    name = "adapter"
    summary = "frozen backbone, one new adapter (adapter.variant) and the task head train"
    options_cls = AdapterMethodOptions

    def check(self, cfg, source: str) -> None:

        opts = plain(cfg.adapter)
        variant = opts.pop("variant", None)
        if not variant:
            raise ConfigError(f"{source}: key 'adapter.variant': missing (e.g. bottleneck, lora)")
        reg = registry("adapter")
        if variant not in reg:
            raise ConfigError(
                f"{source}: key 'adapter.variant': unknown variant {variant!r}; known: {', '.join(reg.names())}"
            )
        try:
            reg.get(variant).make_config(**opts)
        except ConfigError as exc:
            raise ConfigError(f"{source}: key 'adapter': {exc}") from None
        if getattr(reg.get(variant), "training_free", False) and not (
            cfg.optim.steps == 0 or cfg.optim.get("epochs") == 0
        ):
            raise ConfigError(
                f"{source}: key 'adapter.variant': {variant} is built from the training data without "
                "training; set optim.steps=0 (with --allow-untrained), use `vlkit adapt --method "
                f"{variant}`, or train it with a trainable counterpart (e.g. tip-adapter-f)"
            )

    def prepare(self, backbone, task, cfg, adapter_options: dict[str, Any], train_data=None) -> str | None:
        """Inject the recipe's adapter. A variant that needs the task or the data first gets them through
        `options_from_data` (options before the layers are made) and `init_from_data` (the layers filled
        in once injected, with only the recipe's base adapters active)."""

        opts = dict(adapter_options)
        variant = opts.pop("variant")
        adapter = adapter_name_for(opts.pop("name", cfg.name))
        var = registry("adapter").get(variant)
        base = load_base(backbone, cfg.compose.get("base"))  # train on top of frozen adapters
        opts = var.options_from_data(backbone, task, train_data, opts)
        model = AdaptedModel.of(backbone)
        model.add_adapter(adapter, variant, **opts)
        if base:
            model.set_adapter(*(n for n, _ in base), adapter, mode="stack")
        if type(var).init_from_data is not AdapterVariant.init_from_data:
            with model.activated(*(n for n in model.active_adapters if n != adapter), mode=model.active_mode):
                var.init_from_data(backbone, adapter, task, train_data)
        return adapter

    def save(self, cfg, out: Path, backbone, task, adapter: str | None) -> None:
        assert adapter is not None, "prepare made the adapter"
        AdaptedModel.of(backbone).save_adapter(out, name=adapter, task=task.metadata())
        write_base_composition(out, backbone, adapter)  # a no-op unless trained on top of a composition


class FullMethod(TrainingMethod):
    name = "full"
    summary = "full fine-tuning: every backbone weight (or those of compose.towers) trains; writes backbone.safetensors"
    options_cls = FullOptions

    def prepare(self, backbone, task, cfg, adapter_options: dict[str, Any]) -> str | None:
        towers = (cfg.compose or {}).get("towers")
        if not towers:
            for p in backbone.parameters():
                p.requires_grad_(True)
            return None
        known = backbone.tower_prefixes()
        unknown = [t for t in towers if t not in known]
        if unknown:
            raise ConfigError(
                f"key 'compose.towers': {', '.join(map(str, unknown))} is no tower of {backbone.spec}; "
                f"towers: {', '.join(known)}"
            )
        prefixes = tuple(p for t in towers for p in known[t])
        for name, p in backbone.model.named_parameters():
            p.requires_grad_(name.startswith(prefixes))
        return None

    def save(self, cfg, out: Path, backbone, task, adapter: str | None) -> None:
        from safetensors.torch import save_file

        state, seen = {}, set()
        for k, v in backbone.model.state_dict().items():  # tied weights (a T5's shared embeddings) saved once
            key = (v.data_ptr(), tuple(v.shape), v.dtype) if v.numel() else None
            if key is not None and key in seen:
                continue
            seen.add(key)
            state[k] = v.detach().cpu().contiguous()
        with atomic_path(out / "backbone.safetensors") as tmp:
            save_file(state, str(tmp))


class LinearSGDMethod(TrainingMethod):
    name = "linear-sgd"
    summary = "linear head by SGD: frozen backbone, only the task head trains, with the recipe's optim"
    backbone_kinds = ("contrastive",)  # a class head over a dual encoder's image embeddings

    def task_options(self, task_cls, options: dict[str, Any]) -> dict[str, Any]:
        return {**task_cls.linear_probe_options, **options}

    def prepare(self, backbone, task, cfg, adapter_options: dict[str, Any]) -> str | None:
        if not list(task.head.parameters()):
            raise ConfigError(
                f"method {self.name!r} needs a task head with parameters; task {task.name!r} has none"
                + (f" (set task.options to {task.linear_probe_options})" if task.linear_probe_options else "")
            )
        return None


class LinearMethod(LinearSGDMethod):
    """CLIP's linear probe: L-BFGS logistic regression on the frozen image features, C searched on a validation
    split (`vlkit.train.baselines.fit_linear_head`, what `vlkit adapt --method linear` runs too)."""

    name = "linear"
    summary = "linear probe: L-BFGS logistic regression on frozen image features, C searched on validation data"
    solves = True
    options_cls = LinearOptions

    def check(self, cfg, source: str) -> None:
        if cfg.data.augment:
            raise ConfigError(
                f"{source}: key 'data.augment': method 'linear' fits on the frozen features of the training "
                "images, so augmentation does not apply",
                hint="method linear-sgd trains the head by SGD on augmented images",
            )
        c = (cfg.compose or {}).get("C")
        if c is not None and not (isinstance(c, (int, float)) and c > 0):
            raise ConfigError(f"{source}: key 'compose.C': must be a positive number, got {c!r}")

    def solve(self, backbone, task, cfg, train_data) -> dict[str, Any]:
        import datasets as hfds

        if isinstance(train_data, hfds.IterableDataset):
            raise ConfigError(
                "method 'linear' fits on every training example at once; a streaming source cannot be used",
                hint="use a map-style source, or method linear-sgd",
            )
        options = cfg.compose or {}
        c, val = options.get("C"), None
        if c is None and options.get("val"):
            val = load_data({"task": task.name, **plain(options["val"])})
        elif c is None:
            spec = plain(cfg.data.train)
            val = validation_split(spec, task.name, int(cfg.seed), spec.get("shots"))
        fit = fit_linear_head(backbone, task, train_data, val, c=c, cache=bool(cfg.data.feature_cache))
        return {"solver": "lbfgs", **fit}


class ZeroShotMethod(TrainingMethod):
    name = "zeroshot"
    summary = "no training: the frozen backbone (and an untrained head) evaluated as is"
    fits = False
    trains_head = False


class FuseMethod(TrainingMethod):
    name = "fuse"
    summary = "AdapterFusion over frozen adapters (compose.adapters): only the fusion layers and head train"
    options_cls = FuseOptions

    def check(self, cfg, source: str) -> None:
        adapters = cfg.compose.get("adapters") if cfg.compose else None
        if not adapters:
            raise ConfigError(
                f"{source}: key 'compose.adapters': method 'fuse' needs the adapters to fuse "
                "(a list of {name, path}; `vlkit compose A,B --mode fuse --recipe R` fills it in)"
            )
        for i, item in enumerate(adapters):
            path = item.get("path") if hasattr(item, "get") else None
            if not path or not Path(str(path)).is_dir():
                raise ConfigError(
                    f"{source}: key 'compose.adapters[{i}].path': adapter directory {path} does not exist"
                )

    def prepare(self, backbone, task, cfg, adapter_options: dict[str, Any]) -> str | None:

        prepare_fuse(backbone, task, *fuse_arguments(cfg))
        return None

    def save(self, cfg, out: Path, backbone, task, adapter: str | None) -> None:

        write_fuse_outputs(out, backbone, *fuse_arguments(cfg))


def fuse_arguments(cfg) -> tuple[list[tuple[str, Path]], str, float]:
    """The recipe's `compose` mapping as plain arguments for vlkit.compose's fusion: (name, dir) sources, the
    fusion's name and its temperature."""
    spec = cfg.compose
    sources = [
        (str(item.get("name") or Path(str(item["path"])).name), Path(str(item["path"])))
        for item in spec.get("adapters") or []
    ]
    return sources, str(spec.get("fusion") or "fusion"), float(spec.get("temperature", 1.0))


BUILTIN_METHODS = (AdapterMethod(), FullMethod(), LinearMethod(), LinearSGDMethod(), ZeroShotMethod(), FuseMethod())


def get_method(name: str) -> TrainingMethod:

    return registry("method").get(name)


def freeze(backbone) -> None:
    """Every backbone parameter frozen (a method's `prepare` then says what trains)."""
    for p in backbone.parameters():
        p.requires_grad_(False)


def prepare_adapter(
    method: TrainingMethod, backbone, task, cfg, adapter_options: dict[str, Any], train_data=None
) -> str | None:
    """One call of `method.prepare` for `task` (with `train_data` when its `prepare` takes that keyword); the
    task head then trains when the method trains heads. Returns the adapter the method made, or None."""
    check_backbone_kind(method, backbone)
    if train_data is not None and "train_data" in inspect.signature(method.prepare).parameters:
        prepare: Any = method.prepare  # this one takes the keyword (checked above)
        adapter = prepare(backbone, task, cfg, adapter_options, train_data=train_data)
    else:
        adapter = method.prepare(backbone, task, cfg, adapter_options)
    for p in task.head.parameters():
        p.requires_grad_(method.trains_head)
    return adapter


def check_backbone_kind(method: TrainingMethod, backbone) -> None:
    """A ConfigError in one line when `method` does not train this kind of backbone (its `backbone_kinds`)."""
    kind = getattr(backbone, "kind", None)
    kinds = getattr(method, "backbone_kinds", None) or ()
    if kind is not None and kinds and kind not in kinds:
        raise ConfigError(
            f"method {method.name!r} trains {' and '.join(kinds)} backbones; "
            f"{getattr(backbone, 'spec', type(backbone).__name__)} is a {kind} one"
        )


def trainable_parameters(backbone, heads: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """The parameters that train, by name: `backbone.<name>` (each tied tensor once), then each head's
    under its prefix (`{"head.": head}` for one task)."""
    trainable = {f"backbone.{n}": p for n, p in backbone.named_parameters() if p.requires_grad}
    for prefix, head in heads.items():
        trainable.update({f"{prefix}{n}": p for n, p in head.named_parameters() if p.requires_grad})
    return trainable


def apply_method(
    backbone, task, cfg, adapter_options: dict[str, Any], train_data=None
) -> tuple[str | None, dict[str, nn.Parameter]]:
    """Set requires_grad for the method; returns (adapter name or None, trainable parameters by name).

    `train_data` (the training dataset) reaches a method whose `prepare` takes a `train_data` keyword."""
    method = get_method(cfg.method)
    freeze(backbone)
    adapter = prepare_adapter(method, backbone, task, cfg, adapter_options, train_data=train_data)
    return adapter, trainable_parameters(backbone, {"head.": task.head})
