"""The streaming input pipeline: lazy columns, seeded resumable batches, workers, augmentation, spec replacement,
unused-parameter freezing and multi-task training through the one engine."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vlkit
from vlkit.data import load_data
from vlkit.plugins import registry
from vlkit.data.pipeline import LazyImages, SeededBatches, build_augment, make_loader, materialize
from vlkit.errors import ConfigError, DataError
from vlkit.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def write_manifest(d: Path, n: int, size=(40, 30), task="classification") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(n)
    rows = []
    for i in range(n):
        arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(d / f"{i}.png")
        rows.append({"image": f"{i}.png", "label": ["circle", "square"][i % 2], "caption": f"shape number {i % 5}"})
    p = d / "m.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_prepared_images_are_lazy_and_decode_like_preprocess(tmp_path):
    bb = vlkit.load_backbone("tiny@random")
    ds = load_data({"kind": "manifest", "path": str(write_manifest(tmp_path, 6)), "task": "classification"})
    task = registry("task").get("classification")(bb, ds)
    data = task.prepare(bb, ds)
    assert isinstance(data["pixels"], LazyImages)
    assert data["pixels"].shape == (6, 3, bb.image_size, bb.image_size)
    assert all(v.numel() < 100 for v in data.values() if isinstance(v, torch.Tensor))
    want = bb.preprocess_batch([Image.open(tmp_path / f"{i}.png") for i in (4, 1)])
    assert torch.equal(data["pixels"][torch.tensor([4, 1])], want)
    assert torch.equal(materialize(data)["pixels"][4], want[0])


def test_seeded_batches_resume_and_shard():
    full = SeededBatches(10, 3, seed=5)
    it = iter(full)
    stream = [next(it) for _ in range(9)]
    assert [len(r) for _, r in stream[:4]] == [3, 3, 3, 1]
    assert sorted(i for _, r in stream[:4] for i in r) == list(range(10))
    resumed = iter(SeededBatches(10, 3, seed=5, start=5))
    assert [next(resumed) for _ in range(4)] == stream[5:9]
    shards = [list(SeededBatches(10, 4, seed=1, rank=r, world=2).order(0)) for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) == len(shards[1]) == 5


def test_loader_workers_give_identical_batches_with_augment(tmp_path):
    bb = vlkit.load_backbone("tiny@random")
    ds = load_data({"kind": "manifest", "path": str(write_manifest(tmp_path, 8)), "task": "classification"})
    task = registry("task").get("classification")(bb, ds)
    data = task.prepare(bb, ds)
    aug = build_augment([{"RandomResizedCrop": {"scale": [0.3, 1.0]}}, "RandomHorizontalFlip"], bb.image_size)
    data = {k: v.with_augment(aug, seed=3) if isinstance(v, LazyImages) else v for k, v in data.items()}

    def batches(workers):
        loader = make_loader(data, SeededBatches(8, 4, seed=0), train=True, options={"num_workers": workers})
        it = iter(loader)
        return [next(it) for _ in range(4)]

    a, b = batches(0), batches(2)
    assert all(torch.equal(x["pixels"], y["pixels"]) and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))
    # epochs 0 and 1 see the same rows differently augmented
    rows0 = data["pixels"].fetch([0], epoch=0)
    assert torch.equal(rows0, data["pixels"].fetch([0], epoch=0))
    assert not torch.equal(rows0, data["pixels"].fetch([0], epoch=1))
    assert not torch.equal(rows0, data["pixels"].fetch([0]))  # evaluation: no augmentation


def test_augment_spec_errors():
    assert build_augment(False, 64) is None
    assert build_augment(True, 64) is not None
    with pytest.raises(ConfigError, match="NoSuchTransform"):
        build_augment(["NoSuchTransform"], 64)
    with pytest.raises(ConfigError, match="data.augment"):
        load_recipe(ROOT / "recipes" / "quickstart.yaml", ["data.augment=[Bogus]"])


def test_corrupt_image_is_reported_at_decode_with_file_and_row(tmp_path):
    m = write_manifest(tmp_path, 4)
    (tmp_path / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    bb = vlkit.load_backbone("tiny@random")
    ds = load_data({"kind": "manifest", "path": str(m), "task": "classification"})
    task = registry("task").get("classification")(bb, ds)
    data = task.prepare(bb, ds)
    with pytest.raises(DataError, match=r"row 3.*2\.png"):
        data["pixels"][[2]]


def test_user_data_spec_replaces_the_default(tmp_path):
    m = write_manifest(tmp_path, 4)
    cfg = load_recipe(None, [f"data.train.kind=manifest", f"data.train.path={m}", "optim.steps=1"])
    assert dict(cfg.data.train) == {"kind": "manifest", "path": str(m)}
    cfg = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["data.train.kind=manifest", f"data.train.path={m}"])
    assert dict(cfg.data.train) == {"kind": "manifest", "path": str(m)}  # world options go
    cfg = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["adapter.variant=lora", "adapter.rank=2"])
    assert dict(cfg.adapter) == {"variant": "lora", "towers": "both", "rank": 2}  # reduction goes, towers stays
    cfg = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["~adapter.towers"])
    assert "towers" not in cfg.adapter
    with pytest.raises(ConfigError, match="no such key"):
        load_recipe(ROOT / "recipes" / "quickstart.yaml", ["~adapter.nothing"])


def _quick(tmp_path, steps=4, extra=(), n=True):
    sizes = ["data.train.n=32", "data.eval.n=16"] if n else []
    return load_recipe(ROOT / "recipes" / "quickstart.yaml",
                       [f"optim.steps={steps}", *sizes, "eval.every_steps=0",
                        "checkpoint.every_steps=2", "logging.tensorboard=false", "backbone=tiny@random", *extra])


def test_parameters_without_gradient_are_frozen_and_named(tmp_path):
    from vlkit.train.engine import run

    events = []
    result, bb, _ = run(_quick(tmp_path), tmp_path / "q", progress=lambda e, **i: events.append((e, i)))
    warning = [i["message"] for e, i in events if e == "warning"]
    assert warning and "text" in warning[0] and "frozen" in warning[0]
    assert result["warnings"] == warning
    text_params = [p for n, p in bb.named_parameters() if ".adapters." in n and "transformer." in n
                   and "visual" not in n]
    assert text_params and not any(p.requires_grad for p in text_params)
    vision = sum(p.numel() for n, p in bb.named_parameters() if ".adapters." in n and "visual" in n)
    head = result["parameters"]["head"]
    assert result["parameters"]["trainable"] == vision + head


def test_multitask_resume_matches_uninterrupted(tmp_path):
    from vlkit.train.engine import run

    over = ["optim.steps=6", "checkpoint.every_steps=3", "backbone=tiny@random", "logging.plot=false"] + [
        f"tasks.{i}.data.{s}.n={n}" for i in range(3) for s, n in (("train", 24), ("eval", 8))]
    cfg = load_recipe(ROOT / "recipes" / "multitask.yaml", over)
    full, _, _ = run(cfg, tmp_path / "full")
    run(cfg, tmp_path / "part", stop_after=3)
    resumed, _, _ = run(cfg, tmp_path / "part", resume=True)
    assert resumed["steps"] == full["steps"] == 6
    for name in full["tasks"]:
        a = load_file(str(tmp_path / "full" / "adapters" / name / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "part" / "adapters" / name / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_workers_and_augment_is_bit_exact(tmp_path):
    from vlkit.train.engine import run

    cfg = _quick(tmp_path, steps=6, extra=["data.num_workers=2", "data.augment=true", "checkpoint.every_steps=3"])
    run(cfg, tmp_path / "full")
    run(cfg, tmp_path / "part", stop_after=3)
    run(cfg, tmp_path / "part", resume=True)
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "part" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = (load_file(str(tmp_path / d / "head.safetensors")) for d in ("full", "part"))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)


@pytest.mark.slow
def test_quickstart_under_torchrun_two_processes(tmp_path):
    """The README's data-parallel command on the quickstart (linear head, adapters in both towers)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "vlkit", "train", str(ROOT / "recipes" / "quickstart.yaml"), "-o", str(tmp_path / "ddp"),
           "--json", "--no-progress", "optim.steps=3", "data.train.n=32", "data.eval.n=16", "eval.every_steps=0",
           "checkpoint.every_steps=0", "logging.tensorboard=false", "data.num_workers=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["processes"] == 2 and result["processes_agree"] is True


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--cpu"], ["--multi_gpu"]], ids=["cpu", "multi_gpu"])
def test_accelerate_launch_two_cpu_processes(tmp_path, flags):
    """`accelerate launch --cpu --num_processes 2` really runs 2 processes (vlkit re-runs under torchrun)."""
    port = "29541" if flags == ["--cpu"] else "29543"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2",
           "--main_process_port", port, "-m", "vlkit", "train", str(ROOT / "recipes" / "quickstart.yaml"),
           "-o", str(tmp_path / "acc"), "--json", "--no-progress", "device=cpu", "optim.steps=2",
           "data.train.n=16", "data.eval.n=8", "eval.every_steps=0", "checkpoint.every_steps=0",
           "logging.tensorboard=false"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["processes"] == 2 and result["processes_agree"] is True


def _saved(tmp_path, n=20):
    ds = load_data({"kind": "world", "domain": "photo", "task": "retrieval", "n": n, "seed": 0})
    d = tmp_path / "saved"
    ds.save_to_disk(str(d))
    return d


def test_streaming_source_trains_and_resumes_bit_exact(tmp_path):
    from vlkit.train.engine import run

    src = _saved(tmp_path)
    over = ["task.name=retrieval", "~task.options.head", "data.train.kind=hf", f"data.train.source={src}",
            "data.train.streaming=true", "data.shuffle_buffer=8", "data.num_workers=1", "data.augment=true",
            "data.eval.task=retrieval", "data.eval.n=8", "adapter.towers=both"]
    cfg = _quick(tmp_path, steps=6, extra=[*over, "checkpoint.every_steps=3"], n=False)
    full, _, _ = run(cfg, tmp_path / "full")
    assert full["steps"] == 6 and "mean_recall" in full["metrics"]
    run(cfg, tmp_path / "part", stop_after=3)
    run(cfg, tmp_path / "part", resume=True)
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "part" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_streaming_source_needs_steps(tmp_path):
    from vlkit.train.engine import run

    src = _saved(tmp_path, n=8)
    cfg = _quick(tmp_path, extra=["task.name=retrieval", "~task.options.head", "data.train.kind=hf",
                                  f"data.train.source={src}", "data.train.streaming=true", "optim.steps=null",
                                  "optim.epochs=1", "data.eval.task=retrieval"], n=False)
    with pytest.raises(ConfigError, match="optim.steps"):
        run(cfg, tmp_path / "x")


@pytest.mark.slow
def test_multitask_resume_after_kill_matches_uninterrupted(tmp_path):
    """A multi-task run killed with SIGKILL after a checkpoint and resumed from the CLI ends bit-identical."""
    import signal
    import time

    over = ["optim.steps=12", "checkpoint.every_steps=3", "backbone=tiny@random", "logging.plot=false",
            "logging.every_steps=1", "--no-progress"] + [
        f"tasks.{i}.data.{s}.n={n}" for i in range(3) for s, n in (("train", 24), ("eval", 8))]

    def start(out, *extra):
        return subprocess.Popen([sys.executable, "-m", "vlkit", "train", str(ROOT / "recipes" / "multitask.yaml"),
                                 "-o", str(out), *over, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    full = start(tmp_path / "full")
    assert full.wait(timeout=300) == 0, full.stderr.read()
    proc = start(tmp_path / "killed")
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.is_file() and latest.read_text().strip() >= "step-00000006"):
        if proc.poll() is not None:
            pytest.fail("run ended before it could be killed: " + proc.stderr.read())
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "composition.json").exists(), "the run finished before the kill"
    resumed = start(tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    for name in ("med-cls", "sat-vqa", "sketch-ret"):
        a = load_file(str(tmp_path / "full" / "adapters" / name / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "killed" / "adapters" / name / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_does_not_repeat_logged_steps(tmp_path):
    from vlkit.train.engine import run

    cfg = _quick(tmp_path, steps=6, extra=["checkpoint.every_steps=2", "logging.every_steps=1"])
    run(cfg, tmp_path / "r", stop_after=5)  # steps 1-5 logged, checkpoint at 4
    run(cfg, tmp_path / "r", resume=True)
    steps = [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_written_files_are_readable_by_others(tmp_path):
    import os
    import stat

    from vlkit.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644


def test_zero_steps_is_refused_before_anything_is_written():
    with pytest.raises(ConfigError, match="optim.steps.*>= 1"):
        load_recipe(ROOT / "recipes" / "quickstart.yaml", ["optim.steps=0"])
