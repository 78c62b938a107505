"""Object geometry in unit coordinates: what every shape, finding and land-cover object is made of.

An object is a list of *parts* in a unit frame centred on the object (x right, y down, roughly [-1, 1]);
the scene scales them by the object's half extent and places them at its centre. Keeping the geometry here,
and drawing it in `render.py`, lets the scene compute exact boxes (for grounding) from the very points the
renderer fills. A part is ``(kind, role, data)``:

- ``("poly", role, [(x, y), ...])``: a filled polygon;
- ``("ellipse", role, (x0, y0, x1, y1))``: a filled ellipse in its box;
- ``("stroke", role, [(x, y), ...])``: an open pencil line (sketch);
- ``("stripes", role, (x0, y0, x1, y1, horizontal, count))``: crop rows inside a rectangle (satellite field).

The role tells the renderer which colour, intensity or blur to use. `make_look` draws the per-object
appearance (exact RGB, intensity amplitude, roof colour...) that is not part of the scene's words.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .domains import PHOTO

Part = tuple[str, str, Any]


def _rotate(points: list[tuple[float, float]], degrees: float) -> list[tuple[float, float]]:
    if not degrees:
        return points
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _regular(n: int, radius: float = 1.0, start: float = -90.0) -> list[tuple[float, float]]:
    angles = [math.radians(start + 360.0 * k / n) for k in range(n)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _star() -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.45
        a = math.radians(-90.0 + 36.0 * k)
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _cross(w: float = 0.32) -> list[tuple[float, float]]:
    return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]


def photo_outline(shape: str, rng: np.random.Generator) -> tuple[str, Any]:
    """The outline of a photo/sketch shape: ("ellipse", box) or ("poly", points), with a small random tilt."""
    if shape == "circle":
        return "ellipse", (-1.0, -1.0, 1.0, 1.0)
    if shape == "square":
        pts, tilt = [(-0.86, -0.86), (0.86, -0.86), (0.86, 0.86), (-0.86, 0.86)], 12.0
    elif shape == "triangle":
        pts, tilt = [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)], 10.0
    elif shape == "star":
        pts, tilt = _star(), 12.0
    elif shape == "cross":
        pts, tilt = _cross(), 12.0
    elif shape == "diamond":
        pts, tilt = [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)], 6.0
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return "poly", _rotate(pts, float(rng.uniform(-tilt, tilt)))


def _blob(rng: np.random.Generator, n: int, roughness: float, base: float = 1.0) -> list[tuple[float, float]]:
    """A closed irregular outline: a circle whose radius varies by a few random harmonics."""
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in (2, 3, 5):
        r += roughness / k * rng.uniform(0.5, 1.0) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    r = base * r / r.max()
    return [(float(x), float(y)) for x, y in zip(r * np.cos(t), r * np.sin(t))]


def _pencil(
    points: list[tuple[float, float]], rng: np.random.Generator, closed: bool = True
) -> list[tuple[float, float]]:
    """A hand-drawn version of an outline: densified, wobbly, slightly overshooting the start."""
    pts = list(points) + ([points[0], points[1 % len(points)]] if closed else [])
    out: list[tuple[float, float]] = []
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        for t in (0.0, 0.33, 0.66):
            out.append((x0 + (x1 - x0) * t + rng.normal(0, 0.035), y0 + (y1 - y0) * t + rng.normal(0, 0.035)))
    # stop a little after the start point: pencil strokes rarely close exactly
    return out[: len(out) - 2] if closed else out


def make_parts(domain: str, shape: str, rng: np.random.Generator) -> list[Part]:
    """Unit-frame parts of one object of `shape` in `domain` (deterministic given `rng`)."""
    if domain == "photo":
        kind, data = photo_outline(shape, rng)
        return [(kind, "body", data)]
    if domain == "sketch":
        kind, data = photo_outline(shape, rng)
        if kind == "ellipse":
            data = _blob(rng, 20, 0.08)
        return [("stroke", "pen", _pencil(data, rng))]
    if domain == "medical":
        return _medical_parts(shape, rng)
    if domain == "satellite":
        return _satellite_parts(shape, rng)
    raise ValueError(f"unknown domain {domain!r}")


def _medical_parts(shape: str, rng: np.random.Generator) -> list[Part]:
    if shape == "nodule":
        a = rng.uniform(0.85, 1.0)
        return [("ellipse", "soft", (-a, -1.0, a, 1.0))]
    if shape == "mass":
        return [("poly", "lobulated", _blob(rng, 24, 0.45))]
    if shape == "calcification":
        k = int(rng.integers(3, 7))
        parts = []
        start = rng.uniform(0, 2 * math.pi)
        for j in range(k):  # two dots at opposite ends so the cluster spans its nominal size, the rest around
            if j < 2:
                r, a = rng.uniform(0.7, 0.76), start + math.pi * j
            else:
                r, a = rng.uniform(0.2, 0.7), rng.uniform(0, 2 * math.pi)
            x, y, d = r * math.cos(a), r * math.sin(a), rng.uniform(0.2, 0.25)
            parts.append(("ellipse", "dot", (x - d, y - d, x + d, y + d)))
        return parts
    if shape == "cyst":
        a = rng.uniform(0.66, 0.82)
        box = (-1.0, -a, 1.0, a) if rng.random() < 0.5 else (-a, -1.0, a, 1.0)
        return [("ellipse", "rim", box)]
    if shape == "consolidation":
        return [("poly", "haze", _blob(rng, 24, 0.55))]
    raise ValueError(f"unknown finding {shape!r}")


def _satellite_parts(shape: str, rng: np.random.Generator) -> list[Part]:
    if shape == "building":
        w = rng.uniform(0.55, 0.95)
        rect = [(-w, -0.85), (w, -0.85), (w, 0.85), (-w, 0.85)]
        if rng.random() < 0.5:
            rect = [(y, x) for x, y in rect]
        rect = _rotate(rect, float(rng.uniform(-8, 8)))
        shadow = [(x + 0.2, y + 0.2) for x, y in rect]
        return [("poly", "shadow", shadow), ("poly", "roof", rect)]
    if shape == "field":
        w = rng.uniform(0.7, 1.0)
        box = (-1.0, -w, 1.0, w) if rng.random() < 0.5 else (-w, -1.0, w, 1.0)
        x0, y0, x1, y1 = box
        rect = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        return [("poly", "crop", rect), ("stripes", "rows", (*box, bool(rng.random() < 0.5), int(rng.integers(4, 7))))]
    if shape == "lake":
        shore = _blob(rng, 28, 0.7)
        water = [(0.84 * x, 0.84 * y) for x, y in shore]
        return [("poly", "shore", shore), ("poly", "water", water)]
    if shape == "road":
        angle = float(rng.choice([0.0, 90.0, 45.0, 135.0]) + rng.uniform(-8, 8))
        band = _rotate([(-1.0, -0.28), (1.0, -0.28), (1.0, 0.28), (-1.0, 0.28)], angle)
        line = _rotate([(-0.95, 0.0), (0.95, 0.0)], angle)
        return [("poly", "road", band), ("stroke", "roadline", line)]
    if shape == "forest":
        parts: list[Part] = []
        crowns = []
        k = int(rng.integers(6, 9))
        start = rng.uniform(0, 2 * math.pi)
        for j in range(k):  # a ring of crowns that spans the nominal size, then a few inside
            a = start + 2 * math.pi * (j + rng.uniform(-0.2, 0.2)) / k
            r = rng.uniform(0.58, 0.68)
            crowns.append((r * math.cos(a), r * math.sin(a), rng.uniform(0.24, 0.3)))
        for _ in range(int(rng.integers(2, 5))):
            r, a = 0.35 * math.sqrt(rng.uniform(0, 1)), rng.uniform(0, 2 * math.pi)
            crowns.append((r * math.cos(a), r * math.sin(a), rng.uniform(0.26, 0.32)))
        for x, y, d in crowns:
            parts.append(("ellipse", "treeshadow", (x - d + 0.08, y - d + 0.08, x + d + 0.08, y + d + 0.08)))
        for x, y, d in crowns:
            parts.append(("ellipse", "tree", (x - d, y - d, x + d, y + d)))
        return parts
    raise ValueError(f"unknown land-cover object {shape!r}")


def parts_extent(parts: list[Part]) -> tuple[float, float, float, float]:
    """(xmin, ymin, xmax, ymax) of all parts in the unit frame."""
    xs: list[float] = []
    ys: list[float] = []
    for kind, _, data in parts:
        if kind in ("ellipse", "stripes"):
            xs += [data[0], data[2]]
            ys += [data[1], data[3]]
        else:
            xs += [p[0] for p in data]
            ys += [p[1] for p in data]
    return min(xs), min(ys), max(xs), max(ys)


ROOF_COLOURS = ((150, 150, 150), (172, 84, 62), (214, 210, 200), (120, 112, 104))
CROP_COLOURS = (((176, 162, 70), (140, 150, 60)), ((96, 150, 60), (70, 118, 46)), ((196, 170, 104), (160, 130, 80)))


def make_look(domain: str, shape: str, colour: str, rng: np.random.Generator) -> dict[str, Any]:
    """Appearance details of one object that captions do not mention (kept small so classes stay clear)."""
    if domain == "photo":
        r, g, b = PHOTO.rgb[colour]
        j = rng.integers(-10, 11, size=3)
        return {"rgb": tuple(int(min(255, max(0, v + int(d)))) for v, d in zip((r, g, b), j))}
    if domain == "medical":
        amp = rng.uniform(70, 100) if colour == "bright" else -rng.uniform(58, 75)
        return {"amp": float(amp), "texture": int(rng.integers(2**31))}
    if domain == "satellite":
        crop = CROP_COLOURS[int(rng.integers(len(CROP_COLOURS)))]
        return {
            "roof": ROOF_COLOURS[int(rng.integers(len(ROOF_COLOURS)))],
            "crop": crop,
            "water": (int(rng.integers(30, 50)), int(rng.integers(62, 84)), int(rng.integers(110, 140))),
        }
    if domain == "sketch":
        return {"pen": int(rng.integers(30, 80)), "double": bool(rng.random() < 0.4)}
    raise ValueError(f"unknown domain {domain!r}")
