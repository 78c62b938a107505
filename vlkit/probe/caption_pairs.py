"""Caption-pair probes in the ARO / SugarCrepe form: one image, a true and a false caption.

An example is correct when s(true caption, image) > s(false caption, image) (strictly: a tie is a miss);
the reported accuracy is the macro average over categories (micro beside it), chance 50.

``caption-pairs`` reads local JSON (``data=FILE.json``, ``.jsonl``, or a folder of such files):

- a list of rows, or a mapping ``{id: row}`` (SugarCrepe's files), or ``{"examples": [rows]}``;
- row fields: the image (``image``, ``image_path``, ``filename`` or ``file_name``; a path relative to the
  JSON file, or to ``image_root=`` when given), the true caption (``true_caption`` or ``caption``), the false
  caption (``false_caption`` or ``negative_caption``) and the category (``category``, else ``relation_name``
  (ARO), else the file's stem — so a folder of SugarCrepe files gives one category per file).

``synth-attribute-swap`` and ``synth-relation-swap`` are generated from the embedded world's verified
minimal pairs (``data="synth"`` or ``"synth:DOMAIN"``): each pair gives two examples (image_0 with caption_0
true and caption_1 false, and image_1 the other way round).

- attribute swap (ARO VG-Attribution): ``a red circle left of a blue square`` / ``a blue circle left of a
  red square`` (category ``swap-colour``), and the same with sizes (``swap-size``);
- relation swap (ARO VG-Relation): ``a circle left of a square`` / ``a square left of a circle``
  (``swap-objects``), and ``A left of B and above C`` / ``A above B and left of C`` (``swap-prepositions``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..errors import ConfigError, DataError
from . import metrics as M
from .base import DEFAULT_RESAMPLES, Probe, annotate_breakdowns, build_result, summarize
from .systems import score_examples

IMAGE_KEYS = ("image", "image_path", "filename", "file_name")
TRUE_KEYS = ("true_caption", "caption")
FALSE_KEYS = ("false_caption", "negative_caption")
CATEGORY_KEYS = ("category", "relation_name")
METRICS = ("accuracy", "micro_accuracy")
CHANCE = {"accuracy": 50.0, "micro_accuracy": 50.0}

ATTRIBUTE_SWAPS = {"adj_colour": "swap-colour", "adj_size": "swap-size"}
RELATION_SWAPS = {"noun": "swap-objects", "preposition": "swap-prepositions"}
SYNTH_N = 400


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
            for what, value, keys in (("image", image, IMAGE_KEYS), ("true caption", true, TRUE_KEYS),
                                      ("false caption", false, FALSE_KEYS)):
                if value is None:
                    raise DataError(f"{where} has no {what} (expected one of {', '.join(keys)})")
            img = Path(str(image)).expanduser()
            if not img.is_absolute():
                img = (root or file.parent) / img
            if not img.is_file():
                raise DataError(f"{where}: image file not found: {img}")
            category = _first(row, CATEGORY_KEYS) or file.stem
            examples.append({"id": row.get("id", f"{file.stem}:{i - 1}"), "image": str(img), "true": str(true),
                             "false": str(false), "category": str(category)})
    return examples


def synth_pairs(kinds: Iterable[str], n_pairs: int, seed: int = 0, domain: str = "photo",
                image_size: int = 64) -> Iterator[dict[str, Any]]:
    """World minimal pairs of the given kinds, cycling through the kinds (seeded, deterministic):
    ``{"kind", "image_0", "image_1", "caption_0", "caption_1"}`` (caption_i is true of image_i only)."""
    from ..world import DOMAINS
    from ..world.render import render_scene
    from ..world.winoground import KINDS, kinds_for, make_pair

    if domain not in DOMAINS:
        raise ConfigError(f"unknown world domain {domain!r}; domains: {', '.join(DOMAINS)}")
    collapsed_of = {k: c for c, ks in KINDS.items() for k in ks}
    unknown = [k for k in kinds if k not in collapsed_of]
    if unknown:
        raise ConfigError(f"unknown pair kind(s) {', '.join(unknown)}; kinds: {', '.join(sorted(collapsed_of))}")
    usable = [k for k in kinds if k in kinds_for(domain, collapsed_of[k])]
    if not usable:
        raise ConfigError(f"the {domain} domain has none of the pair kinds {', '.join(kinds)}")
    for i in range(n_pairs):
        kind = usable[i % len(usable)]
        rng = np.random.default_rng([seed, 7919, sorted(collapsed_of).index(kind), i])
        pair = make_pair(domain, collapsed_of[kind], rng, kind=kind)
        c0, c1 = pair.captions(domain)
        yield {"kind": kind, "collapsed_tag": collapsed_of[kind], "caption_0": c0, "caption_1": c1,
               "image_0": render_scene(domain, pair.objs_0, pair.bg_seed, image_size),
               "image_1": render_scene(domain, pair.objs_1, pair.bg_seed, image_size)}


def synth_swap_examples(kinds: dict[str, str], n: int = SYNTH_N, seed: int = 0, domain: str = "photo",
                        image_size: int = 64) -> list[dict[str, Any]]:
    """Caption pairs from world minimal pairs of the given kinds ({kind: category}), balanced over kinds:
    each pair gives (image_0, caption_0 true, caption_1 false) and (image_1, caption_1 true, caption_0 false)."""
    examples: list[dict[str, Any]] = []
    for i, p in enumerate(synth_pairs(list(kinds), (n + 1) // 2, seed=seed, domain=domain, image_size=image_size)):
        for k in (0, 1):
            examples.append({"id": f"{i}_{k}", "image": p[f"image_{k}"], "true": p[f"caption_{k}"],
                             "false": p[f"caption_{1 - k}"], "category": kinds[p["kind"]]})
    return examples[:n]


def _subset(examples: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None or n >= len(examples):
        return examples
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=n, replace=False))
    return [examples[i] for i in keep]


def pair_batches(examples: list[dict]) -> Callable[[int, int], tuple[list[list[Any]], list[list[str]]]]:
    from PIL import Image

    def image(value):
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        try:
            with Image.open(value) as im:
                return im.convert("RGB")
        except OSError as exc:
            raise DataError(f"cannot read image {value}: {exc}") from None

    def get(start: int, stop: int):
        rows = examples[start:stop]
        return [[image(r["image"])] for r in rows], [[r["true"], r["false"]] for r in rows]

    return get


class CaptionPairProbe(Probe):
    """Accuracy of the true caption over the false one, macro over categories, from local JSON files."""

    name = "caption-pairs"
    summary = "ARO/SugarCrepe-form caption pairs from local JSON (true vs false caption, macro accuracy)"
    data_help = "FILE.json / FILE.jsonl or a folder of them (rows: image, true_caption, false_caption, category)"
    default_data: str | None = None

    def examples(self, data: Any, *, n: int | None, data_seed: int, image_root: str | None = None
                 ) -> tuple[list[dict], str]:
        if data is None:
            raise ConfigError(f"probe {self.name!r} needs --data FILE.json (or a folder of JSON files)")
        if isinstance(data, list):
            return _subset(data, n, data_seed), "caption-pairs:list"
        examples = load_caption_pair_files(data, image_root=image_root)
        return _subset(examples, n, data_seed), f"caption-pairs:{Path(str(data)).resolve().stem}"

    def run(self, backbone, systems, *, data: Any = None, seed: int = 0, n: int | None = None,
            n_boot: int = DEFAULT_RESAMPLES, level: float = 0.95, data_seed: int = 0, batch_size: int = 64,
            image_root: str | None = None, progress: Callable[[int], Callable[[int], None]] | None = None,
            **options: Any) -> dict[str, Any]:
        if options:
            raise ConfigError(f"unknown option(s) for probe {self.name!r}: {', '.join(sorted(options))}")
        examples, label = self.examples(data if data is not None else self.default_data, n=n,
                                        data_seed=data_seed, image_root=image_root)
        if not examples:
            raise DataError(f"probe {self.name!r}: no examples in {label}")
        advance = progress(len(examples)) if progress is not None else None
        scores = score_examples(backbone, systems, len(examples), pair_batches(examples), batch_size=batch_size,
                                progress=advance)
        categories = [e["category"] for e in examples]
        correct = {lab: M.caption_pair_correct(s[:, 0, 0], s[:, 1, 0]) for lab, s in scores.items()}
        values = {lab: {"accuracy": c, "micro_accuracy": c} for lab, c in correct.items()}
        stats = {"accuracy": lambda v: M.macro_statistic(v, categories), "micro_accuracy": M.mean_statistic}
        summary = summarize(list(scores), values, stats, len(examples), n_boot=n_boot, seed=seed, level=level)
        breakdowns = {lab: {"category": M.breakdown({"accuracy": c}, categories)} for lab, c in correct.items()}
        annotate_breakdowns(breakdowns, {"category": M.groups_of(categories)},
                            {lab: {"accuracy": c} for lab, c in correct.items()}, ["accuracy"], n_boot=n_boot,
                            seed=seed, level=level)
        per_example = {"ids": [e["id"] for e in examples], "keys": ["true", "false"],
                       "scores": {lab: s[:, :, 0].tolist() for lab, s in scores.items()},
                       "extra": {"category": categories}}
        return build_result(self, backbone, systems, dataset=label, n=len(examples), metrics=METRICS,
                            primary="accuracy", chance=CHANCE, summary=summary, breakdowns=breakdowns,
                            n_boot=n_boot, seed=seed, level=level, per_example=per_example)


class SynthSwapProbe(CaptionPairProbe):
    """A caption-pair probe generated from the embedded world (``data="synth"`` or ``"synth:DOMAIN"``)."""

    default_data = "synth"

    def __init__(self, name: str, kinds: dict[str, str], summary: str):
        self.name, self.kinds, self.summary = name, dict(kinds), summary
        self.data_help = f"synth (default) or synth:DOMAIN; categories {', '.join(kinds.values())}"

    def examples(self, data: Any, *, n: int | None, data_seed: int, image_root: str | None = None
                 ) -> tuple[list[dict], str]:
        text = str(data or "synth")
        if text != "synth" and not text.startswith("synth:"):
            return super().examples(data, n=n, data_seed=data_seed, image_root=image_root)
        domain = text.partition(":")[2] or "photo"
        examples = synth_swap_examples(self.kinds, n=int(n or SYNTH_N), seed=data_seed, domain=domain)
        return examples, f"{self.name}:{domain}"


def attribute_swap_probe() -> SynthSwapProbe:
    return SynthSwapProbe("synth-attribute-swap", ATTRIBUTE_SWAPS,
                          "world pairs whose attributes swap between objects (colour, size): binding")


def relation_swap_probe() -> SynthSwapProbe:
    return SynthSwapProbe("synth-relation-swap", RELATION_SWAPS,
                          "world pairs whose objects or prepositions swap around a relation: word order")
