"""The Task interface the trainer, `vlkit adapt`, compose and export drive.

A task turns a `datasets.Dataset` into prepared columns once (`prepare`: small tensors such as labels and
tokens, and lazy image columns that the streaming pipeline decodes per batch), owns a head module (possibly with no
parameters), computes a training loss on a batch and metrics on a prepared eval set. The backbone is
passed in each call, so the same task object works with adapters switched on or off.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..data.images import ImageReader
from ..data.pipeline import LazyImages, iter_batches
from ..errors import ConfigError, DataError


class Task(ABC):
    """A task, and what it declares to the rest of vlkit (read by the data layer, the router, `compose run`,
    export and `vlkit data`, so no task name is written anywhere else):

    - `name`, `metric` (the primary metric, higher is better);
    - `options_cls`: its options as one dataclass with field help (`OPTIONS`, their names, derives from it);
    - `required`: the columns a dataset must have (data validation);
    - `text_column`: the column of the text an input of this task carries (the router's text input);
      `input_texts` may compute it instead (classification: the class prompt of the label);
    - `show_columns`: what `vlkit data show` prints under each image; `annotate` may draw on it;
    - `linear_probe_options`: task options the `linear` method sets (e.g. a trainable head);
    - `exportable`: `vlkit export --task NAME` writes this task's classifier graph. An exportable task has
      `logits(backbone, pixels) -> (B, C)`, `predict(backbone, data, batch_size) -> (N,)` class indices,
      `class_names`, `prompt`, `prompts`, `head_kind` ("text": logits are `logit_scale * image @
      class_embeddings(backbone).T`), `class_embeddings(backbone)`, and `zero_shot_options` (the options of
      its zero-shot form, the one export also verifies);
    - `answer(backbone, pixels, tokens, top)`: one input's answer for `vlkit compose run`.
    """

    name: str = ""
    metric: str = ""
    options_cls: ClassVar[type | None] = None
    """The task's options (recipe `task.options`) as one dataclass: each field's name, type, default (as the task
    applies it) and help (its attribute docstring; `vlkit.options.option_specs`). Setting it derives `OPTIONS`."""
    OPTIONS: tuple[str, ...] = ()
    """The names of the task's options (from `options_cls` where it is set); others are refused with the list of
    these."""
    required: tuple[str, ...] = ()
    text_column: str | None = None
    show_columns: tuple[str, ...] = ()
    linear_probe_options: dict[str, Any] = {}
    exportable: bool = False
    backbone_kind: ClassVar[str] = "contrastive"
    """The backbones the task runs on: "contrastive" (dual encoders: embeddings and logit scale) or "generative"
    (`vlkit.backbones.generative.GenerativeBackbone`: loss, generate); another kind is refused at construction."""
    adapt_default: ClassVar[bool] = False
    """True: the task `vlkit adapt` runs on a backbone of this task's `backbone_kind` when no `--task` is given
    (classification for dual encoders, captioning for generative backbones)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("options_cls")
        if declared is None:
            return
        if not dataclasses.is_dataclass(declared):
            raise TypeError(f"{cls.__name__}.options_cls must be a dataclass, got {declared!r}")
        names = tuple(f.name for f in dataclasses.fields(declared))
        if "OPTIONS" in cls.__dict__ and tuple(cls.__dict__["OPTIONS"]) != names:
            raise TypeError(
                f"{cls.__name__}.OPTIONS {cls.__dict__['OPTIONS']} differs from its options_cls "
                f"fields {names}: set options_cls only"
            )
        cls.OPTIONS = names

    def __init__(self, backbone, train_data=None, **options: Any):
        kind = getattr(backbone, "kind", None)
        if kind == "generative" and self.backbone_kind != "generative":
            raise ConfigError(
                f"task {self.name!r} runs on a dual encoder's embeddings; {backbone.spec} is a "
                "generative backbone: give a task that generates text (`vlkit plugins` lists the tasks)"
            )
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

    def example_values(self, backbone, data: dict[str, torch.Tensor], batch_size: int = 256) -> dict[str, Any]:
        """Per-example values behind metrics that are means over examples, for bootstrap intervals (`vlkit eval`):
        ``{metric: (values (N,), groups (N,) or None)}`` where the metric is 100 × the mean of `values` (with
        `groups`: the mean over groups of each group's mean). {} (the default): no intervals."""
        return {}

    def cache_features(self, backbone, data: dict, frozen: set[str], cache, *, train: bool = False) -> dict:
        """Prepared `data` with the inputs of towers in `frozen` swapped for cached embeddings, where this
        task reads them only through those towers (`vlkit.tasks.features`); the default caches nothing."""
        return data

    @classmethod
    def input_texts(cls, ds, options: dict[str, Any]) -> list[str | None] | None:
        """The text each example of `ds` gives as input (None: the task reads no text column of its own)."""
        if cls.text_column and cls.text_column in ds.column_names:
            return [None if t is None else str(t) for t in ds[cls.text_column]]
        return None

    @classmethod
    def annotate(cls, draw, row: dict[str, Any], scale: float) -> None:
        """Draw on a `vlkit data show` thumbnail (a PIL ImageDraw; `scale` maps image pixels to it)."""
        return None

    def answer(self, backbone, pixels: torch.Tensor, tokens: torch.Tensor | None, top: int = 3) -> dict[str, Any]:
        """The answer for one input (`pixels` (1, 3, S, S), `tokens` (1, L) or None) for `vlkit compose run`.
        The default is the image-text score when a text is given."""
        out: dict[str, Any] = {"task": self.name}
        if tokens is not None:
            img = backbone.encode_image(pixels, normalize=True)
            txt = backbone.encode_text(tokens, normalize=True)
            out["score"] = round(float(backbone.logit_scale) * float((img * txt).sum()), 4)
        return out

    def metadata(self) -> dict[str, Any]:
        """What an adapter directory records about the task (class names, answer set, prompt...)."""
        return {"name": self.name, "metric": self.metric, "options": self.options}

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict(state)


@runtime_checkable
class ExportableTask(Protocol):
    """What a task that declares `exportable = True` also has (`vlkit export --task NAME`, the serve classify
    endpoint and the export's verification read these members)."""

    exportable: ClassVar[bool]
    zero_shot_options: ClassVar[dict[str, Any]]
    """Options of the task's zero-shot form, the one export also verifies (classification: the text head)."""
    head_kind: str
    """"text": logits are `logit_scale * image @ class_embeddings(backbone).T`; otherwise a trained head."""
    class_names: list[str]
    prompt: str
    prompts: list[str]

    def logits(self, backbone, pixels: torch.Tensor) -> torch.Tensor: ...

    def predict(self, backbone, data: dict[str, torch.Tensor], batch_size: int = 256) -> torch.Tensor: ...

    def class_embeddings(self, backbone) -> torch.Tensor: ...


def batches(data: dict[str, torch.Tensor], batch_size: int):
    """Prepared data in order, `batch_size` rows at a time; lazy image columns stream through a DataLoader."""

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

    return {
        k: (v.materialize() if isinstance(v, LazyImages) else v).to(device, non_blocking=True) for k, v in batch.items()
    }


def require_columns(task: Task, ds, columns: tuple[str, ...] | None = None) -> None:
    """A DataError naming the missing columns when `ds` lacks what `task` reads."""

    need = task.required if columns is None else columns
    have = set(ds.column_names)
    missing = [c for c in need if c not in have]
    if missing:
        raise DataError(
            f"task {task.name!r} needs column(s) {', '.join(missing)}; the dataset has "
            f"{', '.join(ds.column_names) or 'none'}"
        )


def prepare_pixels(backbone, ds, column: str = "image"):
    """The image column as a lazy (N, 3, S, S) column: rows are decoded and put through the backbone's own
    transform when a batch reads them (in DataLoader workers), never all at once."""

    transform = getattr(backbone, "image_transform", None) or backbone.preprocess
    return LazyImages(ImageReader(ds, column, label=getattr(ds, "_vlkit_label", None)), transform, backbone.image_size)


def tokenize_texts(backbone, texts: list[str], chunk: int = 4096) -> torch.Tensor:
    """`backbone.tokenize` in chunks (tokenizers build one padded tensor per call)."""
    texts = [str(t) for t in texts]
    if not texts:
        return backbone.tokenize([""])[:0]
    return torch.cat([backbone.tokenize(texts[i : i + chunk]) for i in range(0, len(texts), chunk)])


def check_options(task_name: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:

    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown option(s) for task {task_name!r}: {', '.join(unknown)}", hint=f"options: {', '.join(allowed)}"
        )


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
