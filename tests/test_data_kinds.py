"""Dataset kinds on local files the tests write: parquet, imagefolder, hf on local directories (save_to_disk,
data directories, streaming), webdataset tar shards, and the options each kind rejects."""
from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
from PIL import Image  # noqa: E402

from vlkit.data import load_data, validate  # noqa: E402
from vlkit.data.images import ImageReader  # noqa: E402
from vlkit.data.webdataset import expand_braces, resolve_shards  # noqa: E402
from vlkit.errors import ConfigError, DataError  # noqa: E402


def image(seed: int, size=(8, 6), mode="RGB") -> Image.Image:
    """A small image with distinct pixels per seed (noise, so PNG round trips are a real check)."""
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 4 if mode == "RGBA" else 3), np.uint8)
    return Image.fromarray(arr, mode)


def encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def captions_ds(n=3, labels=True):
    cols = {"image": [encode(image(i), "PNG") for i in range(n)], "caption": [f"caption {i}" for i in range(n)]}
    feats = {"image": datasets.Image(), "caption": datasets.Value("string")}
    if labels:
        cols["label"] = [i % 2 for i in range(n)]
        feats["label"] = datasets.ClassLabel(names=["cat", "dog"])
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


# ---------------------------------------------------------------- parquet and imagefolder

def test_parquet_written_by_datasets_for_retrieval_and_classification(tmp_path):
    path = tmp_path / "train.parquet"
    captions_ds(4).to_parquet(str(path))
    ret = load_data(f"parquet:{path}", task="retrieval")
    assert ret["caption"] == [f"caption {i}" for i in range(4)]
    assert (pixels(ret[2]["image"]) == pixels(image(2))).all()
    cls = load_data({"kind": "parquet", "source": str(path), "task": "classification"})
    assert cls["label"] == [0, 1, 0, 1]
    reader = ImageReader(cls, "image", f"parquet:{path}")
    assert (pixels(reader.read([3])[0]) == pixels(image(3))).all()
    some = load_data(f"parquet:{path}", columns=["image", "caption"])  # a supported option still passes
    assert some.column_names == ["image", "caption"]


def test_imagefolder_class_folders_and_metadata(tmp_path):
    for i, name in enumerate(["cat", "dog", "cat"]):
        (tmp_path / "cls" / name).mkdir(parents=True, exist_ok=True)
        image(i).save(tmp_path / "cls" / name / f"{i}.png")
    ds = load_data(f"imagefolder:{tmp_path / 'cls'}", task="classification")
    assert ds.features["label"].names == ["cat", "dog"] and sorted(ds["label"]) == [0, 0, 1]
    caps = tmp_path / "caps"
    caps.mkdir()
    image(5).save(caps / "a.png")
    (caps / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "five"}) + "\n")
    ds = load_data(f"imagefolder:{caps}", task="retrieval")
    assert ds["caption"] == ["five"] and (pixels(ds[0]["image"]) == pixels(image(5))).all()


# ---------------------------------------------------------------- unknown options

def test_unknown_options_name_the_kind_and_the_options(tmp_path):
    pq = tmp_path / "x.parquet"
    captions_ds(2).to_parquet(str(pq))
    (tmp_path / "folder" / "cat").mkdir(parents=True)
    image(0).save(tmp_path / "folder" / "cat" / "0.png")
    image(0).save(tmp_path / "a.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "caption": "c"}) + "\n")
    shard = write_shard(tmp_path / "s.tar", [("k0", {"png": encode(image(0), "PNG"), "txt": b"c"})])
    saved = tmp_path / "saved"
    captions_ds(2).save_to_disk(str(saved))
    for kind, source in (("parquet", pq), ("imagefolder", tmp_path / "folder"), ("manifest", manifest),
                         ("webdataset", shard), ("hf", saved)):
        with pytest.raises(ConfigError) as info:
            load_data({"kind": kind, "source": str(source), "domain": "medical", "n": 4, "seed": 0})
        assert str(info.value) == f"unknown option(s) for dataset kind {kind!r}: domain, n, seed"
    with pytest.raises(ConfigError, match=r"unknown option\(s\) for dataset kind 'parquet': shards$"):
        load_data(f"parquet:{pq}", shards="x")


# ---------------------------------------------------------------- hf on local paths, streaming

def test_hf_on_save_to_disk_dataset_and_dataset_dict(tmp_path):
    captions_ds(3).save_to_disk(str(tmp_path / "one"))
    ds = load_data(f"hf:{tmp_path / 'one'}", task="classification")
    assert isinstance(ds, datasets.Dataset) and ds["caption"] == ["caption 0", "caption 1", "caption 2"]
    assert ds[1]["image"].mode == "RGB" and (pixels(ds[1]["image"]) == pixels(image(1))).all()

    dd = datasets.DatasetDict({"train": captions_ds(3), "test": captions_ds(2, labels=False)})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(load_data(f"hf:{tmp_path / 'dict'}")) == 3  # train by default
    test = load_data({"kind": "hf", "source": str(tmp_path / "dict"), "split": "test", "task": "retrieval"})
    assert len(test) == 2
    with pytest.raises(DataError, match=r"has no split 'validation'; splits: train, test"):
        load_data(f"hf:{tmp_path / 'dict'}", split="validation")
    with pytest.raises(DataError, match=r"has no column 'label' required for task 'classification'"):
        load_data(f"hf:{tmp_path / 'dict'}", split="test", task="classification")
    with pytest.raises(DataError, match="hf local path not found"):
        load_data(f"hf:{tmp_path / 'nowhere'}")


def test_hf_on_local_data_directory(tmp_path):
    (tmp_path / "data").mkdir()
    captions_ds(3).to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    captions_ds(2).to_parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"))
    ds = load_data(f"hf:{tmp_path}", task="retrieval")
    assert isinstance(ds, datasets.Dataset) and len(ds) == 3
    assert len(load_data(f"hf:{tmp_path}", split="test")) == 2


def test_streaming_returns_an_iterable_dataset_whose_rows_decode(tmp_path):
    captions_ds(3).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "dir").mkdir()
    captions_ds(3).to_parquet(str(tmp_path / "dir" / "train.parquet"))
    for source in (tmp_path / "saved", tmp_path / "dir"):
        ds = load_data({"kind": "hf", "source": str(source), "streaming": True, "task": "classification"})
        assert isinstance(ds, datasets.IterableDataset)
        rows = list(ds)
        assert [r["caption"] for r in rows] == ["caption 0", "caption 1", "caption 2"]
        assert all(isinstance(r["image"], Image.Image) and r["image"].mode == "RGB" for r in rows)
        assert (pixels(rows[2]["image"]) == pixels(image(2))).all()
        with pytest.raises(DataError, match=r"streaming dataset .* has no column 'question' required for task"):
            load_data({"kind": "hf", "source": str(source), "streaming": "true", "task": "vqa"})


# ---------------------------------------------------------------- webdataset shards

def write_shard(path: Path, samples, *, extra=()) -> Path:
    """A tar shard of (key, {ext: bytes}) samples, members in key order like img2dataset writes them."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path):
    """Three shards: jpg+txt+cls, png+txt+cls, png+json (caption and integer label)."""
    d = tmp_path / "wds"
    d.mkdir()
    write_shard(d / "train-0000.tar", [(f"{i:06d}", {"jpg": encode(image(i), "JPEG"), "txt": f"jpeg {i}\n".encode(),
                                                     "cls": str(i % 3).encode()}) for i in range(3)])
    write_shard(d / "train-0001.tar", [(f"{i:06d}", {"png": encode(image(i), "PNG"), "txt": f"png {i}".encode(),
                                                     "cls": f"{i % 3}\n".encode()}) for i in range(3, 6)])
    write_shard(d / "train-0002.tar", [(f"{i:06d}", {"png": encode(image(i, mode="RGBA"), "PNG"),
                                                     "json": json.dumps({"caption": f"json {i}", "label": i % 3,
                                                                         "url": "http://x"}).encode()})
                                       for i in range(6, 8)])
    return d


def test_webdataset_brace_expansion_columns_and_pixels(shards):
    spec = {"kind": "webdataset", "shards": str(shards / "train-{0000..0002}.tar"), "task": "classification"}
    ds = load_data(spec)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 8
    assert ds.column_names == ["image", "caption", "label", "__key__", "__shard__"]
    assert not isinstance(ds.features["image"], datasets.Image)
    assert ds["caption"] == [f"jpeg {i}" for i in range(3)] + [f"png {i}" for i in range(3, 6)] + ["json 6", "json 7"]
    assert ds["label"] == [i % 3 for i in range(8)] and ds.features["label"] == datasets.Value("int64")
    assert ds["__key__"][3] == "000003" and ds["__shard__"][3] == str(shards / "train-0001.tar")
    assert ds[0]["image"]["member"] == "000000.jpg" and ds[0]["image"]["shard"] == str(shards / "train-0000.tar")
    validate(ds, "retrieval")

    reader = pickle.loads(pickle.dumps(ImageReader(ds, "image", "webdataset")))  # as DataLoader workers get it
    ims = reader.read(list(range(8)))
    assert [im.mode for im in ims] == ["RGB"] * 6 + ["RGBA"] * 2  # as stored: the backbone's transform converts
    for i in range(3, 8):  # PNG: exact, alpha included
        assert (np.asarray(ims[i]) == np.asarray(image(i, mode="RGBA" if i >= 6 else "RGB"))).all()
    for i in range(3):  # JPEG (lossy): the same pixels as decoding the bytes that were written
        assert (pixels(ims[i]) == pixels(Image.open(io.BytesIO(encode(image(i), "JPEG"))))).all()

    assert load_data(f"webdataset:{shards}/train-{{0000,0002}}.tar", task="retrieval")["__key__"] == [
        "000000", "000001", "000002", "000006", "000007"]
    assert len(load_data(f"webdataset:{shards}/train-*.tar")) == 8  # glob
    assert len(load_data(f"webdataset:{shards}")) == 8  # a folder of shards
    assert len(load_data(str(shards / "train-0001.tar"))) == 3  # a bare .tar path is a webdataset
    assert len(load_data(str(shards / "train-{0000..0001}.tar"))) == 6  # so is a bare shard pattern
    two = [str(shards / "train-0002.tar"), str(shards / "train-0000.tar")]
    listed = load_data({"kind": "webdataset", "shards": two})
    assert listed["__key__"] == ["000006", "000007", "000000", "000001", "000002"]


def test_webdataset_label_names_and_validation(tmp_path, shards):
    write_shard(tmp_path / "named.tar", [(f"k{i}", {"png": encode(image(i), "PNG"),
                                                    "json": json.dumps({"text": f"t{i}", "label": name}).encode()})
                                         for i, name in enumerate(["dog", "cat", "dog"])])
    ds = load_data(f"webdataset:{tmp_path / 'named.tar'}", task="classification")
    assert ds.features["label"].names == ["cat", "dog"] and ds["label"] == [1, 0, 1]
    assert ds["caption"] == ["t0", "t1", "t2"]

    write_shard(tmp_path / "nolabel.tar", [("a", {"png": encode(image(0), "PNG"), "txt": b"x"})])
    with pytest.raises(DataError) as info:
        load_data(f"webdataset:{tmp_path / 'nolabel.tar'}", task="classification")
    msg = str(info.value)
    assert "nolabel.tar" in msg and "member a.png" in msg and "'label'" in msg
    with pytest.raises(ConfigError, match="unknown option"):
        load_data({"kind": "webdataset", "shards": str(tmp_path / "nolabel.tar"), "shuffle": True})

    ds = load_data(f"webdataset:{shards}/train-0000.tar", task="retrieval")
    (shards / "train-0000.tar").unlink()
    with pytest.raises(DataError, match=r"shard not found: .*train-0000\.tar"):
        validate(ds, "retrieval", source="webdataset")


def test_webdataset_errors_name_shard_and_member(tmp_path):
    png = encode(image(0), "PNG")
    write_shard(tmp_path / "noimg.tar", [("a", {"png": png, "txt": b"ok"}), ("b", {"txt": b"lonely caption"})])
    with pytest.raises(DataError) as info:
        load_data(f"webdataset:{tmp_path / 'noimg.tar'}")
    msg = str(info.value)
    assert f"shard {tmp_path / 'noimg.tar'}" in msg and "member b.txt" in msg and "no image" in msg

    write_shard(tmp_path / "badcls.tar", [("a", {"png": png, "cls": b"dog"})])
    with pytest.raises(DataError, match=r"shard .*badcls\.tar, member a\.cls: label 'dog' is not an integer"):
        load_data(f"webdataset:{tmp_path / 'badcls.tar'}")

    write_shard(tmp_path / "badjson.tar", [("a", {"png": png, "json": b"{oops"})])
    with pytest.raises(DataError, match=r"shard .*badjson\.tar, member a\.json: not valid JSON"):
        load_data(f"webdataset:{tmp_path / 'badjson.tar'}")

    (tmp_path / "text.tar").write_text("this is not an archive at all\n" * 40)
    with pytest.raises(DataError, match=rf"shard {tmp_path / 'text.tar'}: not a tar archive"):
        load_data(f"webdataset:{tmp_path / 'text.tar'}")
    (tmp_path / "gz.tar").write_bytes(gzip.compress((tmp_path / "badcls.tar").read_bytes()))
    with pytest.raises(DataError, match=r"gz\.tar: a compressed tar archive cannot be indexed"):
        load_data(f"webdataset:{tmp_path / 'gz.tar'}")
    with pytest.raises(DataError, match=r"webdataset shard not found: .*train-0003\.tar"):
        load_data(f"webdataset:{tmp_path}/train-{{0003..0004}}.tar")
    with pytest.raises(DataError, match="no webdataset shards match"):
        load_data(f"webdataset:{tmp_path}/nothing-*.tar")

    full = (tmp_path / "badcls.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(full[:512 + 50])  # the png's header and part of its data
    with pytest.raises(DataError, match=r"cut\.tar, member a\.png: truncated"):
        load_data(f"webdataset:{tmp_path / 'cut.tar'}")
    cls_header = full.index(b"a.cls")
    (tmp_path / "cut2.tar").write_bytes(full[:cls_header + 100])  # cut inside the next member's header
    with pytest.raises(DataError, match=r"cut2\.tar: truncated \(the archive ends inside the member header"):
        load_data(f"webdataset:{tmp_path / 'cut2.tar'}")

    write_shard(tmp_path / "corrupt.tar", [("a", {"png": png, "txt": b"fine"}),
                                           ("b", {"png": b"\x89PNG not really", "txt": b"broken"})])
    ds = load_data(f"webdataset:{tmp_path / 'corrupt.tar'}", task="retrieval")  # image bytes not read at load
    reader = ImageReader(ds, "image", "webdataset:corrupt")
    assert (pixels(reader.read([0])[0]) == pixels(image(0))).all()
    with pytest.raises(DataError) as info:
        reader.read([1])
    msg = str(info.value)
    assert "row 2" in msg and f"shard {tmp_path / 'corrupt.tar'}, member b.png" in msg and "cannot decode" in msg


def test_brace_expansion_and_shard_resolution(tmp_path):
    assert expand_braces("a-{0000..0002}.tar") == ["a-0000.tar", "a-0001.tar", "a-0002.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert expand_braces("s{8..10}") == ["s8", "s9", "s10"]
    assert expand_braces("{2..0}") == ["2", "1", "0"]
    assert expand_braces("plain{x}.tar") == ["plain{x}.tar"]
    for split in ("train", "test"):
        write_shard(tmp_path / f"{split}-0.tar", [("a", {"png": encode(image(0), "PNG")})])
    assert resolve_shards(str(tmp_path / "{split}-0.tar"), "test") == [str(tmp_path / "test-0.tar")]
    assert resolve_shards(f"{tmp_path}/train-0.tar::{tmp_path}/test-0.tar") == [
        str(tmp_path / "train-0.tar"), str(tmp_path / "test-0.tar")]


def test_webdataset_index_of_a_5k_member_shard(tmp_path, capsys):
    png = encode(image(0, size=(4, 4)), "PNG")
    n = 2500  # 2500 samples x (png + txt) = 5000 members
    write_shard(tmp_path / "big.tar", [(f"{i:07d}", {"png": png, "txt": f"c{i}".encode()}) for i in range(n)])
    start = time.perf_counter()
    ds = load_data(f"webdataset:{tmp_path / 'big.tar'}", task="retrieval")
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[webdataset] indexed {2 * n} members in {elapsed:.3f}s")
    assert len(ds) == n and ds["caption"][-1] == f"c{n - 1}"
    assert ImageReader(ds, "image").read([n - 1])[0].size == (4, 4)
