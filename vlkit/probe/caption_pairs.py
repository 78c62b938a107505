"""Caption-pair probes in the ARO / SugarCrepe form: one image, a true and a false caption.

An example is correct when s(true caption, image) > s(false caption, image) (strictly: a tie is a miss);
the reported accuracy is the macro average over categories (micro beside it), chance 50.

``caption-pairs`` reads local JSON (``data=FILE.json``, ``.jsonl``, or a folder of such files):

- a list of rows, or a mapping ``{id: row}`` (SugarCrepe's files), or ``{"examples": [rows]}``;
- row fields: the image (``image``, ``image_path``, ``filename`` or ``file_name``; a path relative to the
  JSON file, or to ``image_root=`` when given), the true caption (``true_caption`` or ``caption``), the false
  caption (``false_caption`` or ``negative_caption``) and the category (``category``, else ``relation_name``
  (ARO), else the file's stem — so a folder of SugarCrepe files gives one category per file).

The world plugin (`vlkit.world.probes`) builds ``synth-attribute-swap`` and ``synth-relation-swap`` on
this probe, with examples generated from the world's minimal pairs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from ..imagefile import ImageDecodeError, open_image
from . import metrics as M
from .base import DEFAULT_RESAMPLES, Probe, ProbeOptions, annotate_breakdowns, build_result, summarize
from .systems import score_examples

IMAGE_KEYS = ("image", "image_path", "filename", "file_name")
TRUE_KEYS = ("true_caption", "caption")
FALSE_KEYS = ("false_caption", "negative_caption")
CATEGORY_KEYS = ("category", "relation_name")
METRICS = ("accuracy", "micro_accuracy")
CHANCE = {"accuracy": 50.0, "micro_accuracy": 50.0}


def _first(row: dict, keys: tuple[str, ...]) -> Any:
    return next((row[k] for k in keys if row.get(k) not in (None, "")), None)


def _rows_of(obj: Any, file: Path) -> list[dict]:
    if isinstance(obj, dict) and isinstance(obj.get("examples"), list):
        obj = obj["examples"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        obj = [{"id": k, **v} for k, v in obj.items()]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"caption-pair file {file} must hold a list of rows, {{id: row}}, or {{'examples': [...]}}")
    return obj


def read_json_rows(file: Path) -> list[dict]:
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix.lower() == ".jsonl":
            return _rows_of([json.loads(line) for line in text.splitlines() if line.strip()], file)
        return _rows_of(json.loads(text), file)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"caption-pair file {file} is not valid JSON: {exc}") from None


def load_caption_pair_files(data: str | Path, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """Examples ``{"id", "image" (path), "true", "false", "category"}`` from a JSON file or a folder of them."""
    path = Path(data).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".jsonl"))
        if not files:
            raise DataError(f"no .json/.jsonl caption-pair files in {path}")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"caption-pair data not found: {path}")
    root = Path(image_root).expanduser() if image_root else None
    examples = []
    for file in files:
        for i, row in enumerate(read_json_rows(file), start=1):
            where = f"{file}, row {i}"
            image, true, false = _first(row, IMAGE_KEYS), _first(row, TRUE_KEYS), _first(row, FALSE_KEYS)
            for what, value, keys in (
                ("image", image, IMAGE_KEYS),
                ("true caption", true, TRUE_KEYS),
                ("false caption", false, FALSE_KEYS),
            ):
                if value is None:
                    raise DataError(f"{where} has no {what} (expected one of {', '.join(keys)})")
            img = Path(str(image)).expanduser()
            if not img.is_absolute():
                img = (root or file.parent) / img
            if not img.is_file():
                raise DataError(f"{where}: image file not found: {img}")
            category = _first(row, CATEGORY_KEYS) or file.stem
            examples.append(
                {
                    "id": row.get("id", f"{file.stem}:{i - 1}"),
                    "image": str(img),
                    "true": str(true),
                    "false": str(false),
                    "category": str(category),
                }
            )
    return examples


def _subset(examples: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None or n >= len(examples):
        return examples
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=n, replace=False))
    return [examples[i] for i in keep]


def pair_batches(examples: list[dict]) -> Callable[[int, int], tuple[list[list[Any]], list[list[str]]]]:
    from PIL import Image

    def image(value):  # in its own mode: the backbone's own transform converts it
        if isinstance(value, Image.Image):
            return value
        try:
            return open_image(value)
        except ImageDecodeError as exc:
            raise DataError(f"cannot read {exc}") from None

    def get(start: int, stop: int):
        rows = examples[start:stop]
        return [[image(r["image"])] for r in rows], [[r["true"], r["false"]] for r in rows]

    return get


def caption_pair_result(
    probe,
    backbone,
    systems,
    scores: dict,
    examples: list[dict],
    label: str,
    *,
    n_boot: int,
    seed: int,
    level: float,
    extra_columns: dict | None = None,
    extra: dict | None = None,
) -> dict[str, Any]:
    """The common result of a caption-pair probe from `score_examples` scores (per system (n, 2, 1): the true
    caption, then the perturbed one) and its examples (dicts with `id` and `category`): `accuracy` (macro over
    categories, primary) and `micro_accuracy` with bootstrap intervals, paired differences and a per-category
    breakdown. Plugin probes of the same form (e.g. vlkit-ia3's `word-order`) call it too."""
    categories = [e["category"] for e in examples]
    correct = {lab: M.caption_pair_correct(s[:, 0, 0], s[:, 1, 0]) for lab, s in scores.items()}
    values = {lab: {"accuracy": c, "micro_accuracy": c} for lab, c in correct.items()}
    stats = {"accuracy": lambda v: M.macro_statistic(v, categories), "micro_accuracy": M.mean_statistic}
    summary = summarize(list(scores), values, stats, len(examples), n_boot=n_boot, seed=seed, level=level)
    breakdowns = {lab: {"category": M.breakdown({"accuracy": c}, categories)} for lab, c in correct.items()}
    annotate_breakdowns(
        breakdowns,
        {"category": M.groups_of(categories)},
        {lab: {"accuracy": c} for lab, c in correct.items()},
        ["accuracy"],
        n_boot=n_boot,
        seed=seed,
        level=level,
    )
    per_example = {
        "ids": [e["id"] for e in examples],
        "keys": ["true", "false"],
        "scores": {lab: s[:, :, 0].tolist() for lab, s in scores.items()},
        "extra": {"category": categories, **(extra_columns or {})},
    }
    return build_result(
        probe,
        backbone,
        systems,
        dataset=label,
        n=len(examples),
        metrics=METRICS,
        primary="accuracy",
        chance=CHANCE,
        summary=summary,
        breakdowns=breakdowns,
        n_boot=n_boot,
        seed=seed,
        level=level,
        per_example=per_example,
        extra=extra,
    )


@dataclass
class CaptionPairOptions(ProbeOptions):
    """The options of a caption-pair probe (`caption-pairs`, and the world's synth swap probes)."""

    data_seed: int = 0
    """Seed of the subset drawn with -n (and of generated pairs) (--data-seed)."""
    batch_size: int = 64
    """Examples scored per batch (--batch-size)."""
    image_root: str | None = None
    """Folder that relative image paths of JSON data start in (--images); None: each JSON file's folder."""


class CaptionPairProbe(Probe):
    """Accuracy of the true caption over the false one, macro over categories, from local JSON files."""

    name = "caption-pairs"
    summary = "ARO/SugarCrepe-form caption pairs from local JSON (true vs false caption, macro accuracy)"
    data_help = "FILE.json / FILE.jsonl or a folder of them (rows: image, true_caption, false_caption, category)"
    default_data: str | None = None
    options_cls = CaptionPairOptions

    def examples(
        self, data: Any, *, n: int | None, data_seed: int, image_root: str | None = None
    ) -> tuple[list[dict], str]:
        if data is None:
            raise ConfigError(f"probe {self.name!r} needs --data FILE.json (or a folder of JSON files)")
        if isinstance(data, list):
            return _subset(data, n, data_seed), "caption-pairs:list"
        examples = load_caption_pair_files(data, image_root=image_root)
        return _subset(examples, n, data_seed), f"caption-pairs:{Path(str(data)).resolve().stem}"

    def run(
        self,
        backbone,
        systems,
        *,
        data: Any = None,
        seed: int = 0,
        n: int | None = None,
        n_boot: int = DEFAULT_RESAMPLES,
        level: float = 0.95,
        data_seed: int = 0,
        batch_size: int = 64,
        image_root: str | None = None,
        progress: Callable[[int], Callable[[int], None]] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        if options:
            raise ConfigError(f"unknown option(s) for probe {self.name!r}: {', '.join(sorted(options))}")
        examples, label = self.examples(
            data if data is not None else self.default_data, n=n, data_seed=data_seed, image_root=image_root
        )
        if not examples:
            raise DataError(f"probe {self.name!r}: no examples in {label}")
        advance = progress(len(examples)) if progress is not None else None
        scores = score_examples(
            backbone, systems, len(examples), pair_batches(examples), batch_size=batch_size, progress=advance
        )
        return caption_pair_result(
            self, backbone, systems, scores, examples, label, n_boot=n_boot, seed=seed, level=level
        )
