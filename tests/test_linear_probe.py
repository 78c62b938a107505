"""Recipe method `linear` (issue 26): the L-BFGS linear probe of `vlkit adapt --method linear`, through `vlkit train`:
the same fit on the same data (same accuracy and C), within a point of scikit-learn's LogisticRegression, its output
usable where a linear run's output is read; the SGD head is recipe method `linear-sgd`."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from cli_helpers import cli
from test_eval import digits  # noqa: F401 (fixture: scikit-learn's digits in CoOp's layout)

from vlkit.errors import ConfigError
from vlkit.train.recipe import load_recipe

LOGGING = {"tensorboard": False, "plot": False}


def _write(tmp_path, recipe: dict, name: str = "recipe.yaml"):
    f = tmp_path / name
    f.write_text(yaml.safe_dump(recipe))
    return f


@pytest.mark.slow
def test_recipe_linear_equals_adapt_linear_and_scikit_learn(digits, tmp_path, capsys):  # noqa: F811
    from sklearn.linear_model import LogisticRegression

    from vlkit import load_backbone
    from vlkit.compose.predict import load_task
    from vlkit.data import load_data
    from vlkit.train.baselines import image_features
    from vlkit.train.fewshot_run import method_recipe

    out = tmp_path / "fs"
    code, stdout, err = cli(["adapt", "--method", "linear", "--shots", "4", "--seeds", "1", "--data",
                             f"coop:{digits}", "-o", str(out), "--json"], capsys)
    assert code == 0, err
    (adapted,) = json.loads(stdout[stdout.index("{"):])["runs"]
    train = {"kind": "coop", "source": str(digits), "split": "train", "shots": 4}
    test = {"kind": "coop", "source": str(digits), "split": "test"}
    recipe = method_recipe("tiny", "linear", train, test, 10, 1, 4)
    recipe.update(logging=LOGGING, optim={"steps": 10})  # optim does not apply to the L-BFGS fit
    code, stdout, err = cli(["train", str(_write(tmp_path, recipe)), "-o", str(tmp_path / "run"), "--json",
                             "--no-progress"], capsys)
    assert code == 0, err
    res = json.loads(stdout[stdout.index("{"):])
    assert res["method"] == "linear" and res["steps"] == 0 and res["solver"]["solver"] == "lbfgs"
    assert res["solver"]["C_source"] == "validation" and len(res["solver"]["C_search"]) >= 7
    assert res["solver"]["C"] == pytest.approx(adapted["C"], rel=1e-9)
    assert round(res["score"], 2) == adapted["accuracy"]
    # the same C and features in scikit-learn: within a point on the test set
    bb = load_backbone("tiny")
    run_dir = tmp_path / "run"
    task = load_task(bb, json.loads((run_dir / "task.json").read_text()), run_dir / "head.safetensors")
    shots = load_data(train, task="classification")
    (x, y), (xt, yt) = (image_features(bb, task, ds) for ds in (shots, load_data(test, task="classification")))
    sk = LogisticRegression(C=res["solver"]["C"], max_iter=1000).fit(x.numpy(), y.numpy())
    theirs = 100.0 * float((sk.predict(xt.numpy()) == yt.numpy()).mean())
    assert abs(res["score"] - theirs) <= 1.0, (res["score"], theirs)
    # the run's files rebuild its classifier (what eval, compose run, serve and export read): the same accuracy
    with torch.no_grad():
        again = task.evaluate(bb, task.prepare(bb, load_data(test, task="classification")))["accuracy"]
    assert again == pytest.approx(res["score"], abs=1e-6)


def test_linear_sgd_trains_the_head_by_steps(tmp_path):
    from vlkit.train.engine import run

    over = ["backbone=tiny@random", "data.train.n=24", "data.eval.n=12", "optim.steps=3", "eval.every_steps=0",
            "checkpoint.every_steps=0", "logging.tensorboard=false", "logging.plot=false"]
    res, _, task = run(load_recipe("recipes/quickstart.yaml", [*over, "method=linear-sgd"]), tmp_path / "sgd")
    assert res["steps"] == 3 and "solver" not in res and task.head_kind == "linear"
    res, _, _ = run(load_recipe("recipes/quickstart.yaml", [*over, "method=linear", "compose.C=0.5"]),
                    tmp_path / "lin")
    assert res["steps"] == 0 and res["solver"]["C"] == 0.5 and res["solver"]["C_source"] == "given"


def test_linear_recipe_errors(tmp_path, capsys):
    base = ["backbone=tiny@random", "method=linear"]
    with pytest.raises(ConfigError, match="data.augment.*linear-sgd"):
        load_recipe("recipes/quickstart.yaml", [*base, "data.augment=true"])
    with pytest.raises(ConfigError, match="compose.C"):
        load_recipe("recipes/quickstart.yaml", [*base, "compose.C=-1"])
    with pytest.raises(ConfigError, match="compose.lr"):
        load_recipe("recipes/quickstart.yaml", [*base, "compose.lr=1"])
    load_recipe("recipes/quickstart.yaml", [*base, "optim.steps=null"])  # no steps needed
    recipe = {"name": "vqa-linear", "backbone": "tiny@random", "method": "linear", "task": {"name": "vqa"},
              "data": {"train": {"kind": "world", "domain": "photo", "task": "vqa", "n": 16, "seed": 0}},
              "logging": LOGGING}
    code, _, err = cli(["train", str(_write(tmp_path, recipe)), "-o", str(tmp_path / "v"), "--no-progress"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and "linear-sgd" in err
