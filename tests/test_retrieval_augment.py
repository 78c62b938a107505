"""Retrieval pre-training aids: NegCLIP word-swap negatives, caption word dropping, and the pairs task."""
from __future__ import annotations

import torch

from vlkit.data.pipeline import materialize

import vlkit
from vlkit.tasks.retrieval import RetrievalTask, negclip_loss, swap_word

GROUPS = [["circle", "square", "star"], ["red", "blue"], ["left", "right"]]


def test_swap_word_changes_exactly_one_word_within_its_group():
    cap = "a red circle left of a blue square"
    for seed in range(20):
        neg = swap_word(cap, GROUPS, seed)
        diff = [(a, b) for a, b in zip(cap.split(), neg.split()) if a != b]
        assert len(diff) == 1
        a, b = diff[0]
        assert any(a in g and b in g for g in GROUPS)
    assert swap_word("nothing to swap here", GROUPS, 0) is None
    assert swap_word(cap, GROUPS, 3) == swap_word(cap, GROUPS, 3)


def test_negclip_loss_penalises_a_negative_closer_than_the_positive():
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    txt = img.clone()
    far = -img
    near = img + 0.01
    valid = torch.ones(4, dtype=torch.bool)
    scale = torch.tensor(10.0)
    assert negclip_loss(img, txt, far, valid, scale) < negclip_loss(img, txt, near, valid, scale)
    # invalid negatives are ignored: the loss equals plain InfoNCE image->text part with no extra columns
    none = negclip_loss(img, txt, near, torch.zeros(4, dtype=torch.bool), scale)
    assert none < negclip_loss(img, txt, near, valid, scale)


def test_drop_words_removes_a_whole_group_and_keeps_end_of_text_last():
    bb = vlkit.load_backbone("tiny@random")
    task = RetrievalTask(bb, None, drop_groups=[["red", "blue"]], drop_prob=1.0)
    tok = bb.tokenize(["a red circle left of a blue square", "a circle"])
    out = task.drop_words(tok)
    red, blue = bb.tokenize("red")[0, 1], bb.tokenize("blue")[0, 1]
    assert not torch.isin(out[0], torch.stack([red, blue])).any()
    assert torch.equal(out[1], tok[1])
    eot = tok.max()
    assert int(out[0].argmax()) == int((out[0] != 0).sum()) - 1 and out[0].max() == eot


def test_prepare_adds_hard_negatives_and_loss_uses_them():
    from vlkit import world

    bb = vlkit.load_backbone("tiny@random")
    ds = world.generate("photo", "retrieval", 8, seed=0)
    task = RetrievalTask(bb, ds, swap_groups=[["red", "orange", "yellow", "green", "blue", "purple", "black"]])
    data = materialize(task.prepare(bb, ds))
    assert data["neg_tokens"].shape == data["tokens"].shape and data["neg_valid"].all()
    assert not torch.equal(data["neg_tokens"], data["tokens"])
    loss = task.loss(bb, data)
    assert torch.isfinite(loss)


def test_pairs_task_scores_and_metrics():
    from vlkit import world
    from vlkit.tasks.pairs import PairsTask

    bb = vlkit.load_backbone("tiny@random")
    ds = world.generate("photo", "winoground", 6, seed=0)
    task = PairsTask(bb, ds)
    data = materialize(task.prepare(bb, ds))
    out = task.evaluate(bb, data)
    assert {"text_score", "image_score", "group_score"} <= set(out)
    loss = task.loss(bb, data)
    assert torch.isfinite(loss)
