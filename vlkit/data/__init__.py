"""Datasets for vlkit: dataset kinds are plugins; `load_data` turns a spec into a `datasets.Dataset`.

>>> from vlkit.data import load_data
>>> ds = load_data("manifest:captions.jsonl", task="retrieval")
>>> ds = load_data({"kind": "world", "domain": "medical", "task": "vqa", "n": 200, "seed": 0})
"""

from __future__ import annotations

from .api import (
    dataset_kinds,
    load_data,
    parse_data_spec,
    required_fields,
    validate,
)

__all__ = [
    "dataset_kinds",
    "load_data",
    "parse_data_spec",
    "required_fields",
    "validate",
]
