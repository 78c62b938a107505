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


@pytest.fixture
def no_compiler():
    """A machine without a working C++ compiler, as the inductor sees it."""
    import torch._inductor.config as inductor

    with inductor.patch({"cpp.cxx": (None, "/nonexistent/c++")}):
        yield


def test_compile_check_names_the_missing_compiler(no_compiler):
    from vlkit.train.compiling import compile_problem, compiled_step

    problem = compile_problem("cpu")
    assert problem is not None and "Cxx" in problem and "\n" not in problem
    model = torch.nn.Linear(2, 2)
    notes = []
    assert compiled_step(model, "auto", "cpu", lambda event, **info: notes.append((event, info))) is model
    assert notes and notes[0][0] == "note" and "eager" in notes[0][1]["message"]
    assert compiled_step(model, False, "cpu") is model
    from vlkit.errors import ConfigError

    with pytest.raises(ConfigError, match="compile: true"):
        compiled_step(model, True, "cpu")


@pytest.mark.parametrize("setting", ["true", "auto"])
def test_compile_without_a_compiler_exits_2_or_falls_back(tmp_path, capsys, monkeypatch, no_compiler, setting):
    monkeypatch.setenv("VLKIT_PLUGINS", "")
    run = tmp_path / "run"
    code, _, err = cli(["train", str(ROOT / "recipes" / "quickstart.yaml"), *QUICK, "optim.steps=1",
                        f"compile={setting}", "-o", str(run), "--no-progress"], capsys)
    lines = err.strip().splitlines()
    if setting == "true":
        assert code == 2 and [ln for ln in lines if ln.startswith("error:")] == lines[-1:], err
        assert lines[-1].startswith("error: compile: true, but torch.compile does not work here: ") and "Cxx" in err
        assert not (run / "adapter_model.safetensors").exists()
    else:
        assert code == 0, err
        assert [ln for ln in lines if ln.startswith("note: compile: auto")], err
        assert (run / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("value", ["abc", "1"])
def test_compile_takes_true_false_or_auto(tmp_path, capsys, monkeypatch, value):
    monkeypatch.setenv("VLKIT_PLUGINS", "")
    code, _, err = cli(["train", str(ROOT / "recipes" / "quickstart.yaml"), *QUICK, f"compile={value}", "-o",
                        str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 2 and "key 'compile': expected true, false or auto" in err and len(err.strip().splitlines()) == 1


def test_a_resume_may_change_compile(tmp_path, capsys, monkeypatch, no_compiler):
    monkeypatch.setenv("VLKIT_PLUGINS", "")
    run = tmp_path / "run"
    args = ["train", str(ROOT / "recipes" / "quickstart.yaml"), *QUICK, "-o", str(run), "--no-progress"]
    code, _, err = cli(args + ["optim.steps=2"], capsys)
    assert code == 0, err
    code, _, err = cli(args + ["optim.steps=3", "compile=auto", "--resume"], capsys)
    assert code == 0 and "note: compile: auto" in err, err
