"""`optim.head_lr`: the task head in its own optimiser group, checked in the recipe, used by the engine."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vlkit.errors import ConfigError
from vlkit.train.engine import param_groups
from vlkit.train.recipe import load_recipe

BASE = {"name": "h", "backbone": "tiny@random", "method": "adapter",
        "adapter": {"variant": "bottleneck", "reduction": 16, "towers": "vision"},
        "task": {"name": "classification", "options": {"head": "linear"}},
        "data": {"train": {"kind": "world", "domain": "photo", "task": "classification", "n": 32, "seed": 0}},
        "optim": {"lr": 1e-3, "steps": 2, "batch_size": 16},
        "logging": {"tensorboard": False, "plot": False}}


def test_param_groups_split_the_head_only_when_asked():
    a, b, h = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    trainable = {"backbone.x": a, "backbone.y": b, "head.linear.weight": h}
    one = param_groups(trainable, 1e-3, None)
    assert len(one) == 1 and one[0]["lr"] == 1e-3 and len(one[0]["params"]) == 3
    two = param_groups(trainable, 1e-3, 5e-2)
    assert [g["lr"] for g in two] == [1e-3, 5e-2]
    assert two[0]["params"] == [a, b] and two[1]["params"] == [h]
    only_head = param_groups({"head.w": h}, 1e-3, 5e-2)
    assert len(only_head) == 1 and only_head[0]["lr"] == 5e-2


def test_recipe_rejects_a_non_positive_head_lr():
    with pytest.raises(ConfigError, match="optim.head_lr"):
        load_recipe(None, ["optim.head_lr=0"], base=BASE)
    assert load_recipe(None, ["optim.head_lr=0.05"], base=BASE).optim.head_lr == pytest.approx(0.05)


def test_head_moves_faster_with_a_larger_head_lr(tmp_path):
    from vlkit.backbones.loading import load_backbone
    from vlkit.train.engine import build_task, load_datasets, run

    cfg0 = load_recipe(None, base=BASE)
    start = build_task(load_backbone(cfg0.backbone), cfg0, load_datasets(cfg0)[0]).head.linear.weight.detach()
    moved = {}
    for head_lr in (1e-4, 1e-1):
        cfg = load_recipe(None, [f"optim.head_lr={head_lr}"], base=BASE)
        _, _, task = run(cfg, tmp_path / str(head_lr), progress=False)
        moved[head_lr] = float((task.head.linear.weight.detach() - start).abs().max())
    assert moved[1e-4] > 0 and moved[1e-1] > 10 * moved[1e-4]
