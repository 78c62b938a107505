"""The world's probes: ``synth-attribute-swap`` and ``synth-relation-swap``, caption pairs in the ARO form
generated from the world's verified minimal pairs (``data="synth"`` or ``"synth:DOMAIN"``); any other data
argument reads local JSON as the ``caption-pairs`` probe does. Each pair gives two examples (image_0 with
caption_0 true and caption_1 false, and image_1 the other way round).

- attribute swap (ARO VG-Attribution): ``a red circle left of a blue square`` / ``a blue circle left of a
  red square`` (category ``swap-colour``), and the same with sizes (``swap-size``);
- relation swap (ARO VG-Relation): ``a circle left of a square`` / ``a square left of a circle``
  (``swap-objects``), and ``A left of B and above C`` / ``A above B and left of C`` (``swap-prepositions``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..probe.caption_pairs import CaptionPairProbe
from .domains import DOMAINS
from .render import render_scene
from .winoground import KINDS, kinds_for, make_pair

ATTRIBUTE_SWAPS = {"adj_colour": "swap-colour", "adj_size": "swap-size"}
RELATION_SWAPS = {"noun": "swap-objects", "preposition": "swap-prepositions"}
SYNTH_N = 400


def synth_pairs(
    kinds: Iterable[str], n_pairs: int, seed: int = 0, domain: str = "photo", image_size: int = 64
) -> Iterator[dict[str, Any]]:
    """World minimal pairs of the given kinds, cycling through the kinds (seeded, deterministic):
    ``{"kind", "image_0", "image_1", "caption_0", "caption_1"}`` (caption_i is true of image_i only)."""
    if domain not in DOMAINS:
        raise ConfigError(f"unknown world domain {domain!r}; domains: {', '.join(DOMAINS)}")
    kinds = list(kinds)
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
        yield {
            "kind": kind,
            "collapsed_tag": collapsed_of[kind],
            "caption_0": c0,
            "caption_1": c1,
            "image_0": render_scene(domain, pair.objs_0, pair.bg_seed, image_size),
            "image_1": render_scene(domain, pair.objs_1, pair.bg_seed, image_size),
        }


def synth_swap_examples(
    kinds: dict[str, str], n: int = SYNTH_N, seed: int = 0, domain: str = "photo", image_size: int = 64
) -> list[dict[str, Any]]:
    """Caption pairs from world minimal pairs of the given kinds ({kind: category}), balanced over kinds:
    each pair gives (image_0, caption_0 true, caption_1 false) and (image_1, caption_1 true, caption_0 false)."""
    examples: list[dict[str, Any]] = []
    for i, p in enumerate(synth_pairs(list(kinds), (n + 1) // 2, seed=seed, domain=domain, image_size=image_size)):
        for k in (0, 1):
            examples.append(
                {
                    "id": f"{i}_{k}",
                    "image": p[f"image_{k}"],
                    "true": p[f"caption_{k}"],
                    "false": p[f"caption_{1 - k}"],
                    "category": kinds[p["kind"]],
                }
            )
    return examples[:n]


class SynthSwapProbe(CaptionPairProbe):
    """A caption-pair probe generated from the embedded world (``data="synth"`` or ``"synth:DOMAIN"``)."""

    default_data = "synth"

    def __init__(self, name: str, kinds: dict[str, str], summary: str):
        self.name, self.kinds, self.summary = name, dict(kinds), summary
        self.data_help = f"synth (default) or synth:DOMAIN; categories {', '.join(kinds.values())}"

    def examples(
        self, data: Any, *, n: int | None, data_seed: int, image_root: str | None = None
    ) -> tuple[list[dict], str]:
        text = str(data or "synth")
        if text != "synth" and not text.startswith("synth:"):
            return super().examples(data, n=n, data_seed=data_seed, image_root=image_root)
        domain = text.partition(":")[2] or "photo"
        examples = synth_swap_examples(self.kinds, n=int(n or SYNTH_N), seed=data_seed, domain=domain)
        return examples, f"{self.name}:{domain}"


def attribute_swap_probe() -> SynthSwapProbe:
    return SynthSwapProbe(
        "synth-attribute-swap",
        ATTRIBUTE_SWAPS,
        "world pairs whose attributes swap between objects (colour, size): binding",
    )


def relation_swap_probe() -> SynthSwapProbe:
    return SynthSwapProbe(
        "synth-relation-swap",
        RELATION_SWAPS,
        "world pairs whose objects or prepositions swap around a relation: word order",
    )
