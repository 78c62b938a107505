"""Scenes: one to three objects on a 3x3 grid of regions, their placement, relations and JSON form.

Each object sits in its own grid cell, jittered a little around the cell centre and kept inside the image,
with boxes that never touch. Relations are defined by the grid, which makes them geometrically clear:

- ``A left of B``: A's column is left of B's column (centres at least ~0.2 of the image apart in x);
- ``A above B``: A's row is above B's row (likewise in y);
- ``A bigger than B``: A's size class (small < medium < large) is larger than B's.

`holds` evaluates a small structured description ("a red circle left of a square", "two stars and one
cross") against a scene; the Winoground builder uses it to check that each caption is true of its own
image and false of the other.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from itertools import permutations
from typing import Any

import numpy as np

from .domains import RELATIONS, SIZE_HALF, SIZE_RANK, region_name
from .shapes import Part, make_look, make_parts, parts_extent

CELL = 1.0 / 3.0
JITTER = 0.05  # max offset of an object centre from its cell centre
PAD = 0.02  # min distance from a box to the image border
GAP = 0.02  # min distance between two boxes


@dataclass
class WorldObject:
    shape: str
    colour: str  # "" in domains without a colour attribute
    size: str
    cell: int  # 0..8, row-major
    cx: float = 0.0
    cy: float = 0.0
    parts: list[Part] = field(default_factory=list, repr=False)
    look: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    @property
    def region(self) -> str:
        return region_name(self.row, self.col)

    @property
    def half(self) -> float:
        return SIZE_HALF[self.size]

    @property
    def box(self) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = parts_extent(self.parts)
        h = self.half
        return (self.cx + h * x0, self.cy + h * y0, self.cx + h * x1, self.cy + h * y1)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"shape": self.shape}
        if self.colour:
            d["colour"] = self.colour
        d.update(
            size=self.size,
            region=self.region,
            center=[round(self.cx, 4), round(self.cy, 4)],
            box=[round(v, 4) for v in self.box],
        )
        return d


def relation_holds(a: WorldObject, rel: str, b: WorldObject) -> bool:
    if rel == "left of":
        return a.col < b.col
    if rel == "right of":
        return a.col > b.col
    if rel == "above":
        return a.row < b.row
    if rel == "below":
        return a.row > b.row
    if rel == "bigger than":
        return SIZE_RANK[a.size] > SIZE_RANK[b.size]
    raise ValueError(f"unknown relation {rel!r}")


def true_relations(objs: list[WorldObject]) -> list[tuple[int, str, int]]:
    return [
        (i, rel, j)
        for i, a in enumerate(objs)
        for j, b in enumerate(objs)
        if i != j
        for rel in RELATIONS
        if relation_holds(a, rel, b)
    ]


def scene_json(objs: list[WorldObject]) -> str:
    """The `scene` column: objects (shape, colour, size, region, center, box) and every true relation."""
    rels = [{"subject": i, "relation": rel, "object": j} for i, rel, j in true_relations(objs)]
    return json.dumps({"objects": [o.to_json() for o in objs], "relations": rels}, separators=(",", ":"))


def new_object(domain: str, shape: str, colour: str, size: str, cell: int, rng: np.random.Generator) -> WorldObject:
    return WorldObject(
        shape, colour, size, cell, parts=make_parts(domain, shape, rng), look=make_look(domain, shape, colour, rng)
    )


def _clamp_centre(o: WorldObject, cx: float, cy: float) -> tuple[float, float]:
    x0, y0, x1, y1 = parts_extent(o.parts)
    h = o.half
    cx = min(max(cx, PAD - h * x0), 1.0 - PAD - h * x1)
    cy = min(max(cy, PAD - h * y0), 1.0 - PAD - h * y1)
    return cx, cy


def recentre(o: WorldObject, cx: float, cy: float) -> WorldObject:
    o.cx, o.cy = _clamp_centre(o, cx, cy)
    return o


def boxes_apart(objs: Iterable[WorldObject]) -> bool:
    objs = list(objs)
    for i, a in enumerate(objs):
        ax0, ay0, ax1, ay1 = a.box
        for b in objs[i + 1 :]:
            bx0, by0, bx1, by1 = b.box
            if ax0 < bx1 + GAP and bx0 < ax1 + GAP and ay0 < by1 + GAP and by0 < ay1 + GAP:
                return False
    return True


def place(objs: list[WorldObject], rng: np.random.Generator, tries: int = 6) -> bool:
    """Jitter each object around its cell centre until no two boxes touch; False if that fails."""
    for _ in range(tries):
        for o in objs:
            ccx, ccy = (o.col + 0.5) * CELL, (o.row + 0.5) * CELL
            recentre(o, ccx + rng.uniform(-JITTER, JITTER), ccy + rng.uniform(-JITTER, JITTER))
        if boxes_apart(objs):
            return True
    return False


def copy_object(o: WorldObject, **changes: Any) -> WorldObject:
    """A copy with some fields changed; the centre is re-clamped (a bigger object may need to move in)."""
    c = replace(o, **changes)
    return recentre(c, c.cx, c.cy)


def sample_scene(
    domain: str,
    rng: np.random.Generator,
    n_objects: int,
    shapes: list[str],
    colours: list[str],
    sizes: list[str],
    fixed: list[dict[str, str]] | None = None,
) -> list[WorldObject]:
    """`n_objects` objects in distinct cells; `fixed[i]` pins attributes of object i (shape/colour/size)."""
    fixed = fixed or []
    for attempt in range(40):
        cells = rng.choice(9, size=n_objects, replace=False)
        objs = []
        for k in range(n_objects):
            pin = fixed[k] if k < len(fixed) else {}
            shape = pin.get("shape") or str(rng.choice(shapes))
            colour = pin.get("colour", str(rng.choice(colours)) if colours else "")
            size = pin.get("size") or str(rng.choice(sizes if attempt < 20 else ["small"]))
            objs.append(new_object(domain, shape, colour, size, int(cells[k]), rng))
        if place(objs, rng):
            return objs
    raise RuntimeError("could not place scene objects")  # pragma: no cover - small objects always fit


# ---- structured descriptions -------------------------------------------------------------------------


def matches(o: WorldObject, desc: dict[str, str]) -> bool:
    return all(getattr(o, k) == v for k, v in desc.items())


def holds(struct: dict[str, Any], objs: list[WorldObject]) -> bool:
    """Is a structured description true of a scene?

    ``{"objects": [desc, ...], "clauses": [(i, rel, j), ...]}``: some distinct objects match the
    descriptions (dicts of shape/colour/size) and satisfy every clause. ``{"counts": {shape: n}}``: exactly
    n objects of each named shape.
    """
    if "counts" in struct:
        return all(sum(o.shape == s for o in objs) == n for s, n in struct["counts"].items())
    descs = struct["objects"]
    for assign in permutations(range(len(objs)), len(descs)):
        if all(matches(objs[a], d) for a, d in zip(assign, descs)) and all(
            relation_holds(objs[assign[i]], rel, objs[assign[j]]) for i, rel, j in struct["clauses"]
        ):
            return True
    return False
