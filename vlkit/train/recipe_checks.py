"""The checks of a recipe that need the plugin registries but no weights or data (`check_recipe`): known method,
task, backbone and dataset kinds, choices, numeric ranges, data sources and local files, the multi-task and fusion
keys; and the resolvers a recipe file may call (`check_resolvers`). `vlkit.train.recipe.load_recipe` runs them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

from ..backbones.loading import factory_name
from ..compose.sharing import SHARING, shared_parts
from ..data.pipeline import build_augment
from ..errors import ConfigError
from ..plugins import registry
from .compiling import check_compile_setting

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("constant", "linear", "cosine")

RESOLVER_RE = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*:([^}]*)\}")
ENV_RESOLVERS = ("oc.env", "env")


def check_resolvers(node: Any, source: str, allow_env: set[str], key: str = "") -> None:
    """A shared recipe must not copy secrets from the environment into a run's files: `${oc.env:NAME}` is
    refused unless NAME is allowed, and other resolver calls (`${oc.decode:...}`, ...) always are."""
    if isinstance(node, dict):
        for k, v in node.items():
            check_resolvers(v, source, allow_env, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            check_resolvers(v, source, allow_env, f"{key}[{i}]")
    elif isinstance(node, str):
        for m in RESOLVER_RE.finditer(node):
            name, arg = m.group(1), m.group(2).split(",")[0].strip()
            if name in ENV_RESOLVERS and arg in allow_env:
                continue
            if name in ENV_RESOLVERS:
                raise ConfigError(
                    f"{source}: key {key!r} reads the environment variable {arg} ({m.group(0)}); "
                    "recipes do not read the environment",
                    hint=f"allow it explicitly with --allow-env {arg}, or pass the value as an override",
                )
            raise ConfigError(
                f"{source}: key {key!r} calls the resolver {name!r} ({m.group(0)}); recipes may only "
                "refer to other keys (${{key}}) and allowed environment variables"
            )


def _choice(value: str, choices: tuple[str, ...], key: str, source: str) -> None:
    if value not in choices:
        raise ConfigError(f"{source}: key {key!r}: expected one of {', '.join(choices)}, got {value!r}")


def _check_data_source(spec: Any, key: str, source: str) -> None:
    from omegaconf import OmegaConf

    if spec is None:
        return
    spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec)
    if "mix" in spec:
        if not isinstance(spec["mix"], list) or not spec["mix"]:
            raise ConfigError(f"{source}: key '{key}.mix': must be a non-empty list of data sources")
        for i, sub in enumerate(spec["mix"]):
            _check_data_source(sub, f"{key}.mix[{i}]", source)
        return
    kind = spec.get("kind")
    if not kind:
        raise ConfigError(f"{source}: key {key!r}: needs a 'kind' (e.g. world, manifest, imagefolder, hf)")

    if kind not in registry("dataset"):
        raise ConfigError(
            f"{source}: key '{key}.kind': unknown dataset kind {kind!r}; known: "
            f"{', '.join(registry('dataset').names())}"
        )
    for pkey in ("path", "data_dir", "data_files"):
        val = spec.get(pkey)
        if isinstance(val, str) and kind in ("manifest", "imagefolder", "parquet") and not Path(val).exists():
            raise ConfigError(f"{source}: key '{key}.{pkey}': file {val} does not exist")


def check_recipe(cfg, source: str = "<recipe>", allow_untrained: bool = False) -> None:
    """Semantic checks that need the plugin registries but no weights or data."""
    from omegaconf import OmegaConf

    methods = registry("method")
    if cfg.method not in methods:
        raise ConfigError(f"{source}: key 'method': unknown method {cfg.method!r}; known: {', '.join(methods.names())}")
    method = methods.get(cfg.method)
    _choice(cfg.precision, PRECISIONS, "precision", source)
    _choice(cfg.device, DEVICES, "device", source)
    check_compile_setting(cfg.compile, source)
    _choice(cfg.optim.schedule, SCHEDULES, "optim.schedule", source)
    _choice(cfg.optim.optimizer, ("adamw", "sgd"), "optim.optimizer", source)
    if cfg.task.name not in registry("task"):
        raise ConfigError(
            f"{source}: key 'task.name': unknown task {cfg.task.name!r}; known: {', '.join(registry('task').names())}"
        )
    if method.fits and not getattr(method, "solves", False) and cfg.optim.steps is None and cfg.optim.epochs is None:
        raise ConfigError(f"{source}: key 'optim': give optim.steps or optim.epochs")
    if cfg.data.num_workers < 0 or cfg.data.prefetch_factor < 1 or cfg.data.shuffle_buffer < 1:
        raise ConfigError(f"{source}: key 'data': num_workers must be >= 0, prefetch_factor and shuffle_buffer >= 1")

    try:
        build_augment(cast(dict, OmegaConf.to_container(cfg.data, resolve=True)).get("augment"), 224)
    except ConfigError as exc:
        raise ConfigError(f"{source}: key 'data.augment': {exc}") from None
    for key in ("steps", "epochs"):
        value = getattr(cfg.optim, key)
        least = 1 if method.fits and not getattr(method, "solves", False) and not allow_untrained else 0
        if value is not None and value < least:
            raise ConfigError(
                f"{source}: key 'optim.{key}': must be >= 1 (got {value}); a run with no step "
                "would write an untrained adapter",
                hint="pass --allow-untrained to write one anyway",
            )
    for key in ("batch_size", "grad_accum"):
        if getattr(cfg.optim, key) < 1:
            raise ConfigError(f"{source}: key 'optim.{key}': must be >= 1")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"{source}: key 'seed': must be an integer in 0 .. 2**32 - 1, got {cfg.seed}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"{source}: key 'optim.lr': must be > 0")
    if cfg.optim.head_lr is not None and cfg.optim.head_lr <= 0:
        raise ConfigError(f"{source}: key 'optim.head_lr': must be > 0 (or null for optim.lr)")
    method.check_options(dict(cfg.compose or {}), source)
    method.check(cfg, source)
    _check_data_source(cfg.data.train, "data.train", source)
    _check_data_source(cfg.data.eval, "data.eval", source)
    _check_compose(cfg, source)
    bb = cfg.backbone
    if "@" in bb:
        weights = bb.split("@", 1)[1]
        if ("/" in weights or weights.endswith(".safetensors")) and not Path(weights).exists():
            raise ConfigError(f"{source}: key 'backbone': weights file {weights} does not exist")

    if factory_name(bb) not in registry("backbone"):
        raise ConfigError(
            f"{source}: key 'backbone': unknown backbone {bb!r}; known kinds: {', '.join(registry('backbone').names())}"
        )


def _check_compose(cfg, source: str) -> None:
    """Checks of the multi-task (`tasks`, `sharing`) and fusion (`method: fuse`, `compose`) keys."""

    if cfg.tasks:
        _choice(cfg.sharing, SHARING, "sharing", source)
        if cfg.method not in ("adapter", "full"):
            raise ConfigError(
                f"{source}: key 'tasks': multi-task training needs method 'adapter' (one adapter per "
                "task, tied per `sharing`) or 'full' (one model fine-tuned on every task)"
            )
        try:
            if cfg.method == "adapter":
                shared_parts(cfg.adapter.variant, cfg.sharing)
        except ConfigError as exc:
            raise ConfigError(f"{source}: key 'sharing': {exc}") from None
        for i, t in enumerate(cfg.tasks):
            if t.name not in registry("task"):
                raise ConfigError(
                    f"{source}: key 'tasks[{i}].name': unknown task {t.name!r}; known: "
                    f"{', '.join(registry('task').names())}"
                )
            _check_data_source(t.data.train, f"tasks[{i}].data.train", source)
            _check_data_source(t.data.eval, f"tasks[{i}].data.eval", source)
    base = cfg.compose.get("base") if cfg.compose else None
    if base and cfg.tasks:
        raise ConfigError(
            f"{source}: key 'compose.base': a multi-task run writes a route composition of its task "
            "adapters, which cannot carry a base under each of them",
            hint="train each task on the base with its own single-task recipe",
        )
    if base and (cfg.method != "adapter" or not Path(str(base).split("+")[0]).exists()):
        raise ConfigError(
            f"{source}: key 'compose.base': "
            + (f"{base} does not exist" if cfg.method == "adapter" else "only method 'adapter' trains on a base")
        )
