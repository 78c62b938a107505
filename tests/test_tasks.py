"""Built-in tasks: pure metrics against hand-computed values, each task end to end on tiny@random."""
from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch

from vlkit.data.pipeline import materialize
from PIL import Image

import vlkit
from vlkit.errors import ConfigError, DataError
from vlkit.plugins import get_plugins, registry, reset_plugins
from vlkit.tasks import metrics as M
from vlkit.tasks.base import Task

N = 16
SHAPES = ["circle", "square", "triangle", "star"]


# --- metrics ------------------------------------------------------------------------------------
def test_accuracy_and_macro():
    pred = torch.tensor([0, 1, 1, 2, 0, 0])
    target = torch.tensor([0, 1, 2, 2, -1, 0])
    assert M.accuracy(pred, target) == pytest.approx(100 * 4 / 6)  # the -1 target is a miss
    # class 0: 2/2, class 1: 1/1, class 2: 1/2 -> mean 83.33
    assert M.per_class_accuracy(pred, target) == {0: 100.0, 1: 100.0, 2: 50.0}
    assert M.macro_accuracy(pred, target) == pytest.approx(250 / 3)
    assert M.grouped_accuracy(pred, target, torch.tensor([0, 0, 1, 1, 1, -1])) == {
        0: 100.0, 1: pytest.approx(100 / 3)}
    assert M.accuracy(torch.zeros(0), torch.zeros(0)) == 0.0


def test_retrieval_ranks_ties_and_duplicates():
    sim = torch.tensor([[0.9, 0.5, 0.1],
                        [0.9, 0.5, 0.1],
                        [0.2, 0.2, 0.2],   # all tied: pessimistic, the two non-hits count as ahead
                        [0.1, 0.3, 0.3]])  # tie between the hit (col 2) and a non-hit (col 1)
    ranks = M.retrieval_ranks(sim, torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2]))
    assert ranks.tolist() == [1, 2, 3, 2]
    assert M.recall_at_k(ranks, 1) == 25.0
    assert M.recall_at_k(ranks, 2) == 75.0
    # duplicate keys in the gallery: either copy of caption 7 is a hit
    sim = torch.tensor([[0.1, 0.8, 0.9, 0.3], [0.6, 0.5, 0.4, 0.7]])
    ranks = M.retrieval_ranks(sim, torch.tensor([7, 3]), torch.tensor([7, 7, 5, 3]))
    assert ranks.tolist() == [2, 1]
    # a query without any hit and a NaN row never count
    sim = torch.tensor([[0.5, 0.4], [float("nan"), float("nan")]])
    ranks = M.retrieval_ranks(sim, torch.tensor([9, 0]), torch.tensor([0, 1]))
    assert ranks.tolist() == [3, 2]
    keys, distinct = M.string_keys(["a", "b", "a", "c", "b"])
    assert keys.tolist() == [0, 1, 0, 2, 1] and distinct == ["a", "b", "c"]


def test_box_iou_and_giou():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.3, 0.4]])
    b = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.6, 0.6, 0.8, 0.8], [0.1, 0.1, 0.3, 0.4]])
    # overlap 0.25^2 = 1/16, union 2 * 1/4 - 1/16 = 7/16 -> 1/7
    iou = M.box_iou(a, b)
    assert iou.tolist() == pytest.approx([1 / 7, 0.0, 1.0], abs=1e-6)
    giou = M.generalized_box_iou(a, b)
    # case 0: hull (0,0)-(0.75,0.75) = 9/16, 1/7 - (9/16 - 7/16) / (9/16) = 1/7 - 2/9
    # case 1 disjoint: hull 0.64, union 0.08 -> 0 - 0.56 / 0.64 = -0.875
    assert giou.tolist() == pytest.approx([1 / 7 - 2 / 9, -0.875, 1.0], abs=1e-6)
    assert M.iou_accuracy(iou, 0.5) == pytest.approx(100 / 3)
    assert M.mean_iou(iou) == pytest.approx(100 * (1 / 7 + 1) / 3, abs=1e-4)
    assert M.box_iou(torch.tensor([0.3, 0.3, 0.3, 0.3]), torch.tensor([0.3, 0.3, 0.3, 0.3])).item() == 0.0
    box = torch.tensor([0.5, 0.4, 0.2, 0.6])
    assert M.cxcywh_to_xyxy(box).tolist() == pytest.approx([0.4, 0.1, 0.6, 0.7])
    assert M.xyxy_to_cxcywh(M.cxcywh_to_xyxy(box)).tolist() == pytest.approx(box.tolist())


# --- tiny datasets ------------------------------------------------------------------------------
def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def _dataset(task: str, n: int = N, seed: int = 0) -> datasets.Dataset:
    images = _images(n, seed)
    if task == "classification":
        feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=SHAPES)})
        return datasets.Dataset.from_dict({"image": images, "label": [i % 4 for i in range(n)]}, features=feats)
    if task == "retrieval":
        cols = {"caption": [f"a {c} {s}" for c, s in zip(["red", "blue"] * n, SHAPES * n)][:n]}
        cols["caption"][-1] = cols["caption"][0]  # a duplicate caption
    elif task == "vqa":
        cols = {"question": [f"what colour is the {SHAPES[i % 4]}" if i % 2 else "how many circles"
                             for i in range(n)],
                "answer": [["red", "two", "blue", "yes"][i % 4] for i in range(n)],
                "answer_type": [["colour", "count", "colour", "yesno_relation"][i % 4] for i in range(n)]}
    else:
        rng = np.random.default_rng(seed)
        boxes = []
        for _ in range(n):
            x0, y0 = rng.uniform(0, 0.6, 2)
            w, h = rng.uniform(0.15, 0.35, 2)
            boxes.append([float(x0), float(y0), float(x0 + w), float(y0 + h)])
        cols = {"expression": [f"the {SHAPES[i % 4]}" for i in range(n)], "box": boxes}
    return datasets.Dataset.from_dict({"image": images, **cols}).cast_column("image", datasets.Image())


@pytest.fixture(scope="module")
def backbone():
    return vlkit.load_backbone("tiny@random")


def _adapted():
    bb = vlkit.load_backbone("tiny@random")
    vlkit.inject(bb, "bottleneck")
    return bb


PRIMARY = {"classification": "accuracy", "retrieval": "mean_recall", "vqa": "accuracy", "grounding": "acc_iou50"}
KEYS = {"classification": {"pixels", "labels"}, "retrieval": {"pixels", "tokens", "caption_ids"},
        "vqa": {"pixels", "tokens", "answer_ids", "answer_types"}, "grounding": {"pixels", "tokens", "boxes"}}


def _train(task: Task, bb, data, steps: int, lr: float = 3e-3) -> list[float]:
    params = [p for p in bb.parameters() if p.requires_grad] + list(task.head.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    bb.train()
    for _ in range(steps):
        loss = task.loss(bb, data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    bb.eval()
    return losses


@pytest.mark.parametrize("name", list(PRIMARY))
def test_task_end_to_end(name):
    torch.manual_seed(0)
    bb = _adapted()
    ds = _dataset(name)
    task = registry("task").get(name)(bb, ds)
    assert task.name == name and task.metric == PRIMARY[name]
    data = materialize(task.prepare(bb, ds))
    assert set(data) == KEYS[name]
    assert all(len(v) == N for v in data.values())
    assert data["pixels"].shape == (N, 3, bb.image_size, bb.image_size)

    loss = task.loss(bb, {k: v[:8] for k, v in data.items()})
    assert torch.isfinite(loss)
    loss.backward()
    adapter_grads = [p.grad for n, p in bb.named_parameters() if p.requires_grad and ".adapters." in n]
    assert adapter_grads and any(g is not None and g.abs().sum() > 0 for g in adapter_grads)
    for p in task.head.parameters():
        assert p.grad is not None
    bb.zero_grad()
    task.head.zero_grad()

    before = task.evaluate(bb, data, batch_size=5)
    assert PRIMARY[name] in before and 0.0 <= before[PRIMARY[name]] <= 100.0
    losses = _train(task, bb, data, steps=20)
    assert losses[-1] < 0.75 * losses[0], losses
    after = task.evaluate(bb, data)
    assert after[PRIMARY[name]] >= before[PRIMARY[name]]
    meta = task.metadata()
    assert meta["name"] == name and meta["metric"] == PRIMARY[name]
    # rebuilding from recorded options without training data gives the same head layout
    again = registry("task").get(name)(bb, None, **meta["options"])
    again.load_head_state(task.head_state())
    assert again.evaluate(bb, data) == pytest.approx(after)


# --- task specifics -----------------------------------------------------------------------------
def test_classification_heads_and_labels(backbone):
    ds = _dataset("classification", n=8)
    text = registry("task").get("classification")(backbone, ds)
    assert text.prompts[0] == "a photo of a circle" and list(text.head.parameters()) == []
    linear = registry("task").get("classification")(backbone, ds, head="linear")
    data = materialize(text.prepare(backbone, ds))
    with torch.no_grad():
        zs = text.logits(backbone, data["pixels"])
        lin = linear.logits(backbone, data["pixels"])
    assert torch.allclose(zs, lin, atol=1e-4)  # the linear head starts as the zero-shot classifier
    assert text.evaluate(backbone, data) == linear.evaluate(backbone, data)
    # eval data whose ClassLabel lists the names in another order is mapped by name
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=SHAPES[::-1])})
    other = datasets.Dataset.from_dict({"image": _images(2, 1), "label": [0, 3]}, features=feats)
    assert text.prepare(backbone, other)["labels"].tolist() == [3, 0]
    custom = registry("task").get("classification")(backbone, None, class_names=["a", "b"], prompt="an {} thing")
    assert custom.prompts == ["an a thing", "an b thing"]
    with pytest.raises(ConfigError):
        registry("task").get("classification")(backbone, ds, prompt="no placeholder")
    with pytest.raises(ConfigError):
        registry("task").get("classification")(backbone, ds, head="mlp")
    with pytest.raises(ConfigError):
        registry("task").get("classification")(backbone, ds, bogus=1)
    with pytest.raises(ConfigError):
        registry("task").get("classification")(backbone, None)
    with pytest.raises(DataError):
        text.prepare(backbone, ds.remove_columns("label"))


def test_retrieval_duplicates(backbone):
    from vlkit.tasks.retrieval import contrastive_loss

    # images 1 and 2 differ, captions 0 and 1 are one string (identical text embeddings); scale 1.
    # Hand computation, both directions: (log(2e+1) + 2 log(e+2) - 2) / 3.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ref = (math.log(2 * math.e + 1) + 2 * math.log(math.e + 2) - 2) / 3
    keyed = contrastive_loss(img, txt, torch.tensor(1.0), torch.tensor([0, 0, 1]))
    assert keyed.item() == pytest.approx(ref, abs=1e-5)
    # soft targets: with one key for both rows every pair is a positive, each target is (1/2, 1/2);
    # logits 5 * a @ t.T = [[5, 0], [3, 4]] -> mean over rows and columns of logsumexp - mean logit
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    soft = contrastive_loss(a, t, torch.tensor(5.0), torch.tensor([3, 3]))

    def lse(*v):
        return math.log(sum(math.exp(x) for x in v))

    ref = (lse(5, 0) - 2.5 + lse(3, 4) - 3.5 + lse(5, 3) - 4 + lse(0, 4) - 2) / 4
    assert soft.item() == pytest.approx(ref, abs=1e-5)
    # a dataset whose captions are all the same: every retrieval is a hit
    ds = _dataset("retrieval", n=6).map(lambda r: {"caption": "a red circle"})
    task = registry("task").get("retrieval")(backbone, ds)
    data = materialize(task.prepare(backbone, ds))
    assert data["caption_ids"].tolist() == [0] * 6
    out = task.evaluate(backbone, data)
    assert out["mean_recall"] == 100.0 and set(out) == {
        "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"}


def test_vqa_answer_set(backbone):
    ds = _dataset("vqa", n=8)
    task = registry("task").get("vqa")(backbone, ds)
    assert task.answers == ["blue", "red", "two", "yes"]
    head_params = sum(p.numel() for p in task.head.parameters())
    assert head_params < 0.03 * sum(p.numel() for p in backbone.parameters())
    unseen = ds.map(lambda r, i: {"answer": "purple" if i == 0 else r["answer"], "answer_type": "odd"},
                    with_indices=True)
    data = task.prepare(backbone, unseen)
    assert data["answer_ids"][0].item() == -1
    out = task.evaluate(backbone, data)
    assert set(out) == {"accuracy", "accuracy_odd"}
    fixed = registry("task").get("vqa")(backbone, None, answers=["Yes", "no"], hidden=8)
    assert fixed.prepare(backbone, ds)["answer_ids"].tolist()[:4] == [-1, -1, -1, 0]
    with pytest.raises(ConfigError):
        registry("task").get("vqa")(backbone, None)


def test_grounding_boxes(backbone):
    ds = _dataset("grounding", n=4)
    task = registry("task").get("grounding")(backbone, ds)
    assert (task.num_tokens, task.width) == (64, 128)
    data = materialize(task.prepare(backbone, ds))
    boxes = task.predict(backbone, data)
    assert boxes.shape == (4, 4) and bool((boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all())
    bad = ds.map(lambda r: {"box": [10.0, 10.0, 40.0, 50.0]})
    with pytest.raises(DataError):
        task.prepare(backbone, bad)


def test_encode_image_tokens(backbone):
    x = torch.randn(2, 3, 64, 64)
    pooled, tokens = backbone.encode_image_tokens(x)
    assert tokens.shape == (2, 64, 128) and not backbone.model.visual.output_tokens
    assert torch.allclose(pooled, backbone.encode_image(x), atol=1e-5)


def test_encode_image_tokens_hf():
    transformers = pytest.importorskip("transformers")
    from vlkit.backbones.hf import HFBackbone

    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)
    tc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
              max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    x = torch.randn(2, 3, 32, 32)
    for model in (transformers.CLIPModel(transformers.CLIPConfig(vision_config=vc, text_config=tc, projection_dim=24)),
                  transformers.SiglipModel(transformers.SiglipConfig(vision_config=vc, text_config=tc))):
        bb = HFBackbone(model.eval(), "hf:test", None, 32, (0.5,) * 3, (0.5,) * 3, 16)
        pooled, tokens = bb.encode_image_tokens(x)
        assert tokens.shape == (2, 16, 32)
        assert torch.allclose(pooled, bb.encode_image(x), atol=1e-5)


# --- plugins ------------------------------------------------------------------------------------
def test_builtin_and_third_party_tasks_registered(backbone):
    from vlkit.hookspecs import hookimpl

    class EchoTask(Task):
        name, metric, required = "echo", "score", ("image",)

        def prepare(self, backbone, ds):
            return {"x": torch.zeros(len(ds))}

        def loss(self, backbone, batch):
            return batch["x"].sum()

        def evaluate(self, backbone, data, batch_size=256):
            return {"score": 100.0}

    class Plugin:
        @hookimpl
        def register_tasks(self, register):
            register("echo", EchoTask, "a test task")

    reset_plugins()
    try:
        assert {"classification", "retrieval", "vqa", "grounding"} <= set(registry("task").names())
        get_plugins().register_plugin(Plugin(), name="echo-plugin")
        entry = registry("task").entry("echo")
        assert entry.obj is EchoTask and entry.plugin == "echo-plugin"
        task = entry.obj(backbone, None)
        assert task.evaluate(backbone, task.prepare(backbone, _dataset("classification", n=2))) == {"score": 100.0}
    finally:
        reset_plugins()
    assert "echo" not in registry("task").names()


# --- the procedural world, when it is there -------------------------------------------------------
def _world_generate():
    try:
        from vlkit.world import generate
    except ImportError:
        return None
    return generate


@pytest.mark.parametrize("name", list(PRIMARY))
def test_task_on_world(name):
    generate = _world_generate()
    if generate is None:
        pytest.skip("vlkit.world.generate is not available yet")
    bb = vlkit.load_backbone("tiny@random")
    ds = generate("photo", name, 16, 0)
    task = registry("task").get(name)(bb, ds)
    data = materialize(task.prepare(bb, ds))
    assert torch.isfinite(task.loss(bb, {k: v[:8] for k, v in data.items()}))
    assert PRIMARY[name] in task.evaluate(bb, data)


def test_vqa_uses_the_fused_pair():
    torch.manual_seed(0)
    bb = vlkit.load_backbone("tiny@random")
    ds = _dataset("vqa", n=4)
    task = registry("task").get("vqa")(bb, ds)
    data = materialize(task.prepare(bb, ds))
    with torch.no_grad():
        apart = task.pair_features(bb, data["pixels"], data["tokens"])
    vlkit.inject(bb, "fusion", name="f")
    assert bb.joint_active()
    with torch.no_grad():  # identity at init: the same features
        assert torch.allclose(task.pair_features(bb, data["pixels"], data["tokens"]), apart, atol=1e-5)
    task.loss(bb, data).backward()
    grads = [p.grad for n, p in bb.named_parameters() if ".adapters.f." in n]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
