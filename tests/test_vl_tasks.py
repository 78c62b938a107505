"""Generative tasks (captioning, vqa-gen, gqa, nlvr2): their metrics against the official implementations, the
world's generative data, the public datasets' own file layouts, and training through the one engine with an
exact resume."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from vl_models import make_lm

from vlkit.data import load_data
from vlkit.data.pipeline import TextColumn
from vlkit.errors import ConfigError, DataError
from vlkit.plugins import registry
from vlkit.tasks.answer_metrics import exact_match, normalize_answer, vqa_accuracy
from vlkit.tasks.caption_metrics import bleu, caption_scores, cider_d, ptb_tokenize

REFS = [
    ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave.", "a person surfing in the ocean",
     "Man on a surfboard riding a wave!", "A surfer, in a black wetsuit, rides the wave."],
    ["Two dogs playing with a red frisbee in the park.", "Dogs play in the grass.", "two dogs chase a frisbee",
     "A couple of dogs running on a lawn.", "The dogs aren't tired; they're playing."],
    ["A plate of food (rice and beans) on a table.", "a plate with rice, beans and salad", "Food on a white plate.",
     "A dinner plate holds rice and beans", "Rice & beans on a dish"],
    ["A red bus parked at the side of the road.", "A double-decker bus on a city street.", "red bus on the street",
     "The bus isn't moving.", "A bus stopped near a curb."],
]
HYPS = ["a man riding a wave on a surfboard", "two dogs playing with a frisbee", "a plate of rice and beans",
        "a red bus on the street"]


def test_cider_d_and_bleu4_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    for hyps in (HYPS, ["a wave", "dogs", "a red bus parked on a plate of food today", ""]):
        toks = [ptb_tokenize(h) for h in hyps]
        refs = [[ptb_tokenize(r) for r in rs] for rs in REFS]
        gts = {i: rs for i, rs in enumerate(refs)}
        res = {i: [h] for i, h in enumerate(toks)}
        c_mean, c_each = Cider().compute_score(gts, res)
        assert cider_d(toks, refs) == pytest.approx(list(c_each), abs=1e-12)
        b, _ = Bleu(4).compute_score(gts, res, verbose=0)
        assert bleu(toks, refs) == pytest.approx(b, abs=1e-12)
        scores = caption_scores(hyps, REFS)
        assert scores == pytest.approx({"cider": 100 * c_mean, "bleu4": 100 * b[3]}, abs=1e-9)
    assert caption_scores(HYPS, REFS)["cider"] > caption_scores(HYPS[::-1], REFS)["cider"] + 50


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer runs on java")
def test_ptb_tokenize_equals_the_stanford_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = [r for rs in REFS for r in rs] + ['A "big" bus at 10:30 a.m. in the U.S.', "It can't be -- or can it?",
                                              "'Hello' said the dog's owner...", "A 1,000-year-old church [left]"]
    java = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [ptb_tokenize(t) for t in texts] == [java[i][0] for i in range(len(texts))]


@pytest.mark.parametrize("pred,answers,expected", [
    ("2", ["2"] * 3 + ["two"] * 2 + ["3"] * 5, 1.0),          # number words normalised when humans disagree
    ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),                    # (2 * 1/3 + 8 * 2/3) / 10
    ("Two", ["2"] * 10, 0.0),                                  # all agree: the official script normalises nothing
    ("the cat.", ["cat"] * 3 + ["dog"] * 7, 0.9),              # article and period: (3 * 2/3 + 7 * 1) / 10
    ("dont know", ["don't know"] * 4 + ["no"] * 6, 1.0),       # contraction restored
    ("red", ["red"] + ["blue"] * 9, 0.3),                      # 9 * 1/3 / 10
    ("blue\n", ["red"] + ["blue"] * 9, 1.0),
])
def test_vqa_soft_accuracy_hand_computed(pred, answers, expected):
    assert vqa_accuracy(pred, answers) == pytest.approx(expected)


def test_answer_normalisation():
    assert normalize_answer("The two dogs, isnt it?") == "2 dogs isn't it"
    assert normalize_answer("3.5 a.m.") == "3.5 am"
    assert exact_match("A Circle.", "circle") == 1.0 and exact_match("square", "circle") == 0.0


def test_text_column_indexes_like_a_tensor_and_draws_references_per_epoch():
    col = TextColumn([["a", "b", "c", "d"], ["e"], ["f", "g"]], choose=True)
    assert col.fetch([0, 1, 2]).tolist() == ["a", "e", "f"]  # outside training: the first reference
    draws = {tuple(col.fetch([0, 2], epoch=e).tolist()) for e in range(12)}
    assert len(draws) > 1 and all(d[0] in "abcd" and d[1] in "fg" for d in draws)
    assert col.fetch([0], epoch=3).tolist() == col.fetch([0], epoch=3).tolist()
    plain = TextColumn(["x", "y", "z"])
    assert plain[torch.tensor([2, 0])].tolist() == ["z", "x"] and plain[1:].tolist() == ["y", "z"]
    assert plain.to("cpu") is plain


# --- the world's generative data --------------------------------------------------------------------------------

def _objects(scene: str) -> list[dict]:
    return json.loads(scene)["objects"]


def test_world_generates_the_four_tasks():
    cap = load_data({"kind": "world", "domain": "sketch", "task": "captioning", "n": 6, "image_size": 32},
                    task="captioning")
    assert all(len(r) == 5 and r[0] == c for r, c in zip(cap["references"], cap["caption"], strict=True))
    gqa = load_data({"kind": "world", "domain": "photo", "task": "gqa", "n": 16, "image_size": 32}, task="gqa")
    types = gqa["answer_type"]
    assert sorted(set(types)) == ["compare_size", "relate_attribute", "relate_shape", "verify_relation"]
    assert all(types.count(t) == 4 for t in set(types))
    for q, a, t, scene in zip(gqa["question"], gqa["answer"], types, gqa["scene"], strict=True):
        shapes = [o["shape"] for o in _objects(scene)]
        if t == "compare_size":
            assert a in shapes and a in q
        elif t == "verify_relation":
            assert a in ("yes", "no")
    again = load_data({"kind": "world", "domain": "photo", "task": "gqa", "n": 16, "image_size": 32})
    assert again["question"] == gqa["question"]


def test_world_nlvr2_statements_hold_as_labelled_and_are_balanced():
    ds = load_data({"kind": "world", "domain": "photo", "task": "nlvr2", "n": 24, "image_size": 32}, task="nlvr2")
    assert sum(ds["label"]) == 12
    checked = 0
    for text, label, s0, s1 in zip(ds["sentence"], ds["label"], ds["scene_0"], ds["scene_1"], strict=True):
        scenes = [_objects(s0), _objects(s1)]
        m = re.fullmatch(r"there (?:is|are) (one|two|three) (\w+) in total", text)
        if m:
            n = ("one", "two", "three").index(m.group(1)) + 1
            total = sum(o["shape"] in (m.group(2), m.group(2).rstrip("s"), m.group(2)[:-2])
                        for objs in scenes for o in objs)
            assert (total == n) == label, text
            checked += 1
        m = re.fullmatch(r"(both images|exactly one image) contains? an? (?:(\w+) )?(\w+)", text)
        if m:
            has = [any(o["shape"] == m.group(3) and (m.group(2) is None or o.get("colour") == m.group(2))
                       for o in objs) for objs in scenes]
            assert (all(has) if m.group(1) == "both images" else sum(has) == 1) == label, text
            checked += 1
    assert checked >= 8


# --- the public datasets' own layouts ---------------------------------------------------------------------------

def _jpg(path: Path, seed: int, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(seed).random((20, 24, 3)) * 255).astype("uint8")
    Image.fromarray(arr).save(path, fmt)


def test_readers_of_the_public_layouts(tmp_path):
    coco = tmp_path / "coco"
    for i in (1, 2):
        _jpg(coco / "val2014" / f"COCO_val2014_{i:012d}.jpg", i)
    (coco / "annotations").mkdir()
    (coco / "annotations" / "captions_val2014.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (1, 2)],
        "annotations": [{"id": 10 + k, "image_id": 1 + k % 2, "caption": f"caption {k}"} for k in range(5)]}))
    ds = load_data(f"coco-captions:{coco / 'annotations' / 'captions_val2014.json'}", task="captioning")
    assert ds["references"] == [["caption 0", "caption 2", "caption 4"], ["caption 1", "caption 3"]]
    assert ds["caption"] == ["caption 0", "caption 1"] and ds[0]["image"].size == (24, 20)

    vqa = tmp_path / "vqa"
    _jpg(vqa / "val2014" / "COCO_val2014_000000000007.jpg", 7)
    (vqa / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({
        "data_subtype": "val2014", "questions": [{"image_id": 7, "question": "How many?", "question_id": 70}]}))
    (vqa / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [{
        "question_id": 70, "image_id": 7, "multiple_choice_answer": "2", "answer_type": "number",
        "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(["2"] * 6 + ["two"] * 4)]}]}))
    ds = load_data(f"vqav2:{vqa / 'v2_OpenEnded_mscoco_val2014_questions.json'}", task="vqa-gen")
    assert ds[0]["answers"] == ["2"] * 6 + ["two"] * 4 and ds[0]["question"] == "How many?"

    gqa = tmp_path / "gqa"
    _jpg(gqa / "images" / "n123.jpg", 3)
    (gqa / "questions").mkdir()
    (gqa / "questions" / "testdev_balanced_questions.json").write_text(json.dumps({"201": {
        "imageId": "n123", "question": "Is the cup left of the plate?", "answer": "yes",
        "fullAnswer": "Yes, it is.", "types": {"structural": "verify"}}}))
    ds = load_data(f"gqa-questions:{gqa / 'questions' / 'testdev_balanced_questions.json'}", task="gqa")
    assert ds[0]["question_id"] == "201" and ds[0]["answer"] == "yes" and ds[0]["answer_type"] == "verify"

    nl = tmp_path / "nlvr2"
    for side in (0, 1):
        _jpg(nl / "images" / "dev" / f"dev-850-0-img{side}.png", side, "PNG")
        _jpg(nl / "images" / "train" / "3" / f"train-10-1-img{side}.png", 5 + side, "PNG")
    (nl / "data").mkdir()
    (nl / "data" / "dev.json").write_text(json.dumps({"identifier": "dev-850-0-0", "sentence": "Two dogs.",
                                                      "label": "True"}) + "\n")
    (nl / "data" / "train.json").write_text(json.dumps({"identifier": "train-10-1-2", "sentence": "No dogs.",
                                                        "label": "False", "directory": 3}) + "\n")
    dev = load_data(f"nlvr2-jsonl:{nl / 'data' / 'dev.json'}", task="nlvr2")
    train = load_data(f"nlvr2-jsonl:{nl / 'data' / 'train.json'}", task="nlvr2")
    assert dev[0]["label"] == "true" and train[0]["label"] == "false"
    assert np.asarray(train[0]["image_1"]).tolist() != np.asarray(train[0]["image_0"]).tolist()
    (nl / "data" / "test1.json").write_text(json.dumps({"identifier": "test1-1-0-0", "sentence": "x",
                                                        "label": "True"}) + "\n")
    with pytest.raises(DataError, match="cannot find the images"):
        load_data(f"nlvr2-jsonl:{nl / 'data' / 'test1.json'}", task="nlvr2")
    with pytest.raises(ConfigError, match="unknown option"):
        load_data(f"gqa-questions:{gqa / 'questions' / 'testdev_balanced_questions.json'}", split_by="x")


# --- tasks on a generative backbone, trained through the engine ------------------------------------------------

@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return make_lm("t5", tmp_path_factory.mktemp("lms"))


def test_tasks_refuse_a_backbone_that_does_not_generate():
    for name in ("captioning", "vqa-gen", "gqa", "nlvr2"):
        with pytest.raises(ConfigError, match="generates text: it needs a generative backbone"):
            registry("task").get(name)(SimpleNamespace(kind="contrastive", spec="tiny"))


def test_prepare_prompts_targets_and_two_images(t5_dir):
    import vlkit

    bb = vlkit.load(f"vl:lm={t5_dir},vision=tiny@random").backbone
    ds = load_data({"kind": "world", "domain": "photo", "task": "nlvr2", "n": 4, "image_size": 32}, task="nlvr2")
    task = registry("task").get("nlvr2")(bb, ds)
    data = task.prepare(bb, ds)
    assert tuple(data["pixels"][:2].shape) == (2, 2, 3, bb.image_size, bb.image_size)
    assert data["prompts"].tolist()[0] == "nlvr: " + ds[0]["sentence"]
    assert data["targets"].tolist() == ["true" if v else "false" for v in ds["label"]]
    assert torch.isfinite(task.loss(bb, {k: v[:2] for k, v in data.items()}))
    scores = task.evaluate(bb, data, batch_size=3)
    assert set(scores) == {"accuracy"} and 0 <= scores["accuracy"] <= 100
    out = task.answer(bb, data["pixels"][:1], ds[0]["sentence"])
    assert out["task"] == "nlvr2" and isinstance(out["text"], str)


class _Killed(Exception):
    pass


def test_kill_and_resume_is_bit_exact(t5_dir, tmp_path):
    from vlkit.train.engine import train

    def cfg():
        return {"name": "cap", "backbone": f"vl:lm={t5_dir},vision=tiny@random", "method": "adapter",
                "adapter": {"variant": "lora", "rank": 2, "towers": "lm"},
                "task": {"name": "captioning", "options": {"max_new_tokens": 3}},
                "data": {"train": {"kind": "world", "domain": "photo", "task": "captioning", "n": 6, "image_size": 32},
                         "eval": {"kind": "world", "domain": "photo", "task": "captioning", "n": 2, "seed": 5,
                                  "image_size": 32}, "num_workers": 1},
                "optim": {"steps": 5, "batch_size": 4, "warmup_steps": 0, "lr": 5e-2},
                "logging": {"tensorboard": False, "plot": False}, "eval": {"batch_size": 4},
                "checkpoint": {"every_steps": 1}, "seed": 0}

    full = train(cfg(), tmp_path / "full")
    assert full["steps"] == 5 and {"cider", "bleu4"} <= set(full["metrics"])

    def kill_at_3(event, **info):
        if event == "step" and info["step"] == 3:
            raise _Killed

    with pytest.raises(_Killed):
        train(cfg(), tmp_path / "killed", progress=kill_at_3)
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists()
    train(cfg(), tmp_path / "killed", resume=True)
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = {k: v for k, v in a.items()}
    assert any(v.abs().sum() > 0 for v in start.values())
