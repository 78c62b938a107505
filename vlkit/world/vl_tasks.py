"""The world's generative tasks: captioning (several references per image), GQA-style compositional questions
and NLVR2-style statements about a pair of images.

- `captioning`: one to three objects; `caption` and `references` (five captions drawn with the caption
  templates and relations of `language.py`, the first being `caption`);
- `gqa`: two or three objects and a question that composes a relation with an attribute — what shape / what
  colour (or size) is the object related to another, is one object related to another (yes/no, balanced),
  which of two objects is bigger; `answer_type` names the question type, balanced in blocks;
- `nlvr2`: two scenes and a statement about the pair — a count in total, what both images contain, what
  exactly one image contains, or a relation in the left or right image; `label` is true for half of the
  examples exactly (balanced in blocks), and each statement is checked against the scenes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .domains import COUNT_WORDS, RELATIONS, SIZE_RANK, SIZES, SPECS
from .language import (
    GQA_ATTRIBUTE,
    GQA_COMPARE,
    GQA_SHAPE,
    GQA_VERIFY,
    NLVR_BOTH,
    NLVR_COUNT,
    NLVR_ONE,
    NLVR_SIDE,
    caption,
    refer,
)
from .render import render_scene
from .scenes import holds, relation_holds, sample_scene, scene_json

N_REFERENCES = 5
GQA_TYPES = ("relate_shape", "relate_attribute", "verify_relation", "compare_size")


def _kit(domain: str):
    s = SPECS[domain]
    return s, list(s.shapes), list(s.colours), list(SIZES)


def captioning_row(domain: str, rng: np.random.Generator, size: int) -> dict[str, Any]:
    _, shapes, colours, sizes = _kit(domain)
    objs = sample_scene(domain, rng, int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3])), shapes, colours, sizes)
    refs = [caption(domain, objs, rng) for _ in range(N_REFERENCES)]
    return {
        "image": render_scene(domain, objs, int(rng.integers(2**31)), size),
        "domain": domain,
        "scene": scene_json(objs),
        "caption": refs[0],
        "references": refs,
    }


def _unique_related(objs, rel: str, b: int) -> int | None:
    hits = [i for i, o in enumerate(objs) if i != b and relation_holds(o, rel, objs[b])]
    return hits[0] if len(hits) == 1 else None


def _gqa_question(domain: str, objs, rng: np.random.Generator, qtype: str, want_yes: bool):
    s = SPECS[domain]
    kinds = ("shape", "colour", "size", "loc")
    if qtype in ("relate_shape", "relate_attribute"):
        b = int(rng.integers(len(objs)))
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        a = _unique_related(objs, rel, b)
        if a is None:
            return None
        ref = refer(b, objs, domain, rng, kinds)
        if qtype == "relate_shape":
            return GQA_SHAPE.format(obj=s.object_word, rel=rel, ref=ref), objs[a].shape
        attr = "colour" if s.colours else "size"
        answer = objs[a].colour if s.colours else objs[a].size
        return GQA_ATTRIBUTE.format(attr=attr, shape=objs[a].shape, rel=rel, ref=ref), answer
    if qtype == "verify_relation":
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        pairs = [
            (a, b)
            for a in range(len(objs))
            for b in range(len(objs))
            if a != b and relation_holds(objs[a], rel, objs[b]) == want_yes
        ]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        q = GQA_VERIFY.format(ra=refer(a, objs, domain, rng, kinds), rel=rel, rb=refer(b, objs, domain, rng, kinds))
        return q, "yes" if want_yes else "no"
    a, b = (int(x) for x in rng.choice(len(objs), size=2, replace=False))
    if objs[a].shape == objs[b].shape or objs[a].size == objs[b].size:
        return None
    bigger = a if SIZE_RANK[objs[a].size] > SIZE_RANK[objs[b].size] else b
    return GQA_COMPARE.format(ra=objs[a].shape, rb=objs[b].shape), objs[bigger].shape


def gqa_row(domain: str, rng: np.random.Generator, slot: int, size: int) -> dict[str, Any]:
    _, shapes, colours, sizes = _kit(domain)
    qtype, want_yes = GQA_TYPES[slot // 2], slot % 2 == 0
    while True:
        objs = sample_scene(domain, rng, int(rng.integers(2, 4)), shapes, colours, sizes)
        qa = _gqa_question(domain, objs, rng, qtype, want_yes)
        if qa is not None:
            break
    q, a = qa
    return {
        "image": render_scene(domain, objs, int(rng.integers(2**31)), size),
        "domain": domain,
        "scene": scene_json(objs),
        "caption": caption(domain, objs, rng),
        "question": q,
        "answer": a,
        "answer_type": qtype,
    }


def _desc(o, domain: str, colour: bool) -> dict[str, str]:
    d = {"shape": o.shape}
    if colour and o.colour:
        d["colour"] = o.colour
    return d


def _phrase(d: dict[str, str]) -> str:
    words = " ".join([d[k] for k in ("colour",) if d.get(k)] + [d["shape"]])
    return ("an " if words[0] in "aeiou" else "a ") + words


def _statement(domain: str, scenes, rng: np.random.Generator) -> tuple[str, bool]:
    """A statement about the pair (drawn from the scenes, or with a random shape) and whether it holds."""
    s = SPECS[domain]
    kind = int(rng.integers(4))
    every = [o for objs in scenes for o in objs]
    pick = every[int(rng.integers(len(every)))]
    shape = pick.shape if rng.random() < 0.6 else str(rng.choice(list(s.shapes)))
    if kind == 0:
        n = int(rng.integers(1, 4))
        total = sum(o.shape == shape for o in every)
        noun = s.plurals[shape] if n > 1 else shape
        return NLVR_COUNT.format(be="is" if n == 1 else "are", n=COUNT_WORDS[n], plural=noun), total == n
    if kind in (1, 2):
        d = _desc(pick, domain, rng.random() < 0.5) if shape == pick.shape else {"shape": shape}
        has = [any(all(getattr(o, k) == v for k, v in d.items()) for o in objs) for objs in scenes]
        if kind == 1:
            return NLVR_BOTH.format(a=_phrase(d)), all(has)
        return NLVR_ONE.format(a=_phrase(d)), sum(has) == 1
    side = int(rng.integers(2))
    objs = scenes[side]
    if len(objs) < 2:
        return "", False
    i, j = (int(x) for x in rng.choice(len(objs), size=2, replace=False))
    rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
    da, db = _desc(objs[i], domain, True), _desc(objs[j], domain, False)
    if rng.random() < 0.3:
        db = {"shape": str(rng.choice(list(s.shapes)))}
    truth = holds({"objects": [da, db], "clauses": [(0, rel, 1)]}, objs)
    return NLVR_SIDE.format(side=("left", "right")[side], a=_phrase(da), rel=rel, b=_phrase(db)), truth


def nlvr2_row(domain: str, rng: np.random.Generator, want_true: bool, i: int, size: int) -> dict[str, Any]:
    _, shapes, colours, sizes = _kit(domain)
    while True:
        scenes = [sample_scene(domain, rng, int(rng.integers(1, 4)), shapes, colours, sizes) for _ in range(2)]
        for _ in range(30):
            text, truth = _statement(domain, scenes, rng)
            if text and truth == want_true:
                images = [render_scene(domain, objs, int(rng.integers(2**31)), size) for objs in scenes]
                return {
                    "id": i,
                    "image_0": images[0],
                    "image_1": images[1],
                    "sentence": text,
                    "label": truth,
                    "domain": domain,
                    "scene_0": scene_json(scenes[0]),
                    "scene_1": scene_json(scenes[1]),
                }


def vl_features(task: str) -> dict[str, Any] | None:
    """The extra columns of a generative world task (None for the other tasks)."""
    import datasets
    from datasets import Image, Value

    strings = getattr(datasets, "List", datasets.Sequence)(Value("string"))
    if task == "captioning":
        return {
            "image": Image(),
            "domain": Value("string"),
            "scene": Value("string"),
            "caption": Value("string"),
            "references": strings,
        }
    if task == "gqa":
        return {
            "image": Image(),
            "domain": Value("string"),
            "scene": Value("string"),
            "caption": Value("string"),
            "question": Value("string"),
            "answer": Value("string"),
            "answer_type": Value("string"),
        }
    if task == "nlvr2":
        return {
            "id": Value("int32"),
            "image_0": Image(),
            "image_1": Image(),
            "sentence": Value("string"),
            "label": Value("bool"),
            "domain": Value("string"),
            "scene_0": Value("string"),
            "scene_1": Value("string"),
        }
    return None
