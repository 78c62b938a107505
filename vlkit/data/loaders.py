"""Built-in dataset loaders: a hub id or local `datasets` directory, a local imagefolder, a manifest, parquet
files (the world plugin, `vlkit.world.plugin`, adds the procedural world).

Every loader has the plugin signature ``loader(source: str | None = None, *, split: str | None = None,
**options) -> datasets.Dataset``; `task` among the options names the columns that rows must fill. Each kind
declares its options as one dataclass with field help (`HfOptions`, ...; registered as the kind's
`options_cls`) and its loader rejects any other with one ConfigError naming the kind and the options, so a
stray ``domain``/``n``/``seed`` never reaches `datasets.load_dataset`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..options import option_names
from .api import pick_split, required_fields
from .hub import hub_load
from .labels import name_labels
from .manifest import check_image_exists, image_columns_of, load_manifest, read_rows

SPLIT_NAMES = ("train", "validation", "valid", "val", "dev", "test")


@dataclass
class KindOptions:
    """The option every built-in dataset kind takes beside `source` and `split`."""

    task: str | None = None
    """Set by vlkit: the task the data is loaded for (every row must fill that task's columns)."""


@dataclass
class ManifestOptions(KindOptions):
    """The options of the `manifest` dataset kind (its columns come from the file, not from options)."""


@dataclass
class LoadOptions(KindOptions):
    """Options a kind built on `datasets.load_dataset` passes on to it unchanged."""

    cache_dir: str | None = None
    """Cache folder of the `datasets` library (load_dataset's cache_dir); None: its default folder."""
    keep_in_memory: bool | None = None
    """Copy the dataset into memory instead of memory-mapping its Arrow cache (load_dataset's keep_in_memory)."""
    num_proc: int | None = None
    """Processes that prepare the dataset (load_dataset's num_proc); None: one."""


@dataclass
class HfOptions(LoadOptions):
    """The options of the `hf` dataset kind."""

    config: str | None = None
    """The dataset's configuration (subset) name, load_dataset's `name`."""
    name: str | None = None
    """Another spelling of config (give one; when both are given they must agree)."""
    revision: str | None = None
    """Hub revision to read: a branch, tag or commit (hub ids only)."""
    token: str | bool | None = None
    """Hub token for a gated dataset (hub ids only); None: the logged-in user's token, if any."""
    streaming: bool = False
    """true: stream the rows (a datasets.IterableDataset) instead of downloading the whole dataset first."""
    data_files: str | list[str] | dict[str, Any] | None = None
    """Which files of the dataset to read: a path pattern, a list, or {split: pattern} (load_dataset's)."""


@dataclass
class ImagefolderOptions(LoadOptions):
    """The options of the `imagefolder` dataset kind (the imagefolder builder's own)."""

    drop_labels: bool | None = None
    """true: no label column from the class subfolders; None: the builder decides from the layout."""
    drop_metadata: bool | None = None
    """true: ignore metadata.jsonl/.csv files (images and folder labels only)."""
    filters: Any = None
    """Row filter the builder applies (a pyarrow expression, or DNF tuples such as [["label", "==", 0]])."""


@dataclass
class ParquetOptions(LoadOptions):
    """The options of the `parquet` dataset kind (the parquet builder's own)."""

    columns: list[str] | None = None
    """Read only these columns; None: every column."""
    filters: Any = None
    """Row filter applied while reading (DNF tuples such as [["label", "==", 0]], or a pyarrow expression)."""
    batch_size: int | None = None
    """Rows per Arrow record batch while reading; None: the builder's default."""


# What `datasets.load_dataset` calls a single local file, by suffix (for hf:FILE).
FILE_BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}


def _int_option(name: str, value: Any) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"data option {name} must be an integer, got {value!r}") from None
    if isinstance(value, float) and value != out:
        raise ConfigError(f"data option {name} must be an integer, got {value!r}")
    return out


def _no_extra(kind: str, options: dict[str, Any], declared: type) -> dict[str, Any]:
    """`options` when each is a field of `declared`, the kind's options dataclass (options a loader names as
    keyword parameters never arrive here); else one ConfigError naming the kind and every unknown option."""
    allowed = option_names(declared)
    unknown = sorted(k for k in options if k not in allowed)
    if unknown:
        raise ConfigError(f"unknown option(s) for dataset kind {kind!r}: {', '.join(unknown)}")
    return options


def _required(task: str | None) -> tuple[str, ...]:
    return required_fields(task) if task else ()


def _bool_option(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"data option {name} must be true or false, got {value!r}")


def is_local_source(source: str) -> bool:
    """Whether an hf source means a local path (it exists, or is written as one) rather than a hub id."""
    return source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` was written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def load_hf(
    source: str | None = None,
    *,
    split: str | None = None,
    config: str | None = None,
    name: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    task: str | None = None,
    streaming: Any = False,
    **load_kwargs: Any,
):
    """A Hugging Face hub dataset id (``hf:user/name``, with the user's token when it is gated), or a local path:
    a `save_to_disk` directory (`datasets.load_from_disk`), a data directory `datasets.load_dataset` reads
    (parquet/jsonl/csv/images) or one such file. ``streaming: true`` gives a `datasets.IterableDataset`."""
    _no_extra("hf", load_kwargs, HfOptions)
    if config and name and config != name:
        raise ConfigError(f"hf dataset: config={config!r} and name={name!r} disagree")
    if not source:
        raise ConfigError("the hf dataset kind needs a hub id or a local directory: hf:user/name or hf:DIR")
    streaming = _bool_option("streaming", streaming)
    if is_local_source(source):
        if token is not None:
            raise ConfigError(f"hf:{source} is a local path: a hub token does not apply to it")
        return _load_hf_local(
            Path(source).expanduser(),
            split=split,
            name=config or name,
            revision=revision,
            streaming=streaming,
            **load_kwargs,
        )
    if streaming:
        load_kwargs["streaming"] = True
    ds = hub_load(source, name=config or name, split=split, token=token, revision=revision, **load_kwargs)
    return pick_split(ds, split, f"hf:{source}")


def _load_hf_local(
    path: Path, *, split: str | None, name: str | None, revision: str | None, streaming: bool, **load_kwargs: Any
):
    import datasets

    label = f"hf:{path}"
    if not path.exists():
        raise DataError(f"hf local path not found: {path}")
    if revision:
        raise ConfigError(f"{label} is a local path: it has no revision (revision={revision!r})")
    try:
        if is_saved_dataset(path):
            if name or load_kwargs:
                given = ", ".join((["config"] if name else []) + sorted(load_kwargs))
                raise ConfigError(f"{label} was written by save_to_disk: option(s) {given} do not apply")
            ds = pick_split(datasets.load_from_disk(str(path)), split, label)
            return ds.to_iterable_dataset() if streaming else ds
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"{label}: cannot tell how to read {path.name}; expected a save_to_disk or data "
                    f"directory, or a {', '.join(FILE_BUILDERS)} file"
                )
            ds = datasets.load_dataset(builder, data_files=[str(path)], name=name, streaming=streaming, **load_kwargs)
        else:
            ds = datasets.load_dataset(str(path), name=name, streaming=streaming, **load_kwargs)
    except (KeyboardInterrupt, SystemExit, ConfigError, DataError):
        raise
    except Exception as exc:
        raise _wrap_local_error("hf", path, exc) from exc
    return pick_split(ds, split, label)


def _local_dir(kind: str, source: str | None) -> Path:
    if not source:
        raise ConfigError(f"the {kind} dataset kind needs a local folder: {kind}:DIR")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{kind} folder not found: {path}")
    if not path.is_dir():
        raise DataError(f"{kind} source must be a folder: {path}")
    return path


def _check_imagefolder_metadata(root: Path, required: tuple[str, ...]) -> None:
    """Every row of an imagefolder's metadata.jsonl/.csv must point at an existing image and fill `required`.

    Only a stat per file: an image that does not decode raises DataError when it is read (vlkit.data.images).
    """
    for meta in sorted(list(root.rglob("metadata.jsonl")) + list(root.rglob("metadata.csv"))):
        rows = list(read_rows(meta))
        if not rows:
            continue
        keys = list(dict.fromkeys(k for _, rec in rows for k in rec))
        img_cols, single = image_columns_of(keys, meta)
        src_cols = [single] if single else img_cols
        for row, rec in rows:
            where = f"{meta}, row {row}"
            for c in required:
                if c not in ("image", "image_0", "image_1", "label") and c in keys and rec.get(c) is None:
                    raise DataError(f"{where} has no value for {c!r}")
            for c in src_cols:
                value = rec.get(c)
                if not isinstance(value, str) or not value:
                    raise DataError(f"{where} has no image path in column {c!r}")
                check_image_exists(meta.parent / value, where=where)


def _wrap_local_error(kind: str, where: Path, exc: Exception) -> DataError:
    lines = str(exc).strip().splitlines()
    msg = lines[0][:300] if lines else type(exc).__name__
    return DataError(f"cannot load {kind} {where}: {msg}")


def load_imagefolder(
    source: str | None = None, *, split: str | None = None, task: str | None = None, **load_kwargs: Any
):
    """A local folder in the Hugging Face imagefolder layout (class subfolders, or a metadata.jsonl/.csv)."""
    import datasets

    _no_extra("imagefolder", load_kwargs, ImagefolderOptions)
    root = _local_dir("imagefolder", source)
    _check_imagefolder_metadata(root, _required(task))
    try:
        ds = datasets.load_dataset("imagefolder", data_dir=str(root), split=split, **load_kwargs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        raise _wrap_local_error("imagefolder", root, exc) from exc

    return name_labels(pick_split(ds, split, f"imagefolder:{root}"), root)


def load_manifest_kind(source: str | None = None, *, split: str | None = None, task: str | None = None, **options: Any):
    """A local JSONL/CSV manifest of image paths (relative to its folder, or absolute) and their fields.

    With `split`, a manifest that has a ``split`` column keeps only that split's rows; one without it is
    taken whole (one manifest file per split).
    """

    _no_extra("manifest", options, ManifestOptions)
    if not source:
        raise ConfigError("the manifest dataset kind needs a file: manifest:FILE.jsonl (or .csv)")

    ds = load_manifest(source, required=_required(task), split=split)
    return name_labels(ds, Path(source).expanduser().parent)


def parquet_files(source: str, kind: str = "parquet", split: str | None = None) -> list[Path]:
    """The parquet files of a file or folder (searched recursively).

    With `split`, files named SPLIT-*.parquet (or in a SPLIT/ folder) are chosen; a folder whose files name
    no split at all is taken whole.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(f"{kind} path not found: {path}")
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise DataError(f"no .parquet files under {path}")
    if split:

        def split_of(f: Path) -> str | None:
            for name in SPLIT_NAMES:
                if f.name.startswith((f"{name}-", f"{name}_", f"{name}.")) or f.parent.name == name:
                    return name
            return None

        named = {f: split_of(f) for f in files}
        chosen = [f for f in files if named[f] == split or f.name.startswith(f"{split}-") or f.parent.name == split]
        if chosen:
            files = chosen
        elif any(named.values()):
            found = sorted({s for s in named.values() if s})
            raise DataError(f"no parquet files for split {split!r} under {path}; splits found: {', '.join(found)}")
    return files


def load_parquet(source: str | None = None, *, split: str | None = None, task: str | None = None, **load_kwargs: Any):
    """Local parquet files (a file, or a folder searched recursively; `split` picks SPLIT-*.parquet)."""
    import datasets

    _no_extra("parquet", load_kwargs, ParquetOptions)
    if not source:
        raise ConfigError("the parquet dataset kind needs a file or folder: parquet:DIR")
    files = parquet_files(source, split=split)
    try:
        return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", **load_kwargs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        raise _wrap_local_error("parquet", Path(source), exc) from exc


__all__ = [
    "load_hf",
    "load_imagefolder",
    "load_manifest_kind",
    "load_parquet",
    "parquet_files",
    "is_saved_dataset",
    "KindOptions",
    "HfOptions",
    "ImagefolderOptions",
    "ManifestOptions",
    "ParquetOptions",
]
