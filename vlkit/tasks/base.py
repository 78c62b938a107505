"""The Task interface the trainer, `vlkit adapt`, compose and export drive.

A task turns a `datasets.Dataset` into prepared columns once (`prepare`: small tensors such as labels and
tokens, and lazy image columns that the streaming pipeline decodes per batch), owns a head module (possibly with no
parameters), computes a training loss on a batch and metrics on a prepared eval set. The backbone is
passed in each call, so the same task object works with adapters switched on or off.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class Task(ABC):
    """Subclasses set `name`, `metric` (the primary metric, higher is better) and `required` columns."""

    name: str = ""
    metric: str = ""
    required: tuple[str, ...] = ()

    def __init__(self, backbone, train_data=None, **options: Any):
        self.options = dict(options)
        self.head: nn.Module = nn.Module()

    @abstractmethod
    def prepare(self, backbone, ds) -> dict[str, torch.Tensor]:
        """Tensors for every example of `ds` (first dimension = examples): pixels, tokens, targets."""

    @abstractmethod
    def loss(self, backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training loss on a batch (a slice of what `prepare` returned)."""

    @abstractmethod
    def evaluate(self, backbone, data: dict[str, torch.Tensor], batch_size: int = 256) -> dict[str, float]:
        """Metrics on prepared eval data, in percent where they are rates; includes `self.metric`."""

    def cache_features(self, backbone, data: dict, frozen: set[str], cache, *, train: bool = False) -> dict:
        """Prepared `data` with the inputs of towers in `frozen` swapped for cached embeddings, where this
        task reads them only through those towers (`vlkit.tasks.features`); the default caches nothing."""
        return data

    def metadata(self) -> dict[str, Any]:
        """What an adapter directory records about the task (class names, answer set, prompt...)."""
        return {"name": self.name, "metric": self.metric, "options": self.options}

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict(state)


def batches(data: dict[str, torch.Tensor], batch_size: int):
    """Prepared data in order, `batch_size` rows at a time; lazy image columns stream through a DataLoader."""
    from ..data.pipeline import iter_batches

    yield from iter_batches(data, batch_size)


def num_examples(data: dict[str, torch.Tensor]) -> int:
    return len(next(iter(data.values())))


# --- helpers shared by the built-in tasks ---------------------------------------------------------
def device_of(backbone) -> torch.device:
    """The device the backbone's weights live on (CPU for a parameterless stub)."""
    for p in backbone.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """`batch` on `device`; a lazy image column (a whole small prepared set) is decoded first."""
    from ..data.pipeline import LazyImages

    return {k: (v.materialize() if isinstance(v, LazyImages) else v).to(device, non_blocking=True)
            for k, v in batch.items()}


def require_columns(task: Task, ds, columns: tuple[str, ...] | None = None) -> None:
    """A DataError naming the missing columns when `ds` lacks what `task` reads."""
    from ..errors import DataError

    need = task.required if columns is None else columns
    have = set(ds.column_names)
    missing = [c for c in need if c not in have]
    if missing:
        raise DataError(f"task {task.name!r} needs column(s) {', '.join(missing)}; the dataset has "
                        f"{', '.join(ds.column_names) or 'none'}")


def prepare_pixels(backbone, ds, column: str = "image"):
    """The image column as a lazy (N, 3, S, S) column: rows are decoded and put through the backbone's own
    transform when a batch reads them (in DataLoader workers), never all at once."""
    from ..data.images import ImageReader
    from ..data.pipeline import LazyImages

    transform = getattr(backbone, "image_transform", None) or backbone.preprocess
    return LazyImages(ImageReader(ds, column, label=getattr(ds, "_vlkit_label", None)), transform,
                      backbone.image_size)


def tokenize_texts(backbone, texts: list[str], chunk: int = 4096) -> torch.Tensor:
    """`backbone.tokenize` in chunks (tokenizers build one padded tensor per call)."""
    texts = [str(t) for t in texts]
    if not texts:
        return backbone.tokenize([""])[:0]
    return torch.cat([backbone.tokenize(texts[i:i + chunk]) for i in range(0, len(texts), chunk)])


def check_options(task_name: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    from ..errors import ConfigError

    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown option(s) for task {task_name!r}: {', '.join(unknown)}",
                          hint=f"options: {', '.join(allowed)}")


def world_helper(name: str):
    """A function of the procedural world (`vlkit.world.<name>`), or None where the world is not there."""
    import importlib

    try:
        world = importlib.import_module("vlkit.world")
    except ModuleNotFoundError as exc:
        if exc.name not in ("vlkit.world", "vlkit"):
            raise
        return None
    return getattr(world, name, None)


def dataset_domains(ds) -> list[str]:
    """The distinct values of a `domain` column in first-seen order ([] when there is none)."""
    if ds is None or "domain" not in ds.column_names:
        return []
    seen: dict[str, None] = {}
    for d in ds["domain"]:
        if d is not None:
            seen.setdefault(str(d), None)
    return list(seen)


class Evaluating:
    """Context: no autograd and the head in eval mode, restoring its previous mode afterwards."""

    def __init__(self, head: nn.Module):
        self.head = head
        self._grad = torch.no_grad()

    def __enter__(self):
        self._was_training = self.head.training
        self.head.eval()
        self._grad.__enter__()
        return self

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        self.head.train(self._was_training)
        return False
