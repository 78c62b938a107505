"""The ``webdataset`` kind: tar shards as img2dataset writes them and open_clip trains on, read through an index.

A shard is a plain (uncompressed) tar archive whose members are grouped into samples by key: the member name
up to the first dot of its basename (``000123.jpg``, ``000123.txt``, ``000123.json``, ``000123.cls`` are one
sample, key ``000123``; a folder inside the archive is part of the key). The image is the ``jpg``, ``jpeg``,
``png``, ``webp``, ``tif`` or ``tiff`` member; the caption comes from ``txt`` (else the json's ``caption`` or
``text``); the label from ``cls`` (an integer) or the json's ``label`` (integers, or names: a ClassLabel of the
sorted names); ``question``, ``answer``, ``expression`` and ``box`` come from the json when present.

    {kind: webdataset, shards: "/data/train-{0000..0099}.tar", task: retrieval}

``shards`` (or ``source``) is a path, a glob, a brace pattern (ranges ``{0000..0099}``, lists ``{a,b}``),
several of them joined by ``::`` or given as a list, or a folder of ``.tar`` files. ``{split}`` in a
pattern is replaced by the split (default ``train``); without it the shards are taken whole for any split.

Why an index over the standard `tarfile` module rather than the `webdataset` package: the package streams a
shard front to back, so shuffling needs a shuffle buffer, resuming means replaying the stream, and sharding
across DataLoader workers and DDP ranks is by whole shards. Here each shard's member headers are scanned once
(`tarfile` gives every member's data offset and size; no image byte is read at load) and the result is a
map-style `datasets.Dataset` whose ``image`` column holds ``{"shard", "offset", "size", "member"}``
references. Any row can then be read with one seek, so the trainer's seeded sampler shuffles globally,
resumes bit-exactly from a step and splits rows evenly across workers and ranks, exactly as for any other
kind; `vlkit.data.images` decodes the referenced bytes in the DataLoader workers.

Errors name the shard and the member: a shard that is missing or is not a tar archive, a key with no image,
a ``cls`` that is not an integer, a json that does not parse, a member cut short by a truncated archive.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, DataError
from .api import required_fields
from .loaders import KindOptions, _no_extra
from .manifest import parse_box

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff")
TEXT_EXTS = ("txt", "cls", "json")
JSON_FIELDS = ("question", "answer", "expression", "box")
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``a-{00..02}.tar`` → a-00.tar, a-01.tar, a-02.tar; ``{x,y}`` → x, y.

    Ranges keep the zero padding of their ends; a brace group that is neither a range nor a list stays as is.
    """
    for m in _BRACE.finditer(pattern):
        body = m.group(1)
        rng = _RANGE.match(body)
        if rng:
            lo, hi = rng.group(1), rng.group(2)
            width = max(len(lo), len(hi)) if lo.lstrip("-").startswith("0") or hi.lstrip("-").startswith("0") else 0
            step = 1 if int(hi) >= int(lo) else -1
            alts = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
        elif "," in body:
            alts = body.split(",")
        else:
            continue
        head, tail = pattern[: m.start()], pattern[m.end() :]
        return [out for alt in alts for out in expand_braces(head + alt + tail)]
    return [pattern]


def resolve_shards(shards: Any, split: str | None = None) -> list[str]:
    """The absolute shard paths a ``shards`` spec names, in order, each checked to exist."""
    if isinstance(shards, (str, os.PathLike)):
        patterns = os.fspath(shards).split("::")
    elif isinstance(shards, (list, tuple)):
        bad = [s for s in shards if not isinstance(s, (str, os.PathLike))]
        if bad or not shards:
            raise ConfigError(
                f"webdataset shards must be paths or patterns, got {bad[0]!r} in the list {shards!r}"
                if bad
                else "webdataset shards: the list is empty"
            )
        patterns = [os.fspath(s) for s in shards]
    else:
        raise ConfigError(f"webdataset shards must be a path, a pattern or a list of them, not {shards!r}")
    out: list[str] = []
    for pattern in (p.strip() for p in patterns):
        if not pattern:
            continue
        if "{split}" in pattern:
            pattern = pattern.replace("{split}", split or "train")
        for item in expand_braces(os.path.expanduser(pattern)):
            if glob.has_magic(item):
                found = sorted(glob.glob(item))
                if not found:
                    raise DataError(f"no webdataset shards match {item}")
            elif os.path.isdir(item):
                found = sorted(glob.glob(os.path.join(glob.escape(item), "*.tar")))
                if not found:
                    raise DataError(f"no .tar shards in folder {item}")
            elif os.path.isfile(item):
                found = [item]
            else:
                raise DataError(f"webdataset shard not found: {item}")
            out.extend(os.path.abspath(f) for f in found)
    if not out:
        raise ConfigError("the webdataset kind needs shards: {kind: webdataset, shards: /data/train-{0000..0099}.tar}")
    return list(dict.fromkeys(out))


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name: up to / after the first dot of its basename; None without a dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_shard(shard: str) -> dict[str, dict[str, tuple[str, int, int]]]:
    """{key: {ext: (member, data offset, size)}} of one shard, in archive order, from member headers only."""
    with open(shard, "rb") as fh:
        head = fh.read(6)
        end = fh.seek(0, os.SEEK_END)
    if head.startswith(COMPRESSED_MAGIC):
        raise DataError(
            f"shard {shard}: a compressed tar archive cannot be indexed (members are read by offset); "
            "decompress it to a plain .tar"
        )
    samples: dict[str, dict[str, tuple[str, int, int]]] = {}
    try:
        with tarfile.open(shard, mode="r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                parts = split_name(info.name)
                if parts is None:
                    continue
                key, ext = parts
                members = samples.setdefault(key, {})
                if ext in members:
                    raise DataError(f"shard {shard}, member {info.name}: key {key!r} already has a {ext!r} member")
                if info.offset_data + info.size > end:
                    raise DataError(
                        f"shard {shard}, member {info.name}: truncated (the archive ends before its {info.size} bytes)"
                    )
                members[ext] = (info.name, info.offset_data, info.size)
            if 0 < end - tf.offset < tarfile.BLOCKSIZE:  # tarfile stops quietly at a cut-off header
                raise DataError(
                    f"shard {shard}: truncated (the archive ends inside the member header at byte {tf.offset})"
                )
    except tarfile.TarError as exc:
        raise DataError(f"shard {shard}: not a tar archive ({exc})") from None
    return samples


def _read_texts(shard: str, samples: dict[str, dict[str, tuple[str, int, int]]]) -> dict[tuple[str, str], str]:
    """The text of every txt/cls/json member of a shard, read in offset order."""
    wanted = sorted(
        (m[1], m[2], m[0], key, ext)
        for key, members in samples.items()
        for ext, m in members.items()
        if ext in TEXT_EXTS
    )
    out: dict[tuple[str, str], str] = {}
    with open(shard, "rb") as fh:
        for offset, size, member, key, ext in wanted:
            fh.seek(offset)
            try:
                out[key, ext] = fh.read(size).decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"shard {shard}, member {member}: not UTF-8 text") from None
    return out


def _sample_row(shard: str, key: str, members: dict[str, tuple[str, int, int]], texts: dict) -> dict[str, Any]:
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    if image_ext is None:
        names = ", ".join(m[0] for m in members.values())
        raise DataError(f"shard {shard}, member {names}: key {key!r} has no image member ({', '.join(IMAGE_EXTS)})")
    member, offset, size = members[image_ext]
    row: dict[str, Any] = {"image": {"shard": shard, "offset": offset, "size": size, "member": member}}
    meta: dict[str, Any] = {}
    if "json" in members:
        where = f"shard {shard}, member {members['json'][0]}"
        try:
            meta = json.loads(texts[key, "json"])
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON: {exc.msg}") from None
        if not isinstance(meta, dict):
            raise DataError(f"{where}: not a JSON object")
    if "txt" in members:
        row["caption"] = texts[key, "txt"].strip()
    elif isinstance(caption := meta.get("caption") or meta.get("text"), str):
        row["caption"] = caption.strip()
    if "cls" in members:
        text = texts[key, "cls"].strip()
        if not re.fullmatch(r"-?\d+", text):
            raise DataError(f"shard {shard}, member {members['cls'][0]}: label {text[:40]!r} is not an integer")
        row["label"] = int(text)
    elif meta.get("label") is not None:
        label = meta["label"]
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise DataError(
                f"shard {shard}, member {members['json'][0]}: label must be an integer or a name, got {label!r}"
            )
        row["label"] = label
    for field in JSON_FIELDS:
        if meta.get(field) is not None:
            row[field] = meta[field]
    if "box" in row:
        row["box"] = parse_box(row["box"], where=f"shard {shard}, member {members['json'][0]}")
    return row


def _where(row: dict[str, Any]) -> str:
    return f"shard {row['__shard__']}, member {row['image']['member']}"


def _label_column(rows: list[dict[str, Any]]):
    """(values, feature): int64 for integer labels, a ClassLabel of the sorted names for string labels."""
    import datasets

    values = [r.get("label") for r in rows]
    names = {v for v in values if isinstance(v, str)}
    if not names:
        return values, datasets.Value("int64")
    mixed = next((r for r in rows if isinstance(r.get("label"), int)), None)
    if mixed is not None:
        raise DataError(
            f"{_where(mixed)}: label {mixed['label']!r} is an integer but other samples name their "
            f"labels ({sorted(names)[0]!r}, ...)"
        )
    order = sorted(names)
    index = {n: i for i, n in enumerate(order)}
    return [index[v] if v is not None else None for v in values], datasets.ClassLabel(names=order)


def build_dataset(rows: list[dict[str, Any]]):
    """A map-style `datasets.Dataset` of indexed samples (image = tar reference struct, not datasets.Image)."""
    import datasets

    string = datasets.Value("string")
    ref = {"shard": string, "offset": datasets.Value("int64"), "size": datasets.Value("int64"), "member": string}
    features: dict[str, Any] = {"image": ref}
    columns: dict[str, list[Any]] = {"image": [r["image"] for r in rows]}
    for name in ("caption", "label") + JSON_FIELDS:
        if not any(name in r for r in rows):
            continue
        if name == "label":
            columns[name], features[name] = _label_column(rows)
            continue
        columns[name] = [r.get(name) for r in rows]
        if name == "box":
            seq = getattr(datasets, "List", None) or datasets.Sequence
            features[name] = seq(datasets.Value("float32"), length=4)
        else:
            bad = next((r for r in rows if name in r and not isinstance(r[name], str)), None)
            if bad is not None:
                raise DataError(f"{_where(bad)}: {name} must be text, got {bad[name]!r}")
            features[name] = string
    for name in ("__key__", "__shard__"):
        columns[name], features[name] = [r[name] for r in rows], string
    return _from_columns(columns, datasets.Features(features))


def _from_columns(columns: dict[str, list[Any]], features):
    """`Dataset.from_dict` fed typed arrow arrays (row-by-row feature encoding costs seconds at 20k rows)."""
    import datasets
    import pyarrow as pa

    schema = features.arrow_schema
    ds = datasets.Dataset.from_dict({c: pa.array(v, type=schema.field(c).type) for c, v in columns.items()})
    return ds if ds.features == features else ds.cast(features)


def index_shards(shards: list[str], *, required: tuple[str, ...] = (), task: str | None = None):
    """Index `shards` into one Dataset; every sample must fill `required` (the task's columns)."""
    rows: list[dict[str, Any]] = []
    for shard in shards:
        samples = scan_shard(shard)
        texts = _read_texts(shard, samples)
        for key, members in samples.items():
            row = _sample_row(shard, key, members, texts)
            row["__key__"], row["__shard__"] = key, shard
            for field in required:
                if field != "image" and row.get(field) is None:
                    have = ", ".join(m[0] for m in members.values())
                    raise DataError(
                        f"shard {shard}, member {row['image']['member']}: key {key!r} has no "
                        f"{field!r} (required for task {task!r}; members: {have})"
                    )
            rows.append(row)
    if not rows:
        raise DataError(
            f"no samples in webdataset shards {shards[0]}"
            + (f" (and {len(shards) - 1} more)" if len(shards) > 1 else "")
        )
    return build_dataset(rows)


@dataclass
class WebdatasetOptions(KindOptions):
    """The options of the `webdataset` dataset kind."""

    shards: str | list[str] | None = None
    """The tar shards, instead of the source: a brace pattern (/data/train-{0000..0099}.tar), a glob, a folder
    of .tar files, several joined by ::, or a list; {split} in a pattern becomes the split (default train)."""


def load_webdataset(
    source: str | None = None, *, split: str | None = None, shards: Any = None, task: str | None = None, **options: Any
):
    """Tar shards (img2dataset / open_clip layout) as a map-style Dataset of tar member references."""

    _no_extra("webdataset", options, WebdatasetOptions)
    if source is not None and shards is not None and os.fspath(source) != shards:
        raise ConfigError(f"webdataset spec gives both source={source!r} and shards={shards!r}")
    spec = shards if shards is not None else source
    if spec is None:
        raise ConfigError("the webdataset kind needs shards: {kind: webdataset, shards: /data/train-{0000..0099}.tar}")
    required = required_fields(task) if task else ()
    unsupported = [f for f in required if f.startswith("image_")]
    if unsupported:
        raise ConfigError(f"webdataset samples hold one image; task {task!r} needs {', '.join(unsupported)}")
    return index_shards(resolve_shards(spec, split), required=required, task=task)


__all__ = ["expand_braces", "resolve_shards", "scan_shard", "index_shards", "load_webdataset", "WebdatasetOptions"]
