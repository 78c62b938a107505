"""Winoground: the hub copy (gated, parquet), a local copy (parquet or examples.jsonl + images/), or synth pairs.

All sources give the same columns: id, image_0, image_1 (images, each in its own mode), caption_0,
caption_1, tag, secondary_tag, num_main_preds, collapsed_tag. The official repo layout is ``examples.jsonl``
(``image_0``/``image_1`` hold file stems such as ``ex_0_img_0``) plus ``images/ex_0_img_0.png``; the current
hub repo stores the same rows in parquet with the images embedded as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..plugins import registry
from .hub import hf_token, hub_load
from .loaders import KindOptions, _int_option, _no_extra, parquet_files
from .manifest import check_image_bytes, check_image_file, read_rows

HUB_ID = "facebook/winoground"
HUB_SPLIT = "test"
IMAGE_COLUMNS = ("image_0", "image_1")
REQUIRED = ("image_0", "image_1", "caption_0", "caption_1")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LOCAL_HINT = (
    "use a local copy instead: winoground with --data DIR (a folder of parquet files, or examples.jsonl "
    "with an images/ folder), or the world kind's minimal pairs: winoground:synth"
)


def canonical_features() -> dict[str, Any]:
    import datasets

    string = datasets.Value("string")
    return {
        "id": datasets.Value("int64"),
        "image_0": datasets.Image(),
        "image_1": datasets.Image(),
        "caption_0": string,
        "caption_1": string,
        "tag": string,
        "secondary_tag": string,
        "num_main_preds": datasets.Value("int64"),
        "collapsed_tag": string,
    }


def normalize(ds, label: str):
    """Required columns present; known columns cast to the canonical types, in the canonical order first."""
    import datasets

    missing = [c for c in REQUIRED if c not in ds.column_names]
    if missing:
        raise DataError(f"winoground data {label} has no column {missing[0]!r} (columns: {', '.join(ds.column_names)})")
    canon = canonical_features()
    order = [c for c in canon if c in ds.column_names] + [c for c in ds.column_names if c not in canon]
    if order != ds.column_names:
        ds = ds.select_columns(order)
    target = datasets.Features({c: canon.get(c, ds.features[c]) for c in order})
    for c in IMAGE_COLUMNS:  # keep a mode/decode setting that is already there
        if isinstance(ds.features[c], datasets.Image):
            target[c] = ds.features[c]
    if target != ds.features:
        try:
            ds = ds.cast(target)
        except Exception as exc:
            raise DataError(f"winoground data {label}: unexpected column types: {exc}") from None
    return ds


def find_examples(root: Path) -> Path | None:
    """The examples.jsonl of a local copy: ROOT/examples.jsonl, ROOT/data/examples.jsonl, or ROOT itself."""
    if root.is_file():
        return root if root.name.endswith(".jsonl") else None
    for cand in (root / "examples.jsonl", root / "data" / "examples.jsonl"):
        if cand.is_file():
            return cand
    return None


def _image_file(images: Path, value: Any, where: str, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where} has no image name in column {column!r}")
    value = value.strip()
    direct = Path(value)
    if direct.suffix.lower() in IMAGE_EXTENSIONS:
        path = direct if direct.is_absolute() else images / direct
    else:
        candidates = [images / f"{value}{ext}" for ext in IMAGE_EXTENSIONS]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    check_image_file(path, where=where)
    return str(path)


def load_examples_jsonl(examples: Path, images_dir: str | Path | None = None):
    """The official layout: examples.jsonl rows whose image_0/image_1 are stems of files in images/."""
    import datasets

    images = Path(images_dir).expanduser() if images_dir else examples.parent / "images"
    if not images.is_dir():
        raise DataError(f"winoground images folder not found: {images} (expected beside {examples})")
    rows = list(read_rows(examples))
    if not rows:
        raise DataError(f"winoground examples file {examples} has no rows")
    canon = canonical_features()
    keys = list(dict.fromkeys(k for _, rec in rows for k in rec))
    columns: dict[str, list[Any]] = {
        c: [] for c in [c for c in canon if c in keys or c == "id"] + [k for k in keys if k not in canon]
    }
    for row, rec in rows:
        where = f"winoground examples {examples}, row {row}"
        for c in REQUIRED:
            if rec.get(c) is None or (isinstance(rec.get(c), str) and not rec[c].strip()):
                raise DataError(f"{where} has no value for {c!r}")
        for c in columns:
            if c in IMAGE_COLUMNS:
                columns[c].append(_image_file(images, rec.get(c), where, c))
            elif c == "id":
                columns[c].append(rec.get("id", row - 1))
            else:
                columns[c].append(rec.get(c))
    try:
        ds = datasets.Dataset.from_dict({c: v for c, v in columns.items() if c not in IMAGE_COLUMNS})
        for c in IMAGE_COLUMNS:
            ds = ds.add_column(c, columns[c]).cast_column(c, datasets.Image())
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"winoground examples {examples}: cannot build a dataset: {exc}") from None
    return normalize(ds, str(examples))


def check_parquet_images(files: list[Path]) -> None:
    """Every image_0/image_1 cell of the parquet files holds a readable image (errors name file and row)."""
    import pyarrow.parquet as pq

    for f in files:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        cols = [c for c in IMAGE_COLUMNS if c in names]
        if len(cols) < len(IMAGE_COLUMNS):
            raise DataError(
                f"winoground parquet {f} has no column "
                f"{next(c for c in IMAGE_COLUMNS if c not in names)!r} (columns: {', '.join(names)})"
            )
        start = 0
        for batch in pf.iter_batches(columns=cols, batch_size=16):
            for c in cols:
                for i, cell in enumerate(batch.column(c).to_pylist()):
                    where = f"winoground parquet {f}, row {start + i + 1}, column {c!r}"
                    data = cell.get("bytes") if isinstance(cell, dict) else cell
                    path = cell.get("path") if isinstance(cell, dict) else None
                    if data:
                        check_image_bytes(data, where=where)
                    elif path:
                        check_image_file(Path(path) if Path(path).is_absolute() else f.parent / path, where=where)
                    else:
                        raise DataError(f"{where} has no image")
            start += batch.num_rows


def load_parquet_copy(source: Path, split: str | None = None):
    """A local copy of the hub repo's parquet files (a file or a folder searched recursively)."""
    import datasets

    files = parquet_files(str(source), kind="winoground", split=split)
    check_parquet_images(files)
    try:
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        raise DataError(f"cannot load winoground parquet {source}: {str(exc).splitlines()[0][:300]}") from exc
    return normalize(ds, str(source))


def load_hub(split: str | None = None, token: str | bool | None = None, dataset_id: str = HUB_ID):
    """`datasets.load_dataset("facebook/winoground", split="test", token=<the user's token>)`."""

    if token is None:
        token = hf_token()
    ds = hub_load(dataset_id, split=split or HUB_SPLIT, token=token, local_hint=LOCAL_HINT)
    return normalize(ds, f"hub {dataset_id}")


def load_synth(n: int = 400, seed: int = 0, domain: str = "photo", image_size: int = 64):
    """Minimal pairs from the ``world`` dataset kind (the world plugin), task winoground."""

    if "world" not in registry("dataset"):
        raise ConfigError(
            "winoground:synth needs the dataset kind 'world' (the built-in world plugin), which is not registered"
        )
    ds = registry("dataset").get("world")(
        None,
        domain=domain,
        task="winoground",
        n=_int_option("n", n),
        seed=_int_option("seed", seed),
        image_size=_int_option("image_size", image_size),
    )
    return normalize(ds, "synth")


SYNTH_OPTIONS: dict[str, Any] = {"n": 400, "seed": 0, "domain": "photo", "image_size": 64}


@dataclass
class WinogroundOptions(KindOptions):
    """The options of the `winoground` dataset kind; each belongs to one source and is refused with another."""

    token: str | bool | None = None
    """Hub token for the gated hub copy (winoground:hub only); None: the logged-in user's token."""
    images_dir: str | None = None
    """Folder of the images of a local examples.jsonl copy; None: images/ beside it."""
    n: int | None = None
    """Generated minimal pairs (winoground:synth only); None: 400."""
    seed: int | None = None
    """Seed of the generated pairs (winoground:synth only); None: 0."""
    domain: str | None = None
    """World domain the pairs are drawn in (winoground:synth only); None: photo."""
    image_size: int | None = None
    """Side in pixels of the generated images (winoground:synth only); None: 64."""


def load_winoground(
    source: str | None = None,
    *,
    split: str | None = None,
    task: str | None = None,
    token: str | bool | None = None,
    images_dir: str | None = None,
    n: int | None = None,
    seed: int | None = None,
    domain: str | None = None,
    image_size: int | None = None,
    **options: Any,
):
    """Winoground from `source`: ``hub`` (default), ``synth``, or a local folder/file.

    A local folder holds parquet files (the hub layout) or ``examples.jsonl`` plus ``images/``. Each option
    belongs to one source and is refused with another: `token` (hub), `n`/`seed`/`domain`/`image_size`
    (synth; defaults 400, 0, photo, 64), `images_dir` (a local examples.jsonl), `split` (hub and parquet copies).
    """
    _no_extra("winoground", options, WinogroundOptions)
    if task not in (None, "winoground"):
        raise ConfigError(f"winoground data is for task 'winoground', not {task!r}")
    is_hub = source in (None, "", "hub") or source.startswith("hub:")
    synth = {
        k: v for k, v in (("n", n), ("seed", seed), ("domain", domain), ("image_size", image_size)) if v is not None
    }
    _only_for("token", token is not None and not is_hub, "the hub copy (winoground:hub)")
    _only_for(", ".join(synth), bool(synth) and source != "synth", "generated pairs (winoground:synth)")
    if is_hub:
        return load_hub(
            split=split, token=token, dataset_id=source[4:] if source and source.startswith("hub:") else HUB_ID
        )
    _only_for("split", split is not None and source == "synth", "the hub copy and parquet copies")
    if source == "synth":
        return load_synth(**{**SYNTH_OPTIONS, **synth})
    path = Path(str(source)).expanduser()  # not None: None is the hub
    if not path.exists():
        raise DataError(
            f"winoground source not found: {path}",
            hint="give hub, synth, or a local folder with parquet files or examples.jsonl + images/",
        )
    examples = find_examples(path)
    if examples is not None:
        _only_for("split", split is not None, "the hub copy and parquet copies")
        return load_examples_jsonl(examples, images_dir)
    _only_for("images_dir", images_dir is not None, "a local examples.jsonl copy")
    if path.is_file() and path.suffix != ".parquet":
        raise DataError(f"winoground source {path} must be examples.jsonl, a parquet file or a folder")
    return load_parquet_copy(path, split=split)


def _only_for(names: str, given: bool, source: str) -> None:
    if given:
        raise ConfigError(f"winoground option(s) {names} apply only to {source}, not to this source")
