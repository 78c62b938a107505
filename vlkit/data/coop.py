"""The dataset kind `coop`: CoOp's few-shot layout (Zhou et al.), as the published CLIP-adaptation tables use it.

    DATA/oxford_pets/
        images/...                     the per-dataset image folder (its name varies: images, 2750, jpg, ...)
        split_zhou_OxfordPets.json     {"train": [[relative path, label, classname], ...], "val": [...], "test": [...]}

    load_data("coop:DATA/oxford_pets", split="test")
    load_data({"kind": "coop", "source": "DATA/oxford_pets", "split": "train", "shots": 16, "seed": 1})

Options:
- `split`: train (default), val or test;
- `shots`: k examples per class (CoOp's protocol: drawn from the split with `seed`; every class needs k; on
  `val` CoOp uses min(k, 4), which the caller asks for by passing that k);
- `seed`: the seed of the draw (default 1, CoOp's first seed; in a recipe, the recipe's `seed` unless the spec
  gives one, with a note saying so: `vlkit.data.shots`); refused without `shots`;
- `image_dir`: the folder the JSON's paths are relative to (default: found: the dataset folder, or the one
  sub-folder where the first listed image exists);
- `name`: which `split_zhou_<Name>.json` when the folder holds several.

Columns: `image` (read lazily from its file) and `label` (a `datasets.ClassLabel` whose names are the JSON's
class names in label order), so `classification` takes the class names and prompts from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .api import few_shot
from .shots import check_shots

SPLITS = ("train", "val", "test")


@dataclass
class CoopOptions:
    """The options of the `coop` dataset kind, beside `split` (train, the default, val or test)."""

    shots: int | None = None
    """k examples per class, drawn from the split with seed (every class needs k); None: the whole split."""
    seed: int = 1
    """Seed of the few-shot draw (1: CoOp's first seed)."""
    image_dir: str | None = None
    """Folder the split file's image paths are relative to (relative to the dataset folder); None: the dataset
    folder, or its sub-folder that holds the first listed image."""
    name: str | None = None
    """Which split_zhou_<Name>.json to read when the folder holds several."""
    task: str | None = None
    """Set by vlkit: the task the data is loaded for (coop data has image and label columns only)."""


OPTIONS = tuple(f.name for f in fields(CoopOptions))


def _split_file(root: Path, name: str | None) -> Path:
    files = sorted(root.glob("split_zhou_*.json"))
    if name is not None:
        files = [f for f in files if f.stem == f"split_zhou_{name}"]
    if not files:
        raise DataError(
            f"coop:{root} has no split_zhou_{name or '<Name>'}.json (CoOp's split file)",
            hint="point coop: at the dataset folder that holds the split file and the images",
        )
    if len(files) > 1:
        names = ", ".join(f.stem[len("split_zhou_") :] for f in files)
        raise ConfigError(f"coop:{root} holds several split files ({names}); choose one with name=...")
    return files[0]


def _image_root(root: Path, first: str, image_dir: str | None) -> Path:
    if image_dir is not None:
        if not isinstance(image_dir, str) or not image_dir.strip():
            raise ConfigError(f"coop option image_dir must be a folder name, got {image_dir!r}")
        d = Path(image_dir).expanduser()
        d = d if d.is_absolute() else root / d
        if not d.is_dir():
            raise DataError(f"coop:{root}: image_dir {d} is not a folder")
        return d
    for d in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if (d / first).is_file():
            return d
    raise DataError(
        f"coop:{root}: the first listed image {first} is in neither the dataset folder nor one of its sub-folders",
        hint="give image_dir=FOLDER (the folder the split file's paths start in)",
    )


from .api import required_fields  # noqa: E402


def load_coop(source: str | None = None, *, split: str | None = None, **options: Any):
    import datasets

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown coop option(s) {', '.join(unknown)}; options: split, {', '.join(OPTIONS[:-1])}")
    shots, seed = _draw_options(options)
    task = options.get("task")
    if task is not None and not set(required_fields(task)) <= {"image", "label"}:
        raise ConfigError(f"the coop dataset kind holds image/label data; task {task!r} needs more")
    if not source:
        raise ConfigError("the coop dataset kind needs a folder: coop:DATA/<dataset>")
    root = Path(source).expanduser()
    if not root.is_dir():
        raise DataError(f"coop:{source} is not a folder")
    split = split or "train"
    if split not in SPLITS:
        raise ConfigError(f"coop split must be one of {', '.join(SPLITS)}, got {split!r}")
    sfile = _split_file(root, options.get("name"))
    try:
        table = json.loads(sfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{sfile} is not valid JSON: {exc}") from None
    if not isinstance(table, dict) or not all(isinstance(table.get(s), list) for s in SPLITS if s in table):
        raise DataError(f"{sfile} is not a CoOp split file (train/val/test lists of [path, label, classname])")
    if split not in table:
        raise DataError(f"{sfile} has no {split!r} list (has {', '.join(table)})")
    names: dict[int, str] = {}
    for s in SPLITS:  # the class names of every split, so train / val / test share one ClassLabel
        for i, item in enumerate(table.get(s, [])):
            if not (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], str)
                and item[0].strip()
                and isinstance(item[1], int)
                and not isinstance(item[1], bool)
                and item[1] >= 0
            ):
                raise DataError(f"{sfile}: {s}[{i}] is not [relative path, label, classname]")
            if names.setdefault(item[1], str(item[2])) != str(item[2]):
                raise DataError(f"{sfile}: label {item[1]} is named both {names[item[1]]!r} and {item[2]!r}")
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{sfile}: labels must be 0..{len(names) - 1}, got {sorted(names)[:5]}...")
    rows = table[split]
    if not rows:
        raise DataError(f"{sfile}: the {split} list is empty")
    images = _image_root(root, rows[0][0], options.get("image_dir"))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[names[i] for i in range(len(names))])}
    )
    ds = datasets.Dataset.from_dict(
        {"image": [str(images / r[0]) for r in rows], "label": [r[1] for r in rows]}, features=features
    )
    if shots is not None:
        ds = few_shot(ds, shots, seed=seed)
    return ds


def _draw_options(options: dict[str, Any]) -> tuple[int | None, int]:
    """(shots, seed), checked: integers, and no seed without shots (it would change nothing)."""

    shots, seed = options.get("shots"), options.get("seed")
    if shots is not None:
        check_shots(shots, "coop option shots")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"coop option seed must be an integer (the seed of the few-shot draw), got {seed!r}")
    if seed is not None and shots is None:
        raise ConfigError(
            f"coop option seed={seed} is the seed of the few-shot draw; without shots=k it changes nothing",
            hint="give shots=k too, or drop seed",
        )
    return shots, CoopOptions.seed if seed is None else seed
