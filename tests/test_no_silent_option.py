"""No documented option silently ignored (issue 29): the `coop` kind's `shots`/`seed` and the recipe's are
reconciled (the kind draws with its own seed when given, else with the recipe's, and says so in one note),
bad values are one error line, and Winoground's per-source options are refused with another source."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cli_helpers import cli
from test_fewshot import coop_dir  # noqa: F401 (fixture)

from vlkit.data import load_data
from vlkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def recipe(tmp_path, train: dict, seed: int = 0, name: str = "recipe") -> Path:
    r = {"name": "coop-run", "backbone": "tiny@random", "method": "adapter",
         "adapter": {"variant": "bottleneck", "reduction": 8}, "task": {"name": "classification"},
         "data": {"train": train}, "optim": {"steps": 1, "batch_size": 4, "warmup_steps": 0},
         "eval": {"every_steps": 0}, "checkpoint": {"every_steps": 0},
         "logging": {"tensorboard": False, "plot": False}, "seed": seed}
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(r))
    return f


def drawn(cfg) -> list[str]:
    from vlkit.train.jobs import load_datasets

    train, _ = load_datasets(cfg)
    return sorted(x["path"] for x in train.cast_column("image", __import__("datasets").Image(decode=False))["image"])


def coop_draw(root, shots, seed) -> list[str]:
    import datasets

    ds = load_data(f"coop:{root}", split="train", shots=shots, seed=seed)
    return sorted(x["path"] for x in ds.cast_column("image", datasets.Image(decode=False))["image"])


def test_coop_seed_in_a_recipe_is_checked(coop_dir, tmp_path, capsys):  # noqa: F811
    f = recipe(tmp_path, {"kind": "coop", "source": str(coop_dir), "shots": 1, "seed": "abc"})
    code, _, err = cli(["train", str(f), "-o", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1 and "coop option seed must be an integer" in err, err
    for bad, what in (("abc", "shots must be an integer >= 1"), (0, "shots must be an integer >= 1"),
                      (1.5, "shots must be an integer >= 1")):
        f = recipe(tmp_path, {"kind": "world", "domain": "satellite", "task": "classification", "n": 40,
                              "shots": bad})
        code, _, err = cli(["train", str(f), "-o", str(tmp_path / "run"), "--no-progress"], capsys)
        assert code == 2 and err.count("\n") == 1 and what in err, err


def test_coop_draws_with_its_own_seed_or_the_recipes_with_a_note(coop_dir, tmp_path, capsys):  # noqa: F811
    from vlkit.train.recipe import load_recipe

    own = recipe(tmp_path, {"kind": "coop", "source": str(coop_dir), "shots": 2, "seed": 3}, seed=5, name="own")
    notes: list[str] = []
    cfg = load_recipe(own, notes=notes)
    assert notes == [] and drawn(cfg) == coop_draw(coop_dir, 2, 3)
    assert coop_draw(coop_dir, 2, 3) != coop_draw(coop_dir, 2, 5)  # the seeds do pick different shots

    plain = recipe(tmp_path, {"kind": "coop", "source": str(coop_dir), "shots": 2}, seed=5, name="plain")
    cfg = load_recipe(plain, notes=notes)
    assert drawn(cfg) == coop_draw(coop_dir, 2, 5)
    assert len(notes) == 1 and "recipe's seed 5" in notes[0] and "data.train.seed" in notes[0]

    code, _, err = cli(["train", str(plain), "-o", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 0, err
    note = "note: data.train: coop draws shots=2 with the recipe's seed 5"
    assert [ln for ln in err.splitlines() if ln.startswith(note)], err
    code, _, err = cli(["train", str(own), "-o", str(tmp_path / "run2"), "--no-progress"], capsys)
    assert code == 0 and "note: data.train" not in err, err


def test_other_kinds_draw_with_the_recipe_seed_and_keep_their_own(tmp_path):
    from vlkit.data.api import few_shot
    from vlkit.train.recipe import load_recipe

    spec = {"kind": "world", "domain": "satellite", "task": "classification", "n": 40, "seed": 7, "shots": 2}
    notes: list[str] = []
    cfg = load_recipe(recipe(tmp_path, spec, seed=3), notes=notes)
    import datasets

    from vlkit.train.jobs import load_datasets

    def images(ds):
        return [x["bytes"] for x in ds.cast_column("image", datasets.Image(decode=False))["image"]]

    train, _ = load_datasets(cfg)
    full = load_data({k: v for k, v in spec.items() if k != "shots"})  # the world's seed 7 generates the data
    assert notes == [] and images(train) == images(few_shot(full, 2, seed=3))  # the recipe's seed 3 draws
    assert images(train) != images(few_shot(full, 2, seed=7))


def test_coop_kind_options_are_used_or_refused(coop_dir):  # noqa: F811
    with pytest.raises(ConfigError, match="without shots=k it changes nothing"):
        load_data(f"coop:{coop_dir}", split="train", seed=2)
    for bad in ("2", True, 2.0):
        with pytest.raises(ConfigError, match="seed must be an integer"):
            load_data(f"coop:{coop_dir}", split="train", shots=1, seed=bad)
    with pytest.raises(ConfigError, match="shots must be an integer"):
        load_data(f"coop:{coop_dir}", split="train", shots="1")


def test_winoground_options_belong_to_their_source(tmp_path):
    with pytest.raises(ConfigError, match="n, seed apply only to generated pairs"):
        load_data({"kind": "winoground", "source": str(tmp_path), "n": 4, "seed": 1})
    with pytest.raises(ConfigError, match="token apply only to the hub copy"):
        load_data({"kind": "winoground", "source": "synth", "token": "x"})
    with pytest.raises(ConfigError, match="domain apply only"):
        load_data("winoground:hub", domain="medical")
    with pytest.raises(ConfigError, match="split apply only to the hub copy and parquet copies"):
        load_data("winoground:synth", split="test")
    assert len(load_data("winoground:synth", n=3, seed=1)) == 3


def test_probe_data_seed_is_for_generated_pairs_only(tmp_path, capsys):
    from vlkit.probe.winoground import load_winoground_data

    with pytest.raises(ConfigError, match="fixed copy"):
        load_winoground_data(str(tmp_path), data_seed=3)
    a, _ = load_winoground_data("synth", n=2, data_seed=1)
    b, _ = load_winoground_data("synth", n=2)
    assert a["caption_0"] != b["caption_0"] or a["caption_1"] != b["caption_1"]  # the seed is used
    code, _, err = cli(["probe", "winoground", "-b", "tiny@random", "--data", "hub", "--data-seed", "3",
                        "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1 and "generates synth pairs" in err, err


@pytest.mark.parametrize("args, unused", [
    (["--mode", "stack", "--method", "ties"], "--method does not apply to --mode stack"),
    (["--mode", "average", "--rank", "4"], "--rank does not apply to --mode average"),
    (["--mode", "merge", "--density", "0.5"], "--density does not apply to merge --method linear"),
    (["--mode", "merge", "--method", "task_arithmetic", "--rank", "2"], "--rank does not apply to merge"),
    (["--mode", "parallel", "--recipe", "r.yaml"], "--recipe does not apply to --mode parallel"),
    (["--mode", "merge", "--router-steps", "5", "--per-adapter", "9"], "--router-steps, --per-adapter do not"),
    (["--mode", "route", "--weights", "1,2"], "--weights does not apply to --mode route"),
    (["--mode", "stack", "--image", "x.png", "--backbone", "tiny"], "--image, --backbone do not apply"),
    (["--mode", "fuse", "--set", "seed=1", "--text", "hi"], "--text does not apply to --mode fuse"),
])
def test_compose_refuses_options_its_mode_does_not_use(tmp_path, capsys, args, unused):
    code, _, err = cli(["compose", "a,b", *args, "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and unused in err, err


def test_compose_run_refuses_the_composing_options(tmp_path, capsys):
    code, _, err = cli(["compose", "run", str(tmp_path), "--image", "x.png", "--mode", "stack", "--overwrite"],
                       capsys)
    assert code == 2 and "--mode, --overwrite do not apply to vlkit compose run" in err, err
    import vlkit
    from vlkit.compose.api import compose

    bb = vlkit.load_backbone("tiny@random")
    vlkit.inject(bb, "lora", rank=2)
    a = vlkit.save_adapter(bb, tmp_path / "a")
    with pytest.raises(ConfigError, match="weights do not apply to mode route"):
        compose([str(a)], "route", tmp_path / "o", weights=[1.0])


def test_export_peft_refuses_the_graph_options(tmp_path, capsys):
    code, _, err = cli(["export", "--format", "peft", "-a", str(tmp_path), "-o", str(tmp_path / "o"), "--task",
                        "classification", "--fp16", "--target", "onnx"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "--target, --task, --fp16 do not apply to --format peft" in err


def test_hf_local_path_refuses_a_hub_token(tmp_path):
    with pytest.raises(ConfigError, match="a hub token does not apply"):
        load_data({"kind": "hf", "source": str(tmp_path), "token": "hf_x"})


@pytest.mark.parametrize("args, unused", [
    (["--backbone", "tiny", "--providers", "CPUExecutionProvider"], "--providers does not apply with --engine torch"),
    (["--engine", "onnx", "--adapters", "x", "--device", "cpu", "--backbone", "tiny"],
     "--device, --backbone do not apply with --engine onnx"),
    (["--backbone", "tiny", "--replicas", "2", "--ray-address", "h:6379"], "--replicas, --ray-address do not apply"),
    (["--backbone", "tiny", "--cluster", "ray", "--threads", "2"], "--threads does not apply with --engine torch "
                                                                     "--cluster ray"),
])
def test_serve_refuses_flags_its_engine_or_cluster_does_not_use(capsys, args, unused):
    code, _, err = cli(["serve", *args], capsys)
    assert code == 2 and err.count("\n") == 1 and unused in err, err


def test_probe_overwrite_needs_an_out_dir(capsys):
    code, _, err = cli(["probe", "winoground", "-b", "tiny@random", "--overwrite"], capsys)
    assert code == 2 and err.count("\n") == 1 and "without --out nothing is written" in err, err


def test_eval_overwrite_needs_an_out_file(capsys):
    code, _, err = cli(["eval", "--data", "world:satellite/classification", "--overwrite"], capsys)
    assert code == 2 and err.count("\n") == 1 and "without --out nothing is written" in err, err
