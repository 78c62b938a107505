"""One way to train: every recipe becomes jobs built by its method's `prepare` (vlkit.train.plan).

A task inside a multi-task recipe gets its adapter exactly as the same task's single-task recipe does: the
variant's `options_from_data` (CoOp's initial prompt and class names) and `init_from_data` (Tip-Adapter-F's
cache) see that task and its data.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vlkit.errors import ConfigError
from vlkit.train.engine import run
from vlkit.train.methods import AdapterMethod
from vlkit.train.plan import MultiTaskPlan, Plan, build_plan, job_count
from vlkit.train.recipe import load_recipe


def _data(domain: str, n: int) -> dict:
    return {"train": {"kind": "world", "domain": domain, "task": "classification", "n": n, "seed": 0}}


def _single(adapter: dict, domain: str = "medical", n: int = 20, name: str = "med"):
    return load_recipe(None, [], allow_untrained=True, base={
        "name": name, "backbone": "tiny", "adapter": adapter, "data": _data(domain, n), "optim": {"steps": 0},
        "task": {"name": "classification", "options": {"head": "text"}},
        "logging": {"tensorboard": False, "plot": False}})


def _multi(adapter: dict, sizes=(20, 20), head: str = "text"):
    tasks = [{"name": "classification", "options": {"head": head}, "adapter": name, "data": _data(domain, n)}
             for (name, domain), n in zip((("med", "medical"), ("sat", "satellite")), sizes, strict=True)]
    return load_recipe(None, [], allow_untrained=True, base={
        "name": "mt", "backbone": "tiny", "adapter": adapter, "tasks": tasks, "optim": {"steps": 0},
        "logging": {"tensorboard": False, "plot": False}})


def _saved(d):
    config = json.loads((d / "adapter_config.json").read_text())["config"]
    return config, load_file(str(d / "adapter_model.safetensors"))


@pytest.mark.parametrize("options", [{}, {"class_specific": True}], ids=["shared", "class-specific"])
def test_multitask_coop_derives_its_prompts_as_a_single_task_run(tmp_path, options):
    adapter = {"variant": "coop", **options}
    run(_single(adapter), tmp_path / "single", progress=False)
    run(_multi(adapter), tmp_path / "multi", progress=False)
    single_cfg, single_t = _saved(tmp_path / "single")
    multi_cfg, multi_t = _saved(tmp_path / "multi" / "adapters" / "med")
    assert single_cfg["init_prompt"] != "a photo of a"  # the world's medical class prompt, not the default
    for key in ("init_prompt", "context_ids", "context_start", "class_specific", "class_names", "class_ids"):
        assert multi_cfg[key] == single_cfg[key], key
    assert set(multi_t) == set(single_t)
    assert all(torch.equal(multi_t[k], single_t[k]) for k in single_t)  # the learned context at init
    sat_cfg, _ = _saved(tmp_path / "multi" / "adapters" / "sat")
    sat_task = json.loads((tmp_path / "multi" / "adapters" / "sat" / "task.json").read_text())
    assert sat_cfg["init_prompt"] == sat_task["options"]["prompt"].split("{}")[0].strip() != single_cfg["init_prompt"]
    if options:
        assert sat_cfg["class_names"] == sat_task["options"]["class_names"] != single_cfg["class_names"]


def test_multitask_tip_adapter_f_fills_each_cache_from_its_own_task(tmp_path):
    run(_multi({"variant": "tip-adapter-f"}, sizes=(15, 25)), tmp_path / "mt", progress=False)
    for name, n in (("med", 15), ("sat", 25)):
        cfg, tensors = _saved(tmp_path / "mt" / "adapters" / name)
        assert cfg["cache_size"] == n and cfg["num_classes"] == 5
        values = [t for k, t in tensors.items() if k.endswith(".values")]
        keys = [t for k, t in tensors.items() if k.endswith(".keys")]
        assert values and all(int(v.sum()) == n for v in values)  # one one-hot row per training image
        assert keys and all(k.shape[0] == n and k.abs().sum() > 0 for k in keys)


def test_every_job_is_built_by_the_method_prepare(monkeypatch):
    from vlkit.backbones.loading import load_backbone

    calls = []
    real = AdapterMethod.prepare

    def spy(self, backbone, task, cfg, adapter_options, train_data=None):
        calls.append((cfg.name, task.class_names, len(train_data)))
        return real(self, backbone, task, cfg, adapter_options, train_data=train_data)

    monkeypatch.setattr(AdapterMethod, "prepare", spy)
    multi = _multi({"variant": "bottleneck"}, sizes=(12, 16), head="linear")
    plan = build_plan(multi, load_backbone("tiny"))
    assert isinstance(plan, MultiTaskPlan) and job_count(multi) == 2 and plan.label == "multitask"
    assert [c[0] for c in calls] == ["med", "sat"] and [c[2] for c in calls] == [12, 16]
    assert [j.adapter for j in plan.jobs] == ["med", "sat"] and [j.active.names for j in plan.jobs] == [("med",),
                                                                                                       ("sat",)]
    assert calls[0][1] != calls[1][1]  # each prepare saw its own task
    heads = [n for n in plan.trainable if n.startswith("head.")]
    assert heads and all(n.startswith(("head.med.", "head.sat.")) for n in heads)
    assert any(".med." in n for n in plan.trainable) and any(".sat." in n for n in plan.trainable)
    calls.clear()
    single = _single({"variant": "bottleneck"}, n=12)
    plan = build_plan(single, load_backbone("tiny"))
    assert type(plan) is Plan and job_count(single) == 1 and plan.label == "classification"
    assert [c[0] for c in calls] == ["med"] and plan.jobs[0].adapter == "med" and plan.jobs[0].name is None


def test_multitask_on_a_compose_base_is_refused_at_the_recipe_check(tmp_path):
    with pytest.raises(ConfigError, match="compose.base.*multi-task"):
        load_recipe(None, [f"compose.base={tmp_path}"], base={
            "tasks": [{"name": "classification", "data": _data("medical", 8)}], "optim": {"steps": 1}})
