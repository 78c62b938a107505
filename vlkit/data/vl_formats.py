"""Readers of the public vision-language datasets in their own file layouts (local files only):

- ``coco-captions:annotations/captions_val2014.json``: COCO captions (``images`` + ``annotations``); one row
  per image with ``caption`` (its first caption) and ``references`` (all of them), images from ``image_dir``
  (default: the folder named after the file's split, ``val2014/``, beside or above the annotations folder);
- ``vqav2:v2_OpenEnded_mscoco_val2014_questions.json``: VQAv2 questions, with the answers of the matching
  ``v2_mscoco_val2014_annotations.json`` (``annotations``): ``question``, ``answer`` (the
  multiple-choice answer), ``answers`` (the ten human answers), ``answer_type``; images
  ``COCO_<subtype>_<image id, 12 digits>.jpg``;
- ``gqa-questions:questions/testdev_balanced_questions.json``: GQA questions ({question id: {imageId, question,
  answer, fullAnswer, ...}}); images ``<imageId>.jpg`` in ``images/``;
- ``nlvr2-jsonl:data/dev.json``: NLVR2 (one JSON object a line: identifier, sentence, label, directory for
  train); ``image_0``/``image_1`` are ``<identifier without its last part>-img0.png``/``-img1.png`` under
  ``images/<split>/`` (train: ``images/train/<directory>/``).

Rows keep the datasets' ids. Every image path is checked to exist when the data loads (a stat, no decoding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .loaders import KindOptions, _int_option, _no_extra
from .manifest import check_image_exists


@dataclass
class VlFileOptions(KindOptions):
    """The options of the vision-language dataset readers (coco-captions, vqav2, gqa-questions, nlvr2-jsonl)."""

    image_dir: str | None = None
    """The folder of the images; None: found from the dataset's own layout next to the annotation file."""
    n: int | None = None
    """Read only the first n examples (in file order); None: all."""


@dataclass
class Vqav2Options(VlFileOptions):
    """The options of the `vqav2` dataset kind."""

    annotations: str | None = None
    """The annotations file (answers); None: the file the questions file's name implies, if it exists."""


def _json_file(kind: str, source: str | None) -> Path:
    if not source:
        raise ConfigError(f"the {kind} dataset kind needs its JSON file: {kind}:FILE")
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"{kind} file not found: {path}")
    return path


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None


def _image_dir(kind: str, path: Path, given: str | None, candidates: list[Path]) -> Path:
    if given:
        d = Path(given).expanduser()
        if not d.is_absolute():
            d = path.parent / d
        if not d.is_dir():
            raise DataError(f"{kind}: image_dir not found: {d}")
        return d
    for d in candidates:
        if d.is_dir():
            return d
    raise DataError(
        f"{kind}: cannot find the images of {path.name} (looked in {', '.join(str(c) for c in candidates)})",
        hint="give image_dir=",
    )


def _limit(rows: list, n: Any) -> list:
    if n is None:
        return rows
    n = _int_option("n", n)
    if n < 1:
        raise ConfigError(f"data option n must be at least 1, got {n}")
    return rows[:n]


def _dataset(columns: dict[str, list], image_columns: tuple[str, ...], lists: tuple[str, ...] = ()):
    import datasets
    from datasets import Features, Image, Value

    strings = getattr(datasets, "List", datasets.Sequence)(Value("string"))
    feats = {}
    for name, values in columns.items():
        if name in image_columns:
            feats[name] = Image()
        elif name in lists:
            feats[name] = strings
        elif values and isinstance(values[0], bool):
            feats[name] = Value("bool")
        elif values and isinstance(values[0], int):
            feats[name] = Value("int64")
        else:
            feats[name] = Value("string")
    return datasets.Dataset.from_dict(columns, features=Features(feats))


def _image(d: Path, name: str, where: str) -> str:
    p = d / name
    check_image_exists(p, where=where)
    return str(p)


def _split_of(name: str) -> str | None:
    for part in name.replace(".json", "").split("_"):
        if part.startswith(("train", "val", "test")):
            return part
    return None


def load_coco_captions(
    source: str | None = None,
    *,
    split: str | None = None,
    task: str | None = None,
    image_dir: str | None = None,
    n: Any = None,
    **options: Any,
):
    """COCO captions JSON (``images`` and ``annotations``): one row per image with all its captions."""
    _no_extra("coco-captions", options, VlFileOptions)
    path = _json_file("coco-captions", source)
    data = _load_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{path} is not a COCO captions file (it needs 'images' and 'annotations')")
    sub = _split_of(path.name) or ""
    images = _image_dir(
        "coco-captions",
        path,
        image_dir,
        [path.parent / sub, path.parent.parent / sub, path.parent / "images"]
        if sub
        else [path.parent / "images", path.parent],
    )
    caps: dict[Any, list[str]] = {}
    for a in data["annotations"]:
        caps.setdefault(a["image_id"], []).append(str(a["caption"]).strip())
    cols: dict[str, list] = {"image": [], "image_id": [], "caption": [], "references": []}
    for i, im in enumerate(_limit([im for im in data["images"] if caps.get(im["id"])], n)):
        cols["image"].append(_image(images, im["file_name"], f"{path}, image {i + 1}"))
        cols["image_id"].append(int(im["id"]))
        cols["caption"].append(caps[im["id"]][0])
        cols["references"].append(caps[im["id"]])
    if not cols["image"]:
        raise DataError(f"{path} has no captioned images")
    return _dataset(cols, ("image",), ("references",))


def _annotations_path(path: Path, given: str | None) -> Path | None:
    if given:
        p = Path(given).expanduser()
        if not p.is_absolute():
            p = path.parent / p
        if not p.is_file():
            raise DataError(f"vqav2 annotations file not found: {p}")
        return p
    guess = path.parent / path.name.replace("_OpenEnded", "").replace("_questions", "_annotations")
    return guess if guess.is_file() and guess != path else None


def load_vqav2(
    source: str | None = None,
    *,
    split: str | None = None,
    task: str | None = None,
    image_dir: str | None = None,
    n: Any = None,
    annotations: str | None = None,
    **options: Any,
):
    """VQAv2 questions JSON with its annotations (answers) JSON, images in COCO's layout."""
    _no_extra("vqav2", options, Vqav2Options)
    path = _json_file("vqav2", source)
    data = _load_json(path)
    if not isinstance(data, dict) or "questions" not in data:
        raise DataError(f"{path} is not a VQAv2 questions file (it needs 'questions')")
    sub = str(data.get("data_subtype") or _split_of(path.name.replace("mscoco_", "")) or "")
    images = _image_dir(
        "vqav2",
        path,
        image_dir,
        [path.parent / sub, path.parent.parent / sub, path.parent.parent / "images" / sub, path.parent / "images"],
    )
    ann_path = _annotations_path(path, annotations)
    answers: dict[Any, dict] = {}
    if ann_path is not None:
        answers = {a["question_id"]: a for a in _load_json(ann_path).get("annotations", [])}
    cols: dict[str, list] = {"image": [], "question_id": [], "question": []}
    if answers:
        cols.update(answer=[], answers=[], answer_type=[])
    for i, q in enumerate(_limit(data["questions"], n)):
        name = f"COCO_{sub}_{int(q['image_id']):012d}.jpg"
        cols["image"].append(_image(images, name, f"{path}, question {i + 1}"))
        cols["question_id"].append(int(q["question_id"]))
        cols["question"].append(str(q["question"]))
        if answers:
            a = answers.get(q["question_id"])
            if a is None:
                raise DataError(f"{ann_path} has no answers for question {q['question_id']}")
            cols["answer"].append(str(a["multiple_choice_answer"]))
            cols["answers"].append([str(x["answer"]) for x in a["answers"]])
            cols["answer_type"].append(str(a.get("answer_type") or ""))
    return _dataset(cols, ("image",), ("answers",))


def load_gqa(
    source: str | None = None,
    *,
    split: str | None = None,
    task: str | None = None,
    image_dir: str | None = None,
    n: Any = None,
    **options: Any,
):
    """GQA questions JSON ({question id: {imageId, question, answer, fullAnswer, types}}), images by imageId."""
    _no_extra("gqa-questions", options, VlFileOptions)
    path = _json_file("gqa-questions", source)
    data = _load_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "imageId" in v for v in data.values()):
        raise DataError(f"{path} is not a GQA questions file ({{question id: {{imageId, question, ...}}}})")
    images = _image_dir("gqa-questions", path, image_dir, [path.parent.parent / "images", path.parent / "images"])
    cols: dict[str, list] = {
        "image": [],
        "question_id": [],
        "question": [],
        "answer": [],
        "full_answer": [],
        "answer_type": [],
    }
    for i, (qid, q) in enumerate(_limit(list(data.items()), n)):
        cols["image"].append(_image(images, f"{q['imageId']}.jpg", f"{path}, question {qid}"))
        cols["question_id"].append(str(qid))
        cols["question"].append(str(q["question"]))
        if "answer" not in q:
            raise DataError(f"{path}: question {qid} has no answer (row {i + 1})")
        cols["answer"].append(str(q["answer"]))
        cols["full_answer"].append(str(q.get("fullAnswer") or ""))
        cols["answer_type"].append(str((q.get("types") or {}).get("structural") or ""))
    return _dataset(cols, ("image",))


def load_nlvr2(
    source: str | None = None,
    *,
    split: str | None = None,
    task: str | None = None,
    image_dir: str | None = None,
    n: Any = None,
    **options: Any,
):
    """NLVR2 JSON lines (identifier, sentence, label) with each example's left and right images."""
    _no_extra("nlvr2-jsonl", options, VlFileOptions)
    path = _json_file("nlvr2-jsonl", source)
    part = path.stem.split("_")[0]
    images = _image_dir(
        "nlvr2-jsonl",
        path,
        image_dir,
        [
            path.parent.parent / "images" / part,
            path.parent / "images" / part,
            path.parent / part,
            path.parent / "images",
        ],
    )
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {lineno} is not valid JSON: {exc.msg}") from None
    cols: dict[str, list] = {"identifier": [], "image_0": [], "image_1": [], "sentence": [], "label": []}
    for i, rec in enumerate(_limit(rows, n)):
        where = f"{path}, line {i + 1}"
        ident = str(rec.get("identifier") or "")
        if ident.count("-") < 3 or "sentence" not in rec or "label" not in rec:
            raise DataError(f"{where}: an NLVR2 example needs identifier (split-set-pair-sentence), sentence and label")
        folder = images / str(rec["directory"]) if rec.get("directory") is not None else images
        stem = ident.rsplit("-", 1)[0]
        cols["identifier"].append(ident)
        cols["image_0"].append(_image(folder, f"{stem}-img0.png", where))
        cols["image_1"].append(_image(folder, f"{stem}-img1.png", where))
        cols["sentence"].append(str(rec["sentence"]))
        cols["label"].append(str(rec["label"]).strip().lower())
    return _dataset(cols, ("image_0", "image_1"))
