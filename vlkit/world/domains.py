"""Domain lexicons of the procedural world: shapes, colours, sizes, regions, relations and caption openers.

Every word the world can emit comes from the tables in this module or the templates in `language.py`, which
is what keeps `vocabulary()` small and complete. The four domains share the scene model (one to three objects
on a 3x3 grid of regions) but differ in class set, look and wording:

- ``photo``: flat, clearly distinct colours on a light ground; classes are shapes (the pre-training domain).
- ``medical``: grayscale radiograph-like images; classes are findings, "colours" are intensities (bright/dark).
- ``satellite``: top-down textured ground with land-cover objects; no colour attribute.
- ``sketch``: pencil outlines of the photo shapes on paper; no colour attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

DOMAINS = ("photo", "medical", "satellite", "sketch")
TASKS = ("classification", "retrieval", "vqa", "grounding", "winoground", "captioning", "vqa-gen", "gqa", "nlvr2")

# Stable small integers mixed into every RNG seed (never Python's hash(), which is salted per process).
DOMAIN_IDS = {name: i + 1 for i, name in enumerate(DOMAINS)}
TASK_IDS = {name: i + 1 for i, name in enumerate(TASKS)}

SIZES = ("small", "medium", "large")
SIZE_RANK = {name: i for i, name in enumerate(SIZES)}
# Half extent of an object's box, as a fraction of the image side.
SIZE_HALF = {"small": 0.075, "medium": 0.105, "large": 0.14}

ROW_NAMES = ("upper", "middle", "lower")
COL_NAMES = ("left", "center", "right")

RELATIONS = ("left of", "right of", "above", "below", "bigger than")
SPATIAL_RELATIONS = RELATIONS[:4]

COUNT_WORDS = ("zero", "one", "two", "three")
YES_NO = ("yes", "no")


def region_name(row: int, col: int) -> str:
    """'upper left', 'upper center', ..., 'center' for the middle cell, ..., 'lower right'."""
    if row == 1 and col == 1:
        return "center"
    return f"{ROW_NAMES[row]} {COL_NAMES[col]}"


REGIONS = tuple(region_name(r, c) for r in range(3) for c in range(3))


@dataclass(frozen=True)
class DomainSpec:
    """Everything that differs between domains, in words (the look lives in `render.py`)."""

    name: str
    shapes: tuple[str, ...]
    plurals: dict[str, str]
    colours: tuple[str, ...]
    class_prompt: str
    prefixes: tuple[str, ...]
    object_word: str  # singular noun for "the object" in questions
    objects_word: str  # plural noun for "how many objects"
    shape_question: tuple[str, ...]  # templates asking what is at {loc}
    region_suffix: str = ""  # appended to a region name ("region" for clinical wording)
    adjectives: dict[str, str] = field(default_factory=dict)  # shape -> descriptive adjective in captions
    rgb: dict[str, tuple[int, int, int]] = field(default_factory=dict)


PHOTO = DomainSpec(
    name="photo",
    shapes=("circle", "square", "triangle", "star", "cross", "diamond"),
    plurals={
        "circle": "circles",
        "square": "squares",
        "triangle": "triangles",
        "star": "stars",
        "cross": "crosses",
        "diamond": "diamonds",
    },
    colours=("red", "orange", "yellow", "green", "blue", "purple", "black"),
    class_prompt="a photo of a {}",
    prefixes=("a photo of", "an image of", "a picture of", ""),
    object_word="object",
    objects_word="objects",
    shape_question=("what shape is {loc}", "which shape is {loc}"),
    rgb={
        "red": (214, 40, 40),
        "orange": (247, 140, 20),
        "yellow": (236, 201, 18),
        "green": (38, 158, 62),
        "blue": (38, 84, 214),
        "purple": (134, 58, 184),
        "black": (30, 30, 34),
    },
)

MEDICAL = DomainSpec(
    name="medical",
    shapes=("nodule", "mass", "calcification", "cyst", "consolidation"),
    plurals={
        "nodule": "nodules",
        "mass": "masses",
        "calcification": "calcifications",
        "cyst": "cysts",
        "consolidation": "consolidations",
    },
    colours=("bright", "dark"),
    class_prompt="a radiograph showing a {}",
    prefixes=("a radiograph showing", "an x ray showing", "a chest radiograph with", ""),
    object_word="finding",
    objects_word="findings",
    shape_question=("what finding is seen {loc}", "what kind of finding is {loc}"),
    region_suffix="region",
    adjectives={
        "nodule": "round",
        "mass": "irregular",
        "calcification": "punctate",
        "cyst": "oval",
        "consolidation": "hazy",
    },
)

SATELLITE = DomainSpec(
    name="satellite",
    shapes=("building", "field", "lake", "road", "forest"),
    plurals={"building": "buildings", "field": "fields", "lake": "lakes", "road": "roads", "forest": "forests"},
    colours=(),
    class_prompt="a satellite image of a {}",
    prefixes=("a satellite image of", "an aerial view of", "a top down view of", ""),
    object_word="object",
    objects_word="objects",
    shape_question=("what is {loc}", "what kind of object is {loc}"),
)

SKETCH = DomainSpec(
    name="sketch",
    shapes=PHOTO.shapes,
    plurals=PHOTO.plurals,
    colours=(),
    class_prompt="a sketch of a {}",
    prefixes=("a sketch of", "a drawing of", "a pencil drawing of", ""),
    object_word="shape",
    objects_word="shapes",
    shape_question=("what shape is drawn {loc}", "what shape is {loc}"),
)

SPECS = {s.name: s for s in (PHOTO, MEDICAL, SATELLITE, SKETCH)}


def spec(domain: str) -> DomainSpec:

    try:
        return SPECS[domain]
    except KeyError:
        raise ConfigError(f"unknown world domain {domain!r}; domains: {', '.join(DOMAINS)}") from None


def class_names(domain: str) -> list[str]:
    """Classification label names of a domain (shapes, findings or land-cover classes)."""
    return list(spec(domain).shapes)


def shape_names(domain: str) -> list[str]:
    """The object kinds of a domain (the same list as `class_names`: a scene object's ``shape``)."""
    return list(spec(domain).shapes)


def colour_names(domain: str) -> list[str]:
    """Colour attribute values: photo colours, 'bright'/'dark' for medical, [] where colour is not an attribute."""
    return list(spec(domain).colours)


def class_prompt(domain: str) -> str:
    """A zero-shot prompt template with one ``{}`` for the class name."""
    return spec(domain).class_prompt


def answer_set(domain: str) -> list[str]:
    """The closed VQA answer list: colours, then shapes, then counts, then yes/no."""
    s = spec(domain)
    return [*s.colours, *s.shapes, *COUNT_WORDS, *YES_NO]


def vqa_answer_types(domain: str) -> tuple[str, ...]:
    """Question types asked in a domain (no colour questions where colour is not an attribute)."""
    types = ("colour", "shape", "count", "yesno_relation")
    return types if spec(domain).colours else types[1:]
