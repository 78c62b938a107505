"""Public data API: parse a data spec, look its kind up in the plugin registry, load, convert to RGB, validate.

A spec is a string ``kind:source`` (``"imagefolder:/data/x"``, ``"hf:user/name"``, ``"winoground:synth"``,
``"world:medical/vqa"``), a bare local path (its kind is guessed from the layout), or a mapping with the key
``kind`` plus options (``{"kind": "manifest", "path": "x.jsonl", "task": "retrieval"}``; omegaconf mappings
work too). Keyword options given to :func:`load_data` override those in the spec.

A loader returns a map-style `datasets.Dataset` (validated row by row against the task), or, for a streaming
source (``hf`` with ``streaming: true``), a `datasets.IterableDataset` whose columns are checked against its
features when they are known. An image column is a `datasets.Image` feature or a column of tar member
references (``webdataset`` shards), decoded lazily by `vlkit.data.images`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, UnknownNameError
from ..plugins import registry
from .images import is_tar_ref_feature

# Option names that mean "the source" in a mapping spec (a manifest's path, a hub id, a directory).
SOURCE_ALIASES = ("source", "path", "data_dir", "dir", "id")


def required_fields(task: str) -> tuple[str, ...]:
    """The columns a dataset must have for `task` (image columns first): what the registered task (or probe)
    of that name declares in its `required` attribute."""

    for kind in ("task", "probe"):
        reg = registry(kind)
        if isinstance(task, str) and task in reg:
            need = reg.get(task).required
            if need:
                return tuple(need)
    known = registry("task").names() + [e.name for e in registry("probe") if e.obj.required]
    raise ConfigError(f"unknown task {task!r}; known: {', '.join(known)}")


def _plain_mapping(spec: Any) -> dict[str, Any]:
    """A plain dict from a dict or an omegaconf DictConfig (interpolations resolved)."""
    if type(spec).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        spec = OmegaConf.to_container(spec, resolve=True)
    return dict(spec)


def guess_kind(path: str) -> str | None:
    """The dataset kind of an existing local path, from its layout; None when it is not a local path."""
    p = Path(path).expanduser()
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".csv"):
            return "winoground" if p.name == "examples.jsonl" else "manifest"
        if suffix == ".parquet":
            return "parquet"
        if suffix == ".tar":
            return "webdataset"
        raise ConfigError(
            f"cannot tell the dataset kind of {path}: expected a .jsonl/.csv manifest, a .parquet file or a .tar shard",
            hint="write it as KIND:PATH, e.g. manifest:x.jsonl",
        )
    if p.is_dir():
        if (p / "examples.jsonl").is_file() or (p / "data" / "examples.jsonl").is_file():
            return "winoground"
        if any(p.glob("*.parquet")) or any(p.glob("*/*.parquet")):
            return "parquet"
        if any(p.glob("*.tar")):
            return "webdataset"
        return "imagefolder"
    return None


def parse_data_spec(spec: str | Mapping | None = None, **options: Any) -> dict[str, Any]:
    """Normalise a data spec to ``{"kind": ..., "source": ... (if any), **options}``.

    Strings: ``"kind:source"``, ``"kind"`` alone, an existing local path (kind guessed from its layout:
    ``.jsonl``/``.csv`` → manifest, ``.parquet`` or a folder of them → parquet, a folder with
    ``examples.jsonl`` → winoground, another folder → imagefolder) or ``"user/name"`` (a hub id → hf).
    Mappings: the key ``kind`` plus options; ``path``/``data_dir``/``dir``/``id`` are aliases of ``source``.
    """
    out: dict[str, Any] = {}
    if spec is None:
        pass
    elif isinstance(spec, str) or isinstance(spec, os.PathLike):
        out.update(_parse_string(os.fspath(spec)))
    elif isinstance(spec, Mapping) or type(spec).__module__.startswith("omegaconf"):
        out.update(_plain_mapping(spec))
    else:
        raise ConfigError(f"a data spec must be a string or a mapping with a 'kind' key, not {type(spec).__name__}")
    out.update(options)
    for alias in SOURCE_ALIASES[1:]:
        if alias in out:
            value = out.pop(alias)
            if out.get("source") not in (None, value):
                raise ConfigError(f"data spec gives both source={out['source']!r} and {alias}={value!r}")
            out["source"] = value
    if out.get("source") is not None:
        out["source"] = os.fspath(out["source"])
    kind = out.get("kind")
    if not kind and out.get("source"):
        kind = guess_kind(out["source"])
    if not kind or not isinstance(kind, str):
        raise ConfigError(
            "a data spec needs a kind: write KIND:SOURCE (e.g. imagefolder:DIR, manifest:x.jsonl, "
            "hf:user/name, winoground:synth) or give kind= in a mapping"
        )
    out["kind"] = kind
    return out


def _parse_string(text: str) -> dict[str, Any]:
    text = text.strip()
    if not text:
        raise ConfigError("empty data spec")
    kind, sep, rest = text.partition(":")
    # "C:\\data" is a Windows path, not kind "C"; "./a:b" is a path too.
    is_kind = sep and kind and kind.replace("_", "").replace("-", "").isalnum() and len(kind) > 1
    if is_kind:
        return {"kind": kind, "source": rest or None}
    guessed = guess_kind(text)
    if guessed is not None:
        return {"kind": guessed, "source": text}
    if text.endswith(".tar") and any(c in text for c in "{*?["):  # a shard pattern: /data/train-{0000..0099}.tar
        return {"kind": "webdataset", "source": text}
    if os.sep in text or text.startswith((".", "~")):
        if text.count("/") == 1 and not text.startswith((".", "/", "~")):
            return {"kind": "hf", "source": text}
        raise DataError(f"data path not found: {text}")
    return {"kind": text}


def _registry():

    return registry("dataset")


def dataset_kinds() -> list[str]:
    """Names of every registered dataset kind (built-in and from plugins)."""
    return _registry().names()


def pick_split(ds: Any, split: str | None, label: str):
    """A single (Iterable)Dataset out of an (Iterable)DatasetDict: `split`, else "train", else the only split."""
    import datasets

    if not isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return ds
    names = list(ds)
    if split is not None:
        if split not in ds:
            raise DataError(f"{label} has no split {split!r}; splits: {', '.join(names)}")
        return ds[split]
    if "train" in ds:
        return ds["train"]
    if len(names) == 1:
        return ds[names[0]]
    raise DataError(f"{label} has several splits ({', '.join(names)}); choose one with split=")


def image_columns(ds) -> list[str]:
    """Columns of `ds` that hold images: datasets.Image features and tar member reference columns."""
    import datasets

    return [
        name
        for name, feat in (ds.features or {}).items()
        if isinstance(feat, datasets.Image) or is_tar_ref_feature(feat)
    ]


def _first_bad_row(column) -> int | None:
    """0-based index of the first null in a pyarrow (chunked) array, or None."""
    if column.null_count == 0:
        return None
    offset = 0
    for chunk in getattr(column, "chunks", [column]):
        if chunk.null_count:
            for i, valid in enumerate(chunk.is_valid().to_pylist()):
                if not valid:
                    return offset + i
        offset += len(chunk)
    return None


def validate(ds, task: str, *, source: str | None = None) -> None:
    """Check that `ds` has the columns `task` needs, no empty values in them, and no dangling image paths.

    Raises DataError naming the column (and the source, when given) or the 1-based row and the file.
    """
    import datasets

    fields = required_fields(task)
    label = source or "dataset"
    if isinstance(ds, datasets.IterableDataset):
        if ds.features is not None:  # unknown until the first rows are read for some streaming sources
            _check_columns(list(ds.features), fields, task, label, streaming=True)
        return
    _check_columns(ds.column_names, fields, task, label)
    table = ds.data
    img_cols = set(image_columns(ds))
    for name in fields:
        column = table.column(name)
        bad = _first_bad_row(column)
        if bad is not None:
            raise DataError(f"{label}: row {bad + 1} has no value for {name!r} (required for task {task!r})")
        if name in img_cols and is_tar_ref_feature(ds.features[name]):
            _check_shards(column, name, label)
        elif name in img_cols:
            _check_image_paths(column, name, label)


def _check_columns(have: list[str], fields: tuple[str, ...], task: str, label: str, streaming: bool = False):
    missing = [f for f in fields if f not in have]
    if missing:
        what = "streaming dataset " if streaming else ""
        raise DataError(
            f"{what}{label} has no column {missing[0]!r} required for task {task!r} "
            f"(needs {', '.join(fields)}; has {', '.join(have) or 'no columns'})"
        )


def _check_shards(column, name: str, label: str) -> None:
    """Tar member references must point into shards that exist (one stat per shard, not per row)."""
    import pyarrow.compute as pc

    combined = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    for shard in pc.unique(combined.field("shard")).to_pylist():
        if shard and not os.path.isfile(shard):
            raise DataError(f"{label}: shard not found: {shard} (column {name!r})")


def _check_image_paths(column, name: str, label: str) -> None:
    """Image structs that hold only a local path must point at an existing file."""
    import pyarrow as pa

    if not pa.types.is_struct(column.type):
        return
    field_names = [column.type.field(i).name for i in range(column.type.num_fields)]
    if "path" not in field_names or "bytes" not in field_names:
        return
    combined = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    paths = combined.field("path").to_pylist()
    blobs = combined.field("bytes").is_null().to_pylist()
    for i, (path, no_bytes) in enumerate(zip(paths, blobs, strict=True)):
        if no_bytes and path and "://" not in path and not os.path.exists(path):
            raise DataError(f"{label}: row {i + 1}: image file not found: {path} (column {name!r})")


def load_data(spec: str | Mapping | None = None, **options: Any):
    """Load a dataset through its registered kind; `task=` validates the columns. Images are not converted:
    they reach the backbone's own transform in their own mode (see `vlkit.imagefile`).

    >>> load_data({"kind": "world", "domain": "medical", "task": "vqa", "n": 200, "seed": 0})
    >>> load_data("imagefolder:/data/pets", task="classification")
    """
    import datasets

    if os.environ.get("VLKIT_DATA_PROGRESS", "") in ("", "0"):
        datasets.disable_progress_bars()  # vlkit shows its own progress; per-cast bars only add noise
    parsed = parse_data_spec(spec, **options)
    kind = parsed.pop("kind")
    source = parsed.pop("source", None)
    split = parsed.pop("split", None)
    reg = _registry()
    if kind not in reg:
        raise UnknownNameError("dataset kind", kind, reg.names())
    loader = reg.get(kind)
    label = f"{kind}:{source}" if source else kind
    ds = loader(source, split=split, **parsed)
    ds = pick_split(ds, split, label)
    if not isinstance(ds, (datasets.Dataset, datasets.IterableDataset)):
        raise DataError(f"dataset kind {kind!r} returned {type(ds).__name__}, not a datasets.Dataset")
    task = parsed.get("task")
    if task:
        validate(ds, task, source=label)
    try:
        ds._vlkit_label = label  # how decode errors of the lazy image pipeline name the source
    except AttributeError:  # pragma: no cover - a Dataset subclass with __slots__
        pass
    return ds


def few_shot(ds, shots: int, seed: int = 0, column: str = "label"):
    """The first `shots` examples of each class after a seeded shuffle (every class must have that many)."""
    if shots < 1:
        raise ConfigError(f"shots must be >= 1, got {shots}")
    if column not in ds.column_names:
        raise ConfigError(f"few-shot selection needs a {column!r} column; this dataset has {ds.column_names}")
    import torch

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds), generator=g).tolist()
    labels = ds[column]
    taken: dict[int, list[int]] = {}
    for i in order:
        bucket = taken.setdefault(labels[i], [])
        if len(bucket) < shots:
            bucket.append(i)
    short = {k: len(v) for k, v in taken.items() if len(v) < shots}
    if short:
        raise ConfigError(f"not enough examples for {shots} shots in classes {sorted(short)} (have {short})")
    return ds.select(sorted(i for v in taken.values() for i in v))
