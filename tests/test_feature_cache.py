"""The frozen-tower feature cache: hits, misses on changed weights or data, and unchanged training results."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlkit
from vlkit.data import load_data
from vlkit.plugins import registry
from vlkit.tasks.features import FeatureCache, frozen_towers, image_embed
from vlkit.train.engine import run
from vlkit.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _column(bb, n=6, seed=0):
    ds = load_data({"kind": "world", "domain": "photo", "task": "classification", "n": n, "seed": seed})
    task = registry("task").get("classification")(bb, ds)
    return task.prepare(bb, ds)["pixels"]


def test_cache_hits_and_misses_on_changed_weights_or_data():
    bb = vlkit.load_backbone("tiny@random").eval()
    cache = FeatureCache()
    col = _column(bb)
    first = cache.images(bb, col)
    assert torch.allclose(first, bb.encode_image(col.materialize()).float(), atol=1e-5)
    assert torch.equal(cache.images(bb, col), first) and (cache.hits, cache.misses) == (1, 1)
    cache.images(bb, _column(bb, seed=1))
    assert cache.misses == 2, "other data must miss"
    tokens = bb.tokenize(["a red circle", "a blue square"])
    cache.texts(bb, tokens)
    with torch.no_grad():
        next(p for n, p in bb.model.named_parameters() if n.startswith("visual.")).add_(1e-3)
    changed = cache.images(bb, col)
    assert cache.misses == 4 and not torch.equal(changed, first), "a changed vision weight must miss"
    cache.texts(bb, tokens)
    assert cache.hits == 2, "the text tower did not change: its entry still hits"


def test_frozen_towers_from_trainable_names():
    bb = vlkit.load_backbone("tiny@random")
    vlkit.inject(bb, "lora", name="v", rank=2, towers="vision")
    names = [f"backbone.{n}" for n, p in bb.named_parameters() if p.requires_grad]
    assert frozen_towers(bb, names) == {"text"}
    assert frozen_towers(bb, []) == {"vision", "text"}
    assert frozen_towers(bb, names + ["head.linear.weight"]) == {"text"}


def test_embed_helpers_accept_features():
    bb = vlkit.load_backbone("tiny@random").eval()
    px = _column(bb, n=2).materialize()
    feats = bb.encode_image(px)
    assert torch.allclose(image_embed(bb, feats), bb.encode_image(px, normalize=True), atol=1e-6)


@pytest.mark.parametrize("case", ["linear-probe", "vision-only-retrieval"])
def test_cached_run_matches_uncached(tmp_path, case):
    if case == "linear-probe":
        over = ["method=linear-sgd", "task.options.head=linear"]  # the SGD head: trained through the loop
        recipe = ROOT / "recipes" / "quickstart.yaml"
        data = ["data.train.n=32", "data.eval.n=16"]
    else:
        over = ["adapter.variant=lora", "adapter.rank=2", "adapter.towers=vision", "task.name=retrieval",
                "~task.options.head"]
        recipe = ROOT / "recipes" / "quickstart.yaml"
        data = ["data.train.task=retrieval", "data.eval.task=retrieval", "data.train.n=32", "data.eval.n=16"]
    common = ["optim.steps=4", "eval.every_steps=2", "checkpoint.every_steps=0", "logging.tensorboard=false",
              "logging.plot=false", "backbone=tiny@random", *data, *over]
    results = {}
    for flag in ("true", "false"):
        cfg = load_recipe(recipe, [*common, f"data.feature_cache={flag}"])
        res, _, _ = run(cfg, tmp_path / flag)
        results[flag] = res
    a, b = results["true"], results["false"]
    for k, v in b["metrics"].items():
        assert a["metrics"][k] == pytest.approx(v, abs=1e-3), k
    name = "head.safetensors" if case == "linear-probe" else "adapter_model.safetensors"
    ta, tb = (load_file(str(tmp_path / f / name)) for f in ("true", "false"))
    assert all(torch.allclose(ta[k], tb[k], atol=1e-5) for k in ta)
