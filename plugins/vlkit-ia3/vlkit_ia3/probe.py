"""The `word-order` probe: does each system score an image higher with its caption than with the caption's
words put out of order?

Every image with a caption of two or more words gives up to two examples (categories): `reverse` (the words
in reverse order) and `shuffle` (a seeded permutation of the words that differs from the caption and from
its reverse). An example is correct when s(caption, image) > s(perturbed, image) strictly; a bag-of-words
model scores exactly 50% (a tie is never a win), so this measures how much word order the text tower sees.

Data: by default the world's photo retrieval set (`vlkit.data.load_data({"kind": "world", "domain": "photo",
"task": "retrieval", "n": n, "seed": data_seed})`); `--data` is any data spec with `image` and `caption`
columns, e.g. a local manifest FILE.jsonl / FILE.csv (validated with `load_data(spec, task="word-order")`,
which reads this probe's `required`). `-n` caps the images (a seeded subset of local data).

The result is vlkit's common probe result (`vlkit.probe.base.build_result`): metrics `accuracy` (macro over
the two categories, primary) and `micro_accuracy`, percentile bootstrap intervals and paired differences to
the frozen backbone, and a per-category breakdown with intervals, all from vlkit's public
`vlkit.probe.caption_pairs.caption_pair_result`, as for the built-in caption-pair probes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from vlkit.errors import ConfigError, DataError
from vlkit.probe.base import DEFAULT_RESAMPLES, Probe, ProbeOptions
from vlkit.probe.caption_pairs import caption_pair_result

DEFAULT_N = 200
CATEGORIES = ("reverse", "shuffle")


def perturbations(caption: str, seed: int) -> dict[str, str]:
    """{category: perturbed caption} for the categories that change the caption (seeded)."""
    words = caption.split()
    out: dict[str, str] = {}
    rev = " ".join(reversed(words))
    if rev != caption:
        out["reverse"] = rev
    rng = random.Random(seed)
    for _ in range(20):
        perm = words[:]
        rng.shuffle(perm)
        text = " ".join(perm)
        if text != " ".join(words) and text != rev:
            out["shuffle"] = text
            break
    return out


@dataclass
class WordOrderOptions(ProbeOptions):
    """The options of the `word-order` probe, beside every probe's."""

    data_seed: int = 0
    """Seed of the world data, of the -n subset of local data and of the shuffled captions (--data-seed)."""
    batch_size: int = 64
    """Examples scored per batch (--batch-size)."""


class WordOrderProbe(Probe):
    name = "word-order"
    summary = "caption vs its words reversed / shuffled (seeded): does the text tower see word order"
    data_help = "world photo retrieval set (default) or a data spec / manifest FILE.jsonl with image, caption"
    default_data = None
    required = ("image", "caption")
    options_cls = WordOrderOptions

    def dataset(self, data: Any, n: int | None, data_seed: int):
        from vlkit.data import load_data

        if data is None:
            spec = {"kind": "world", "domain": "photo", "task": "retrieval", "n": int(n or DEFAULT_N),
                    "seed": data_seed}
            return load_data(spec), "word-order:world-photo"
        ds = load_data(data, task=self.name)
        if n is not None and n < len(ds):
            keep = np.sort(np.random.default_rng(data_seed).choice(len(ds), size=n, replace=False))
            ds = ds.select(keep.tolist())
        return ds, f"word-order:{data}"

    def examples(self, ds, data_seed: int) -> list[dict[str, Any]]:
        out = []
        for i, caption in enumerate(ds["caption"]):
            caption = " ".join(str(caption).split())
            for category, false in perturbations(caption, seed=data_seed * 1_000_003 + i).items():
                out.append({"id": f"{i}_{category}", "row": i, "true": caption, "false": false,
                            "category": category})
        return out

    def run(self, backbone, systems, *, data: Any = None, seed: int = 0, n: int | None = None,
            n_boot: int = DEFAULT_RESAMPLES, level: float = 0.95, data_seed: int = 0, batch_size: int = 64,
            progress: Callable[[int], Callable[[int], None]] | None = None, **options: Any) -> dict[str, Any]:
        from vlkit.probe.systems import score_examples

        if options:
            raise ConfigError(f"unknown option(s) for probe {self.name!r}: {', '.join(sorted(options))}")
        ds, label = self.dataset(data, n, data_seed)
        examples = self.examples(ds, data_seed)
        if not examples:
            raise DataError(f"probe {self.name!r}: no caption of {label} has two or more words to reorder")

        def get(start: int, stop: int):
            rows = examples[start:stop]
            return ([[ds[r["row"]]["image"].convert("RGB")] for r in rows], [[r["true"], r["false"]] for r in rows])

        advance = progress(len(examples)) if progress is not None else None
        scores = score_examples(backbone, systems, len(examples), get, batch_size=batch_size, progress=advance)
        return caption_pair_result(self, backbone, systems, scores, examples, label, n_boot=n_boot, seed=seed,
                                   level=level, extra={"images": len(ds)},
                                   extra_columns={"caption": [e["true"] for e in examples],
                                                  "perturbed": [e["false"] for e in examples]})
