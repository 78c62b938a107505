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
    with pytest.raises(ConfigError, match="unknown task 'captioning'"):
        required_fields("captioning")
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
    assert ds[0]["image"].mode == "RGB"  # load_data converts every source's images to RGB


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
    assert [ds[i]["image"].mode for i in range(3)] == ["RGB"] * 3  # the RGBA one converted
    assert ds[1]["image"].getpixel((0, 0)) == COLORS[1]


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
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    m2 = write_jsonl(tmp_path / "m2.jsonl", [{"image": "broken.png", "caption": "x"}])
    with pytest.raises(DataError) as info:
        load_data(f"manifest:{m2}", task="retrieval")
    msg = str(info.value)
    assert "cannot read image" in msg and "broken.png" in msg and "row 1" in msg


def test_manifest_bad_json_and_bad_box(tmp_path):
    png(tmp_path / "a.png")
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "a.png", "caption": "x"}\n{"image": oops}\n')
    with pytest.raises(DataError, match=r"row 2 \(line 2\) is not valid JSON"):
        load_data(f"manifest:{m}")
    b = write_jsonl(tmp_path / "b.jsonl", [{"image": "a.png", "expression": "e", "box": [1, 2, 3]}])
    with pytest.raises(DataError, match=r"b\.jsonl, row 1: box must be 4 numbers"):
        load_data(f"manifest:{b}", task="grounding")


# ---------------------------------------------------------------- imagefolder, parquet, validate

def test_imagefolder_metadata_and_class_folders(tmp_path):
    folder = tmp_path / "caps"
    png(folder / "a.png", COLORS[0])
    png(folder / "b.png", COLORS[1], mode="RGBA")
    write_jsonl(folder / "metadata.jsonl", [{"file_name": "a.png", "caption": "red"},
                                            {"file_name": "b.png", "caption": "green"}])
    ds = load_data(f"imagefolder:{folder}", task="retrieval")
    assert sorted(ds["caption"]) == ["green", "red"]
    assert {ds[i]["image"].mode for i in range(len(ds))} == {"RGB"}
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
    assert out["caption"] == ["a", "b"] and out[0]["image"].mode == "RGB"
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
    assert ds[0]["image"].mode == "RGB"


def test_hf_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_data("hf:someone/not-cached-anywhere", split="train")
    msg = str(info.value)
    assert "someone/not-cached-anywhere" in msg and "unreachable" in msg
    assert "imagefolder" in msg and "manifest" in msg and "parquet" in msg
    assert "Traceback" not in msg and "\n" not in msg
