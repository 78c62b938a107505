"""`generate`: the world's tasks as Hugging Face `datasets.Dataset` objects.

Example ``i`` is drawn from ``numpy.random.default_rng([seed, domain_id, task_id, i])`` (stable integers, no
``hash()``), so any example can be regenerated alone and the output is byte-identical across processes.
Quantities that must be balanced exactly (class labels, photo colours, VQA question types and yes/no
answers, Winoground collapsed tags) come from a shuffled block design: a permutation of the options drawn
from ``[seed, domain_id, task_id, block, salt]`` for each block of consecutive examples.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from vlkit import __version__

from ..errors import ConfigError
from .domains import DOMAIN_IDS, DOMAINS, SIZES, SPECS, TASK_IDS, TASKS, answer_set, class_names, vqa_answer_types
from .language import caption, expression, question
from .render import render_scene
from .scenes import sample_scene, scene_json
from .vl_tasks import GQA_TYPES, captioning_row, gqa_row, nlvr2_row, vl_features
from .winoground import COLLAPSED, make_pair

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024


def example_rng(seed: int, domain: str, task: str, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, DOMAIN_IDS[domain], TASK_IDS[task], i])


def balanced(seed: int, domain: str, task: str, i: int, k: int, salt: int) -> int:
    """Index in range(k) for example i such that every block of k consecutive examples uses each once."""
    perm = np.random.default_rng([seed, DOMAIN_IDS[domain], TASK_IDS[task], i // k, salt]).permutation(k)
    return int(perm[i % k])


def check_args(domain: str, task: str, n: int, seed: int, image_size: int) -> None:

    if domain not in DOMAINS:
        raise ConfigError(f"unknown world domain {domain!r}; domains: {', '.join(DOMAINS)}")
    if task not in TASKS:
        raise ConfigError(f"unknown world task {task!r}; tasks: {', '.join(TASKS)}")
    for name, value in (("n", n), ("seed", seed), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"world {name} must be an integer, got {value!r}")
    if n < 1:
        raise ConfigError(f"world n must be at least 1, got {n}")
    if seed < 0:
        raise ConfigError(f"world seed must be >= 0, got {seed}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"world image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size}")


def _classification(domain: str, seed: int, i: int, size: int) -> dict[str, Any]:
    s = SPECS[domain]
    rng = example_rng(seed, domain, "classification", i)
    label = balanced(seed, domain, "classification", i, len(s.shapes), salt=1)
    pin = {"shape": s.shapes[label], "size": str(rng.choice(SIZES))}
    if s.colours:
        pin["colour"] = s.colours[balanced(seed, domain, "classification", i, len(s.colours), salt=2)]
    objs = sample_scene(domain, rng, 1, list(s.shapes), list(s.colours), list(SIZES), fixed=[pin])
    o = objs[0]
    row = {
        "image": render_scene(domain, objs, int(rng.integers(2**31)), size),
        "domain": domain,
        "scene": scene_json(objs),
        "caption": caption(domain, objs, rng),
        "label": label,
        "shape": o.shape,
    }
    if s.colours:
        row["colour"] = o.colour
    row.update(size=o.size, region=o.region)
    return row


def _multi(domain: str, task: str, seed: int, i: int, size: int) -> dict[str, Any]:
    s = SPECS[domain]
    rng = example_rng(seed, domain, task, i)
    shapes, colours, sizes = list(s.shapes), list(s.colours), list(SIZES)
    extra: dict[str, Any] = {}
    if task == "retrieval":
        objs = sample_scene(domain, rng, int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3])), shapes, colours, sizes)
    elif task in ("vqa", "vqa-gen"):
        types = vqa_answer_types(domain)
        slot = balanced(seed, domain, task, i, 2 * len(types), salt=3)
        qtype, want_yes = types[slot // 2], slot % 2 == 0
        while True:
            k = int(rng.integers(2, 4)) if qtype == "yesno_relation" else int(rng.integers(1, 4))
            objs = sample_scene(domain, rng, k, shapes, colours, sizes)
            qa = question(domain, objs, rng, qtype, want_yes)
            if qa is not None:
                break
        q, a = qa
        extra = {"question": q, "answer": a, "answer_type": qtype, "answer_id": answer_set(domain).index(a)}
    else:  # grounding: 2-3 objects, half the time the target shares its shape with a distractor
        k = int(rng.integers(2, 4))
        fixed: list[dict[str, str]] = []
        if rng.random() < 0.5:
            shared = str(rng.choice(shapes))
            fixed = [{"shape": shared}, {"shape": shared}]
        objs = sample_scene(domain, rng, k, shapes, colours, sizes, fixed=fixed)
        t = int(rng.integers(k))
        extra = {"expression": expression(t, objs, domain, rng), "box": [round(v, 4) for v in objs[t].box], "target": t}
    row = {
        "image": render_scene(domain, objs, int(rng.integers(2**31)), size),
        "domain": domain,
        "scene": scene_json(objs),
        "caption": caption(domain, objs, rng),
    }
    row.update(extra)
    return row


def _winoground(domain: str, seed: int, i: int, size: int) -> dict[str, Any]:
    rng = example_rng(seed, domain, "winoground", i)
    collapsed = COLLAPSED[balanced(seed, domain, "winoground", i, len(COLLAPSED), salt=4)]
    pair = make_pair(domain, collapsed, rng)
    c0, c1 = pair.captions(domain)
    return {
        "id": i,
        "image_0": render_scene(domain, pair.objs_0, pair.bg_seed, size),
        "image_1": render_scene(domain, pair.objs_1, pair.bg_seed, size),
        "caption_0": c0,
        "caption_1": c1,
        "tag": pair.tag,
        "secondary_tag": pair.secondary_tag,
        "num_main_preds": pair.num_main_preds,
        "collapsed_tag": pair.collapsed,
    }


def _generative(domain: str, task: str, seed: int, i: int, size: int) -> dict[str, Any]:
    rng = example_rng(seed, domain, task, i)
    if task == "captioning":
        return captioning_row(domain, rng, size)
    if task == "gqa":
        return gqa_row(domain, rng, balanced(seed, domain, task, i, 2 * len(GQA_TYPES), salt=5), size)
    return nlvr2_row(domain, rng, balanced(seed, domain, task, i, 2, salt=6) == 0, i, size)


def features(domain: str, task: str):
    """The `datasets.Features` of a generated dataset."""
    import datasets
    from datasets import ClassLabel, Features, Image, Value

    if vl_features(task) is not None:
        return Features(vl_features(task))
    if task == "winoground":
        return Features(
            {
                "id": Value("int32"),
                "image_0": Image(),
                "image_1": Image(),
                "caption_0": Value("string"),
                "caption_1": Value("string"),
                "tag": Value("string"),
                "secondary_tag": Value("string"),
                "num_main_preds": Value("int32"),
                "collapsed_tag": Value("string"),
            }
        )
    f: dict[str, Any] = {
        "image": Image(),
        "domain": Value("string"),
        "scene": Value("string"),
        "caption": Value("string"),
    }
    if task == "classification":
        f["label"] = ClassLabel(names=class_names(domain))
        f["shape"] = Value("string")
        if SPECS[domain].colours:
            f["colour"] = Value("string")
        f.update(size=Value("string"), region=Value("string"))
    elif task in ("vqa", "vqa-gen"):
        f.update(
            question=Value("string"), answer=Value("string"), answer_type=Value("string"), answer_id=Value("int64")
        )
    elif task == "grounding":
        list_type = getattr(datasets, "List", None)
        box = list_type(Value("float64"), length=4) if list_type else datasets.Sequence(Value("float64"), length=4)
        f.update(expression=Value("string"), box=box, target=Value("int64"))
    return Features(f)


def world_info(domain: str, task: str, n: int, seed: int, image_size: int) -> dict[str, Any]:
    """What `write` records in world.json (also kept as JSON in the dataset's info.description)."""

    return {
        "world": "vlkit procedural world",
        "domain": domain,
        "task": task,
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "class_names": class_names(domain),
        "answer_set": answer_set(domain),
        "vlkit_version": __version__,
    }


def generate_rows(domain: str, task: str, n: int, seed: int = 0, image_size: int = 64, start: int = 0):
    """Yield examples start..start+n-1 as dicts (PIL images, not yet encoded)."""
    check_args(domain, task, n, seed, image_size)
    for i in range(start, start + n):
        if task == "classification":
            yield _classification(domain, seed, i, image_size)
        elif task in ("captioning", "gqa", "nlvr2"):
            yield _generative(domain, task, seed, i, image_size)
        elif task == "winoground":
            yield _winoground(domain, seed, i, image_size)
        else:
            yield _multi(domain, task, seed, i, image_size)


def generate(domain: str, task: str, n: int, seed: int = 0, image_size: int = 64):
    """`n` examples of `task` in `domain` as a `datasets.Dataset` (deterministic in seed and index)."""
    import datasets

    check_args(domain, task, n, seed, image_size)
    feats = features(domain, task)
    columns: dict[str, list[Any]] = {name: [] for name in feats}
    for row in generate_rows(domain, task, n, seed, image_size):
        for name in feats:
            columns[name].append(row[name])
    info = datasets.DatasetInfo(
        description=json.dumps(world_info(domain, task, n, seed, image_size)),
        dataset_name=f"vlkit-world-{domain}-{task}",
        features=feats,
    )
    return datasets.Dataset.from_dict(columns, features=feats, info=info)
