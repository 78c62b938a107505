"""Rendering: scenes to RGB images per domain, and contact sheets of examples.

Shapes are drawn with PIL at 4x (2x above 128 px) and box-downsampled, so edges are anti-aliased and the
output is byte-identical for the same inputs. Backgrounds come from a separate RNG (`bg_seed`) drawn in a
fixed order that does not depend on the objects, so two scenes with the same `bg_seed` (a Winoground pair)
differ only where their objects differ.

- photo: flat colours on a light, near-neutral ground;
- sketch: pencil outlines on grainy paper;
- medical: grayscale radiograph look: vignetted body field, rib-like bands, low-frequency mottling, quantum
  noise, and blurred bright or dark findings;
- satellite: top-down textured ground (grass/dry/mixed) with buildings, fields, lakes, roads and forests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..io import atomic_path
from .scenes import WorldObject


def _supersample(size: int) -> int:
    return 4 if size <= 128 else 2


def _to_px(o: WorldObject, pts, s: int) -> list[tuple[float, float]]:
    h = o.half
    return [((o.cx + h * x) * s, (o.cy + h * y) * s) for x, y in pts]


def _box_px(o: WorldObject, box, s: int) -> tuple[float, float, float, float]:
    (x0, y0), (x1, y1) = _to_px(o, [(box[0], box[1]), (box[2], box[3])], s)
    return x0, y0, x1, y1


def _draw_part(d: ImageDraw.ImageDraw, o: WorldObject, part, s: int, fill, width: int = 1) -> None:
    kind, _, data = part
    if kind == "poly":
        d.polygon(_to_px(o, data, s), fill=fill)
    elif kind == "ellipse":
        d.ellipse(_box_px(o, data, s), fill=fill)
    elif kind == "stroke":
        d.line(_to_px(o, data, s), fill=fill, width=width, joint="curve")
    elif kind == "stripes":
        x0, y0, x1, y1, horizontal, count = data
        bx0, by0, bx1, by1 = _box_px(o, (x0, y0, x1, y1), s)
        span = (by1 - by0) if horizontal else (bx1 - bx0)
        w = max(1, int(span / (2 * count)))
        for k in range(count):
            t = (k + 0.5) / count
            if horizontal:
                y = by0 + t * span
                d.line([(bx0, y), (bx1, y)], fill=fill, width=w)
            else:
                x = bx0 + t * span
                d.line([(x, by0), (x, by1)], fill=fill, width=w)


def _upsample(arr: np.ndarray, size: int) -> np.ndarray:
    """Bicubic upsampling of a small float field (one channel) to size x size."""
    im = Image.fromarray(arr.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.float32)


def _render_photo(objs: list[WorldObject], rng: np.random.Generator, size: int) -> Image.Image:
    ss = _supersample(size)
    grey = int(rng.integers(232, 248))
    tint = rng.integers(-5, 6, size=3)
    im = Image.new("RGB", (size * ss, size * ss), tuple(int(grey + t) for t in tint))
    d = ImageDraw.Draw(im)
    for o in objs:
        for part in o.parts:
            _draw_part(d, o, part, size * ss, o.look["rgb"])
    return im.reduce(ss)


def _render_sketch(objs: list[WorldObject], rng: np.random.Generator, size: int) -> Image.Image:
    ss = _supersample(size)
    paper = float(rng.integers(242, 252)) + np.array([0.0, -2.0, -8.0], dtype=np.float32) * rng.uniform(0.3, 1.0)
    grain = rng.normal(0, 3.0, size=(size, size, 1)).astype(np.float32)
    base = np.clip(paper + grain, 0, 255).astype(np.uint8)
    im = Image.fromarray(base, "RGB").resize((size * ss, size * ss), Image.Resampling.NEAREST)
    d = ImageDraw.Draw(im)
    width = max(1, round(size * ss / 42))
    for o in objs:
        pen = (o.look["pen"],) * 3
        for part in o.parts:
            _draw_part(d, o, part, size * ss, pen, width)
            if o.look["double"]:
                kind, role, pts = part
                shifted = [(x + 0.05, y - 0.04) for x, y in pts]
                _draw_part(d, o, (kind, role, shifted), size * ss, pen, max(1, width * 2 // 3))
    return im.reduce(ss)


_MEDICAL_BLUR = {"soft": 0.2, "lobulated": 0.14, "dot": 0.0, "rim": 0.04, "haze": 0.4}
_MEDICAL_GAIN = {"soft": 1.0, "lobulated": 1.0, "dot": 1.25, "rim": 1.0, "haze": 1.25}


def _render_medical(objs: list[WorldObject], rng: np.random.Generator, size: int) -> Image.Image:
    ss = _supersample(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(92, 118)
    r2 = ((xx - 0.5) / rng.uniform(0.55, 0.7)) ** 2 + ((yy - 0.5) / rng.uniform(0.62, 0.75)) ** 2
    field = base + 34.0 * np.clip(1.0 - r2, 0.0, 1.0)
    freq, phase = rng.uniform(4.0, 6.5), rng.uniform(0, 1)
    ribs = 7.0 * np.sin(2 * np.pi * (yy * freq + phase + 0.06 * np.sin(2 * np.pi * xx * rng.uniform(0.8, 1.6))))
    mottle = 9.0 * _upsample(rng.normal(size=(5, 5)), size)
    noise = rng.normal(0, 6.5, size=(size, size)).astype(np.float32)
    img = field + ribs + mottle
    for o in objs:
        role = o.parts[0][1]
        mask = Image.new("L", (size * ss, size * ss), 0)
        d = ImageDraw.Draw(mask)
        for part in o.parts:
            if role == "rim":
                rim = max(1, round(0.2 * o.half * size * ss))
                d.ellipse(_box_px(o, part[2], size * ss), fill=110, outline=255, width=rim)
            else:
                _draw_part(d, o, part, size * ss, 255)
        mask = mask.reduce(ss)
        radius = _MEDICAL_BLUR[role] * o.half * size
        if radius > 0.3:
            mask = mask.filter(ImageFilter.GaussianBlur(radius))
        weight = np.asarray(mask, dtype=np.float32) / 255.0
        if role == "haze":  # patchy, mottled airspace opacity rather than a smooth blob
            tex = _upsample(np.random.default_rng(o.look["texture"]).normal(size=(7, 7)), size)
            weight = weight * (0.6 + 0.4 * np.tanh(tex))
        img = img + o.look["amp"] * _MEDICAL_GAIN[role] * weight
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(img, "L").convert("RGB")


_GROUNDS = ((92, 118, 64), (150, 136, 96), (116, 124, 78))
_SAT_FIXED = {
    "shadow": (38, 42, 34),
    "shore": (172, 160, 120),
    "road": (128, 126, 120),
    "roadline": (206, 200, 180),
    "tree": (36, 80, 42),
    "treeshadow": (22, 40, 26),
}


def _render_satellite(objs: list[WorldObject], rng: np.random.Generator, size: int) -> Image.Image:
    ss = _supersample(size)
    ground = np.array(_GROUNDS[int(rng.integers(len(_GROUNDS)))], dtype=np.float32)
    lum = _upsample(rng.normal(size=(6, 6)), size)[..., None] * 12.0
    hue = _upsample(rng.normal(size=(6, 6)), size)[..., None] * np.array([6.0, -6.0, 2.0], dtype=np.float32)
    mid = _upsample(rng.normal(size=(16, 16)), size)[..., None] * 9.0
    fine = rng.normal(0, 5.0, size=(size, size, 1)).astype(np.float32)
    late = rng.normal(0, 3.0, size=(size, size, 1)).astype(np.float32)
    base = np.clip(ground + lum + hue + mid + fine, 0, 255).astype(np.uint8)
    im = Image.fromarray(base, "RGB").resize((size * ss, size * ss), Image.Resampling.NEAREST)
    d = ImageDraw.Draw(im)
    for o in objs:
        for part in o.parts:
            role = part[1]
            if role == "roof":
                fill = o.look["roof"]
            elif role == "crop":
                fill = o.look["crop"][0]
            elif role == "rows":
                fill = o.look["crop"][1]
            elif role == "water":
                fill = o.look["water"]
            else:
                fill = _SAT_FIXED[role]
            _draw_part(d, o, part, size * ss, fill, max(1, round(size * ss / 80)))
    out = np.asarray(im.reduce(ss), dtype=np.float32) + late
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


_RENDERERS = {
    "photo": _render_photo,
    "sketch": _render_sketch,
    "medical": _render_medical,
    "satellite": _render_satellite,
}


def render_scene(domain: str, objs: list[WorldObject], bg_seed: int, size: int = 64) -> Image.Image:
    """Draw a scene as a `size` x `size` RGB image; the background depends only on `bg_seed`."""
    return _RENDERERS[domain](objs, np.random.default_rng(bg_seed), size)


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + "..."
    return lines


def render_contact_sheet(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    path: str | os.PathLike,
    columns: int | None = None,
    thumb: int = 128,
    caption_lines: int = 4,
) -> Path:
    """A grid PNG of `images` (scaled to `thumb` px) with each caption in small text underneath.

    Written atomically (temporary file then rename). Returns the path.
    """

    if len(images) != len(captions):
        raise ValueError("render_contact_sheet needs one caption per image")
    n = max(1, len(images))
    columns = columns or min(n, 4)
    rows = (n + columns - 1) // columns
    font_px = 11
    font = _font(font_px)
    line_h = font_px + 2
    pad = 6
    cell_w, cell_h = thumb + 2 * pad, thumb + 2 * pad + caption_lines * line_h
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for k, (im, cap) in enumerate(zip(images, captions)):
        x, y = (k % columns) * cell_w + pad, (k // columns) * cell_h + pad
        im = im.convert("RGB")
        scale = Image.Resampling.NEAREST if thumb % im.width == 0 else Image.Resampling.BICUBIC
        sheet.paste(im.resize((thumb, thumb), scale), (x, y))
        for j, line in enumerate(_wrap(str(cap), font, thumb, caption_lines)):
            d.text((x, y + thumb + 2 + j * line_h), line, fill=(20, 20, 20), font=font)
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
