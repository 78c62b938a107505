"""Bad input on the command line exits 2 with one line, never 1 and never a traceback (issue 27): PEFT configs with
values of the wrong type, webdataset shards given as numbers, a DataLoader worker's error (one line naming the shard
and member; the worker's traceback only under VLKIT_DEBUG=1), `vlkit data show` on a row without its image name,
an empty part of an `a+b` stack. A mapping given whole on the command line replaces the recipe's mapping."""
from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest

import vlkit
from cli_helpers import cli
from vlkit.cli.app import error_message, exit_code

SPEC = "tiny@random"


def one_line(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (code, err)
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def png_bytes(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (seed * 37 % 256, 90, 160)).save(buf, "PNG")
    return buf.getvalue()


def write_shard(path, samples):
    """A plain tar shard: each sample {key: {ext: bytes}}."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples.items():
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture(autouse=True)
def _no_plugins(monkeypatch):
    from vlkit.plugins import reset_plugins

    monkeypatch.setenv("VLKIT_PLUGINS", "")
    reset_plugins()
    yield
    reset_plugins()


# --- PEFT directories -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("r", "eight"), ("r", 0), ("r", True), ("r", 2.5), ("lora_alpha", "x"),
                                       ("lora_alpha", None), ("lora_dropout", 2), ("use_dora", "yes"),
                                       ("use_rslora", 1), ("rank_pattern", {"q_proj": "x"}), ("rank_pattern", [1]),
                                       ("alpha_pattern", {"q_proj": "big"})])
def test_peft_config_values_are_checked(key, value, hf_clip_dir, tmp_path_factory):
    peft = pytest.importorskip("peft")
    from transformers import CLIPModel

    good = tmp_path_factory.getbasetemp() / "peft-good"
    if not good.exists():
        model = peft.get_peft_model(CLIPModel.from_pretrained(hf_clip_dir).eval(),
                                    peft.LoraConfig(r=2, target_modules=["q_proj"]))
        model.save_pretrained(str(good))
    d = tmp_path_factory.mktemp("peft-bad")
    shutil.copytree(good, d, dirs_exist_ok=True)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg[key] = value
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    bb = vlkit.load_backbone(f"hf:{hf_clip_dir}")
    with pytest.raises(Exception) as info:
        vlkit.load_adapter(bb, d)
    assert exit_code(info.value) == 2 and key in error_message(info.value)
    assert len(error_message(info.value).splitlines()) == 1
    vlkit.load_adapter(vlkit.load_backbone(f"hf:{hf_clip_dir}"), good)  # the untouched directory loads


def test_peft_bridge_adapter_with_a_string_rank(tmp_path, capsys):
    bb = vlkit.load_backbone(SPEC)
    vlkit.inject(bb, "peft", config={"peft_type": "LORA", "r": 2, "target_modules": ["out_proj"]})
    d = vlkit.save_adapter(bb, tmp_path / "bridge", name="default")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["config"]["config"]["r"] = "eight"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = cli(["probe", "synth-attribute-swap", "--backbone", SPEC, "--adapters", str(d), "-n", "8"], capsys)
    one_line(code, err)


# --- webdataset shards ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shards", ["[1, 2]", "[]", "[null]", "3", "{a: 1}"])
def test_webdataset_shards_of_the_wrong_type(shards, tmp_path, capsys):
    code, _, err = cli(["train", "recipes/quickstart.yaml", f"data.train={{kind: webdataset, shards: {shards}}}",
                        f"backbone={SPEC}", "optim.steps=1", "-o", str(tmp_path / "run"), "--no-progress"], capsys)
    one_line(code, err, "shards")
    assert not (tmp_path / "run").exists()


class _Rows:
    def __len__(self):
        return 8

    def __getitem__(self, i):
        from vlkit.errors import DataError

        if i == 5:
            raise DataError("shard /data/x.tar, member 000005.png: cannot decode (not a known image format)")
        return i


def test_a_worker_error_reaches_the_user_as_its_one_line():
    import torch

    from vlkit.errors import DataError

    loader = torch.utils.data.DataLoader(_Rows(), batch_size=2, num_workers=2)
    with pytest.raises(DataError) as info:
        list(loader)
    exc = info.value
    assert error_message(exc) == "error: shard /data/x.tar, member 000005.png: cannot decode (not a known image format)"
    assert "Traceback" in exc.worker_traceback and "DataLoader worker process" in exc.worker_traceback
    assert exit_code(exc) == 2
    assert DataError("Caught nothing").worker_traceback is None


@pytest.mark.slow
def test_a_corrupt_member_with_two_workers_is_one_line(tmp_path, capsys, monkeypatch):
    """`data.num_workers=2` over a shard with a member of random bytes: one line naming the shard and the member;
    the worker's traceback only under VLKIT_DEBUG=1."""
    import random

    rng = random.Random(0)
    shard = write_shard(tmp_path / "wds-0.tar", {
        f"{i:04d}": {"png": bytes(rng.randrange(256) for _ in range(300)) if i == 5 else png_bytes(i),
                     "cls": str(i % 2).encode()} for i in range(16)})
    args = ["train", "recipes/quickstart.yaml", f"data.train={{kind: webdataset, shards: {shard}}}", "data.eval=null",
            "data.num_workers=2", f"backbone={SPEC}", "optim.steps=3", "optim.batch_size=8", "eval.every_steps=0",
            "checkpoint.every_steps=0", "logging.plot=false", "logging.tensorboard=false",
            "task.options={head: linear, class_names: [circle, square]}", "-o", str(tmp_path / "run"),
            "--no-progress"]
    code, _, err = cli(args, capsys)
    assert code == 2 and "Traceback" not in err and [x for x in err.splitlines() if x.startswith("error")] == \
        [err.strip().splitlines()[-1]], err
    assert str(shard) in err and "member 0005.png" in err
    monkeypatch.setenv("VLKIT_DEBUG", "1")
    code, _, err = cli([*args, "--overwrite"], capsys)
    assert code == 2 and "Original Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


# --- vlkit data show, probe stacks --------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["drop", "null", "number-list"])
def test_data_show_on_a_row_without_its_image_name(change, tmp_path, capsys):
    out = tmp_path / "g"
    code, _, err = cli(["data", "generate", "-n", "4", "--image-size", "16", "-o", str(out)], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    if change == "drop":
        del rows[1]["file_name"]
    else:
        rows[1]["file_name"] = None if change == "null" else [1, 2]
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli(["data", "show", str(out)], capsys)
    one_line(code, err, "row 2", "file_name")


def test_data_show_on_rows_that_are_not_objects(tmp_path, capsys):
    out = tmp_path / "g"
    assert cli(["data", "generate", "-n", "3", "--image-size", "16", "-o", str(out)], capsys)[0] == 0
    (out / "metadata.jsonl").write_text('[1, 2]\n"x"\n')
    code, _, err = cli(["data", "show", str(out)], capsys)
    one_line(code, err, "row 1")


@pytest.mark.parametrize("form", ["{a}+", "+{a}", "{a}++{a}", "{a}+ "])
def test_probe_refuses_an_empty_stack_part(form, tmp_path, capsys):
    bb = vlkit.load_backbone(SPEC)
    vlkit.inject(bb, "lora", name="a", rank=2)
    a = vlkit.save_adapter(bb, tmp_path / "a", name="a")
    code, _, err = cli(["probe", "synth-attribute-swap", "--backbone", SPEC, "--adapters", form.format(a=a), "-n", "8"],
                       capsys)
    one_line(code, err, "empty part")


# --- a mapping given whole replaces ------------------------------------------------------------------------------
def test_a_mapping_given_whole_replaces_the_recipes(tmp_path):
    import datasets

    from vlkit.train.recipe import load_recipe

    f = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"x": [1]}).to_parquet(str(f))
    cfg = load_recipe("recipes/quickstart.yaml", [f"data.train={{kind: parquet, path: {f}}}"])
    assert dict(cfg.data.train) == {"kind": "parquet", "path": str(f)}
    assert cfg.data.eval.domain == "satellite"  # untouched
    cfg = load_recipe("recipes/quickstart.yaml", ["adapter={variant: lora, rank: 2}", "task={name: retrieval}",
                                                  "data.eval={kind: world, domain: photo, task: retrieval}",
                                                  "data.train={kind: world, domain: photo, task: retrieval}"])
    assert dict(cfg.adapter) == {"variant": "lora", "rank": 2}
    assert cfg.task.name == "retrieval" and dict(cfg.task.options) == {}
    assert dict(cfg.data.eval) == {"kind": "world", "domain": "photo", "task": "retrieval"}
    # a whole mapping, then dotted keys refine it; dotted keys alone keep merging
    cfg = load_recipe("recipes/quickstart.yaml", [f"data.train={{kind: parquet, path: {f}}}", "data.train.split=train"])
    assert dict(cfg.data.train) == {"kind": "parquet", "path": str(f), "split": "train"}
    cfg = load_recipe("recipes/quickstart.yaml", ["data.train.n=16", "task.options.head=text"])
    assert cfg.data.train.domain == "satellite" and cfg.data.train.n == 16 and cfg.task.options.head == "text"
    # inside a list item, too
    cfg = load_recipe("recipes/multitask.yaml", ["tasks.0.data.train={kind: world, domain: sketch, task: "
                                                 "classification, n: 8}"])
    assert dict(cfg.tasks[0].data.train) == {"kind": "world", "domain": "sketch", "task": "classification", "n": 8}
    from vlkit.errors import ConfigError

    with pytest.raises(ConfigError, match="nme"):
        load_recipe("recipes/quickstart.yaml", ["task={nme: retrieval}"])
    spec = dict(load_recipe("recipes/quickstart.yaml", [f"data.train={{kind: parquet, path: {f}}}"]).data.train)
    assert len(vlkit.data.load_data(spec)) == 1  # no world option (domain, n, seed) left in the parquet spec


@pytest.mark.slow
def test_quickstart_trains_on_a_parquet_file_given_whole(tmp_path, capsys):
    """`vlkit train recipes/quickstart.yaml "data.train={kind: parquet, path: F}"` on a file `datasets` wrote."""
    f = tmp_path / "train.parquet"
    ds = vlkit.world.generate("satellite", "classification", 48, seed=3)
    ds.to_parquet(str(f))
    run = tmp_path / "run"
    code, out, err = cli(["train", "recipes/quickstart.yaml", f"data.train={{kind: parquet, path: {f}}}",
                          "optim.steps=4", "optim.batch_size=8", "data.eval.n=16", "eval.every_steps=0",
                          "checkpoint.every_steps=0", "logging.plot=false", "logging.tensorboard=false",
                          "-o", str(run), "--json", "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["steps"] == 4 and (run / "adapter_model.safetensors").is_file()
    saved = (run / "recipe.yaml").read_text()
    assert "kind: parquet" in saved and "domain" not in saved.split("train:")[1].split("eval:")[0]
