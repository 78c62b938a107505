"""Class names for integer labels: what a local folder says about its classes.

`vlkit data generate` writes integer `label`s with the names in its ``world.json`` (``class_names``, in label
order) and a ``label_name`` column beside each label. A loader that gets plain integer labels from a local
folder (imagefolder metadata, a manifest) calls :func:`name_labels`, which casts `label` to a
`datasets.ClassLabel` with those names, so classification takes its class names from the data:

- ``class_names`` of a ``world.json`` in the folder (every label must be below their count);
- else a ``label_name`` column naming each label consistently (labels 0..K-1, each named, no name twice).

Anything else leaves the labels as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INFO_FILE = "world.json"


def folder_class_names(folder: Path | None) -> list[str] | None:
    """``class_names`` of the folder's ``world.json`` (a list of distinct strings), else None."""
    if folder is None or not (Path(folder) / INFO_FILE).is_file():
        return None
    try:
        names = json.loads((Path(folder) / INFO_FILE).read_text(encoding="utf-8")).get("class_names")
    except (ValueError, AttributeError, OSError):
        return None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return None
    return names if len(set(names)) == len(names) else None


def _names_from_column(labels: list[Any], names: list[Any]) -> list[str] | None:
    pairs: dict[int, str] = {}
    for label, name in zip(labels, names):
        if label is None or not isinstance(name, str) or not name:
            return None
        if pairs.setdefault(int(label), name) != name:
            return None
    if sorted(pairs) != list(range(len(pairs))) or len(set(pairs.values())) != len(pairs):
        return None
    return [pairs[i] for i in range(len(pairs))]


def name_labels(ds, folder: Path | None = None):
    """`ds` with an integer `label` column cast to a ClassLabel named from `folder` or a `label_name` column."""
    import datasets

    feats = getattr(ds, "features", None) or {}
    feat = feats.get("label")
    if not isinstance(feat, datasets.Value) or not feat.dtype.startswith(("int", "uint")):
        return ds
    labels = ds["label"]
    if any(v is None or int(v) < 0 for v in labels):
        return ds
    names = folder_class_names(folder)
    if names is not None and max(labels, default=-1) >= len(names):
        names = None
    if names is None and "label_name" in ds.column_names:
        names = _names_from_column(labels, ds["label_name"])
    if names is None:
        return ds
    return ds.cast_column("label", datasets.ClassLabel(names=names))
