"""The procedural image-text world: a seeded, deterministic generator of image-text datasets.

One to three objects (shape, colour, size, position on a 3x3 grid) with geometric relations, rendered in four
domains with a real shift between them (``photo``, ``medical``, ``satellite``, ``sketch``) and exposed as
Hugging Face `datasets.Dataset` objects for five tasks (classification, retrieval, vqa, grounding and
Winoground-style minimal pairs). It is vlkit's embedded default dataset, the pre-training data of the tiny
CLIP (``photo``) and a benchmark for adapters.

>>> from vlkit import world
>>> ds = world.generate("medical", "vqa", n=8, seed=0)
>>> ds[0]["question"], ds[0]["answer"] in world.answer_set("medical")

The same seed gives the same bytes in any process. `write` stores a dataset as PNGs plus a manifest that
``datasets.load_dataset("imagefolder", data_dir=...)`` (or the official Winoground layout) reads back.
"""

from __future__ import annotations

import importlib

_LAZY = {  # loaded on first use, so registering the world plugin costs no numpy or PIL import
    **{
        name: "domains"
        for name in (
            "DOMAINS",
            "TASKS",
            "answer_set",
            "class_names",
            "class_prompt",
            "colour_names",
            "shape_names",
            "vqa_answer_types",
        )
    },
    "MANIFESTS": "io",
    "read": "io",
    "write": "io",
    "vocabulary": "language",
    "render_contact_sheet": "render",
    "features": "tasks",
    "generate": "tasks",
}

__all__ = [
    "DOMAINS",
    "TASKS",
    "generate",
    "features",
    "class_names",
    "class_prompt",
    "colour_names",
    "shape_names",
    "answer_set",
    "vqa_answer_types",
    "vocabulary",
    "write",
    "read",
    "MANIFESTS",
    "render_contact_sheet",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
