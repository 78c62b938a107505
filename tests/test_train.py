"""Training engine: recipes, outputs, resume after a real kill, 2-process data parallel, CLI errors."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlkit.errors import ConfigError
from vlkit.train.recipe import load_recipe

RECIPE = """
name: t
backbone: tiny@random
method: adapter
adapter: {variant: lora, rank: 2, dropout: 0.1}
task: {name: classification}
data:
  train: {kind: world, domain: photo, task: classification, n: 48, seed: 0}
  eval: {kind: world, domain: photo, task: classification, n: 24, seed: 9}
optim: {lr: 1.0e-3, steps: STEPS, batch_size: 8}
checkpoint: {every_steps: 2, keep: 2}
logging: {tensorboard: false, plot: true, every_steps: 1}
"""


def write_recipe(tmp_path: Path, steps: int = 6, extra: str = "") -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE.replace("STEPS", str(steps)) + extra)
    return p


def vlkit(*args, env=None, **kw):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "vlkit", *args], capture_output=True, text=True, env=e, **kw)


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path, tmp_path):
    """Every shipped recipe passes the schema once its required keys (`???`) are given, and its adapter
    options build the variant's config; without them the error names each required key."""
    from omegaconf import OmegaConf

    from vlkit.plugins import registry

    if path.name == "fuse.yaml":  # `vlkit compose A,B --mode fuse --recipe R` fills in compose.adapters
        with pytest.raises(ConfigError, match="compose.adapters"):
            load_recipe(path)
        return
    raw = OmegaConf.load(path)
    missing = sorted(OmegaConf.missing_keys(raw))
    overrides = []
    for key in missing:
        target = tmp_path / key.replace(".", "_")
        target.write_text("") if key.endswith("path") else target.mkdir()
        overrides.append(f"{key}={target}")
    if missing:
        with pytest.raises(ConfigError, match=re.escape(missing[0])) as err:
            load_recipe(path)
        assert all(k in str(err.value) for k in missing)
    if path.name == "pretrain-tiny-partial.yaml":  # stage 2 starts from stage 1's output
        overrides.append("backbone=tiny@random")
    cfg = load_recipe(path, overrides)
    if cfg.method == "adapter":
        opts = dict(cfg.adapter)
        registry("adapter").get(opts.pop("variant")).make_config(**{k: v for k, v in opts.items() if k != "name"})


def test_recipe_overrides_and_types(tmp_path):
    cfg = load_recipe(write_recipe(tmp_path), ["optim.lr=3e-4", "adapter.rank=4"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.adapter.rank == 4


@pytest.mark.parametrize("override,needle", [
    ("optim.stepz=3", "stepz"),
    ("optim.steps=many", "optim.steps"),
    ("adapter.rank=0", "rank"),
    ("adapter.variant=nope", "nope"),
    ("method=magic", "method"),
    ("task.name=nope", "task.name"),
    ("data.train.kind=nope", "data.train.kind"),
])
def test_recipe_errors_name_the_key(tmp_path, override, needle):
    with pytest.raises(ConfigError) as exc:
        load_recipe(write_recipe(tmp_path), [override])
    assert needle in str(exc.value)


def test_recipe_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_recipe(bad)
    manifest = write_recipe(tmp_path, extra="")
    with pytest.raises(ConfigError, match="missing.jsonl"):
        load_recipe(manifest, ["data.train={kind: manifest, path: /nonexistent/missing.jsonl}"])


def test_cli_bad_recipe_exit_2(tmp_path):
    r = vlkit("train", str(write_recipe(tmp_path)), "optim.stepz=3")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_train_outputs_and_adapter_usable(tmp_path):
    from vlkit import load_adapter, load_backbone
    from vlkit.train.engine import train

    res = train(load_recipe(write_recipe(tmp_path, steps=4)), tmp_path / "run", progress=False)
    out = tmp_path / "run"
    for f in ("adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "metrics.json", "metrics.jsonl",
              "training_curves.png", "task.json"):
        assert (out / f).is_file(), f
    assert res["steps"] == 4 and "accuracy" in res["metrics"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    bb = load_backbone("tiny@random")
    rec = load_adapter(bb, out)
    assert rec.variant == "lora" and rec.task["name"] == "classification"


def test_only_trainable_parameters_in_optimizer(tmp_path):
    from vlkit.backbones.loading import load_backbone
    from vlkit.train.engine import build_task, load_datasets
    from vlkit.train.methods import apply_method

    cfg = load_recipe(write_recipe(tmp_path))
    bb = load_backbone(cfg.backbone)
    tr, _ = load_datasets(cfg)
    task = build_task(bb, cfg, tr)
    _, trainable = apply_method(bb, task, cfg, {"variant": "lora", "rank": 2})
    assert trainable and all(".adapters." in n for n in trainable)
    frozen = [n for n, p in bb.named_parameters() if ".adapters." not in n and p.requires_grad]
    assert frozen == []


def _run_cli(recipe, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "vlkit", "train", str(recipe), "-o", str(out), "--no-progress",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    recipe = write_recipe(tmp_path, steps=40)
    full = _run_cli(recipe, tmp_path / "full")
    assert full.wait(timeout=300) == 0, full.stderr.read()
    killed_dir = tmp_path / "killed"
    proc = _run_cli(recipe, killed_dir)
    deadline = time.time() + 240
    latest = killed_dir / "checkpoints" / "latest"
    while time.time() < deadline:
        if latest.is_file() and latest.read_text().strip() >= "step-00000004":
            break
        if proc.poll() is not None:
            pytest.fail("run ended before it could be killed: " + proc.stderr.read())
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "adapter_model.safetensors").exists(), "the run finished before the kill"
    resumed = _run_cli(recipe, killed_dir, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(killed_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    r = vlkit("train", str(write_recipe(tmp_path)), "-o", str(tmp_path / "empty"), "--resume")
    assert r.returncode == 2 and "no checkpoint" in r.stderr


def test_two_process_data_parallel_on_cpu(tmp_path):
    recipe = write_recipe(tmp_path, steps=4)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                "-m", "vlkit", "train", str(recipe), "-o", str(tmp_path / "ddp"), "--json", "--no-progress"]
    r = subprocess.run(torchrun, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["processes"] == 2
    assert result["processes_agree"] is True
