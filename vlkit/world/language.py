"""Language of the world: captions, referring expressions, VQA questions, minimal-pair captions, vocabulary.

All text is built from the domain lexicons (`domains.py`) and the templates below, so `vocabulary()` can list
every word the world can ever emit by reading those tables. Captions are *full*: they name every object with
its attributes, plus a location (one object) or a relation (two or three objects), in one of a few forms:

- photo: "a photo of a small red circle in the upper left", "there is a large blue star left of a small green cross";
- medical: "a radiograph showing a small bright round nodule in the upper left region";
- satellite: "an aerial view of a large lake above a small building";
- sketch: "a pencil drawing of a medium star in the center".
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .domains import COL_NAMES, COUNT_WORDS, RELATIONS, ROW_NAMES, SIZES, SPATIAL_RELATIONS, SPECS, YES_NO, DomainSpec
from .scenes import WorldObject, relation_holds

SINGLE_TEMPLATES = ("{pre}{a} {loc}", "there is {a} {loc}", "{a} {loc}")
MEDICAL_SINGLE_TEMPLATES = ("{a} is seen {loc}",)
PAIR_TEMPLATES = ("{pre}{a} {rel} {b}", "there is {a} {rel} {b}")
TRIPLE_TEMPLATES = ("{pre}{a} {rel} {b} and {c} {loc_c}", "{pre}{a} {rel} {b}, with {c} {loc_c}")

COLOUR_QUESTIONS = {
    "photo": ("what colour is the {ref}?", "what is the colour of the {ref}?"),
    "medical": ("is the {ref} bright or dark?", "what is the intensity of the {ref}?"),
}
PHOTO_SHAPE_BY_COLOUR = "what shape is the {colour} object?"
COUNT_QUESTIONS = ("how many {objs} are there?", "how many {plural} are there?")
COUNT_BY_COLOUR = "how many {colour} {objs} are there?"
YESNO_QUESTIONS = ("is the {ra} {rel} the {rb}?", "does the {ra} appear {rel} the {rb}?")
LOC_TEMPLATE = "in the {region}"
EXPRESSION_TEMPLATES = ("the {ref}",)
REL_REF_TEMPLATE = "{shape} {rel} the {other}"
PREPOSITION_TEMPLATE = "{a} {r1} {b} and {r2} {c}"
NUMERAL_TEMPLATE = "{n1} {s1} and {n2} {s2}"

# generative tasks (`vl_tasks.py`): GQA-style questions and NLVR2-style statements
GQA_SHAPE = "what shape is the {obj} {rel} the {ref}?"
GQA_ATTRIBUTE = "what {attr} is the {shape} {rel} the {ref}?"
GQA_VERIFY = "is the {ra} {rel} the {rb}?"
GQA_COMPARE = "which is bigger, the {ra} or the {rb}?"
NLVR_COUNT = "there {be} {n} {plural} in total"
NLVR_BOTH = "both images contain {a}"
NLVR_ONE = "exactly one image contains {a}"
NLVR_SIDE = "the {side} image shows {a} {rel} {b}"
VL_TEMPLATES = (
    GQA_SHAPE,
    GQA_ATTRIBUTE,
    GQA_VERIFY,
    GQA_COMPARE,
    NLVR_COUNT,
    NLVR_BOTH,
    NLVR_ONE,
    NLVR_SIDE,
    "colour size left right true false",
)

WORD_RE = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """The tokenizer's view of a text: lower-case alphanumeric runs."""
    return WORD_RE.findall(text.lower())


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def noun_phrase(o: WorldObject, domain: str, size: bool = True, colour: bool = True, adjective: bool = True) -> str:
    """'small red circle', 'large bright irregular mass', 'medium lake' (no article)."""
    s = SPECS[domain]
    bits = []
    if size:
        bits.append(o.size)
    if colour and o.colour:
        bits.append(o.colour)
    if adjective and o.shape in s.adjectives:
        bits.append(s.adjectives[o.shape])
    bits.append(o.shape)
    return " ".join(bits)


def loc_phrase(o: WorldObject, domain: str) -> str:
    region = o.region
    if SPECS[domain].region_suffix:
        region = f"{region} {SPECS[domain].region_suffix}"
    return LOC_TEMPLATE.format(region=region)


def _prefix(s: DomainSpec, rng: np.random.Generator) -> str:
    p = s.prefixes[int(rng.integers(len(s.prefixes)))]
    return f"{p} " if p else ""


def pick_relation(a: WorldObject, b: WorldObject, rng: np.random.Generator) -> str:
    """A true relation of a to b, spatial ones preferred (distinct cells always give at least one)."""
    spatial = [r for r in SPATIAL_RELATIONS if relation_holds(a, r, b)]
    if relation_holds(a, "bigger than", b) and (not spatial or rng.random() < 0.2):
        return "bigger than"
    return spatial[int(rng.integers(len(spatial)))]


def caption(domain: str, objs: list[WorldObject], rng: np.random.Generator) -> str:
    """A full caption naming every object with its attributes, and a location or relation."""
    s = SPECS[domain]
    pre = _prefix(s, rng)
    nps = [with_article(noun_phrase(o, domain)) for o in objs]
    if len(objs) == 1:
        templates = SINGLE_TEMPLATES + (MEDICAL_SINGLE_TEMPLATES if domain == "medical" else ())
        t = templates[int(rng.integers(len(templates)))]
        return t.format(pre=pre, a=nps[0], loc=loc_phrase(objs[0], domain))
    rel = pick_relation(objs[0], objs[1], rng)
    if len(objs) == 2:
        t = PAIR_TEMPLATES[int(rng.integers(len(PAIR_TEMPLATES)))]
        return t.format(pre=pre, a=nps[0], rel=rel, b=nps[1])
    t = TRIPLE_TEMPLATES[int(rng.integers(len(TRIPLE_TEMPLATES)))]
    return t.format(pre=pre, a=nps[0], rel=rel, b=nps[1], c=nps[2], loc_c=loc_phrase(objs[2], domain))


# ---- referring expressions ---------------------------------------------------------------------------


def _attr_refs(i: int, objs: list[WorldObject], domain: str, kinds: tuple[str, ...]) -> list[str]:
    """Non-relational descriptions of objs[i] that match no other object."""
    o = objs[i]
    out = []
    for kind in kinds:
        if kind == "colour" and not o.colour:
            continue
        keys = {"shape": ("shape",), "colour": ("colour", "shape"), "size": ("size", "shape")}.get(kind)
        if keys is None:
            continue
        if sum(all(getattr(p, k) == getattr(o, k) for k in keys) for p in objs) == 1:
            out.append(" ".join(getattr(o, k) for k in keys))
    if "loc" in kinds:  # regions are distinct, so this one is always unambiguous
        out.append(f"{o.shape} {loc_phrase(o, domain)}")
    return out


def refer(
    i: int,
    objs: list[WorldObject],
    domain: str,
    rng: np.random.Generator,
    kinds: tuple[str, ...] = ("shape", "colour", "size", "loc", "rel"),
) -> str:
    """A short unambiguous description of objs[i] without article ('red circle', 'star left of the cross')."""
    cands = _attr_refs(i, objs, domain, tuple(k for k in kinds if k != "rel"))
    if "rel" in kinds:
        o = objs[i]
        for j, other in enumerate(objs):
            if j == i:
                continue
            other_refs = _attr_refs(j, objs, domain, ("shape", "colour", "size"))
            if not other_refs:
                continue
            for rel in RELATIONS:
                if (
                    relation_holds(o, rel, other)
                    and sum(p.shape == o.shape and relation_holds(p, rel, other) for p in objs) == 1
                ):
                    ref = other_refs[int(rng.integers(len(other_refs)))]
                    cands.append(REL_REF_TEMPLATE.format(shape=o.shape, rel=rel, other=ref))
    if not cands:
        cands = _attr_refs(i, objs, domain, ("loc",))
    return cands[int(rng.integers(len(cands)))]


def expression(i: int, objs: list[WorldObject], domain: str, rng: np.random.Generator) -> str:
    """A grounding referring expression for objs[i]: 'the red circle', 'the star in the upper left'."""
    t = EXPRESSION_TEMPLATES[int(rng.integers(len(EXPRESSION_TEMPLATES)))]
    return t.format(ref=refer(i, objs, domain, rng))


# ---- visual question answering -----------------------------------------------------------------------


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def question(
    domain: str, objs: list[WorldObject], rng: np.random.Generator, qtype: str, want_yes: bool = True
) -> tuple[str, str] | None:
    """(question, answer) of type `qtype` about the scene, or None when the scene cannot support it."""
    s = SPECS[domain]
    if qtype == "colour":
        i = int(rng.integers(len(objs)))
        ref = refer(i, objs, domain, rng, kinds=("shape", "size", "loc"))
        return _pick(rng, COLOUR_QUESTIONS[domain]).format(ref=ref), objs[i].colour
    if qtype == "shape":
        i = int(rng.integers(len(objs)))
        o = objs[i]
        if domain == "photo" and sum(p.colour == o.colour for p in objs) == 1 and rng.random() < 0.4:
            return PHOTO_SHAPE_BY_COLOUR.format(colour=o.colour), o.shape
        return _pick(rng, s.shape_question).format(loc=loc_phrase(o, domain)) + "?", o.shape
    if qtype == "count":
        forms = ["all", "shape"] + (["colour"] if s.colours else [])
        form = _pick(rng, forms)
        if form == "all":
            return COUNT_QUESTIONS[0].format(objs=s.objects_word), COUNT_WORDS[len(objs)]
        if form == "shape":
            shape = _pick(rng, s.shapes) if rng.random() < 0.3 else _pick(rng, objs).shape
            q = COUNT_QUESTIONS[1].format(plural=s.plurals[shape])
            return q, COUNT_WORDS[sum(o.shape == shape for o in objs)]
        colour = _pick(rng, s.colours) if rng.random() < 0.3 else _pick(rng, objs).colour
        q = COUNT_BY_COLOUR.format(colour=colour, objs=s.objects_word)
        return q, COUNT_WORDS[sum(o.colour == colour for o in objs)]
    if qtype == "yesno_relation":
        if len(objs) < 2:
            return None
        for _ in range(20):
            rel = _pick(rng, RELATIONS)
            pairs = [
                (a, b)
                for a in range(len(objs))
                for b in range(len(objs))
                if a != b and relation_holds(objs[a], rel, objs[b]) == want_yes
            ]
            if pairs:
                a, b = pairs[int(rng.integers(len(pairs)))]
                kinds = ("shape", "colour", "size", "loc")
                ra, rb = refer(a, objs, domain, rng, kinds), refer(b, objs, domain, rng, kinds)
                q = _pick(rng, YESNO_QUESTIONS).format(ra=ra, rel=rel, rb=rb)
                return q, "yes" if want_yes else "no"
        return None
    raise ValueError(f"unknown question type {qtype!r}")


# ---- minimal-pair captions ---------------------------------------------------------------------------


def desc_phrase(desc: dict[str, str]) -> str:
    """'a large red circle' from {'shape': 'circle', 'colour': 'red', 'size': 'large'}."""
    bits = [desc[k] for k in ("size", "colour") if desc.get(k)] + [desc["shape"]]
    return with_article(" ".join(bits))


def struct_caption(struct: dict[str, Any], domain: str) -> str:
    """Text of a structured description (see `scenes.holds`)."""
    if "counts" in struct:
        (s1, n1), (s2, n2) = struct["counts"].items()
        plural = SPECS[domain].plurals
        return NUMERAL_TEMPLATE.format(
            n1=COUNT_WORDS[n1], s1=plural[s1] if n1 > 1 else s1, n2=COUNT_WORDS[n2], s2=plural[s2] if n2 > 1 else s2
        )
    nps = [desc_phrase(d) for d in struct["objects"]]
    clauses = struct["clauses"]
    if len(clauses) == 1:
        i, rel, j = clauses[0]
        return f"{nps[i]} {rel} {nps[j]}"
    (_, r1, _), (_, r2, _) = clauses  # "A r1 B and r2 C": both clauses share subject 0
    return PREPOSITION_TEMPLATE.format(a=nps[0], r1=r1, b=nps[1], r2=r2, c=nps[2])


# ---- vocabulary --------------------------------------------------------------------------------------


def _template_words(t: str) -> set[str]:
    return set(words(re.sub(r"\{[a-z_0-9]*\}", " ", t)))


def vocabulary(generative: bool = True) -> list[str]:
    """Every word any caption, question, answer, expression, class prompt or pair caption can contain.

    `generative=False`: without the words only the generative tasks write (GQA questions, NLVR2 statements): the
    vocabulary the `tiny` CLIP's tokenizer was built from."""
    vocab: set[str] = {"a", "an"}
    texts: list[str] = [
        *SIZES,
        *ROW_NAMES,
        *COL_NAMES,
        *RELATIONS,
        *COUNT_WORDS,
        *YES_NO,
        *SINGLE_TEMPLATES,
        *MEDICAL_SINGLE_TEMPLATES,
        *PAIR_TEMPLATES,
        *TRIPLE_TEMPLATES,
        PHOTO_SHAPE_BY_COLOUR,
        *COUNT_QUESTIONS,
        COUNT_BY_COLOUR,
        *YESNO_QUESTIONS,
        LOC_TEMPLATE,
        *EXPRESSION_TEMPLATES,
        REL_REF_TEMPLATE,
        PREPOSITION_TEMPLATE,
        NUMERAL_TEMPLATE,
        *(VL_TEMPLATES if generative else ()),
    ]
    for qs in COLOUR_QUESTIONS.values():
        texts += qs
    for s in SPECS.values():
        texts += [
            *s.shapes,
            *s.plurals.values(),
            *s.colours,
            *s.prefixes,
            s.class_prompt,
            s.object_word,
            s.objects_word,
            *s.shape_question,
            s.region_suffix,
            *s.adjectives.values(),
        ]
    for t in texts:
        vocab |= _template_words(t)
    return sorted(vocab)
