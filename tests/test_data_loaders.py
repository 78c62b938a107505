"""Data loaders: small local datasets in every layout, loaded through `load_data` as a user would."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")
from PIL import Image  # noqa: E402

from vlkit import plugins  # noqa: E402
from vlkit.data import load_data, parse_data_spec, required_fields, validate  # noqa: E402
from vlkit.errors import ConfigError, DataError, UnknownNameError  # noqa: E402
from vlkit.hookspecs import hookimpl  # noqa: E402

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def png(path: Path, color=(255, 0, 0), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = color + (128,) if mode == "RGBA" else color
    Image.new(mode, (8, 8), fill).save(path)
    return path


def png_bytes(color, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (8, 8), color + (128,) if mode == "RGBA" else color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pixels(im) -> bytes:
    return im.tobytes()


# ---------------------------------------------------------------- spec parsing, registry, task fields

def test_parse_data_spec_forms(tmp_path):
    assert parse_data_spec("hf:user/name") == {"kind": "hf", "source": "user/name"}
    assert parse_data_spec("user/name") == {"kind": "hf", "source": "user/name"}
    assert parse_data_spec("world:medical/vqa", n=4) == {"kind": "world", "source": "medical/vqa", "n": 4}
    assert parse_data_spec({"kind": "manifest", "path": "x.jsonl", "task": "retrieval"}) == {
        "kind": "manifest", "source": "x.jsonl", "task": "retrieval"}
    m = write_jsonl(tmp_path / "m.jsonl", [{"image": "a.png"}])
    assert parse_data_spec(str(m))["kind"] == "manifest"
    assert parse_data_spec(str(tmp_path))["kind"] == "imagefolder"
    from omegaconf import OmegaConf

    assert parse_data_spec(OmegaConf.create({"kind": "winoground", "source": "synth", "n": 2}))["n"] == 2
    with pytest.raises(ConfigError):
        parse_data_spec(None)


def test_required_fields_and_unknown_names():
    assert required_fields("classification") == ("image", "label")
    assert required_fields("retrieval") == ("image", "caption")
    assert required_fields("vqa") == ("image", "question", "answer")
    assert required_fields("grounding") == ("image", "expression", "box")
    assert required_fields("winoground") == ("image_0", "image_1", "caption_0", "caption_1")
    assert required_fields("captioning") == ("image", "caption")
    assert required_fields("nlvr2") == ("image_0", "image_1", "sentence", "label")
    with pytest.raises(ConfigError, match="unknown task 'colorization'"):
        required_fields("colorization")
    with pytest.raises(UnknownNameError) as info:
        load_data("nosuchkind:x")
    for kind in ("hf", "imagefolder", "manifest", "parquet", "winoground", "world"):
        assert kind in str(info.value)


class ToyDatasetPlugin:
    """A third-party plugin adding the dataset kind 'toy' through the same hook."""

    @hookimpl
    def register_datasets(self, register):
        def load_toy(source=None, *, split=None, n=3, **options):
            imgs = [Image.new("RGBA", (4, 4), (9, 9, 9, 9)) for _ in range(int(n))]
            return datasets.Dataset.from_dict(
                {"image": imgs, "caption": [f"{source} {i}" for i in range(int(n))]},
                features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))

        register("toy", load_toy, summary="toy captions")


@pytest.fixture
def toy_plugin():
    plugins.reset_plugins()
    plugins.get_plugins().register_plugin(ToyDatasetPlugin(), name="test-plugin")
    yield
    plugins.reset_plugins()


def test_third_party_plugin_adds_a_kind(toy_plugin):
    entry = plugins.registry("dataset").entry("toy")
    assert entry.plugin == "test-plugin" and entry.summary == "toy captions"
    ds = load_data("toy:hello", n=2, task="retrieval")
    assert ds["caption"] == ["hello 0", "hello 1"]
    assert ds[0]["image"].mode == "RGBA"  # load_data keeps each image's mode: the backbone's transform converts


# ---------------------------------------------------------------- manifests

def test_manifest_jsonl_vqa_relative_and_absolute_paths(tmp_path):
    png(tmp_path / "imgs" / "a.png", COLORS[0])
    png(tmp_path / "imgs" / "b.png", COLORS[1], mode="RGBA")
    absolute = png(tmp_path / "elsewhere" / "c.png", COLORS[2])
    m = write_jsonl(tmp_path / "vqa.jsonl", [
        {"image": "imgs/a.png", "question": "what color?", "answer": "red"},
        {"image": "imgs/b.png", "question": "what color?", "answer": "green"},
        {"image": str(absolute), "question": "what color?", "answer": "blue"},
    ])
    ds = load_data(f"manifest:{m}", task="vqa")
    assert len(ds) == 3 and ds["answer"] == ["red", "green", "blue"]
    assert [ds[i]["image"].mode for i in range(3)] == ["RGB", "RGBA", "RGB"]  # as stored, not converted
    assert ds[1]["image"].getpixel((0, 0)) == COLORS[1] + (128,)


def test_manifest_csv_grounding_boxes_and_dict_spec(tmp_path):
    png(tmp_path / "a.png", COLORS[0])
    png(tmp_path / "b.png", COLORS[1])
    m = tmp_path / "ground.csv"
    with open(m, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file_name", "expression", "box"])
        w.writerow(["a.png", "the red square", "[0, 0, 4, 4]"])
        w.writerow(["b.png", "the green square", "1 2 7 8"])
    ds = load_data({"kind": "manifest", "path": str(m), "task": "grounding"})
    assert ds.column_names == ["image", "expression", "box"]
    assert ds["box"] == [[0.0, 0.0, 4.0, 4.0], [1.0, 2.0, 7.0, 8.0]]


def test_manifest_classification_labels_and_pairs(tmp_path):
    for i, c in enumerate(COLORS):
        png(tmp_path / f"{i}.png", c)
    cls = write_jsonl(tmp_path / "cls.jsonl",
                      [{"image_path": f"{i}.png", "label": name} for i, name in enumerate(["dog", "cat", "dog"])])
    ds = load_data(f"manifest:{cls}", task="classification")
    assert ds.features["label"].names == ["cat", "dog"] and ds["label"] == [1, 0, 1]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"image_0": "0.png", "image_1": "1.png", "caption_0": "red then green", "caption_1": "green then red"}])
    ds = load_data(f"manifest:{pairs}", task="winoground")
    assert ds[0]["image_1"].getpixel((0, 0)) == COLORS[1]


def test_manifest_row_without_required_value(tmp_path):
    png(tmp_path / "a.png")
    m = write_jsonl(tmp_path / "caps.jsonl", [{"image": "a.png", "caption": "x"}, {"image": "a.png"}])
    with pytest.raises(DataError) as info:
        load_data(f"manifest:{m}", task="retrieval")
    msg = str(info.value)
    assert "caps.jsonl" in msg and "row 2" in msg and "'caption'" in msg
    c = tmp_path / "caps.csv"
    c.write_text("image,caption\na.png,hello\na.png,\n")
    with pytest.raises(DataError, match=r"caps\.csv, row 2 has no value for 'caption'"):
        load_data(f"manifest:{c}", task="retrieval")


def test_manifest_missing_column_and_missing_image_column(tmp_path):
    png(tmp_path / "a.png")
    m = write_jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "x"}])
    with pytest.raises(DataError, match=r"no column 'question'"):
        load_data(f"manifest:{m}", task="vqa")
    bad = write_jsonl(tmp_path / "noimg.jsonl", [{"caption": "x"}])
    with pytest.raises(DataError, match=r"noimg\.jsonl has no image column"):
        load_data(f"manifest:{bad}")


def test_manifest_missing_and_corrupt_image_files(tmp_path):
    png(tmp_path / "a.png")
    m = write_jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "x"}, {"image": "gone.png", "caption": "y"}])
    with pytest.raises(DataError) as info:
        load_data(f"manifest:{m}", task="retrieval")
    msg = str(info.value)
    assert "not found" in msg and str(tmp_path / "gone.png") in msg and "row 2" in msg and "m.jsonl" in msg
    # a file that exists but does not decode: loading only stats it; decoding names the manifest, file and row
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (tmp_path / "empty.png").write_bytes(b"")
    m2 = write_jsonl(tmp_path / "m2.jsonl", [{"image": "a.png", "caption": "x"},
                                             {"image": "broken.png", "caption": "y"},
                                             {"image": "empty.png", "caption": "z"}])
    ds = load_data(f"manifest:{m2}", task="retrieval")
    assert len(ds) == 3
    from vlkit.data.images import ImageReader

    reader = ImageReader(ds, "image", f"manifest:{m2}")
    assert reader.read([0])[0].getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(DataError) as info:
        reader.read([1])
    msg = str(info.value)
    assert "cannot decode" in msg and str(tmp_path / "broken.png") in msg and "row 2" in msg and "m2.jsonl" in msg
    with pytest.raises(DataError, match=r"m2\.jsonl, row 3.*empty\.png is empty"):
        reader.read([2])


def test_manifest_bad_json_and_bad_box(tmp_path):
    png(tmp_path / "a.png")
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "a.png", "caption": "x"}\n{"image": oops}\n')
    with pytest.raises(DataError, match=r"row 2 \(line 2\) is not valid JSON"):
        load_data(f"manifest:{m}")
    b = write_jsonl(tmp_path / "b.jsonl", [{"image": "a.png", "expression": "e", "box": [1, 2, 3]}])
    with pytest.raises(DataError, match=r"b\.jsonl, row 1: box must be 4 numbers"):
        load_data(f"manifest:{b}", task="grounding")


def test_manifest_split_column(tmp_path):
    png(tmp_path / "a.png")
    m = write_jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "t", "split": "train"},
                                           {"image": "a.png", "caption": "v", "split": "test"}])
    assert load_data(f"manifest:{m}", split="test")["caption"] == ["v"]
    assert len(load_data(f"manifest:{m}")) == 2
    plain = write_jsonl(tmp_path / "p.jsonl", [{"image": "a.png", "caption": "x"}])
    assert len(load_data(f"manifest:{plain}", split="train")) == 1  # one file per split: taken whole


# ---------------------------------------------------------------- imagefolder, parquet, validate

def test_imagefolder_metadata_and_class_folders(tmp_path):
    folder = tmp_path / "caps"
    png(folder / "a.png", COLORS[0])
    png(folder / "b.png", COLORS[1], mode="RGBA")
    write_jsonl(folder / "metadata.jsonl", [{"file_name": "a.png", "caption": "red"},
                                            {"file_name": "b.png", "caption": "green"}])
    ds = load_data(f"imagefolder:{folder}", task="retrieval")
    assert sorted(ds["caption"]) == ["green", "red"]
    assert {ds[i]["image"].mode for i in range(len(ds))} == {"RGB", "RGBA"}
    classes = tmp_path / "classes"
    png(classes / "cat" / "1.png", COLORS[0])
    png(classes / "dog" / "2.png", COLORS[1])
    ds = load_data(str(classes), task="classification")  # a bare folder path is an imagefolder
    assert ds.features["label"].names == ["cat", "dog"] and len(ds) == 2


def test_imagefolder_missing_file_and_missing_dir(tmp_path):
    folder = tmp_path / "caps"
    png(folder / "a.png")
    write_jsonl(folder / "metadata.jsonl", [{"file_name": "a.png", "caption": "x"},
                                            {"file_name": "lost.png", "caption": "y"}])
    with pytest.raises(DataError, match=r"metadata\.jsonl, row 2: image file not found: .*lost\.png"):
        load_data(f"imagefolder:{folder}")
    (folder / "lost.png").write_bytes(b"not an image")  # exists now: loads; decoding names the file and row
    ds = load_data(f"imagefolder:{folder}", task="retrieval")
    from vlkit.data.images import ImageReader

    row = list(ds["caption"]).index("y")
    with pytest.raises(DataError, match=rf"imagefolder:.*row {row + 1}.*cannot decode image file .*lost\.png"):
        ImageReader(ds, "image", f"imagefolder:{folder}").read([row])
    with pytest.raises(DataError, match="imagefolder folder not found"):
        load_data(f"imagefolder:{tmp_path / 'nope'}")


def test_parquet_kind_and_validate_missing_column(tmp_path):
    feats = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [png_bytes(COLORS[0], "RGBA"), png_bytes(COLORS[1])],
                                     "caption": ["a", "b"]}, features=feats)
    ds = ds.cast_column("image", datasets.Image())
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    out = load_data(f"parquet:{tmp_path / 'pq'}", task="retrieval")
    assert out["caption"] == ["a", "b"] and [out[i]["image"].mode for i in range(2)] == ["RGBA", "RGB"]
    assert len(load_data(f"parquet:{tmp_path / 'pq'}", split="train")) == 2
    with pytest.raises(DataError, match=r"no parquet files for split 'test'.*splits found: train"):
        load_data(f"parquet:{tmp_path / 'pq'}", split="test")
    with pytest.raises(DataError, match=r"parquet:.* has no column 'label' required for task 'classification'"):
        load_data(f"parquet:{tmp_path / 'pq'}", task="classification")
    with pytest.raises(DataError, match="row 2 has no value for 'caption'"):
        validate(datasets.Dataset.from_dict({"image": ["x", "y"], "caption": ["a", None]}), "retrieval")


# ---------------------------------------------------------------- hub (mocked) and offline

def test_hf_kind_calls_load_dataset_with_token(tmp_path, monkeypatch):
    calls = []
    local = datasets.Dataset.from_dict({"image": [png_bytes(COLORS[0], "RGBA")], "caption": ["c"]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "caption": datasets.Value("string")}))

    def fake_load_dataset(path, name=None, split=None, token=None, **kw):
        calls.append((path, name, split, token))
        return local

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_data("hf:someone/captions", config="small", split="train", task="retrieval")
    assert calls == [("someone/captions", "small", "train", "hf_secret")]
    assert ds[0]["image"].mode == "RGBA"


def test_hf_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_data("hf:someone/not-cached-anywhere", split="train")
    msg = str(info.value)
    assert "someone/not-cached-anywhere" in msg and "unreachable" in msg
    assert "imagefolder" in msg and "manifest" in msg and "parquet" in msg
    assert "Traceback" not in msg and "\n" not in msg


# ---------------------------------------------------------------- winoground: examples.jsonl, parquet, hub

WINO_ROWS = [
    {"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1",
     "caption_0": f"a {i} left of b", "caption_1": f"b left of a {i}", "tag": "Relation",
     "secondary_tag": "Symbolic" if i else "", "num_main_preds": 1 + i % 2, "collapsed_tag": "Relation"}
    for i in range(3)
]


def wino_image(i: int, k: int):
    mode = "RGBA" if (i, k) == (1, 0) else "RGB"  # some Winoground images are RGBA
    return COLORS[(i + k) % 4], mode


def write_wino_parquet(path: Path, corrupt: tuple[int, int] | None = None) -> Path:
    """WINO_ROWS in the hub's parquet layout (images as PNG bytes); `corrupt`=(row, k) breaks one image."""
    cols = {c: [r[c] for r in WINO_ROWS] for c in WINO_ROWS[0]}
    for k in (0, 1):
        cols[f"image_{k}"] = [{"bytes": b"garbage" if (r["id"], k) == corrupt else png_bytes(*wino_image(r["id"], k)),
                               "path": f"{r[f'image_{k}']}.png"} for r in WINO_ROWS]
    feats = datasets.Features({c: datasets.Image() if c.startswith("image_") else
                               datasets.Value("int64" if c in ("id", "num_main_preds") else "string")
                               for c in cols})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(cols, features=feats).to_parquet(str(path))
    return path


@pytest.fixture
def wino(tmp_path):
    """The same three examples in the official repo layout and in the hub's parquet layout."""
    repo = tmp_path / "winoground"
    repo.mkdir()
    write_jsonl(repo / "examples.jsonl", WINO_ROWS)
    for r in WINO_ROWS:
        for k in (0, 1):
            color, mode = wino_image(r["id"], k)
            png(repo / "images" / f"{r[f'image_{k}']}.png", color, mode)
    hub = tmp_path / "hubcopy"
    write_wino_parquet(hub / "data" / "test-00000-of-00001.parquet")
    return repo, hub


def rows_of(ds):
    return [{k: (pixels(v) if k.startswith("image_") else v) for k, v in ds[i].items()} for i in range(len(ds))]


def test_winoground_three_sources_agree(wino, monkeypatch):
    repo, hub = wino
    from_jsonl = load_data(f"winoground:{repo}", task="winoground")
    from_parquet = load_data({"kind": "winoground", "source": str(hub)}, task="winoground")

    real_load = datasets.load_dataset
    calls = []

    def fake_hub(path, name=None, split=None, token=None, **kw):
        calls.append((path, split, token))
        return real_load("parquet", data_files=[str(p) for p in sorted(hub.rglob("*.parquet"))], split="train")

    monkeypatch.setenv("HF_TOKEN", "hf_user_token")
    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    from_hub = load_data("winoground:hub", task="winoground")
    assert calls == [("facebook/winoground", "test", "hf_user_token")]

    expected_cols = ["id", "image_0", "image_1", "caption_0", "caption_1", "tag", "secondary_tag",
                     "num_main_preds", "collapsed_tag"]
    for ds in (from_jsonl, from_parquet, from_hub):
        assert ds.column_names == expected_cols
        assert ds.features == from_jsonl.features
        assert [ds[i][f"image_{k}"].mode for i in range(3) for k in (0, 1)] == [
            wino_image(i, k)[1] for i in range(3) for k in (0, 1)]
    assert rows_of(from_jsonl) == rows_of(from_parquet) == rows_of(from_hub)
    assert from_jsonl[1]["image_0"].getpixel((0, 0)) == wino_image(1, 0)[0] + (128,)
    assert from_jsonl["caption_1"][2] == "b left of a 2"


def test_winoground_local_errors(wino, tmp_path):
    repo, hub = wino
    (repo / "images" / "ex_2_img_1.png").unlink()
    with pytest.raises(DataError) as info:
        load_data(f"winoground:{repo}")
    msg = str(info.value)
    assert "examples.jsonl, row 3" in msg and "ex_2_img_1.png" in msg and "not found" in msg

    bad = tmp_path / "badpq"
    write_wino_parquet(bad / "test-00000-of-00001.parquet", corrupt=(1, 1))
    with pytest.raises(DataError) as info:
        load_data(f"winoground:{bad}")
    msg = str(info.value)
    assert "test-00000-of-00001.parquet" in msg and "row 2" in msg and "cannot read image" in msg


def test_winoground_hub_offline_and_gated(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_data("winoground:hub")
    msg = str(info.value)
    assert "facebook/winoground" in msg and "unreachable" in msg and "synth" in msg and "--data" in msg
    assert "Traceback" not in msg

    monkeypatch.delenv("HF_HUB_OFFLINE")
    from datasets.exceptions import DatasetNotFoundError

    def gated(*a, **kw):
        raise DatasetNotFoundError("Dataset 'facebook/winoground' is a gated dataset on the Hub. "
                                   "You must be authenticated to access it.")

    monkeypatch.setattr(datasets, "load_dataset", gated)
    monkeypatch.setattr("vlkit.data.hub.hf_token", lambda: None)
    with pytest.raises(DataError, match=r"'facebook/winoground' is gated.*HF_TOKEN"):
        load_data("winoground")


# ---------------------------------------------------------------- the procedural world

def test_world_kind_and_winoground_synth(tmp_path):
    world = pytest.importorskip("vlkit.world")
    if not hasattr(world, "generate"):
        pytest.skip("vlkit.world is not written yet")
    ds = load_data({"kind": "world", "domain": world.DOMAINS[0], "task": "vqa", "n": 6, "seed": 0})
    assert len(ds) == 6 and ds[0]["image"].mode == "RGB"
    again = load_data(f"world:{world.DOMAINS[0]}/vqa", n=6, seed=0, task="vqa")
    assert rows_of_images(ds) == rows_of_images(again)  # reproducible from the seed

    syn = load_data("winoground:synth", n=4, seed=1, task="winoground")
    assert len(syn) == 4 and syn[0]["image_0"].mode == "RGB"

    # world.write layouts load back through the local kinds
    world.write(ds, tmp_path / "vqa", "vqa")
    back = load_data(f"imagefolder:{tmp_path / 'vqa'}", task="vqa")
    assert sorted(back["question"]) == sorted(ds["question"])
    world.write(syn, tmp_path / "wino", "winoground")
    back = load_data(f"winoground:{tmp_path / 'wino'}", task="winoground")
    assert back["caption_0"] == syn["caption_0"]
    assert [pixels(im) for im in back["image_1"]] == [pixels(im) for im in syn["image_1"]]


def rows_of_images(ds):
    return [pixels(ds[i]["image"]) for i in range(len(ds))]
