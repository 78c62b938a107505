"""The procedural world: determinism, schemas, vocabulary, geometry, minimal pairs, writing and the CLI."""
from __future__ import annotations

import collections
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
from datasets import ClassLabel, Image, Value  # noqa: E402

from vlkit import world  # noqa: E402
from vlkit.errors import ConfigError, DataError  # noqa: E402
from vlkit.world.domains import SIZE_RANK  # noqa: E402
from vlkit.world.language import words  # noqa: E402
from vlkit.world.winoground import KINDS, kinds_for, make_pair  # noqa: E402

SINGLE_TASKS = ("classification", "retrieval", "vqa", "grounding")
PAIR_COLUMNS = ["id", "image_0", "image_1", "caption_0", "caption_1", "tag", "secondary_tag", "num_main_preds",
                "collapsed_tag"]
WINOGROUND_TAGS = {"Noun", "Noun Phrase", "Adjective-Color", "Adjective-Size", "Preposition", "Determiner-Numeral",
                   "Noun, Preposition"}


def image_bytes(ds, column="image") -> list[bytes]:
    return [r[column]["bytes"] for r in ds.cast_column(column, Image(decode=False))]


def digest(ds) -> str:
    """Hash of every image's PNG bytes and every text field of a dataset."""
    h = hashlib.sha256()
    for col in ds.column_names:
        if isinstance(ds.features[col], Image):
            for b in image_bytes(ds, col):
                h.update(b)
        else:
            h.update(json.dumps(list(ds[col])).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def generated():
    """A few examples of every domain x task, generated once for the module."""
    return {(d, t): world.generate(d, t, 24, seed=7) for d in world.DOMAINS for t in world.TASKS}


# ---- API and determinism -----------------------------------------------------------------------------

def test_api_names():
    assert world.DOMAINS == ("photo", "medical", "satellite", "sketch")
    assert world.TASKS == ("classification", "retrieval", "vqa", "grounding", "winoground", "captioning", "vqa-gen",
                           "gqa", "nlvr2")
    assert world.class_names("photo") == world.shape_names("photo")
    assert 6 <= len(world.colour_names("photo")) <= 8 and len(world.class_names("photo")) == 6
    assert world.colour_names("medical") == ["bright", "dark"]
    assert "nodule" in world.class_names("medical") and "lake" in world.class_names("satellite")
    assert world.class_names("sketch") == world.class_names("photo")
    for d in world.DOMAINS:
        assert world.class_prompt(d).count("{}") == 1
        ans = world.answer_set(d)
        assert {"yes", "no", "one", "two"} <= set(ans) and len(ans) == len(set(ans))
    assert world.class_prompt("photo").format("circle") == "a photo of a circle"
    vocab = world.vocabulary()
    assert vocab == sorted(set(vocab)) and len(vocab) < 400


def test_same_seed_same_bytes_and_other_seed_differs():
    a, b = world.generate("photo", "retrieval", 10, seed=3), world.generate("photo", "retrieval", 10, seed=3)
    assert digest(a) == digest(b)
    assert list(a["caption"]) == list(b["caption"]) and list(a["scene"]) == list(b["scene"])
    c = world.generate("photo", "retrieval", 10, seed=4)
    assert image_bytes(a) != image_bytes(c) and list(a["caption"]) != list(c["caption"])
    # example i depends only on (seed, domain, task, i): a longer run starts with the same examples
    longer = world.generate("photo", "retrieval", 14, seed=3)
    assert image_bytes(longer)[:10] == image_bytes(a) and list(longer["caption"])[:10] == list(a["caption"])
    w1, w2 = world.generate("sketch", "winoground", 4, seed=1), world.generate("sketch", "winoground", 4, seed=1)
    assert digest(w1) == digest(w2)


@pytest.mark.parametrize("bad", [dict(domain="x"), dict(task="x"), dict(n=0), dict(seed=-1), dict(image_size=4)])
def test_bad_arguments_raise_config_error(bad):
    args = dict(domain="photo", task="vqa", n=2, seed=0, image_size=64) | bad
    with pytest.raises(ConfigError, match=next(iter(bad))):
        world.generate(**args)


# ---- schemas ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", world.TASKS)
def test_columns_and_features(generated, task):
    for domain in world.DOMAINS:
        ds = generated[domain, task]
        f = ds.features
        assert len(ds) == 24
        if task == "winoground":
            assert ds.column_names == PAIR_COLUMNS
            assert isinstance(f["image_0"], Image) and isinstance(f["image_1"], Image)
            assert f["num_main_preds"].dtype.startswith("int") and f["id"].dtype.startswith("int")
            assert ds[0]["image_0"].mode == "RGB" and ds[0]["image_0"].size == (64, 64)
            continue
        if task == "nlvr2":
            assert ds.column_names[:5] == ["id", "image_0", "image_1", "sentence", "label"]
            assert f["label"] == Value("bool") and ds[0]["image_1"].size == (64, 64)
            continue
        assert ds.column_names[:4] == ["image", "domain", "scene", "caption"]
        assert isinstance(f["image"], Image) and f["caption"] == Value("string")
        row = ds[0]
        assert row["image"].mode == "RGB" and row["image"].size == (64, 64) and row["domain"] == domain
        scene = json.loads(row["scene"])
        assert {"shape", "size", "region", "center", "box"} <= set(scene["objects"][0])
        if task == "classification":
            assert isinstance(f["label"], ClassLabel) and f["label"].names == world.class_names(domain)
            assert ("colour" in ds.column_names) == bool(world.colour_names(domain))
        elif task in ("vqa", "vqa-gen", "gqa"):
            assert {"question", "answer", "answer_type"} <= set(ds.column_names)
        elif task == "captioning":
            assert len(row["references"]) == 5 and row["references"][0] == row["caption"]
        elif task == "grounding":
            assert {"expression", "box"} <= set(ds.column_names) and len(row["box"]) == 4


def test_image_size_option():
    ds = world.generate("medical", "classification", 2, seed=0, image_size=96)
    assert ds[0]["image"].size == (96, 96)


def test_domains_look_different(generated):
    """Medical is grayscale and noisy, photo has flat coloured shapes on a light ground."""
    med = np.asarray(generated["medical", "retrieval"][0]["image"], dtype=np.int16)
    assert (med[..., 0] == med[..., 1]).all() and (med[..., 1] == med[..., 2]).all()
    assert np.abs(np.diff(med[..., 0], axis=1)).mean() > 3  # noisy background
    photo = np.asarray(generated["photo", "classification"][0]["image"], dtype=np.int16)
    assert photo[0, 0].min() > 200 and np.ptp(photo.reshape(-1, 3), axis=0).max() > 80


# ---- language --------------------------------------------------------------------------------------

def test_vocabulary_covers_every_domain_and_task(generated):
    vocab = set(world.vocabulary())
    for d in world.DOMAINS:
        texts = [world.class_prompt(d).format(c) for c in world.class_names(d)] + world.answer_set(d)
        texts += world.colour_names(d) + world.shape_names(d)
        for t in world.TASKS:
            ds = generated[d, t]
            for col in ("caption", "question", "answer", "expression", "caption_0", "caption_1", "sentence"):
                if col in ds.column_names:
                    texts += list(ds[col])
        for text in texts:
            ws = words(text)
            assert set(ws) <= vocab, (text, set(ws) - vocab)
            assert len(ws) <= 30, text  # fits the tiny CLIP's 32-token context with start/end


def test_captions_name_every_object(generated):
    for d in world.DOMAINS:
        for t in ("retrieval", "grounding"):
            for row in generated[d, t]:
                scene = json.loads(row["scene"])
                cap = row["caption"]
                for o in scene["objects"]:
                    assert o["shape"] in cap and o["size"] in cap
                    assert o.get("colour", "") in cap


def test_classification_labels_balanced_and_consistent():
    ds = world.generate("photo", "classification", 12, seed=2)
    names = world.class_names("photo")
    assert collections.Counter(list(ds["label"])) == {i: 2 for i in range(6)}
    for row in ds:
        assert names[row["label"]] == row["shape"]
        assert row["shape"] in row["caption"] and row["colour"] in row["caption"]
        assert len(json.loads(row["scene"])["objects"]) == 1


# ---- geometry --------------------------------------------------------------------------------------

def side(box) -> float:
    """The longer side of a box: how big an object looks."""
    return max(box[2] - box[0], box[3] - box[1])


def test_relations_are_geometrically_true(generated):
    checked = collections.Counter()
    for d in world.DOMAINS:
        for t in ("retrieval", "vqa", "grounding"):
            for row in generated[d, t]:
                scene = json.loads(row["scene"])
                objs = scene["objects"]
                for o in objs:
                    x0, y0, x1, y1 = o["box"]
                    assert 0 <= x0 < o["center"][0] < x1 <= 1 and 0 <= y0 < o["center"][1] < y1 <= 1
                for i, a in enumerate(objs):  # boxes never overlap
                    for b in objs[i + 1:]:
                        ax0, ay0, ax1, ay1 = a["box"]
                        bx0, by0, bx1, by1 = b["box"]
                        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
                for r in scene["relations"]:
                    a, b = objs[r["subject"]], objs[r["object"]]
                    (ax, ay), (bx, by) = a["center"], b["center"]
                    rel = r["relation"]
                    checked[rel] += 1
                    if rel == "left of":
                        assert ax + 0.15 < bx
                    elif rel == "right of":
                        assert ax > bx + 0.15
                    elif rel == "above":
                        assert ay + 0.15 < by
                    elif rel == "below":
                        assert ay > by + 0.15
                    else:
                        assert rel == "bigger than" and SIZE_RANK[a["size"]] > SIZE_RANK[b["size"]]
                        assert side(a["box"]) > side(b["box"]), (d, a, b)
    assert set(checked) == {"left of", "right of", "above", "below", "bigger than"}


def test_grounding_boxes_surround_their_objects():
    ds = world.generate("photo", "grounding", 16, seed=1)
    for row in ds:
        scene = json.loads(row["scene"])
        box = row["box"]
        assert all(0.0 <= v <= 1.0 for v in box) and box[0] < box[2] and box[1] < box[3]
        target = scene["objects"][row["target"]]
        assert box == target["box"]
        assert target["shape"] in row["expression"] and row["expression"].startswith("the ")
        img = np.asarray(row["image"], dtype=np.int16)
        bg = img[0, 0]
        fg = np.abs(img - bg).sum(-1) > 60
        s = img.shape[0]
        cx, cy = int((box[0] + box[2]) / 2 * s), int((box[1] + box[3]) / 2 * s)
        assert fg[cy, cx], "box centre lies on the object"
        inside = np.zeros_like(fg)
        for o in scene["objects"]:  # every object pixel lies inside some box (1 px slack)
            x0, y0, x1, y1 = o["box"]
            inside[max(0, int(y0 * s) - 1):int(np.ceil(y1 * s)) + 1, max(0, int(x0 * s) - 1):int(np.ceil(x1 * s)) + 1] = True
        assert not (fg & ~inside).any()
        x0, y0, x1, y1 = (int(v * s) for v in box)
        assert fg[y0:y1 + 1, x0:x1 + 1].mean() > 0.25  # tight: the object fills a good part of its box


# ---- vqa -------------------------------------------------------------------------------------------

def test_vqa_answers_closed_balanced_and_correct():
    for domain in ("photo", "medical", "satellite"):
        ds = world.generate(domain, "vqa", 48, seed=0)
        answers = world.answer_set(domain)
        types = collections.Counter(list(ds["answer_type"]))
        assert set(types) == set(world.vqa_answer_types(domain))
        assert ("colour" in types) == bool(world.colour_names(domain))
        yesno = [r["answer"] for r in ds if r["answer_type"] == "yesno_relation"]
        assert collections.Counter(yesno)["yes"] == collections.Counter(yesno)["no"] > 0
        for row in ds:
            assert row["answer"] in answers and answers[row["answer_id"]] == row["answer"]
            objs = json.loads(row["scene"])["objects"]
            if row["answer_type"] == "count" and row["question"].startswith("how many objects"):
                assert row["answer"] == ["zero", "one", "two", "three"][len(objs)]
            if row["answer_type"] == "colour":
                assert row["answer"] in {o["colour"] for o in objs}
            if row["answer_type"] == "shape":
                assert row["answer"] in {o["shape"] for o in objs}
            if row["answer_type"] == "yesno_relation":
                assert len(objs) >= 2 and any(r in row["question"] for r in
                                              ("left of", "right of", "above", "below", "bigger than"))


# ---- winoground ------------------------------------------------------------------------------------

def test_winoground_pairs(generated):
    for domain in world.DOMAINS:
        ds = generated[domain, "winoground"]
        assert list(ds["id"]) == list(range(24))
        assert collections.Counter(list(ds["collapsed_tag"])) == {"Object": 8, "Relation": 8, "Both": 8}
        b0, b1 = image_bytes(ds, "image_0"), image_bytes(ds, "image_1")
        for row, i0, i1 in zip(ds, b0, b1):
            assert i0 != i1 and row["caption_0"] != row["caption_1"]
            assert row["tag"] in WINOGROUND_TAGS and row["num_main_preds"] in (1, 2)
            if "Morpheme-Level" not in row["secondary_tag"]:
                assert sorted(words(row["caption_0"])) == sorted(words(row["caption_1"]))
            assert ("Symbolic" in row["secondary_tag"]) == (domain == "sketch")


@pytest.mark.parametrize("domain", world.DOMAINS)
def test_every_pair_kind_is_a_true_minimal_pair(domain):
    rng = np.random.default_rng(0)
    for collapsed in KINDS:
        for kind in kinds_for(domain, collapsed):
            pair = make_pair(domain, collapsed, rng, kind=kind)
            assert pair.valid()  # each caption true of its image and false of the other
            c0, c1 = pair.captions(domain)
            assert c0 != c1
    assert "adj_colour" in kinds_for("photo", "Relation") and "adj_colour" not in kinds_for("sketch", "Relation")


def test_winoground_colour_swap_example():
    rng = np.random.default_rng(3)
    pair = make_pair("photo", "Relation", rng, kind="adj_colour")
    c0, c1 = pair.captions("photo")
    a, b = pair.objs_0, pair.objs_1
    assert [o.colour for o in a] == [o.colour for o in b][::-1] and [o.shape for o in a] == [o.shape for o in b]
    assert c1 == c0.replace(a[0].colour, "#").replace(a[1].colour, a[0].colour).replace("#", a[1].colour) or \
        sorted(words(c0)) == sorted(words(c1))


# ---- writing ---------------------------------------------------------------------------------------

def test_write_imagefolder_round_trip(tmp_path):
    ds = world.generate("photo", "classification", 6, seed=0)
    out = tmp_path / "cls"
    manifest = world.write(ds, out, "classification")
    assert manifest == out / "metadata.jsonl" and not list(out.rglob("*.tmp"))
    first = json.loads(manifest.read_text().splitlines()[0])
    assert first["file_name"] == "images/00000.png" and isinstance(first["label"], int)
    assert first["label_name"] == world.class_names("photo")[first["label"]]
    info = json.loads((out / "world.json").read_text())
    assert info["domain"] == "photo" and info["task"] == "classification" and info["n"] == 6
    assert info["seed"] == 0 and info["image_size"] == 64 and info["class_names"] == world.class_names("photo")
    assert "answer_set" in info and "vlkit_version" in info
    back = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(back) == 6 and list(back["label"]) == list(ds["label"]) and list(back["caption"]) == list(ds["caption"])
    assert list(back["label_name"]) == [world.class_names("photo")[i] for i in list(ds["label"])]
    assert np.array_equal(np.asarray(back[0]["image"].convert("RGB")), np.asarray(ds[0]["image"]))
    again = world.read(out)
    assert list(again["caption"]) == list(ds["caption"]) and again.features["label"].names == world.class_names("photo")


def test_write_grounding_and_winoground(tmp_path):
    g = world.generate("satellite", "grounding", 3, seed=0)
    world.write(g, tmp_path / "g", "grounding")
    assert list(world.read(tmp_path / "g")["box"]) == list(g["box"])
    w = world.generate("medical", "winoground", 3, seed=0)
    manifest = world.write(w, tmp_path / "w", "winoground")
    assert manifest.name == "examples.jsonl"
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert list(rows[0]) == PAIR_COLUMNS and rows[1]["image_0"] == "ex_1_img_0"
    assert (tmp_path / "w" / "images" / "ex_2_img_1.png").is_file()
    back = world.read(tmp_path / "w")
    assert list(back["caption_1"]) == list(w["caption_1"]) and list(back["collapsed_tag"]) == list(w["collapsed_tag"])
    with pytest.raises(DataError, match="no world manifest"):
        world.read(tmp_path)


def test_contact_sheet(tmp_path):
    ds = world.generate("sketch", "retrieval", 5, seed=0)
    path = world.render_contact_sheet([r["image"] for r in ds], list(ds["caption"]), tmp_path / "s.png")
    from PIL import Image as PILImage

    with PILImage.open(path) as im:
        assert im.format == "PNG" and im.width >= 4 * 128


# ---- CLI -------------------------------------------------------------------------------------------

def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlkit", "data", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_cli_generate_then_show(tmp_path):
    from typer.testing import CliRunner

    from vlkit.cli.app import build_app

    out = tmp_path / "med"
    res = run_cli("generate", "--domain", "medical", "--task", "vqa", "-n", "12", "--seed", "0", "-o", str(out),
                  "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["n"] == 12 and summary["domain"] == "medical" and Path(summary["manifest"]).is_file()
    assert "wrote 12 medical/vqa" in res.stderr
    # the files written by another process are byte-identical to an in-process generation
    ds = world.generate("medical", "vqa", 12, seed=0)
    assert image_bytes(ds)[5] == (out / "images" / "00005.png").read_bytes()
    runner = CliRunner()
    app = build_app()
    r = runner.invoke(app, ["data", "show", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "contact_sheet.png").is_file()
    sheet = tmp_path / "sheet.png"
    r = runner.invoke(app, ["data", "show", str(out), "--out", str(sheet), "-k", "2", "--json"])
    assert r.exit_code == 0 and sheet.is_file()
    r = runner.invoke(app, ["data", "generate", "--task", "winoground", "-n", "2", "-o", str(tmp_path / "w")])
    assert r.exit_code == 0 and (tmp_path / "w" / "examples.jsonl").is_file()
    assert runner.invoke(app, ["data", "show", str(tmp_path / "w")]).exit_code == 0


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    res = run_cli("generate", "--domain", "nope", "-o", str(tmp_path / "x"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown world domain 'nope'" in lines[0]
    from vlkit.cli.app import main

    for argv in (["data", "show", str(tmp_path)], ["data", "generate", "-n", "0", "-o", str(tmp_path / "y")]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2


def test_world_is_a_plugin_whose_kind_carries_what_the_rest_needs():
    """The world registers through the hooks; tasks, `vlkit data`, adapt and export read it from the registry."""
    from vlkit.data.kinds import domain_defaults, kind_domains, kind_meta
    from vlkit.plugins import registry
    from vlkit.tasks.classification import default_prompt
    from vlkit.tasks.vqa import default_answers

    for kind, name in (("dataset", "world"), ("backbone", "tiny"), ("probe", "synth-attribute-swap"),
                       ("probe", "synth-relation-swap")):
        assert registry(kind).entry(name).plugin == "vlkit.world.plugin"
    assert kind_domains("world") == world.DOMAINS and tuple(kind_meta("world")["tasks"]) == world.TASKS
    assert domain_defaults("medical") == {"class_names": world.class_names("medical"),
                                          "prompt": world.class_prompt("medical"),
                                          "answers": world.answer_set("medical")}
    assert domain_defaults("mars") is None
    ds = world.generate("satellite", "classification", 4, seed=0)
    assert default_prompt(ds) == world.class_prompt("satellite")
    assert default_answers(world.generate("sketch", "vqa", 4, seed=0)) == world.answer_set("sketch")
