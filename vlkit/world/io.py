"""Writing generated datasets to disk, and reading them back.

Single-image tasks use the Hugging Face *imagefolder* layout::

    out_dir/images/00000.png ...
    out_dir/metadata.jsonl      {"file_name": "images/00000.png", "domain": ..., "caption": ..., "label": 3,
                                 "label_name": "star", ...}
    out_dir/world.json          domain, task, n, seed, image_size, class_names, answer_set, vlkit version

so ``datasets.load_dataset("imagefolder", data_dir=out_dir, split="train")`` loads it with images. Winoground
pairs use the layout of the official Winoground repository::

    out_dir/images/ex_{id}_img_{0,1}.png
    out_dir/examples.jsonl      {"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1", "caption_0": ...}

Every file is written to a temporary name and renamed into place, images first and manifests last, so a
reader never sees a half-written manifest or a manifest that names a missing image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlkit import __version__

from ..errors import ConfigError, DataError
from ..io import write_json, write_text
from .domains import TASKS, answer_set, class_names

MANIFESTS = ("metadata.jsonl", "examples.jsonl")
PAIR_COLUMNS = (
    "id",
    "image_0",
    "image_1",
    "caption_0",
    "caption_1",
    "tag",
    "secondary_tag",
    "num_main_preds",
    "collapsed_tag",
)


def _replace_bytes(path: Path, data: bytes) -> None:
    """Cheap atomic write for the many image files (no fsync; manifests use vlkit.io with fsync)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _png_bytes(value: Any) -> bytes:
    """PNG bytes of an image cell read with decode=False ({'bytes', 'path'}) or a PIL image."""
    import io

    from PIL import Image

    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path"):
            data = Path(value["path"]).read_bytes()
        if data is None:
            raise DataError("an image cell has neither bytes nor a path")
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return data
        value = Image.open(io.BytesIO(data))
    buf = io.BytesIO()
    value.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _info(ds, task: str) -> dict[str, Any]:

    try:
        info = json.loads(ds.info.description or "{}")
    except (TypeError, ValueError, AttributeError):
        info = {}
    if not isinstance(info, dict):
        info = {}
    info["task"] = task
    info["n"] = len(ds)
    if "domain" not in info and "domain" in ds.column_names and len(ds):
        info["domain"] = ds[0]["domain"]
    if info.get("domain") in ("photo", "medical", "satellite", "sketch"):
        info.setdefault("class_names", class_names(info["domain"]))
        info.setdefault("answer_set", answer_set(info["domain"]))
    info.setdefault("vlkit_version", __version__)
    return info


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


def write(ds, out_dir: str | os.PathLike, task: str) -> Path:
    """Write `ds` (from `generate`) as PNGs plus a manifest under `out_dir`; returns the manifest path."""
    from datasets import ClassLabel, Image

    if task not in TASKS:
        raise ConfigError(f"unknown world task {task!r}; tasks: {', '.join(TASKS)}")
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    if task in ("winoground", "nlvr2"):  # two images per example
        cols = PAIR_COLUMNS if task == "winoground" else tuple(ds.column_names)
        missing = [c for c in (*cols, "id", "image_0", "image_1") if c not in ds.column_names]
        if missing:
            raise DataError(f"{task} dataset lacks column(s) {', '.join(missing)}")
        raw = ds.cast_column("image_0", Image(decode=False)).cast_column("image_1", Image(decode=False))
        for row in raw:
            rec: dict[str, Any] = {c: _jsonable(row[c]) for c in cols}
            for col in ("image_0", "image_1"):
                stem = f"ex_{rec['id']}_img_{col[-1]}"
                _replace_bytes(images / f"{stem}.png", _png_bytes(row[col]))
                rec[col] = stem
            lines.append(json.dumps(rec))
        manifest = out / "examples.jsonl"
    else:
        if "image" not in ds.column_names:
            raise DataError(f"a {task} dataset needs an 'image' column; columns: {', '.join(ds.column_names)}")
        label_feature = ds.features.get("label")
        names = label_feature.names if isinstance(label_feature, ClassLabel) else None
        raw = ds.cast_column("image", Image(decode=False))
        width = max(5, len(str(len(ds) - 1)))
        for k, row in enumerate(raw):
            rel = f"images/{k:0{width}d}.png"
            _replace_bytes(out / rel, _png_bytes(row.pop("image")))
            rec = {"file_name": rel}
            for c, v in row.items():
                rec[c] = _jsonable(v)
                if c == "label" and names is not None:
                    rec["label_name"] = names[int(v)]
            lines.append(json.dumps(rec))
        manifest = out / "metadata.jsonl"
    write_text(manifest, "".join(line + "\n" for line in lines))
    write_json(out / "world.json", _info(ds, task))
    return manifest


def find_manifest(out_dir: str | os.PathLike) -> Path:

    d = Path(out_dir)
    if not d.is_dir():
        raise DataError(f"{d} is not a directory")
    for name in MANIFESTS:
        if (d / name).is_file():
            return d / name
    raise DataError(f"no world manifest in {d} (expected {' or '.join(MANIFESTS)})")


def read(out_dir: str | os.PathLike):
    """Load a directory written by `write` as a `datasets.Dataset` (images decoded lazily from the PNGs)."""
    import datasets
    from datasets import ClassLabel, Image

    d = Path(out_dir)
    manifest = find_manifest(d)
    try:
        rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as exc:
        raise DataError(f"{manifest}: not valid JSON lines ({exc})") from None
    if not rows:
        raise DataError(f"{manifest} has no examples")
    info = {}
    if (d / "world.json").is_file():
        try:
            info = json.loads((d / "world.json").read_text(encoding="utf-8"))
        except ValueError:
            info = {}
    if not isinstance(info, dict):
        info = {}
    needed = ("image_0", "image_1") if manifest.name == "examples.jsonl" else ("file_name",)
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise DataError(f"{manifest}: row {i} is not a JSON object")
        bad = next((c for c in needed if isinstance(r.get(c), bool) or not isinstance(r.get(c), (str, int))), None)
        if bad is not None:
            raise DataError(f"{manifest}: row {i} has no {bad!r} (the image's name)")
    if manifest.name == "examples.jsonl":
        image_cols: tuple[str, ...] = ("image_0", "image_1")
        for r in rows:
            for c in image_cols:
                r[c] = str(d / "images" / f"{r[c]}.png")
    else:
        image_cols = ("image",)
        for r in rows:
            r["image"] = str(d / str(r.pop("file_name")))
            r.pop("label_name", None)
    columns = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)}
    for c in image_cols:
        missing = [p for p in columns[c] if not Path(p).is_file()]
        if missing:
            raise DataError(f"{manifest} names {len(missing)} missing image(s), e.g. {missing[0]}")
    try:
        ds = datasets.Dataset.from_dict(columns)
        for c in image_cols:
            ds = ds.cast_column(c, Image())
        if "label" in columns and info.get("class_names") and manifest.name != "examples.jsonl":
            ds = ds.cast_column("label", ClassLabel(names=info["class_names"]))
    except (ValueError, TypeError, KeyError) as exc:  # pyarrow's mixed-type columns are ValueErrors too
        raise DataError(f"{manifest}: the rows do not make one table ({' '.join(str(exc).split())[:200]})") from None
    return ds
