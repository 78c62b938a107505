"""Jobs: what the training loop runs, one per task of a recipe.

A job is one task with its prepared data and the adapters it trains through. `prepare_job` builds one the
same way for every kind of recipe: the task from its training data, then the recipe's method `prepare`
(for method `adapter`: the variant's `options_from_data`, the compose base, the injection and
`init_from_data`), then the data prepared for the loop. `vlkit.train.plan` turns a recipe into its jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..adapters.model import AdaptedModel
from ..data import load_data, required_fields
from ..data.api import few_shot
from ..data.mix import mix_datasets
from ..data.pipeline import StreamingSource, build_augment
from ..data.shots import take_shots
from ..errors import ConfigError
from ..plugins import registry
from .methods import TrainingMethod, get_method, prepare_adapter
from .recipe import plain


@dataclass(frozen=True)
class Activation:
    """The adapters a job runs with, as its method's `prepare` left them active (names, mode, weights, fusion)."""

    names: tuple[str, ...] = ()
    mode: str = "stack"
    weights: tuple[float, ...] | None = None
    fusion: str | None = None

    @classmethod
    def of(cls, backbone) -> Activation:
        model = AdaptedModel.of(backbone)
        names, weights = model.active_adapters, model.state.weights
        return cls(names, model.active_mode, tuple(weights[n] for n in names) if weights else None, model.state.fusion)

    def apply(self, backbone) -> None:
        AdaptedModel.of(backbone).set_adapter(*self.names, mode=self.mode, weights=self.weights, fusion=self.fusion)


@dataclass
class Job:
    """One task trained by the loop: its name (None for a recipe's only task), task, prepared data, sampler
    seed, its recipe, the adapter its method made (or None) and the adapters active while it runs."""

    name: str | None
    task: Any
    train: Any
    eval: Any
    seed: int
    cfg: Any = None
    adapter: str | None = None
    active: Activation | None = None
    source: Any = None  # the training dataset itself (a method that `solves` fits on it)

    def activate(self, backbone) -> None:
        """Make this job's adapters the active ones (nothing to do when the job records none)."""
        if self.active is not None:
            self.active.apply(backbone)


def prepare_job(
    backbone,
    cfg,
    *,
    name: str | None,
    seed: int,
    adapter_options: dict[str, Any],
    datasets: tuple | None = None,
    method: TrainingMethod | None = None,
) -> Job:
    """One job of recipe `cfg`: its task built on the training data, its adapter made by the method's `prepare`
    (with the training data), its training and evaluation data prepared.

    `datasets`: (train, eval or None) instead of the recipe's `data`. The backbone is not frozen here: the
    caller freezes it once before its jobs are prepared."""
    method = method or get_method(cfg.method)
    train_ds, eval_ds = datasets if datasets is not None else load_datasets(cfg)
    task = build_task(backbone, cfg, train_ds)
    adapter = prepare_adapter(method, backbone, task, cfg, adapter_options, train_data=train_ds)
    active = Activation.of(backbone)
    return Job(
        name,
        task,
        prepare_training(cfg, backbone, task, train_ds),
        task.prepare(backbone, eval_ds) if eval_ds is not None else None,
        seed,
        cfg,
        adapter,
        active,
        train_ds,
    )


def build_task(backbone, cfg, train_ds):
    import datasets as hfds

    options = plain(cfg.task.options) or {}
    cls = registry("task").get(cfg.task.name)
    options = get_method(cfg.method).task_options(cls, options)
    if not isinstance(train_ds, hfds.IterableDataset):
        return cls(backbone, train_ds, **options)
    try:
        return cls(backbone, train_ds, **options)
    except (TypeError, KeyError, NotImplementedError, AttributeError) as exc:
        raise ConfigError(
            f"task {cfg.task.name!r} cannot set itself up from a streaming source ({exc})",
            hint="give its vocabulary in task.options (class_names, answers) or use a map-style source",
        ) from None


def _load_source(spec: dict, task: str):
    """One data source; `{"mix": [spec, ...]}` concatenates several on the task's required columns."""
    if "mix" in spec:
        parts, labels = [], []
        for i, sub in enumerate(spec["mix"]):
            sub = dict(sub)
            sub.setdefault("task", task)
            ds = load_data(sub)
            parts.append(ds.select_columns(list(required_fields(task))))
            labels.append(f"mix[{i}] ({getattr(ds, '_vlkit_label', None) or sub.get('kind')})")
        return mix_datasets(parts, labels)
    return load_data(spec)


def load_datasets(cfg):
    """The recipe's (train, eval or None) datasets; `data.train.shots: k` keeps k examples per class."""
    import datasets as hfds

    train = plain(cfg.data.train)
    train.setdefault("task", cfg.task.name)
    shots = take_shots(train, int(cfg.seed))  # None where the dataset kind draws them itself (vlkit.data.shots)
    train_ds = _load_source(train, cfg.task.name)
    if shots is not None:
        if isinstance(train_ds, hfds.IterableDataset):
            raise ConfigError("shots: k needs a map-style source; this one is streaming")
        train_ds = few_shot(train_ds, shots, seed=cfg.seed)
    eval_ds = None
    if cfg.data.eval is not None:
        ev = plain(cfg.data.eval)
        ev.setdefault("task", cfg.task.name)
        eval_ds = _in_memory(_load_source(ev, cfg.task.name))
    return train_ds, eval_ds


def is_streaming(data) -> bool:
    return isinstance(data, StreamingSource)


def prepare_training(cfg, backbone, task, ds):
    """The task's prepared training data, or a StreamingSource for an iterable (streaming) dataset."""
    import datasets as hfds

    if not isinstance(ds, hfds.IterableDataset):
        return task.prepare(backbone, ds)
    if cfg.optim.steps is None:
        raise ConfigError("a streaming training source has no known length: give optim.steps, not optim.epochs")
    return StreamingSource(
        ds,
        task,
        backbone,
        seed=cfg.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        augment=build_augment(cfg.data.augment, backbone.image_size),
    )


def _in_memory(ds):
    """An iterable (streaming) evaluation set read once into an on-disk Arrow dataset."""
    import datasets as hfds

    if not isinstance(ds, hfds.IterableDataset):
        return ds
    return hfds.Dataset.from_generator(lambda: (yield from ds), features=ds.features)
