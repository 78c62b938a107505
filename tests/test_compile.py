"""Recipe key `compile: true`: the training step runs through torch.compile; checkpoints, resume and the
adapter files are those of an eager run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vlkit
from cli_helpers import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_plugins():
    """These tests hide installed plugins (VLKIT_PLUGINS=""): the cached plugin system must not outlive them."""
    from vlkit.plugins import reset_plugins

    reset_plugins()
    yield
    reset_plugins()
QUICK = ["backbone=tiny@random", "optim.batch_size=8", "data.train.n=16", "data.eval.n=8", "eval.every_steps=0",
         "checkpoint.every_steps=1", "logging.plot=false", "logging.tensorboard=false", "adapter.variant=lora",
         "adapter.rank=2"]


@pytest.mark.slow
def test_compiled_training_resumes_and_saves_a_plain_adapter(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLKIT_PLUGINS", "")
    run = tmp_path / "run"
    args = ["train", str(ROOT / "recipes" / "quickstart.yaml"), *QUICK, "compile=true", "-o", str(run), "--no-progress"]
    code, _, err = cli(args + ["optim.steps=2"], capsys)
    assert code == 0, err
    code, _, err = cli(args + ["optim.steps=3", "--resume"], capsys)
    assert code == 0, err
    bb = vlkit.load_backbone("tiny@random")
    vlkit.load_adapter(bb, run)
    assert not any("_orig_mod" in n for n in vlkit.parameter_report(bb)["adapters"])
    with torch.no_grad():
        assert torch.isfinite(bb.encode_image(torch.zeros(1, 3, bb.image_size, bb.image_size))).all()
    eager = tmp_path / "eager"
    code, _, err = cli(["train", str(ROOT / "recipes" / "quickstart.yaml"), *QUICK, "optim.steps=3", "-o", str(eager),
                        "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in eager.iterdir())
