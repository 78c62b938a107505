"""Recipes: YAML read with OmegaConf against typed dataclasses, merged with key=value overrides.

Everything a run needs is checked here, before any backbone weights or data load: unknown keys,
wrong types, unknown plugin names, bad adapter options and missing local files (the checks that need the plugin
registries are `vlkit.train.recipe_checks`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..data.api import SOURCE_ALIASES
from ..data.shots import declared_options, recipe_notes
from ..errors import ConfigError
from ..plugins import registry
from .recipe_checks import check_recipe, check_resolvers


@dataclass
class TaskCfg:
    name: str = "classification"
    options: Dict[str, Any] = field(default_factory=dict)


DEFAULT_TRAIN_DATA = {"kind": "world", "domain": "photo", "task": "classification", "n": 512, "seed": 0}
# an override changing a data spec's kind or an adapter's variant drops the options the new one lacks
SWITCH_KEYS = ("kind", "variant")


@dataclass
class DataCfg:
    """`train`/`eval`: data specs (a kind and its options); a user spec replaces the default entirely.

    Pipeline: `num_workers` DataLoader worker processes decode and transform images; `pin_memory` (null:
    on when CUDA is there); `prefetch_factor` batches per worker; `augment` train-time torchvision v2
    transforms (false, true, or a list of {Name: {options}}); `shuffle_buffer` rows buffered when shuffling a
    streaming (iterable) source; `feature_cache` computes a tower that trains nothing once per dataset
    (`vlkit.tasks.features`)."""

    train: Optional[Dict[str, Any]] = None
    eval: Optional[Dict[str, Any]] = None
    num_workers: int = 0
    pin_memory: Optional[bool] = None
    prefetch_factor: int = 2
    augment: Any = False
    shuffle_buffer: int = 10000
    feature_cache: bool = True


@dataclass
class MultiTaskCfg(TaskCfg):
    """One task of a multi-task recipe (`tasks:`): the task, its own data and its adapter's name."""

    data: DataCfg = field(default_factory=DataCfg)
    adapter: Optional[str] = None


@dataclass
class OptimCfg:
    optimizer: str = "adamw"
    lr: float = 1e-3
    head_lr: Optional[float] = None
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    epochs: Optional[int] = None
    steps: Optional[int] = None
    batch_size: int = 32
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0


@dataclass
class EvalCfg:
    every_steps: int = 0
    batch_size: int = 256


@dataclass
class CheckpointCfg:
    every_steps: int = 0
    keep: int = 2


@dataclass
class LoggingCfg:
    every_steps: int = 10
    tensorboard: bool = True
    plot: bool = True


@dataclass
class Recipe:
    name: str = "run"
    backbone: str = "tiny"
    method: str = "adapter"
    adapter: Dict[str, Any] = field(default_factory=lambda: {"variant": "bottleneck"})
    task: TaskCfg = field(default_factory=TaskCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    precision: str = "fp32"
    device: str = "auto"
    compile: Any = False  # true | false | auto: torch.compile the training step (vlkit.train.compiling)
    seed: int = 0
    output_dir: Optional[str] = None
    eval: EvalCfg = field(default_factory=EvalCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    logging: LoggingCfg = field(default_factory=LoggingCfg)
    notes: List[str] = field(default_factory=list)
    # multi-task training (vlkit.train.multitask): one adapter per task, `sharing` ties parameters
    tasks: List[MultiTaskCfg] = field(default_factory=list)
    sharing: str = "per_task"
    # method "fuse" (vlkit.compose.adapter_fusion): {"adapters": [{"name", "path"}], "fusion": name};
    # method "adapter": {"base": DIR} trains the new adapter stacked on a frozen adapter / composition
    compose: Dict[str, Any] = field(default_factory=dict)


def _omegaconf_error(exc: Exception, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None)
    msg = (getattr(exc, "msg", None) or str(exc)).strip().splitlines()[0]
    where = f"{source}: key {key!r}: " if key else f"{source}: "
    return ConfigError(where + msg.strip())


def load_recipe(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
    notes: list[str] | None = None,
    allow_env: list[str] | tuple[str, ...] = (),
    allow_untrained: bool = False,
):
    """Read a recipe file (or start from defaults) and apply overrides, check it, and return the typed
    `Recipe` (see `as_recipe`).

    `notes` (a list) receives one line per override that dropped options (see `_switch_options`). A recipe
    file reads no environment variable (`${oc.env:NAME}`) unless `allow_env` names it, and calls no other
    resolver. `allow_untrained` lets `optim.steps: 0` through (an adapter written as initialised)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(Recipe)
    layers: list[Any] = []
    source = str(path) if path else "<defaults>"
    if base:
        layers.append(OmegaConf.create(base))
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file {p} does not exist")
        try:
            layers.append(OmegaConf.load(p))
        except Exception as exc:  # yaml.YAMLError and OmegaConf errors
            raise ConfigError(f"{p} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not OmegaConf.is_dict(layers[-1]):
            raise ConfigError(f"{p}: a recipe must be a mapping of keys to values")
        check_resolvers(OmegaConf.to_container(layers[-1], resolve=False), str(p), set(allow_env))
    for item in overrides or []:
        if item.startswith("~"):
            continue
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        merged = OmegaConf.merge(schema, *layers)
        # keys through list items (tasks.0.data.train.n=32) are set in place; the rest merge as a dotlist
        indexed = [o for o in overrides or [] if any(k.isdigit() for k in o.split("=", 1)[0].split("."))]
        plain = [o for o in overrides or [] if o not in indexed]
        plain = _replace_whole(merged, plain)
        removed = [o[1:].split("=", 1)[0] for o in plain if o.startswith("~")]
        plain = [o for o in plain if not o.startswith("~")]
        plain, nulled = _null_removals(merged, plain)
        removed += nulled
        dropped = _switch_options(merged, plain, notes if notes is not None else [])
        removed = [k for k in removed if k not in dropped]
        if plain:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(plain))
        for key in removed:
            _remove_key(merged, key, source)
        for item in indexed:
            key, value = item.split("=", 1)
            if not _replace_whole(merged, [item]):
                continue
            OmegaConf.update(merged, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
        OmegaConf.to_container(merged, resolve=True, throw_on_missing=False)  # every ${...} resolves, now
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, source if not overrides else f"{source} (with overrides)") from None
    if merged.data.train is None and not merged.tasks:
        merged.data.train = dict(DEFAULT_TRAIN_DATA)
    for i, t in enumerate(merged.tasks):
        if t.data.train is None:
            raise ConfigError(f"{source}: key 'tasks[{i}].data.train': each task needs its training data")
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(
            f"{source}: required key(s) {', '.join(missing)} not set (??? in the recipe)",
            hint="give them on the command line: " + " ".join(f"{k}=..." for k in missing),
        )
    check_recipe(merged, source, allow_untrained=allow_untrained)

    data_notes = recipe_notes(merged)  # a recipe setting that overrides a dataset kind's own option says so
    if notes is not None:
        notes.extend(data_notes)
    return as_recipe(merged)


def as_recipe(cfg: Any) -> Recipe:
    """The typed recipe: a `Recipe` (nested dataclasses; data specs, adapter and task options as plain dicts)
    from the checked DictConfig `load_recipe` builds, or a `Recipe` as it is. Everything past the edge (the CLI,
    `load_recipe`) reads this object."""
    if isinstance(cfg, Recipe):
        return cfg
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.merge(OmegaConf.structured(Recipe), cfg)
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, Recipe):
        raise ConfigError("a recipe must be a mapping of keys to values")
    return _with_specs(obj)


class Spec(dict):
    """A free mapping of the recipe (adapter options, task options, data specs, compose): a plain dict whose keys
    also read as attributes, as in the YAML (`cfg.adapter.rank`, `cfg.data.train.kind`)."""

    __slots__ = ()

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        try:
            del self[key]
        except KeyError:
            raise AttributeError(key) from None


def _spec(node: Any) -> Any:
    if isinstance(node, dict):
        return Spec({k: _spec(v) for k, v in node.items()})
    if isinstance(node, list):
        return [_spec(v) for v in node]
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return _with_specs(node)
    return node


def _with_specs(obj: Any) -> Any:
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, _spec(getattr(obj, f.name)))
    return obj


def plain(node: Any) -> Any:
    """A deep plain copy (dicts, lists, scalars) of a recipe node, an OmegaConf node or a dataclass."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return {f.name: plain(getattr(node, f.name)) for f in dataclasses.fields(node)}
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [plain(v) for v in node]
    return copy.deepcopy(node)


COMMON_DATA_KEYS = ("kind", "split", "shots", "mix")  # `task` goes too: the run fills it from task.name


def _accepted_options(parent: str, leaf: str, value: str) -> set[str] | None:
    """The keys a mapping keeps when its `variant` (adapter), `kind` (data spec) or `name` (task) becomes
    `value`: the new plugin's declared options, or None when it declares none (the mapping is emptied)."""
    import dataclasses

    if leaf == "variant":
        reg = registry("adapter")
        if value not in reg:
            return None
        return {f.name for f in dataclasses.fields(reg.get(value).config_cls)} | {"variant", "name"}
    if leaf == "kind":
        if value not in registry("dataset"):
            return None
        return (set(COMMON_DATA_KEYS) | set(SOURCE_ALIASES) | declared_options(value)) - {"task"}
    if leaf == "name":
        reg = registry("task")
        declared = getattr(reg.get(value), "OPTIONS", None) if value in reg else None
        return set(declared) if declared is not None else None
    return None


def _switch_options(cfg, overrides: list[str], notes: list[str]) -> set[str]:
    """An override that changes an adapter's `variant`, a data spec's `kind` or a task's `name` drops the options
    the new one does not have (the task's are under `options`), with one note per override saying which."""
    from omegaconf import OmegaConf

    gone: set[str] = set()
    for item in overrides:
        key, value = item.split("=", 1)
        value = value.strip()
        parent, _, leaf = key.rpartition(".")
        is_task = leaf == "name" and (parent == "task" or parent.startswith("tasks."))
        if not parent or not (leaf in SWITCH_KEYS or is_task):
            continue
        old = OmegaConf.select(cfg, key, default=None)
        if old is None or str(old) == value:
            continue
        mapping_key = f"{parent}.options" if is_task else parent
        node = OmegaConf.select(cfg, mapping_key, default=None)
        if node is None or not OmegaConf.is_dict(node):
            continue
        keep = _accepted_options(parent, leaf, value)
        dropped = sorted(k for k in node if k != leaf and (keep is None or k not in keep))
        for k in dropped:
            node.pop(k)
            gone.add(f"{mapping_key}.{k}")
        if dropped:
            what = {"variant": "adapter variant", "kind": "dataset kind"}.get(leaf, "task")
            notes.append(
                f"{key}={value}: dropped {mapping_key} option(s) {', '.join(dropped)}, which {what} "
                f"{value!r} does not take"
            )
    return gone


def _replace_whole(cfg, overrides: list[str]) -> list[str]:
    """A mapping given whole (a YAML flow mapping: `data.train={kind: parquet, path: d.parquet}`) replaces the
    key's mapping instead of merging into it (a typed one, such as `task`, starts again from its defaults);
    dotted keys (`data.train.path=...`) still merge. Returns the overrides left."""
    from omegaconf import OmegaConf

    left = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key.startswith("~") or not value.strip().startswith("{"):
            left.append(item)
            continue
        given = OmegaConf.from_dotlist([f"v={value}"]).v
        if not OmegaConf.is_dict(given):
            left.append(item)
            continue
        node = OmegaConf.select(cfg, key, default=None)
        kind = OmegaConf.get_type(node) if OmegaConf.is_dict(node) else None
        if kind is not None and kind is not dict:  # a typed section: its defaults, then the given keys
            given = OmegaConf.merge(OmegaConf.structured(kind), given)
        OmegaConf.update(cfg, key, given, merge=False)
    return left


def _null_removals(cfg, overrides: list[str]) -> tuple[list[str], list[str]]:
    """`key=null` inside a free mapping (adapter options, data specs, task options, compose) removes the key;
    a typed recipe key set to null stays an override. Returns (overrides left, keys to remove)."""
    from omegaconf import OmegaConf

    keep, remove = [], []
    for item in overrides:
        key, _, value = item.partition("=")
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(cfg, parent, default=None) if parent else None
        if (
            value.strip().lower() in ("null", "~")
            and node is not None
            and OmegaConf.is_dict(node)
            and OmegaConf.get_type(node) is dict
        ):
            if key.rpartition(".")[2] in node:
                remove.append(key)
        else:
            keep.append(item)
    return keep, remove


def _remove_key(cfg, key: str, source: str) -> None:
    """`~a.b.c` on the command line deletes key c of mapping a.b (an option of a data spec or adapter)."""
    from omegaconf import OmegaConf

    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if node is None or not OmegaConf.is_dict(node) or leaf not in node:
        raise ConfigError(f"{source}: cannot remove {key!r}: no such key")
    try:
        node.pop(leaf)
    except Exception:
        raise ConfigError(f"{source}: cannot remove {key!r}: it is a fixed recipe key (set it instead)") from None


def to_yaml(cfg) -> str:
    """The recipe as YAML (what a run saves as recipe.yaml)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(plain(cfg)))


# keys a resumed run may change: how long it runs, how it logs, evaluates and checkpoints, how data is loaded
RESUME_FREE = (
    "optim.steps",
    "optim.epochs",
    "eval",
    "checkpoint",
    "logging",
    "output_dir",
    "notes",
    "data.num_workers",
    "data.pin_memory",
    "data.prefetch_factor",
    "device",
    "compile",
)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def check_resumable(cfg, *recipe_files: Path) -> None:
    """A ConfigError naming the keys that differ between `cfg` and the recipe the checkpoints were made with
    (the first of `recipe_files` that exists), except keys a resume may change (`RESUME_FREE`)."""
    from omegaconf import OmegaConf

    saved_file = next((Path(f) for f in recipe_files if Path(f).is_file()), None)
    if saved_file is None:
        return
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_file), resolve=False)
    except Exception as exc:
        raise ConfigError(f"--resume: {saved_file} cannot be read: {str(exc).splitlines()[0]}") from None
    now = plain(cfg)
    a, b = _flat(saved if isinstance(saved, dict) else {}), _flat(now)
    free = lambda k: any(k == f or k.startswith(f + ".") for f in RESUME_FREE)  # noqa: E731
    changed = sorted(k for k in set(a) | set(b) if not free(k) and a.get(k) != b.get(k))
    if changed:
        shown = ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ConfigError(
            f"--resume: the recipe differs from the one the checkpoints in {saved_file.parent} were "
            f"made with: {shown}{more}",
            hint="resume with the same recipe (only optim.steps/epochs, eval, checkpoint and logging "
            "may change), or start over with --overwrite",
        )
