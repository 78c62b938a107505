"""NaN/inf adapter tensors are refused on every path that loads them (issue 29): each `vlkit compose` mode,
`compose run`, `probe`, `eval`, `export`, `inspect`, `train`, the task head and the server's hot load. One line, exit 2,
naming the file."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import cli
from safetensors.torch import load_file, save_file

import vlkit
from vlkit.adapters.model import AdaptedModel

SPEC = "tiny@random"


def poison(file, value=float("nan")):
    t = load_file(str(file))
    k = sorted(t)[0]
    t[k] = torch.full_like(t[k], value)
    save_file(t, str(file))
    return file


def one_error_line(code, err, file):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error:") and str(file) in lines[0] and "NaN or inf" in lines[0], err


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finite")
    out = {"tmp": tmp}
    for name, value in (("good", None), ("other", None), ("nan", float("nan")), ("inf", float("-inf"))):
        bb = vlkit.load_backbone(SPEC)
        vlkit.inject(bb, "lora", name=name, rank=2)
        d = vlkit.save_adapter(bb, tmp / name, name=name)
        if value is not None:
            poison(d / "adapter_model.safetensors", value)
        out[name] = d
    return out


@pytest.mark.parametrize("mode", ["stack", "average", "parallel", "merge", "route", "fuse"])
def test_compose_refuses_non_finite_in_every_mode(dirs, tmp_path, capsys, mode):
    out = tmp_path / "out"
    code, _, err = cli(["compose", f"{dirs['good']},{dirs['nan']}", "--mode", mode, "-o", str(out)], capsys)
    one_error_line(code, err, dirs["nan"] / "adapter_model.safetensors")
    assert not out.exists()


def test_inf_is_refused_too_and_good_adapters_still_compose(dirs, tmp_path, capsys):
    code, _, err = cli(["compose", f"{dirs['inf']},{dirs['good']}", "--mode", "stack", "-o", str(tmp_path / "x")],
                       capsys)
    one_error_line(code, err, dirs["inf"] / "adapter_model.safetensors")
    code, _, err = cli(["compose", f"{dirs['good']},{dirs['other']}", "--mode", "stack", "-o",
                        str(tmp_path / "ok")], capsys)
    assert code == 0, err


def test_compose_run_of_a_composition_whose_copy_went_bad(dirs, tmp_path, capsys):
    from PIL import Image

    comp = tmp_path / "comp"
    code, _, err = cli(["compose", f"{dirs['good']},{dirs['other']}", "--mode", "stack", "-o", str(comp)], capsys)
    assert code == 0, err
    files = sorted(comp.rglob("adapter_model.safetensors"))
    assert files
    poison(files[-1])
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(img)
    code, _, err = cli(["compose", "run", str(comp), "--image", str(img), "--text", "a red square"], capsys)
    one_error_line(code, err, files[-1])


def test_probe_export_and_inspect_refuse(dirs, tmp_path, capsys):
    wfile = dirs["nan"] / "adapter_model.safetensors"
    code, _, err = cli(["probe", "winoground", "--backbone", SPEC, "--data", "synth", "-n", "4", "--bootstrap",
                        "5", "--adapters", str(dirs["nan"]), "--no-progress"], capsys)
    one_error_line(code, err, wfile)
    code, out, err = cli(["probe", "winoground", "--backbone", SPEC, "--data", "synth", "-n", "4", "--bootstrap",
                          "5", "--adapters", f"{dirs['good']}+{dirs['nan']}", "--no-progress", "--json"], capsys)
    one_error_line(code, err, wfile)
    assert out == ""
    code, _, err = cli(["export", "--adapter", str(dirs["nan"]), "-o", str(tmp_path / "onnx")], capsys)
    one_error_line(code, err, wfile)
    assert not (tmp_path / "onnx").exists()
    code, _, err = cli(["inspect", str(dirs["inf"])], capsys)
    one_error_line(code, err, dirs["inf"] / "adapter_model.safetensors")


def test_load_adapter_and_a_non_finite_head(dirs, tmp_path):
    from vlkit.compose.predict import load_task
    from vlkit.errors import AdapterFileError

    bb = vlkit.load_backbone(SPEC)
    with pytest.raises(AdapterFileError, match="NaN or inf"):
        vlkit.load_adapter(bb, dirs["nan"])
    assert "nan" not in AdaptedModel.of(bb).records  # nothing half-loaded
    meta = {"name": "vqa", "options": {"answers": ["red", "blue"], "hidden": 8}}
    head = tmp_path / "head.safetensors"
    save_file(load_task(bb, meta).head_state(), str(head))
    assert load_task(bb, meta, head) is not None
    poison(head, float("inf"))
    with pytest.raises(AdapterFileError, match="head.safetensors holds NaN or inf"):
        load_task(bb, meta, head)


def test_server_hot_load_refuses_with_422(dirs):
    from starlette.testclient import TestClient

    from vlkit.serve import ServeConfig, create_app

    app = create_app(ServeConfig(backbone=SPEC, adapters=[str(dirs["good"])], max_batch=4, max_wait_ms=5))
    with TestClient(app) as c:
        r = c.post("/v1/adapters/bad", json={"path": str(dirs["nan"])})
        assert r.status_code == 422, r.text
        assert str(dirs["nan"] / "adapter_model.safetensors") in r.json()["error"] and "NaN" in r.json()["error"]
        assert "bad" not in {a["name"] for a in c.get("/v1/adapters").json()["adapters"]}
        assert c.post("/v1/adapters/other", json={"path": str(dirs["other"])}).status_code == 201


def test_train_on_a_non_finite_base_and_peft_export_refuse(dirs, tmp_path, capsys, make_backbone, monkeypatch):
    monkeypatch.setenv("VLKIT_PLUGINS", "")
    root = Path(__file__).resolve().parents[1]
    code, _, err = cli(["train", str(root / "recipes" / "quickstart.yaml"), "backbone=tiny@random", "data.train.n=16",
                        "data.eval.n=8", "optim.steps=1", "eval.every_steps=0", "logging.tensorboard=false",
                        f"compose.base={dirs['nan']}", "-o", str(tmp_path / "run"), "--no-progress"], capsys)
    one_error_line(code, err, dirs["nan"] / "adapter_model.safetensors")
    bb = make_backbone("hf")
    vlkit.inject(bb, "lora", rank=2)
    src = vlkit.save_adapter(bb, tmp_path / "hf-lora")
    poison(src / "adapter_model.safetensors")
    code, _, err = cli(["export", "--format", "peft", "-a", str(src), "-o", str(tmp_path / "p")], capsys)
    one_error_line(code, err, src / "adapter_model.safetensors")


def test_resume_from_a_non_finite_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLKIT_PLUGINS", "")
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    args = ["train", str(root / "recipes" / "quickstart.yaml"), "backbone=tiny@random", "data.train.n=16",
            "data.eval.n=8", "eval.every_steps=0", "checkpoint.every_steps=1", "logging.tensorboard=false",
            "logging.plot=false", "-o", str(run), "--no-progress"]
    code, _, err = cli(args + ["optim.steps=2"], capsys)
    assert code == 0, err
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "trainable.safetensors"
    poison(ckpt, float("inf"))
    code, _, err = cli(args + ["optim.steps=3", "--resume"], capsys)
    lines = err.strip().splitlines()  # the run's own warning about frozen text-tower adapters comes first
    assert code == 2 and [ln for ln in lines if ln.startswith("error:")] == lines[-1:], err
    assert str(ckpt) in lines[-1] and "NaN or inf" in lines[-1]


def test_eval_refuses(dirs, capsys):
    code, _, err = cli(["eval", "--data", "world:satellite/classification", "-b", SPEC, "-a", str(dirs["nan"]),
                        "--bootstrap", "0"], capsys)
    one_error_line(code, err, dirs["nan"] / "adapter_model.safetensors")
