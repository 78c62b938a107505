"""Prompt templates for zero-shot classification: named sets and how an option names them.

A classification task with several templates embeds every class with each template, normalises each
embedding, averages them over the templates and normalises the mean (CLIP's prompt ensembling, as in its
ImageNet notebook and LAION's CLIP_benchmark). Named sets:

- ``imagenet``: the 80 templates CLIP published for ImageNet (Radford et al. 2021);
- ``photo``: the one template ``a photo of a {}.``.

A `templates` value is a list of templates (each with one ``{}`` for the class name), a set's name, or a
text file with one template per line (a JSON list in a ``.json`` file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet": IMAGENET_TEMPLATES,
    "photo": ("a photo of a {}.",),
}


def _read_file(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"templates file {path} is not valid JSON ({exc})") from None
        if not isinstance(value, list):
            raise ConfigError(f"templates file {path} must hold a JSON list of templates")
        return value
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def resolve_templates(value: Any) -> list[str]:
    """The templates a `templates` value names (a list, a set's name or a file), each checked to hold one ``{}``."""
    if isinstance(value, str):
        if value in TEMPLATE_SETS:
            items: list[Any] = list(TEMPLATE_SETS[value])
        elif Path(value).expanduser().is_file():
            items = _read_file(Path(value).expanduser())
        else:
            raise ConfigError(
                f"unknown template set {value!r}: not a named set ({', '.join(TEMPLATE_SETS)}) nor a file of templates"
            )
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"templates must be a list of templates, a set's name or a file, not {type(value).__name__}")
    if not items:
        raise ConfigError("templates names no template")
    for t in items:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ConfigError(f"each template must contain exactly one '{{}}' for the class name, got {t!r}")
    if len(set(items)) != len(items):
        raise ConfigError("templates lists the same template twice")
    return [str(t) for t in items]
