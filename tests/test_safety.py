"""Nothing lost, nothing silently wrong: the output protocol, validation of results, and one line + exit 2 for
every foreseeable failure (issue 15). CLI cases run in-process through `vlkit.cli.app.main`."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import cli
from vlkit.outputs import OutputError, OutputTarget

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["optim.steps=2", "data.train.n=16", "data.eval.n=8", "eval.every_steps=0", "checkpoint.every_steps=1",
         "backbone=tiny@random", "logging.plot=false", "logging.tensorboard=false"]


@pytest.fixture(autouse=True)
def _only_ia3(monkeypatch):
    monkeypatch.setenv("VLKIT_PLUGINS", "ia3")
    monkeypatch.delenv("VLKIT_PLUGINS_STRICT", raising=False)
    from vlkit.plugins import reset_plugins

    reset_plugins()
    yield
    reset_plugins()


def tree(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `path` (what a reader would see)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def inject(out: Path, capsys, *extra: str) -> None:
    code, _, err = cli(["inject", "--backbone", "tiny@random", "-o", str(out), *extra], capsys)
    assert code == 0, err


def train(out: Path, capsys, *extra: str):
    return cli(["train", str(ROOT / "recipes" / "quickstart.yaml"), *QUICK, *extra, "-o", str(out),
                "--no-progress"], capsys)


# --- the protocol itself ------------------------------------------------------------------------------
def test_output_target_publishes_whole_or_not_at_all(tmp_path):
    t = tmp_path / "out"
    with OutputTarget(t) as o:
        (o.staging / "a.txt").write_text("new")
        assert not t.exists()  # nothing visible before the exchange
    assert tree(t) == {"a.txt": hashlib.sha256(b"new").hexdigest()}
    before = tree(t)
    with pytest.raises(RuntimeError):
        with OutputTarget(t, overwrite=True) as o:
            (o.staging / "b.txt").write_text("half")
            raise RuntimeError("killed")
    assert tree(t) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging dir or lock left behind
    with OutputTarget(t, overwrite=True) as o:
        (o.staging / "c.txt").write_text("c")
    assert sorted(tree(t)) == ["c.txt"]


def test_output_target_refusals(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="existing file"):
        OutputTarget(tmp_path / "file").check()
    src = tmp_path / "src"
    (src / "inner").mkdir(parents=True)
    for target in (src, src / "inner", tmp_path):
        with pytest.raises(OutputError, match="inputs"):
            OutputTarget(target, overwrite=True, inputs=[src]).check()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OutputError, match="not empty.*--overwrite"):
        OutputTarget(tmp_path / "full").check()


def test_lock_names_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        t = tmp_path / "out"
        (tmp_path / ".out.lock").write_text(f"{sleeper.pid}\n")
        with pytest.raises(OutputError, match=f"PID {sleeper.pid}"):
            with OutputTarget(t):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with OutputTarget(t) as o:  # the holder is gone: its lock is taken over
        (o.staging / "x").write_text("x")
    assert (t / "x").is_file() and not (tmp_path / ".out.lock").exists()


def test_carry_moves_checkpoints_into_the_new_directory(tmp_path):
    t = tmp_path / "run"
    (t / "checkpoints").mkdir(parents=True)
    (t / "checkpoints" / "latest").write_text("step-1")
    (t / "old.txt").write_text("old")
    with OutputTarget(t, resume=True, carry=("checkpoints",)) as o:
        (o.staging / "new.txt").write_text("new")
    assert sorted(tree(t)) == ["checkpoints/latest", "new.txt"]


# --- commands -----------------------------------------------------------------------------------------
def test_merge_into_its_own_source_is_refused(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    inject(a, capsys, "--adapter", "lora")
    inject(b, capsys, "--adapter", "lora")
    before = tree(a)
    code, _, err = cli(["compose", f"{a},{b}", "--mode", "merge", "-o", str(a)], capsys)
    assert code == 2 and "one of this command's inputs" in err
    assert tree(a) == before
    code, _, err = cli(["compose", f"{a},{b}", "--mode", "stack", "-o", str(tmp_path / "a" / "sub")], capsys)
    assert code == 2 and tree(a) == before


def test_compose_into_another_adapter_dir_needs_overwrite(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        inject(d, capsys, "--adapter", "lora")
    before = tree(c)
    code, _, err = cli(["compose", f"{a},{b}", "--mode", "stack", "-o", str(c)], capsys)
    assert code == 2 and "not empty" in err and tree(c) == before
    code, _, err = cli(["compose", f"{a},{b}", "--mode", "stack", "-o", str(c), "--overwrite"], capsys)
    assert code == 0, err
    assert (c / "composition.json").is_file() and not (c / "adapter_config.json").exists()  # replaced whole


@pytest.mark.parametrize("weights", ["nan,nan", "inf,1", "1,-inf"])
def test_non_finite_weights_are_refused(tmp_path, capsys, weights):
    a, b = tmp_path / "a", tmp_path / "b"
    inject(a, capsys, "--adapter", "lora")
    inject(b, capsys, "--adapter", "lora")
    code, _, err = cli(["compose", f"{a},{b}", "--mode", "merge", "--weights", weights, "-o",
                        str(tmp_path / "m")], capsys)
    assert code == 2 and "finite" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("bad", ["nan", "int"])
def test_nan_and_integer_adapter_tensors_are_not_merged(tmp_path, capsys, bad):
    a, b = tmp_path / "a", tmp_path / "b"
    inject(a, capsys, "--adapter", "lora")
    inject(b, capsys, "--adapter", "lora")
    w = b / "adapter_model.safetensors"
    t = load_file(str(w))
    k = sorted(t)[0]
    t[k] = torch.full_like(t[k], float("nan")) if bad == "nan" else t[k].to(torch.int32)
    save_file(t, str(w))
    code, _, err = cli(["compose", f"{a},{b}", "--mode", "merge", "-o", str(tmp_path / "m")], capsys)
    assert code == 2 and ("NaN" in err or "floating point" in err), err
    assert not (tmp_path / "m").exists()


def test_train_into_a_finished_run_needs_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = train(run, capsys)
    assert code == 0, err
    before = tree(run)
    first_log = (run / "metrics.jsonl").read_text()
    code, _, err = train(run, capsys, "seed=1")
    assert code == 2 and "not empty" in err and "--resume" in err
    assert tree(run) == before
    code, _, err = train(run, capsys, "seed=1", "--overwrite")
    assert code == 0, err
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(x)["step"] for x in first_log.splitlines()]  # not appended to the old log
    assert "seed: 1" in (run / "recipe.yaml").read_text()


def test_resume_with_a_changed_recipe_touches_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = train(run, capsys)
    assert code == 0, err
    before = tree(run)
    code, _, err = train(run, capsys, "adapter.reduction=4", "--resume")
    assert code == 2 and "recipe differs" in err and "adapter.reduction" in err
    assert tree(run) == before
    code, _, err = train(run, capsys, "optim.steps=3", "--resume")  # a longer run is a compatible change
    assert code == 0, err


def test_damaged_state_json_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, capsys)[0] == 0
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((latest / "state.json").read_text())
    del state["numpy_rng"]
    (latest / "state.json").write_text(json.dumps(state))
    code, _, err = train(run, capsys, "optim.steps=3", "--resume")
    assert code == 2 and "damaged" in err and "numpy_rng" in err
    (latest / "state.json").write_text("{not json")
    code, _, err = train(run, capsys, "optim.steps=3", "--resume")
    assert code == 2 and "cannot be read" in err


def test_second_writer_is_stopped_naming_the_first(tmp_path):
    """Two real `vlkit train` processes into one directory: the second exits 2 naming the first's PID."""
    run = tmp_path / "run"
    env = {**os.environ, "VLKIT_PLUGINS": "ia3"}
    args = [sys.executable, "-m", "vlkit", "train", str(ROOT / "recipes" / "quickstart.yaml"), *QUICK,
            "optim.steps=400", "-o", str(run), "--no-progress"]
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        lock = tmp_path / ".run.lock"
        deadline = time.time() + 120
        while not lock.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert lock.exists(), "the first writer never took the lock"
        second = subprocess.run(args[:-3] + ["optim.steps=2", "-o", str(run), "--no-progress", "--resume"],
                                env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert f"PID {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()


def test_kill_during_the_final_write_leaves_old_or_new_whole(tmp_path, capsys):
    """kill -9 while the finished run's files are staged: the directory is the old run or the new one, whole."""
    run = tmp_path / "run"
    assert train(run, capsys)[0] == 0
    old = tree(run)
    env = {**os.environ, "VLKIT_PLUGINS": "ia3"}
    args = [sys.executable, "-m", "vlkit", "train", str(ROOT / "recipes" / "quickstart.yaml"), *QUICK,
            "seed=7", "-o", str(run), "--no-progress", "--overwrite"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        staged = [p for p in tmp_path.glob(".run.staging-*") if (p / "adapter_model.safetensors").exists()]
        if staged:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    now = tree(run)
    final = {k: v for k, v in now.items() if not k.startswith("checkpoints/")}
    old_final = {k: v for k, v in old.items() if not k.startswith("checkpoints/")}
    recipe = (run / "recipe.yaml").read_text()
    if "seed: 7" in recipe:  # the new run, whole
        assert set(final) >= {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "task.json"}
        assert final["adapter_model.safetensors"] != old_final["adapter_model.safetensors"]
    else:  # the old run, whole (its working state may have been reset by --overwrite)
        assert {k: final[k] for k in old_final if k != "metrics.jsonl"} == \
            {k: v for k, v in old_final.items() if k != "metrics.jsonl"}


# --- bad input: one line, exit 2 ----------------------------------------------------------------------
def test_out_naming_an_existing_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("keep")
    code, _, err = cli(["inject", "--backbone", "tiny@random", "-o", str(f)], capsys)
    assert code == 2 and "existing file" in err and f.read_text() == "keep"


@pytest.mark.parametrize("err_no,words", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"),
                                          (errno.EACCES, "permission denied")])
def test_os_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, err_no, words):
    import vlkit.outputs as outputs

    def fail(*a, **k):
        raise OSError(err_no, os.strerror(err_no), str(tmp_path / "x"))

    monkeypatch.setattr(outputs.OutputTarget, "publish", fail)
    code, _, err = cli(["inject", "--backbone", "tiny@random", "-o", str(tmp_path / "x")], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_seed_out_of_range(tmp_path, capsys):
    code, _, err = train(tmp_path / "r", capsys, "seed=-1")
    assert code == 2 and "seed" in err and not (tmp_path / "r").exists()


def test_untrained_needs_the_flag(tmp_path, capsys):
    code, _, err = train(tmp_path / "r", capsys, "optim.steps=0")
    assert code == 2 and "--allow-untrained" in err and not (tmp_path / "r").exists()
    code, _, err = train(tmp_path / "r", capsys, "optim.steps=0", "--allow-untrained")
    assert code == 0, err
    assert (tmp_path / "r" / "adapter_model.safetensors").is_file()


def test_recipes_read_no_environment_unless_allowed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLKIT_TEST_SECRET", "hunter2")
    recipe = tmp_path / "r.yaml"
    recipe.write_text((ROOT / "recipes" / "quickstart.yaml").read_text() + "\nnotes: ['${oc.env:VLKIT_TEST_SECRET}']\n")
    code, _, err = cli(["train", str(recipe), *QUICK, "-o", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and "VLKIT_TEST_SECRET" in err and "--allow-env" in err
    assert not (tmp_path / "o").exists()
    code, _, err = cli(["train", str(recipe), *QUICK, "-o", str(tmp_path / "o"), "--no-progress",
                        "--allow-env", "VLKIT_TEST_SECRET"], capsys)
    assert code == 0, err
    recipe.write_text((ROOT / "recipes" / "quickstart.yaml").read_text() + "\nnotes: ['${oc.decode:1}']\n")
    code, _, err = cli(["train", str(recipe), *QUICK, "-o", str(tmp_path / "p"), "--no-progress"], capsys)
    assert code == 2 and "resolver" in err


def test_non_utf8_manifest(tmp_path):
    from vlkit.data import load_data
    from vlkit.errors import DataError

    m = tmp_path / "m.jsonl"
    m.write_bytes(b'{"image": "a.png", "caption": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_data({"kind": "manifest", "path": str(m), "task": "retrieval"})


def test_corrupt_image_in_data_show(tmp_path, capsys):
    out = tmp_path / "w"
    code, _, err = cli(["data", "generate", "--task", "retrieval", "-n", "3", "--image-size", "32", "-o", str(out)],
                       capsys)
    assert code == 0, err
    png = sorted((out / "images").glob("*.png"))[0]
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])  # truncated: the header still parses
    code, _, err = cli(["data", "show", str(out)], capsys)
    assert code == 2 and "cannot be decoded" in err
    png.write_bytes(b"")
    code, _, err = cli(["data", "show", str(out)], capsys)
    assert code == 2


def test_hf_directory_with_only_pickle_weights(tmp_path):
    from vlkit.errors import BackboneLoadError
    from vlkit.backbones.hf import load_hf

    from transformers import CLIPConfig

    d = tmp_path / "clip"
    d.mkdir()
    CLIPConfig(text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "intermediate_size": 64},
               vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                              "intermediate_size": 64, "image_size": 32, "patch_size": 16},
               projection_dim=16).save_pretrained(d)
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(BackboneLoadError, match="pickle.*safetensors only"):
        load_hf(f"hf:{d}")


def test_unknown_plugin_name_warns_or_fails_strictly(capsys, monkeypatch):
    from vlkit.plugins import reset_plugins

    monkeypatch.setenv("VLKIT_PLUGINS", "ia3,nosuch")
    reset_plugins()
    code, _, err = cli(["plugins"], capsys)
    assert code == 0 and "warning: VLKIT_PLUGINS names nosuch" in err
    monkeypatch.setenv("VLKIT_PLUGINS_STRICT", "1")
    reset_plugins()
    code, _, err = cli(["plugins"], capsys)
    assert code == 2 and "nosuch" in err


# --- reproducible outputs -----------------------------------------------------------------------------
def test_identical_runs_give_identical_files_with_the_usual_mode(tmp_path, capsys):
    for d in ("a", "b"):
        assert train(tmp_path / d, capsys)[0] == 0
    for name in ("adapter_model.safetensors", "head.safetensors", "adapter_config.json", "task.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    mask = os.umask(0)
    os.umask(mask)
    for p in (tmp_path / "a").rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, p
