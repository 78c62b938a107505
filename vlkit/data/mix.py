"""`{mix: [spec, ...]}`: several data sources as one dataset, their columns aligned before they are joined.

Sources type their columns differently: a manifest's image column is a `datasets.Image` of file paths, a
webdataset's is a struct of tar member references; one source names its labels (a ClassLabel), another
numbers them. `mix_datasets` brings every part to one set of features first:

- image columns: when any part holds tar member references, the others' image files become references too (the
  whole file: offset 0, its size; nothing is read), so one `vlkit.data.images` reader decodes every row lazily;
  images stored as bytes (parquet, hf) cannot be referenced, so the references are read into bytes instead;
- class labels: sources that name their classes differently get one ClassLabel of every name (the first source's
  order, then the new names) and their numbers are mapped by name, so `cat` is one class whatever its number;
- other columns: cast to the first part's feature (numbers to a ClassLabel, names dropped to numbers); a column
  that cannot be cast is a DataError naming the source and the column.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import DataError
from .images import read_tar_member

REF_FEATURE = ("shard", "offset", "size", "member")


def _ref_feature():
    import datasets

    string = datasets.Value("string")
    return {"shard": string, "offset": datasets.Value("int64"), "size": datasets.Value("int64"), "member": string}


def _file_refs(ds, column: str, label: str):
    """`ds` with the image files of `column` as whole-file references; None when a row holds bytes."""
    import datasets

    cells = ds.cast_column(column, datasets.Image(decode=False))[column]
    refs = []
    for i, cell in enumerate(cells, 1):
        path = cell.get("path") if isinstance(cell, dict) else None
        if cell is None or (isinstance(cell, dict) and cell.get("bytes") is not None) or not path:
            return None
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise DataError(f"{label}: row {i}: image file {path}: {exc.strerror or exc}") from None
        refs.append({"shard": os.path.abspath(path), "offset": 0, "size": int(size), "member": os.path.basename(path)})
    return _replace_column(ds, column, refs, _ref_feature())


def _read_refs(ds, column: str):
    """`ds` with the tar member references of `column` read into image bytes (`datasets.Image`)."""
    import datasets

    cells = ds[column]
    blobs = [{"bytes": read_tar_member(c), "path": c["member"]} for c in cells]
    return _replace_column(ds, column, blobs, datasets.Image())


def _replace_column(ds, column: str, values: list[Any], feature):
    import datasets

    new = datasets.Dataset.from_dict({column: values}, features=datasets.Features({column: feature}))
    if len(ds.column_names) == 1:
        return new
    return datasets.concatenate_datasets([ds.remove_columns([column]), new], axis=1).select_columns(
        list(ds.column_names)
    )


def _is_ref(feature) -> bool:
    return isinstance(feature, dict) and all(k in feature for k in REF_FEATURE)


def _same_class_names(parts: list, column: str) -> list:
    """`parts` whose ClassLabel `column`s name their classes differently, mapped onto one ClassLabel by name."""
    import datasets

    feats = [p.features[column] for p in parts]
    if not all(isinstance(f, datasets.ClassLabel) for f in feats) or all(f.names == feats[0].names for f in feats):
        return parts
    union = list(dict.fromkeys(n for f in feats for n in f.names))
    index = {n: i for i, n in enumerate(union)}
    target = datasets.ClassLabel(names=union)
    out = []
    for p, f in zip(parts, feats):
        mapping = [index[n] for n in f.names]
        values = [None if v is None else mapping[v] for v in p[column]]
        out.append(_replace_column(p, column, values, target))
    return out


def _same_image_kind(parts: list, column: str, labels: list[str]) -> list:
    """`parts` whose `column` is tar references in some and images in others, all references or all images."""
    import datasets

    feats = [p.features[column] for p in parts]
    if not any(_is_ref(f) for f in feats) or all(_is_ref(f) for f in feats):
        return parts
    converted = [p if _is_ref(p.features[column]) else _file_refs(p, column, label) for p, label in zip(parts, labels)]
    if all(c is not None for c in converted):
        return converted
    # some images are stored as bytes: read the references instead
    return [
        (_read_refs(p, column) if _is_ref(p.features[column]) else p).cast_column(column, datasets.Image())
        for p in parts
    ]


def mix_datasets(parts: list, labels: list[str] | None = None):
    """One dataset of `parts` (map-style, the same columns), their features aligned; `labels` name the parts in
    messages."""
    import datasets

    labels = labels or [f"mix[{i}]" for i in range(len(parts))]
    if len(parts) == 1:
        return parts[0]
    if any(isinstance(p, datasets.IterableDataset) for p in parts):
        try:
            return datasets.concatenate_datasets(parts)
        except ValueError as exc:
            raise DataError(f"cannot mix these streaming sources: {' '.join(str(exc).split())[:200]}") from None
    columns = list(parts[0].column_names)
    for p, label in zip(parts, labels):
        if sorted(p.column_names) != sorted(columns):
            raise DataError(
                f"{label} has columns {', '.join(p.column_names)}; the other sources of the mix have "
                f"{', '.join(columns)}"
            )
    parts = [p.select_columns(columns) for p in parts]
    for col in columns:
        parts = _same_class_names(_same_image_kind(parts, col, labels), col)
    target = parts[0].features
    aligned = [parts[0]]
    for p, label in zip(parts[1:], labels[1:]):
        if p.features == target:
            aligned.append(p)
            continue
        try:
            aligned.append(p.cast(target))
        except (ValueError, TypeError) as exc:
            col = next((c for c in columns if p.features[c] != target[c]), columns[0])
            raise DataError(
                f"{label}: column {col!r} ({p.features[col]}) cannot be mixed with {labels[0]}'s "
                f"({target[col]}): {' '.join(str(exc).split())[:160]}"
            ) from None
    return datasets.concatenate_datasets(aligned)
