"""Winoground-style minimal pairs: two captions with the same words in a different order, two images.

Each pair follows the tag vocabulary of `facebook/winoground` (collapsed tags mean what they mean there:
Object = noun phrases swap, Relation = adjectives/prepositions/numerals swap, Both = a noun and a relation
swap together):

====================  =========================================================================  ==========
kind                  example (caption_0 / caption_1)                                            collapsed
====================  =========================================================================  ==========
Noun                  a circle left of a square / a square left of a circle                      Object
Noun Phrase           a red circle above a blue star / a blue star above a red circle            Object
Adjective-Color       a red circle left of a blue square / a blue circle left of a red square    Relation
Adjective-Size        a large lake left of a small field / a small lake left of a large field   Relation
Preposition           a circle left of a square and above a star / ... above a square and left   Relation
Determiner-Numeral    two circles and one square / one circle and two squares                    Relation
Noun, Preposition     a circle left of a square and above a star / a square above a circle ...   Both
====================  =========================================================================  ==========

Every pair is verified with `scenes.holds`: caption_i is true of image_i and false of the other image. The
two images share their background (same `bg_seed`) and, where an object keeps its cell, its exact
geometry and position, so they differ only in what the captions swap. ``secondary_tag`` is "Symbolic" for
sketches and includes "Morpheme-Level" where a noun changes number (circle/circles).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .domains import RELATIONS, SIZE_RANK, SIZES, SPECS
from .language import struct_caption
from .scenes import WorldObject, boxes_apart, copy_object, holds, new_object, place, recentre
from .shapes import make_look

KINDS = {
    "Object": ("noun", "noun_phrase"),
    "Relation": ("adj_colour", "adj_size", "preposition", "numeral"),
    "Both": ("noun_preposition",),
}
TAGS = {  # kind -> (tag, num_main_preds)
    "noun": ("Noun", 1),
    "noun_phrase": ("Noun Phrase", 1),
    "adj_colour": ("Adjective-Color", 1),
    "adj_size": ("Adjective-Size", 1),
    "preposition": ("Preposition", 2),
    "numeral": ("Determiner-Numeral", 1),
    "noun_preposition": ("Noun, Preposition", 2),
}
COLLAPSED = tuple(KINDS)
HORIZONTAL = ("left of", "right of")
VERTICAL = ("above", "below")


@dataclass
class Pair:
    kind: str
    collapsed: str
    struct_0: dict[str, Any]
    struct_1: dict[str, Any]
    objs_0: list[WorldObject]
    objs_1: list[WorldObject]
    bg_seed: int
    secondary_tag: str = ""

    @property
    def tag(self) -> str:
        return TAGS[self.kind][0]

    @property
    def num_main_preds(self) -> int:
        return TAGS[self.kind][1]

    def captions(self, domain: str) -> tuple[str, str]:
        return struct_caption(self.struct_0, domain), struct_caption(self.struct_1, domain)

    def valid(self) -> bool:
        return (
            holds(self.struct_0, self.objs_0)
            and holds(self.struct_1, self.objs_1)
            and not holds(self.struct_0, self.objs_1)
            and not holds(self.struct_1, self.objs_0)
        )


def kinds_for(domain: str, collapsed: str) -> tuple[str, ...]:
    kinds = KINDS[collapsed]
    return kinds if SPECS[domain].colours else tuple(k for k in kinds if k != "adj_colour")


def _proto(shape: str, colour: str, size: str, cell: int) -> WorldObject:
    return WorldObject(shape, colour, size, cell)


def _find_cells(n: int, ok: Callable[[list[int]], bool], rng: np.random.Generator) -> list[int] | None:
    for _ in range(400):
        cells = [int(c) for c in rng.choice(9, size=n, replace=False)]
        if ok(cells):
            return cells
    return None


def _realise(domain: str, protos: list[WorldObject], rng: np.random.Generator) -> list[WorldObject]:
    return [new_object(domain, p.shape, p.colour, p.size, p.cell, rng) for p in protos]


def _place_pair(objs_0: list[WorldObject], objs_1: list[WorldObject], rng: np.random.Generator) -> bool:
    """Place image 0, then give every image-1 object that keeps a cell the same centre; jitter the rest."""
    for _ in range(8):
        if not place(objs_0, rng, tries=4):
            continue
        by_cell = {o.cell: o for o in objs_0}
        for o in objs_1:
            if o.cell in by_cell:
                recentre(o, by_cell[o.cell].cx, by_cell[o.cell].cy)
            else:
                recentre(o, (o.col + 0.5) / 3 + rng.uniform(-0.05, 0.05), (o.row + 0.5) / 3 + rng.uniform(-0.05, 0.05))
        if boxes_apart(objs_1):
            return True
    return False


def _attrs(domain: str, rng: np.random.Generator, k: int, distinct_colours: bool = False):
    s = SPECS[domain]
    shapes = [str(x) for x in rng.choice(s.shapes, size=k, replace=False)]
    if s.colours and distinct_colours:
        colours = [str(x) for x in rng.choice(s.colours, size=k, replace=False)]
    elif s.colours:
        colours = [str(rng.choice(s.colours)) for _ in range(k)]
    else:
        colours = [""] * k
    sizes = [str(rng.choice(SIZES)) for _ in range(k)]
    return shapes, colours, sizes


def _two_object(domain: str, kind: str, rng: np.random.Generator):
    """Noun, Noun Phrase, Adjective-Color and Adjective-Size pairs (two objects, one relation)."""
    s = SPECS[domain]
    (s1, s2), (c1, c2), (z1, z2) = _attrs(domain, rng, 2, distinct_colours=(kind in ("adj_colour", "noun_phrase")))
    spatial_only = kind in ("noun_phrase", "adj_size")
    rel = str(rng.choice(RELATIONS[:4] if spatial_only else RELATIONS))
    if rel == "bigger than":
        z1, z2 = sorted(rng.choice(SIZES, size=2, replace=False), key=lambda z: -SIZE_RANK[z])
    if kind == "adj_size":
        z1, z2 = (str(z) for z in rng.choice(SIZES, size=2, replace=False))
    d1, d2 = {"shape": s1}, {"shape": s2}
    if kind == "noun_phrase":  # the attribute that travels with the noun
        if s.colours:
            d1["colour"], d2["colour"] = c1, c2
        else:
            z1, z2 = (str(z) for z in rng.choice(SIZES, size=2, replace=False))
            d1["size"], d2["size"] = z1, z2
    elif kind == "adj_colour":
        d1["colour"], d2["colour"] = c1, c2
    elif kind == "adj_size":
        d1["size"], d2["size"] = z1, z2
    struct_0 = {"objects": [d1, d2], "clauses": [(0, rel, 1)]}
    if kind in ("noun", "noun_phrase"):
        struct_1 = {"objects": [d2, d1], "clauses": [(0, rel, 1)]}
    else:
        key = "colour" if kind == "adj_colour" else "size"
        struct_1 = {"objects": [{**d1, key: d2[key]}, {**d2, key: d1[key]}], "clauses": [(0, rel, 1)]}

    def ok(cells):
        return holds(struct_0, [_proto(s1, c1, z1, cells[0]), _proto(s2, c2, z2, cells[1])])

    cells = _find_cells(2, ok, rng)
    if cells is None:
        return None
    a, b = _realise(domain, [_proto(s1, c1, z1, cells[0]), _proto(s2, c2, z2, cells[1])], rng)
    if kind == "noun":  # shapes (with their geometry) swap places; colour and size stay with the place
        objs_1 = [copy_object(a, shape=s2, parts=b.parts), copy_object(b, shape=s1, parts=a.parts)]
    elif kind == "noun_phrase":  # whole objects swap places
        objs_1 = [copy_object(a, cell=b.cell), copy_object(b, cell=a.cell)]
    elif kind == "adj_colour":
        objs_1 = [
            copy_object(a, colour=c2, look=make_look(domain, s1, c2, rng)),
            copy_object(b, colour=c1, look=make_look(domain, s2, c1, rng)),
        ]
    else:
        objs_1 = [copy_object(a, size=z2), copy_object(b, size=z1)]
    return struct_0, struct_1, [a, b], objs_1


def _three_object(domain: str, kind: str, rng: np.random.Generator):
    """Preposition and Noun-plus-Preposition pairs: 'A r1 B and r2 C' with two relations."""
    shapes, colours, sizes = _attrs(domain, rng, 3)
    r_h, r_v = str(rng.choice(HORIZONTAL)), str(rng.choice(VERTICAL))
    r1, r2 = (r_h, r_v) if rng.random() < 0.5 else (r_v, r_h)
    d = [{"shape": sh} for sh in shapes]
    struct_0 = {"objects": d, "clauses": [(0, r1, 1), (0, r2, 2)]}
    if kind == "preposition":
        struct_1 = {"objects": d, "clauses": [(0, r2, 1), (0, r1, 2)]}
    else:  # the first two nouns swap and so do the two relations
        struct_1 = {"objects": [d[1], d[0], d[2]], "clauses": [(0, r2, 1), (0, r1, 2)]}
    protos = [_proto(sh, c, z, 0) for sh, c, z in zip(shapes, colours, sizes)]

    def arrangement(truth, falsity):
        def ok(cells):
            objs = [_proto(p.shape, p.colour, p.size, c) for p, c in zip(protos, cells)]
            return holds(truth, objs) and not holds(falsity, objs)

        return _find_cells(3, ok, rng)

    cells_0, cells_1 = arrangement(struct_0, struct_1), arrangement(struct_1, struct_0)
    if cells_0 is None or cells_1 is None:
        return None
    objs_0 = _realise(domain, [_proto(p.shape, p.colour, p.size, c) for p, c in zip(protos, cells_0)], rng)
    objs_1 = [copy_object(o, cell=c) for o, c in zip(objs_0, cells_1)]
    return struct_0, struct_1, objs_0, objs_1


def _numeral(domain: str, rng: np.random.Generator):
    """'two circles and one square' vs 'one circle and two squares': one object changes shape."""
    shapes, colours, sizes = _attrs(domain, rng, 3)
    s1, s2 = shapes[0], shapes[1]
    cells = [int(c) for c in rng.choice(9, size=3, replace=False)]
    objs_0 = _realise(
        domain,
        [
            _proto(s1, colours[0], sizes[0], cells[0]),
            _proto(s1, colours[1], sizes[1], cells[1]),
            _proto(s2, colours[2], sizes[2], cells[2]),
        ],
        rng,
    )
    changed = new_object(domain, s2, colours[1], sizes[1], cells[1], rng)
    objs_1 = [objs_0[0], copy_object(objs_0[1], shape=s2, parts=changed.parts), objs_0[2]]
    return {"counts": {s1: 2, s2: 1}}, {"counts": {s1: 1, s2: 2}}, objs_0, objs_1


def make_pair(domain: str, collapsed: str, rng: np.random.Generator, kind: str | None = None) -> Pair:
    """A verified minimal pair of the given collapsed tag (a random kind within it unless `kind` is set)."""
    options = kinds_for(domain, collapsed)
    kind = kind or str(options[int(rng.integers(len(options)))])
    secondary = ["Symbolic"] if domain == "sketch" else []
    if kind == "numeral":
        secondary.append("Morpheme-Level")
    for _ in range(50):
        if kind in ("preposition", "noun_preposition"):
            built = _three_object(domain, kind, rng)
        elif kind == "numeral":
            built = _numeral(domain, rng)
        else:
            built = _two_object(domain, kind, rng)
        if built is None:
            continue
        s0, s1, objs_0, objs_1 = built
        if not _place_pair(objs_0, objs_1, rng):
            continue
        pair = Pair(kind, collapsed, s0, s1, objs_0, objs_1, int(rng.integers(2**31)), ", ".join(secondary))
        if pair.valid():
            return pair
    raise RuntimeError(f"could not build a {kind} pair for {domain}")  # pragma: no cover
