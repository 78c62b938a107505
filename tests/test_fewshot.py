"""CoOp's few-shot protocol (issue 16): the `coop` data kind on a local fixture in CoOp's layout, and
`vlkit adapt --method ... --shots ... --seeds ... --data coop:DIR` with its table and plot."""
from __future__ import annotations

import json

import pytest

from cli_helpers import cli
from vlkit.data import load_data
from vlkit.errors import ConfigError, DataError

CLASSES = ["red_thing", "green thing", "blue thing"]
COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]


@pytest.fixture
def coop_dir(tmp_path):
    """DATA/toy/ with images/<class>/<i>.png and split_zhou_Toy.json, as CoOp lays a dataset out."""
    from PIL import Image

    root = tmp_path / "toy"
    split = {"train": [], "val": [], "test": []}
    for label, (name, color) in enumerate(zip(CLASSES, COLORS)):
        d = root / "images" / name.replace(" ", "_")
        d.mkdir(parents=True)
        for i in range(9):
            shade = tuple(max(0, min(255, c + 7 * i - 30)) for c in color)
            rel = f"{name.replace(' ', '_')}/{i}.png"
            Image.new("RGB", (20, 20), shade).save(root / "images" / rel)
            part = "train" if i < 5 else "val" if i < 6 else "test"
            split[part].append([rel, label, name])
    (root / "split_zhou_Toy.json").write_text(json.dumps(split))
    return root


def test_coop_kind_reads_the_layout(coop_dir):
    ds = load_data(f"coop:{coop_dir}", split="train")
    assert ds.column_names == ["image", "label"] and len(ds) == 15
    assert ds.features["label"].names == CLASSES
    assert ds[0]["image"].size == (20, 20)
    test = load_data({"kind": "coop", "source": str(coop_dir), "split": "test"})
    assert len(test) == 9 and test.features["label"].names == CLASSES
    few = load_data(f"coop:{coop_dir}", split="train", shots=2, seed=1)
    assert len(few) == 6 and sorted(few["label"]) == [0, 0, 1, 1, 2, 2]
    again = load_data(f"coop:{coop_dir}", split="train", shots=2, seed=1)
    other = load_data(f"coop:{coop_dir}", split="train", shots=2, seed=2)
    assert again["image"] == few["image"]
    assert [im.getpixel((0, 0)) for im in other["image"]] != [im.getpixel((0, 0)) for im in few["image"]]


def test_coop_kind_errors(coop_dir, tmp_path):
    with pytest.raises(ConfigError, match="not enough"):
        load_data(f"coop:{coop_dir}", split="train", shots=6)
    with pytest.raises(ConfigError, match="split"):
        load_data(f"coop:{coop_dir}", split="holdout")
    with pytest.raises(ConfigError, match="unknown coop option"):
        load_data(f"coop:{coop_dir}", split="train", colour="red")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="split_zhou"):
        load_data(f"coop:{empty}")
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "split_zhou_Toy.json").write_text((coop_dir / "split_zhou_Toy.json").read_text())
    with pytest.raises(DataError, match="image_dir"):
        load_data(f"coop:{moved}")
    ds = load_data(f"coop:{moved}", image_dir=str(coop_dir / "images"))
    assert len(ds) == 15
    (moved / "split_zhou_Toy.json").write_text(json.dumps({"train": [["a.png", "zero", "x"]]}))
    with pytest.raises(DataError, match="not \\[relative path"):
        load_data(f"coop:{moved}", image_dir=str(coop_dir / "images"))


def test_adapt_protocol_on_coop_data(coop_dir, tmp_path, capsys):
    out = tmp_path / "fs"
    code, stdout, err = cli(["adapt", "--backbone", "tiny@random", "--method", "zeroshot,tip-adapter,lora",
                             "--shots", "1,2", "--seeds", "1,2", "--data", f"coop:{coop_dir}", "--steps", "2",
                             "-o", str(out), "--json"], capsys)
    assert code == 0, err
    res = json.loads(stdout[stdout.index("{"):])
    assert res["methods"] == ["zeroshot", "tip-adapter", "lora"] and res["shots"] == [1, 2]
    assert len(res["runs"]) == 3 * 2 * 2 and len(res["summary"]) == 3 * 2
    for row in res["summary"]:
        assert row["seeds"] == 2 and 0.0 <= row["mean"] <= 100.0 and row["sd"] >= 0.0
    lora = [r for r in res["summary"] if r["method"] == "lora"]
    assert all(r["trainable"] > 0 for r in lora)
    assert all(r["trainable"] == 0 for r in res["summary"] if r["method"] in ("zeroshot", "tip-adapter"))
    assert "± " in err or "±" in stdout or "±" in err  # the table
    assert (out / "fewshot.png").stat().st_size > 1000 and (out / "fewshot.json").is_file()
    assert (out / "tip-adapter" / "1shot-seed1" / "adapter_config.json").is_file()


def test_adapt_protocol_errors(tmp_path, capsys):
    code, _, err = cli(["adapt", "--backbone", "tiny@random", "--method", "nope", "--shots", "1", "-o",
                        str(tmp_path / "x")], capsys)
    assert code == 2 and "nope" in err
    code, _, err = cli(["adapt", "--backbone", "tiny@random", "--method", "lora", "--shots", "1,a", "-o",
                        str(tmp_path / "y")], capsys)
    assert code == 2 and "--shots" in err
