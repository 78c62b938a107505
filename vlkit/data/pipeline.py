"""The streaming input pipeline: lazy image columns, a resumable seeded sampler and DataLoaders over both.

A task's prepared data is a mapping of column name to a tensor (labels, tokens: small, computed once) or
to a `LazyImages` column (decoded and transformed on access, never held as a whole). Training iterates a
`torch.utils.data.DataLoader` whose batch sampler is `SeededBatches`: a seeded permutation per epoch,
sharded across data-parallel ranks, whose position is two integers (epoch, batch) that a checkpoint
stores, so a resumed run reads exactly the batches an uninterrupted one would, with any number of
workers. Train-time augmentation (`data.augment`, torchvision transforms v2) is seeded per (seed, epoch,
row), so it does not depend on which worker decodes a row either. Evaluation streams the same way in
order (`iter_batches`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..errors import ConfigError, DataError

DEFAULT_LOADER = {"num_workers": 0, "pin_memory": None, "prefetch_factor": 2}


class LazyImages:
    """An image column as a tensor-like of shape (N, 3, S, S): `col[idx]` decodes and transforms those rows.

    `idx` is an int, a slice, a list or a 1-D integer tensor. `transform` maps one PIL image, in its own mode,
    to a CHW float tensor (the backbone's own eval transform, which converts the mode as its library does);
    `augment`, when set, is applied to the PIL image first, under a generator seeded from (`seed`, epoch,
    row)."""

    def __init__(self, reader, transform, image_size: int, augment=None, seed: int = 0):
        self.reader = reader
        self.transform = transform
        self.image_size = int(image_size)
        self.augment = augment
        self.seed = int(seed)
        self.loader_options: dict[str, Any] = dict(DEFAULT_LOADER)

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), 3, self.image_size, self.image_size)

    def rows(self, idx) -> list[int]:
        n = len(self)
        if isinstance(idx, int):
            return [idx % n if idx < 0 else idx]
        if isinstance(idx, slice):
            return list(range(n))[idx]
        if isinstance(idx, torch.Tensor):
            idx = idx.reshape(-1).tolist()
        return [int(i) for i in idx]

    def __getitem__(self, idx) -> torch.Tensor:
        return self.fetch(self.rows(idx))

    def fetch(self, rows: list[int], epoch: int | None = None) -> torch.Tensor:
        """Transformed images of `rows`; with `epoch` (training) and an `augment`, augmented first."""
        images = self.reader.read(rows)
        out = []
        for row, im in zip(rows, images, strict=True):
            if self.augment is not None and epoch is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed(self.seed, epoch, row))
                    im = self._augmented(im, row)
            out.append(self.transform(im))
        if not out:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        return torch.stack(out)

    def _augmented(self, im, row: int):
        try:
            return self.augment(im)
        except (ValueError, TypeError) as exc:
            label = getattr(self.reader, "label", "dataset")
            raise DataError(
                f"{label}, row {row + 1}: data.augment cannot transform this {im.mode} image: {exc}",
                hint="geometric transforms take every mode; colour ones need RGB: list RGB first "
                "(PIL's conversion, alpha dropped)",
            ) from None

    def materialize(self) -> torch.Tensor:
        return self.fetch(list(range(len(self))))

    def with_augment(self, augment, seed: int) -> LazyImages:
        out = LazyImages(self.reader, self.transform, self.image_size, augment, seed)
        out.loader_options = dict(self.loader_options)
        return out


class LazyImageSets(LazyImages):
    """K image columns as one tensor-like of shape (N, K, 3, S, S) (two-image examples such as NLVR2's):
    `col[idx]` decodes and transforms the K images of those rows; augmentation is seeded per image."""

    def __init__(self, readers, transform, image_size: int, augment=None, seed: int = 0):
        super().__init__(readers[0], transform, image_size, augment, seed)
        self.readers = list(readers)

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (len(self), len(self.readers), 3, self.image_size, self.image_size)

    def fetch(self, rows: list[int], epoch: int | None = None) -> torch.Tensor:
        views = []
        for k, reader in enumerate(self.readers):
            one = LazyImages(reader, self.transform, self.image_size, self.augment, self.seed + 104_729 * k)
            views.append(one.fetch(rows, epoch))
        return torch.stack(views, dim=1)

    def with_augment(self, augment, seed: int) -> LazyImageSets:
        out = LazyImageSets(self.readers, self.transform, self.image_size, augment, seed)
        out.loader_options = dict(self.loader_options)
        return out


class TextColumn:
    """A column of strings (prompts, targets) or of lists of strings (references) that batches carry beside
    tensors: indexed like a tensor (int, slice, list, 1-D tensor), moved to a device as itself.

    With `choose` (training targets with several references), a row of a training batch (`fetch` with an
    epoch) is one of its references, drawn from (`seed`, epoch, row), so a resumed run draws what an
    uninterrupted one would; outside training it is the first reference."""

    def __init__(self, items, choose: bool = False, seed: int = 0):
        self.items = list(items)
        self.choose = bool(choose)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def rows(self, idx) -> list[int]:
        if isinstance(idx, int):
            return [idx]
        if isinstance(idx, slice):
            return list(range(len(self.items)))[idx]
        if isinstance(idx, torch.Tensor):
            idx = idx.reshape(-1).tolist()
        return [int(i) for i in idx]

    def __getitem__(self, idx):
        return self.fetch(self.rows(idx))

    def fetch(self, rows: list[int], epoch: int | None = None) -> TextColumn | list[str]:
        if not self.choose:
            return TextColumn([self.items[r] for r in rows])
        out = []
        for r in rows:
            refs = self.items[r]
            if isinstance(refs, str):
                out.append(refs)
            elif epoch is None or len(refs) == 1:
                out.append(refs[0])
            else:
                g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, r))
                out.append(refs[int(torch.randint(len(refs), (1,), generator=g))])
        return TextColumn(out)

    def to(self, *args, **kwargs) -> TextColumn:
        return self

    def tolist(self) -> list:
        return list(self.items)


def sample_seed(seed: int, epoch: int, row: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 10_000_019 + int(row) * 7_919) % (2**63 - 1)


def is_lazy(data: Mapping) -> bool:
    return any(isinstance(v, LazyImages) for v in data.values())


def num_rows(data: Mapping) -> int:
    return len(next(iter(data.values())))


def take(data: Mapping, rows, epoch: int | None = None) -> dict[str, Any]:
    """The batch of `rows` of prepared data: tensors indexed, lazy columns decoded (a text column: strings)."""
    rows_t = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(rows, dtype=torch.long)
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, (LazyImages, TextColumn)):
            out[k] = v.fetch(rows_t.tolist(), epoch)
        else:
            out[k] = v[rows_t]
    return out


def materialize(data: Mapping) -> dict[str, torch.Tensor]:
    """Prepared data with every lazy column decoded (small sets: probes, tests, memory measurement)."""
    return {k: v.materialize() if isinstance(v, LazyImages) else v for k, v in data.items()}


def loader_options(data: Mapping) -> dict[str, Any]:
    for v in data.values():
        if isinstance(v, LazyImages):
            return dict(v.loader_options)
    return dict(DEFAULT_LOADER)


def configure(data: Mapping | None, **options: Any) -> None:
    """Set DataLoader options (num_workers, pin_memory, prefetch_factor) on every lazy column of `data`."""
    if data is None:
        return
    for v in data.values():
        if isinstance(v, LazyImages):
            v.loader_options.update({k: o for k, o in options.items() if o is not None or k == "pin_memory"})


class SeededBatches:
    """Endless (epoch, row indices) batches: a seeded permutation per epoch, this rank's shard of it.

    `start` is the number of batches already consumed (resume): the stream begins at
    epoch = start // batches_per_epoch, batch = start % batches_per_epoch, with no replay."""

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0, shuffle: bool = True
    ):
        if n < 1:
            raise ConfigError("the training data has no rows")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.start, self.shuffle = rank, world, start, shuffle
        self.per_proc = n // world if world > 1 else n
        if self.per_proc < 1:
            raise ConfigError(f"{n} training rows cannot be split across {world} processes")
        self.batches_per_epoch = math.ceil(self.per_proc / batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        if self.world > 1:
            perm = perm[self.rank :: self.world][: self.per_proc]
        return perm

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        epoch, b = divmod(self.start, self.batches_per_epoch)
        while True:
            perm = self.order(epoch)
            for i in range(b * self.batch_size, len(perm), self.batch_size):
                yield epoch, perm[i : i + self.batch_size].tolist()
            epoch, b = epoch + 1, 0


class _Batches(torch.utils.data.Dataset):
    """Map-style view whose item is a whole batch: the sampler hands it (epoch, rows)."""

    def __init__(self, data: Mapping, train: bool):
        self.data = dict(data)
        self.train = train

    def __len__(self) -> int:
        return num_rows(self.data)

    def __getitem__(self, item):
        epoch, rows = item
        return take(self.data, rows, epoch if self.train else None)


def _worker_init(_):
    torch.set_num_threads(1)


def make_loader(data: Mapping, sampler, *, train: bool, options: dict[str, Any] | None = None):
    """A DataLoader over prepared `data` whose batches come from `sampler` ((epoch, rows) items)."""
    opts = {**DEFAULT_LOADER, **loader_options(data), **(options or {})}
    workers = int(opts.get("num_workers") or 0)
    if not is_lazy(data):
        workers = 0  # nothing to decode: tensors are indexed in place
    pin = opts.get("pin_memory")
    if pin is None:
        pin = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "batch_size": None,
        "sampler": sampler,
        "num_workers": workers,
        "pin_memory": bool(pin),
        "generator": torch.Generator().manual_seed(0),
    }
    if workers > 0:
        kwargs.update(
            prefetch_factor=int(opts.get("prefetch_factor") or 2), worker_init_fn=_worker_init, persistent_workers=False
        )
    return torch.utils.data.DataLoader(_Batches(data, train), **kwargs)


def iter_batches(data: Mapping, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Prepared data in order, `batch_size` rows at a time (lazy columns decoded by the loader's workers)."""
    n = num_rows(data)
    if not is_lazy(data):
        for i in range(0, n, batch_size):
            yield {k: v[i : i + batch_size] for k, v in data.items()}
        return
    spans = [(0, list(range(i, min(n, i + batch_size)))) for i in range(0, n, batch_size)]
    yield from make_loader(data, spans, train=False)


def build_augment(spec: Any, image_size: int):
    """torchvision transforms v2 from a recipe's `data.augment`: false/None (off), true (open_clip's train
    crop: RandomResizedCrop(scale 0.9-1)), or a list of {TransformName: {kwargs}} applied in order to the
    PIL image (in its own mode) before the backbone's own transform. The list may come from a recipe file or
    an override (OmegaConf's ListConfig / DictConfig) as well as from Python."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    if spec in (None, False, {}, []):
        return None
    from torchvision.transforms import v2

    if spec is True:
        spec = [{"RandomResizedCrop": {"scale": [0.9, 1.0]}}]
    if isinstance(spec, Mapping):
        spec = [{k: v} for k, v in spec.items()]
    if not isinstance(spec, list):
        raise ConfigError(
            "data.augment must be true/false or a list of {TransformName: {options}} (torchvision.transforms.v2)"
        )
    steps = []
    for item in spec:
        name, kwargs = (item, {}) if isinstance(item, str) else next(iter(dict(item).items()))
        kwargs = dict(kwargs or {})
        cls = getattr(v2, str(name), None)
        if not isinstance(cls, type):
            raise ConfigError(f"data.augment: unknown torchvision.transforms.v2 transform {name!r}")
        if name in ("RandomResizedCrop", "Resize", "CenterCrop", "RandomCrop") and "size" not in kwargs:
            kwargs["size"] = image_size
        for key in ("scale", "ratio", "size", "degrees", "translate"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        try:
            steps.append(cls(**kwargs))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"data.augment: {name}({kwargs}): {exc}") from None
    return v2.Compose(steps)


def with_train_augment(data: Mapping, augment, seed: int) -> dict[str, Any]:
    """Prepared training data whose lazy image columns apply `augment` (seeded per epoch and row)."""
    if augment is None:
        return dict(data)
    return {k: v.with_augment(augment, seed) if isinstance(v, LazyImages) else v for k, v in data.items()}


class StreamingSource:
    """Training data from an iterable source (`hf` with `streaming: true`): rows are read in order through a
    seeded shuffle buffer (`data.shuffle_buffer`, reseeded per epoch), prepared a batch at a time by the task
    and decoded in one background worker. Resume re-reads the stream up to the checkpoint's position without
    decoding images (image columns are read as raw bytes), so the batches match an uninterrupted run."""

    def __init__(self, ds, task, backbone, *, seed: int, shuffle_buffer: int, augment=None):
        import datasets

        for name, feat in (ds.features or {}).items():
            if isinstance(feat, datasets.Image) and feat.decode:
                ds = ds.cast_column(name, datasets.Image(decode=False))
        self.ds, self.task, self.backbone = ds, task, backbone
        self.seed, self.shuffle_buffer, self.augment = int(seed), int(shuffle_buffer), augment
        self.loader_options: dict[str, Any] = dict(DEFAULT_LOADER)

    def epoch_stream(self, epoch: int, rank: int = 0, world: int = 1):
        ds = self.ds
        if world > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        ds.set_epoch(epoch)
        return iter(ds)

    def raw_batches(self, batch_size: int, rank: int = 0, world: int = 1, start: int = 0):
        """Endless (epoch, batch index, rows) from batch `start` on (rows of skipped batches are not kept)."""
        epoch, index = 0, 0
        while True:
            rows: list[dict] = []
            filled, seen = 0, 0
            for row in self.epoch_stream(epoch, rank, world):
                seen += 1
                filled += 1
                if index >= start:
                    rows.append(row)
                if filled == batch_size:
                    if index >= start:
                        yield epoch, index, rows
                    rows, filled, index = [], 0, index + 1
            if not seen:
                raise ConfigError("the streaming training source has no rows")
            if filled:
                if index >= start:
                    yield epoch, index, rows
                index += 1
            epoch += 1

    def prepare_rows(self, rows: list[dict], epoch: int, index: int) -> dict[str, torch.Tensor]:
        import datasets

        mini = datasets.Dataset.from_list(rows, features=self.ds.features)
        data = self.task.prepare(self.backbone, mini)
        if self.augment is not None:
            data = with_train_augment(data, self.augment, self.seed + 7_919 * index)
        return take(data, list(range(len(rows))), epoch if self.augment is not None else None)


class _StreamBatches(torch.utils.data.IterableDataset):
    def __init__(self, source: StreamingSource, batch_size: int, rank: int, world: int, start: int):
        self.source, self.batch_size, self.rank, self.world, self.start = source, batch_size, rank, world, start

    def __iter__(self):
        for epoch, index, rows in self.source.raw_batches(self.batch_size, self.rank, self.world, self.start):
            yield self.source.prepare_rows(rows, epoch, index)


def stream_loader(source: StreamingSource, batch_size: int, *, rank: int = 0, world: int = 1, start: int = 0):
    """A DataLoader over a streaming source: at most one worker, so the row order stays the stream's."""
    workers = min(1, int(source.loader_options.get("num_workers") or 0))
    pin = source.loader_options.get("pin_memory")
    kwargs: dict[str, Any] = {
        "batch_size": None,
        "num_workers": workers,
        "pin_memory": bool(torch.cuda.is_available() if pin is None else pin),
    }
    if workers:
        kwargs.update(
            prefetch_factor=int(source.loader_options.get("prefetch_factor") or 2), worker_init_fn=_worker_init
        )
    return torch.utils.data.DataLoader(_StreamBatches(source, batch_size, rank, world, start), **kwargs)
