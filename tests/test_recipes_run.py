"""Every shipped recipe runs end to end from the CLI for a few steps, on local files this test writes.

The GPU recipes run with device=cpu precision=fp32 and a small local open_clip config / transformers
directory as the backbone; one slow case runs the ViT-B-32 recipe at its real size (224 px, random init).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import cli
from PIL import Image, ImageFilter
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SHORT = ["optim.steps=2", "optim.epochs=null", "optim.batch_size=4", "optim.warmup_steps=0", "eval.every_steps=0",
         "checkpoint.every_steps=1", "logging.tensorboard=false", "logging.plot=false", "eval.batch_size=8"]
GPU_ON_CPU = ["device=cpu", "precision=fp32", "data.num_workers=1"]


def _image(rng, size=(48, 36)) -> Image.Image:
    arr = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
    return Image.fromarray(arr).filter(ImageFilter.GaussianBlur(1.5))


@pytest.fixture(scope="module")
def retrieval_manifests(tmp_path_factory):
    d = tmp_path_factory.mktemp("manifest")
    rng = np.random.default_rng(0)
    paths = {}
    for split, n in (("train", 12), ("val", 8)):
        rows = []
        for i in range(n):
            name = f"{split}-{i}.jpg" if i % 2 else f"{split}-{i}.png"
            _image(rng, (64 + 8 * i, 40 + 4 * i)).save(d / name)
            rows.append({"image": name, "caption": f"a photo of thing {i}"})
        paths[split] = d / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


@pytest.fixture(scope="module")
def imagefolders(tmp_path_factory):
    d = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("val", 4)):
        for cls in ("cat", "dog"):
            (d / split / cls).mkdir(parents=True)
            for i in range(n):
                _image(rng, (50, 30)).save(d / split / cls / f"{i}.png")
    return {"train": d / "train", "val": d / "val"}


def _train(capsys, recipe: str, out: Path, *overrides: str):
    code, stdout, err = cli(["train", str(RECIPES / recipe), "-o", str(out), "--json", "--no-progress",
                             *SHORT, *overrides], capsys)
    assert code == 0, err[-3000:]
    result = json.loads(stdout)
    assert result["steps"] == 2
    assert (out / "metrics.json").is_file()
    return result


def test_quickstart(tmp_path, capsys):
    r = _train(capsys, "quickstart.yaml", tmp_path / "q", "data.train.n=16", "data.eval.n=8")
    assert (tmp_path / "q" / "adapter_model.safetensors").is_file() and r["score"] is not None


def test_medical(tmp_path, capsys):
    _train(capsys, "medical.yaml", tmp_path / "m", "data.train.n=16", "data.eval.n=8")


def test_multitask(tmp_path, capsys):
    over = [f"tasks.{i}.data.{s}.n={n}" for i in range(3) for s, n in (("train", 12), ("eval", 8))]
    r = _train(capsys, "multitask.yaml", tmp_path / "mt", *over)
    assert set(r["per_task"]) == {"med-cls", "sat-vqa", "sketch-ret"}
    assert (tmp_path / "mt" / "composition.json").is_file()


def test_vl_multitask_one_shared_adapter(tmp_path, capsys):
    from vl_models import make_lm

    lm = make_lm("t5", tmp_path / "lms")
    over = [f"tasks.{i}.data.{s}.n={n}" for i in range(4) for s, n in (("train", 8), ("eval", 4))]
    r = _train(capsys, "vl-multitask.yaml", tmp_path / "vl", f"backbone=vl:lm={lm},vision=tiny", *over)
    assert set(r["per_task"]) == {"caption", "vqa", "gqa", "nlvr"} and r["sharing"] == "shared"
    assert {"caption/cider", "caption/bleu4", "vqa/accuracy", "gqa/accuracy", "nlvr/accuracy"} <= set(r["metrics"])
    one = sum(t.numel() for t in load_file(str(tmp_path / "vl" / "adapters" / "caption" / "adapter_model.safetensors"))
              .values())
    assert r["parameters"]["trainable"] == r["parameters"]["adapter"] == one  # four tasks, one adapter's weights
    assert (tmp_path / "vl" / "shared.safetensors").is_file()


def test_pretrain_tiny_vl_trains_the_projector_and_t5_only(tmp_path, capsys):
    import torch

    import vlkit

    over = [f"tasks.{i}.data.{s}.n={n}" for i in range(2) for s, n in (("train", 8), ("eval", 4))]
    r = _train(capsys, "pretrain-tiny-vl.yaml", tmp_path / "tvl", *over)
    assert set(r["per_task"]) == {"caption", "vqa"} and 0 < r["parameters"]["trainable_percent"] < 100
    trained = vlkit.load(f"tiny-vl@{tmp_path / 'tvl' / 'backbone.safetensors'}").backbone.model.state_dict()
    start = vlkit.load("tiny-vl@init").backbone.model.state_dict()
    assert all(torch.equal(trained[k], start[k]) for k in start if k.startswith("vision."))
    assert not torch.equal(trained["lm.shared.weight"], start["lm.shared.weight"])


def test_pretrain_stages(tmp_path, capsys):
    _train(capsys, "pretrain-tiny.yaml", tmp_path / "p1", "data.train.mix.0.n=12", "data.train.mix.1.n=12",
           "data.eval.n=8")
    weights = tmp_path / "p1" / "backbone.safetensors"
    assert weights.is_file()
    partial = (RECIPES / "pretrain-tiny-partial.yaml").read_text()
    over = [f"backbone=tiny@{weights}", "data.eval.n=8"]
    if "mix:" in partial:
        over += ["data.train.mix.0.n=12", "data.train.mix.1.n=12"]
    else:
        over += ["data.train.n=12"]
    _train(capsys, "pretrain-tiny-partial.yaml", tmp_path / "p2", *over)


def test_fuse(tmp_path, capsys):
    for name in ("a", "b"):
        _train(capsys, "quickstart.yaml", tmp_path / name, "data.train.n=16", "data.eval.n=8", f"seed={ord(name)}")
    code, _, err = cli(["compose", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--mode", "fuse", "--recipe",
                        str(RECIPES / "fuse.yaml"), "-o", str(tmp_path / "fused"), "--json",
                        *[x for o in SHORT + ["data.train.n=16", "data.eval.n=8", "backbone=tiny"]
                          for x in ("--set", o)]], capsys)
    assert code == 0, err[-3000:]
    assert (tmp_path / "fused" / "composition.json").is_file()


def test_gpu_vitb32_lora_on_a_small_open_clip(tmp_path, capsys, tiny_open_clip, retrieval_manifests):
    r = _train(capsys, "gpu-vitb32-lora.yaml", tmp_path / "v", *GPU_ON_CPU, f"backbone={tiny_open_clip['spec']}",
               f"data.train.path={retrieval_manifests['train']}", f"data.eval.path={retrieval_manifests['val']}")
    assert r["task"] == "retrieval" and "mean_recall" in r["metrics"]


def test_gpu_hf_clip_bottleneck_on_a_small_transformers_dir(tmp_path, capsys, hf_clip_dir, imagefolders):
    r = _train(capsys, "gpu-hf-clip-bottleneck.yaml", tmp_path / "h", *GPU_ON_CPU, f"backbone=hf:{hf_clip_dir}",
               f"data.train.data_dir={imagefolders['train']}", f"data.eval.data_dir={imagefolders['val']}")
    assert r["task"] == "classification" and "accuracy" in r["metrics"]


@pytest.mark.slow
def test_gpu_vitb32_lora_at_real_size(tmp_path, capsys, retrieval_manifests):
    """The issue's command: ViT-B-32 architecture (random init, 224 px) on a real manifest, on CPU."""
    r = _train(capsys, "gpu-vitb32-lora.yaml", tmp_path / "big", *GPU_ON_CPU, "backbone=open_clip:ViT-B-32",
               f"data.train.path={retrieval_manifests['train']}", f"data.eval.path={retrieval_manifests['val']}",
               "optim.batch_size=2")
    assert r["parameters"]["trainable_percent"] < 5


TORCHRUN_CASES = {
    "quickstart.yaml": ["data.train.n=16", "data.eval.n=8"],
    "medical.yaml": ["data.train.n=16", "data.eval.n=8"],
    "multitask.yaml": [f"tasks.{i}.data.{s}.n={n}" for i in range(3) for s, n in (("train", 12), ("eval", 8))],
    "pretrain-tiny.yaml": ["data.train.mix.0.n=12", "data.train.mix.1.n=12", "data.eval.n=8"],
    "gpu-vitb32-lora.yaml": GPU_ON_CPU,
    "gpu-hf-clip-bottleneck.yaml": GPU_ON_CPU,
    "vl-multitask.yaml": [f"tasks.{i}.data.{s}.n={n}" for i in range(4) for s, n in (("train", 8), ("eval", 4))],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TORCHRUN_CASES), ids=list(TORCHRUN_CASES))
def test_recipe_under_torchrun_two_processes(name, tmp_path, tiny_open_clip, hf_clip_dir, retrieval_manifests,
                                            imagefolders):
    """The README's data-parallel launch on each shipped recipe: 2 gloo processes end with identical weights."""
    import subprocess
    import sys

    extra = list(TORCHRUN_CASES[name])
    if name.startswith("gpu-vitb32"):
        extra += [f"backbone={tiny_open_clip['spec']}", f"data.train.path={retrieval_manifests['train']}",
                  f"data.eval.path={retrieval_manifests['val']}"]
    if name.startswith("gpu-hf"):
        extra += [f"backbone=hf:{hf_clip_dir}", f"data.train.data_dir={imagefolders['train']}",
                  f"data.eval.data_dir={imagefolders['val']}"]
    if name.startswith("vl-"):
        from vl_models import make_lm

        extra += [f"backbone=vl:lm={make_lm('t5', tmp_path / 'lms')},vision=tiny"]
    port = str(29600 + list(TORCHRUN_CASES).index(name))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "vlkit", "train", str(RECIPES / name), "-o", str(tmp_path / "ddp"), "--json", "--no-progress",
           *SHORT, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["processes"] == 2 and result["processes_agree"] is True
