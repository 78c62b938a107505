"""Local manifests: JSONL or CSV files listing image paths with captions, labels, questions/answers or boxes.

Image paths are relative to the manifest's folder or absolute. The image column is ``image``, ``file_name``
or ``image_path`` (single image), or ``image_0`` and ``image_1`` (pairs). A ``box`` column holds four numbers,
as a JSON list or separated by spaces/commas. Load-time checks are cheap and name the manifest file and the
1-based data row: a missing required value, a missing image file (one stat per file, no decoding). An image
that exists but cannot be decoded raises `DataError` (naming the file and row) when it is decoded, by
`vlkit.data.images`, so time to the first step does not grow with the dataset.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..imagefile import ImageDecodeError, open_image

SINGLE_IMAGE_COLUMNS = ("image", "file_name", "image_path")
PAIR_IMAGE_COLUMNS = ("image_0", "image_1")
COLUMN_ALIASES = {"bbox": "box", "text": "caption", "expr": "expression", "referring_expression": "expression"}


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based data row, row dict) for each record of a .jsonl or .csv manifest; CSV empty cells are None.
    A manifest that is not UTF-8 text is a DataError naming the file and the byte."""
    try:
        yield from _read_rows(path)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"manifest {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None


def _read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            row = 0
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                row += 1
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"manifest {path}: row {row} (line {lineno}) is not valid JSON: {exc.msg}"
                    ) from None
                if not isinstance(rec, dict):
                    raise DataError(f"manifest {path}: row {row} (line {lineno}) is not a JSON object")
                yield row, rec
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames:
                raise DataError(f"manifest {path} has no header row")
            for row, rec in enumerate(reader, 1):
                if None in rec:
                    raise DataError(f"manifest {path}: row {row} has more cells than the header")
                yield row, {k.strip(): (v if v is None or v.strip() != "" else None) for k, v in rec.items()}
    else:
        raise DataError(f"manifest {path} must be a .jsonl or .csv file")


def resolve_image(value: Any, base: Path, *, where: str, column: str) -> str:
    """The absolute path of an image cell, checked to exist (decoding is checked when the image is read)."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where} has no image path in column {column!r}")
    p = Path(value.strip()).expanduser()
    if not p.is_absolute():
        p = base / p
    check_image_exists(p, where=where)
    return str(p)


def check_image_exists(path: Path, *, where: str) -> None:
    """DataError naming `path` and `where` if the file is missing (a stat; the image is not opened)."""
    if not path.is_file():
        raise DataError(f"{where}: image file not found: {path}")


def check_image_file(path: Path, *, where: str) -> None:
    """DataError naming `path` and `where` if the file is missing or not a readable image (a full decode
    through `vlkit.imagefile.open_image`, the one decoding every reader uses)."""

    if not path.is_file():
        raise DataError(f"{where}: image file not found: {path}")
    try:
        open_image(path)
    except ImageDecodeError as exc:
        raise DataError(f"{where}: cannot read {exc}") from None


def check_image_bytes(data: bytes, *, where: str) -> None:
    """DataError naming `where` if `data` is not a readable image."""

    try:
        open_image(data)
    except ImageDecodeError as exc:
        raise DataError(f"{where}: cannot read image: {exc}") from None


def parse_box(value: Any, *, where: str) -> list[float]:
    """Four numbers from a list or a string (JSON list, or separated by spaces/commas)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise DataError(f"{where}: box {text!r} is not a JSON list of 4 numbers") from None
        else:
            value = [v for v in re.split(r"[\s,;]+", text) if v]
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise DataError(f"{where}: box must be 4 numbers (x0, y0, x1, y1), got {value!r}")
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        raise DataError(f"{where}: box must be 4 numbers (x0, y0, x1, y1), got {value!r}") from None


def image_columns_of(keys: list[str], path: Path) -> tuple[list[str], str | None]:
    """(output image columns, source column for the single-image case) found in a manifest's keys."""
    if all(c in keys for c in PAIR_IMAGE_COLUMNS):
        return list(PAIR_IMAGE_COLUMNS), None
    for c in SINGLE_IMAGE_COLUMNS:
        if c in keys:
            return ["image"], c
    raise DataError(
        f"manifest {path} has no image column: expected one of "
        f"{', '.join(SINGLE_IMAGE_COLUMNS)} (or image_0 and image_1 for pairs); "
        f"columns: {', '.join(keys) or 'none'}"
    )


def _label_feature(values: list[Any]):
    """ClassLabel for string labels (sorted names), int64 for integer labels (digit strings included)."""
    import datasets

    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) for v in present):
        return [int(v) if v is not None else None for v in values], datasets.Value("int64")
    if present and len(present) == len(values) and all(isinstance(v, str) for v in present):
        names = sorted(set(present))
        return values, datasets.ClassLabel(names=names)
    return values, None


def load_manifest(path: str | os.PathLike, *, required: tuple[str, ...] = (), split: str | None = None):
    """A datasets.Dataset from a JSONL/CSV manifest, with image columns as datasets.Image features.

    `required` are the columns every row must fill (from the task); rows are checked at load time, image
    files only for existence.
    `split` keeps the rows whose ``split`` column equals it (row numbers stay those of the file); a
    manifest without a ``split`` column is taken whole.
    """
    import datasets

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"manifest file not found: {path}")
    base = path.resolve().parent
    rows = list(read_rows(path))
    if not rows:
        raise DataError(f"manifest {path} has no rows")
    if split is not None and any("split" in rec for _, rec in rows):
        rows = [(row, rec) for row, rec in rows if rec.get("split") == split]
        if not rows:
            raise DataError(f"manifest {path} has no rows with split {split!r}")
    keys: list[str] = []
    for _, rec in rows:
        for k in rec:
            k = COLUMN_ALIASES.get(k, k)
            if k not in keys:
                keys.append(k)
    img_cols, single_src = image_columns_of(keys, path)
    src_cols = [single_src] if single_src else img_cols
    other = [k for k in keys if k not in src_cols and k not in SINGLE_IMAGE_COLUMNS + PAIR_IMAGE_COLUMNS]
    missing_cols = [c for c in required if c not in img_cols and c not in other]
    if missing_cols:
        raise DataError(
            f"manifest {path} has no column {missing_cols[0]!r} (required: {', '.join(required)}; "
            f"columns: {', '.join(keys)})"
        )
    columns: dict[str, list[Any]] = {c: [] for c in img_cols + other}
    for row, rec in rows:
        rec = {COLUMN_ALIASES.get(k, k): v for k, v in rec.items()}
        where = f"manifest {path}, row {row}"
        for c in required:
            if c not in img_cols and (rec.get(c) is None or (isinstance(rec.get(c), str) and not rec[c].strip())):
                raise DataError(f"{where} has no value for {c!r}")
        for out, src in zip(img_cols, src_cols, strict=True):
            columns[out].append(resolve_image(rec.get(src), base, where=where, column=src))
        for c in other:
            value = rec.get(c)
            if c == "box" and value is not None:
                value = parse_box(value, where=where)
            columns[c].append(value)
    features: dict[str, Any] = {c: datasets.Image() for c in img_cols}
    if "label" in columns:
        columns["label"], feat = _label_feature(columns["label"])
        if feat is not None:
            features["label"] = feat
    if "box" in columns:
        seq = getattr(datasets, "List", None) or datasets.Sequence
        features["box"] = seq(datasets.Value("float32"), length=4)
    plain = [c for c in columns if c not in features]
    try:
        inferred = datasets.Dataset.from_dict({c: columns[c] for c in plain}).features if plain else {}
        full = datasets.Features({c: features[c] if c in features else inferred[c] for c in columns})
        return datasets.Dataset.from_dict(columns, features=full)
    except DataError:
        raise
    except Exception as exc:  # e.g. one column mixing strings and lists: pyarrow cannot build it
        raise DataError(f"manifest {path}: cannot build a dataset from its columns: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
