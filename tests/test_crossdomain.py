"""Cross-domain evaluation (issue 26): `vlkit adapt --eval-domains` / `--eval-data` score a run on other domains
beside the frozen backbone's zero-shot score there (the single run and the few-shot protocol, at its largest shot
count), and `vlkit eval` with several `--data` gives one column group per dataset."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import cli
from test_fewshot import coop_dir  # noqa: F401 (fixture: a 3-class dataset in CoOp's layout)

from vlkit.train.adapt import run_adapt

SPEC = {"kind": "world", "task": "classification", "n": 30, "seed": 20_000}  # the draw run_adapt scores (seed 0)


@pytest.mark.slow
def test_adapt_reports_each_domain_for_the_adapted_and_the_frozen_model(tmp_path):
    from vlkit import load_backbone
    from vlkit.compose.predict import load_task
    from vlkit.data import load_data

    out = tmp_path / "sk"
    res = run_adapt("tiny@random", "sketch", shots=2, out=out, steps=3, n_eval=30, baselines=("linear",),
                    progress=False, eval_domains="photo,medical")
    assert res["cross_domain"]["targets"] == ["photo", "medical"]
    frozen = res["cross_domain"]["frozen"]
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["zero-shot (frozen)"]["cross"] == frozen == rows["bottleneck adapter, off"]["cross"]
    on, probe = rows["bottleneck adapter, on"], rows["linear probe (L-BFGS)"]
    assert set(on["cross"]) == {"photo", "medical"}
    # medical has other classes than sketch: a linear probe's backbone is frozen, so it scores the frozen backbone
    assert probe["cross"]["medical"] == frozen["medical"]
    # photo has sketch's classes: the probe keeps its trained head there
    bb = load_backbone("tiny@random")
    task = load_task(bb, json.loads((out / "baseline-linear" / "task.json").read_text()),
                     out / "baseline-linear" / "head.safetensors")
    photo = load_data({**SPEC, "domain": "photo"})
    with torch.no_grad():
        expect = task.evaluate(bb, task.prepare(bb, photo))["accuracy"]
    assert probe["cross"]["photo"] == round(expect, 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cross_domain"] == {d: {"accuracy": on["cross"][d], "frozen": frozen[d]} for d in frozen}


@pytest.mark.slow
def test_protocol_cross_domain_columns_at_the_largest_shot_count(tmp_path):
    from vlkit.cli.adapt_cmd import _cross_columns
    from vlkit.train.fewshot import run_fewshot

    out = tmp_path / "fs"
    res = run_fewshot("tiny@random", ["zeroshot", "linear"], [1, 2], [1], domain="medical", steps=2, n_eval=20,
                      eval_domains="all", out=out)
    cross = res["cross_domain"]
    assert cross["targets"] == ["photo", "satellite", "sketch"] and cross["shots"] == 2
    for row in res["summary"]:
        assert ("cross" in row) == (row["shots"] == 2)
    zs = next(r for r in res["summary"] if r["method"] == "zeroshot" and r["shots"] == 2)
    assert zs["cross"] == cross["frozen"]
    assert zs["cross"]["photo"] == res["general"]["frozen"]  # the photo target is the general domain's draw
    targets, headers = _cross_columns(res)
    assert targets == cross["targets"] and headers[1] == f"→ satellite (frozen {cross['frozen']['satellite']:.1f})"
    run = json.loads((out / "linear" / "2shot-seed1" / "metrics.json").read_text())
    assert set(run["cross_domain"]) == {"photo", "satellite", "sketch"}
    assert "cross_domain" not in json.loads((out / "linear" / "1shot-seed1" / "metrics.json").read_text())
    assert json.loads((out / "fewshot.json").read_text())["cross_domain"] == cross


def test_eval_data_of_a_data_run(coop_dir, tmp_path, capsys):  # noqa: F811
    twin = tmp_path / "twin"  # the same classes (and images) in another folder: a head keeps its accuracy
    shutil.copytree(coop_dir, twin)
    code, stdout, err = cli(["adapt", "--backbone", "tiny@random", "--method", "zeroshot,linear", "--shots", "2",
                             "--seeds", "1", "--data", f"coop:{coop_dir}", "--eval-data", f"coop:{twin}",
                             "-o", str(tmp_path / "fs"), "--json"], capsys)
    assert code == 0, err
    res = json.loads(stdout[stdout.index("{"):])
    runs = {r["method"]: r for r in res["runs"]}
    target = f"coop:{twin}"
    assert runs["linear"]["cross"][target] == runs["linear"]["accuracy"]
    assert runs["zeroshot"]["cross"][target] == res["cross_domain"]["frozen"][target] == runs["zeroshot"]["accuracy"]


def test_cross_domain_errors(coop_dir, tmp_path, capsys):  # noqa: F811
    base = ["adapt", "--backbone", "tiny@random", "--shots", "1", "--steps", "1"]
    for extra, words in ((["--eval-domains", "mars"], "mars"),
                         (["--domain", "sketch", "--eval-domains", "photo,sketch"], "adapts to"),
                         (["--eval-domains", "photo,photo"], "twice"),
                         (["--eval-data", "coop:/nowhere"], "--data"),
                         (["--data", f"coop:{coop_dir}", "--eval-domains", "photo"], "--eval-data"),
                         (["--data", f"coop:{coop_dir}", "--eval-data", f"coop:{coop_dir}"], "own data")):
        code, _, err = cli([*base, *extra, "-o", str(tmp_path / "x")], capsys)
        assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and words in err, (extra, err)
        assert not (tmp_path / "x").exists()


def test_eval_several_datasets_one_column_group_each(coop_dir, tmp_path, capsys):  # noqa: F811
    shutil.copytree(coop_dir, tmp_path / "twin")
    specs = [f"coop:{coop_dir}", f"coop:{tmp_path / 'twin'}"]
    common = ["--backbone", "tiny@random", "--bootstrap", "20", "--general", specs[1], "--json"]
    code, stdout, err = cli(["eval", "--data", specs[0], "--data", specs[1], *common], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    assert res["data"] == specs and [p["data"] for p in res["datasets"]] == specs
    assert "classification on 2 datasets" in err
    from vlkit.cli.eval_cmd import result_table

    headers = [str(c.header) for c in result_table(res).columns]
    assert headers == ["model", *(h for s in specs for h in (f"{s} (test): accuracy (n=9)", f"{s} (test): Δ")),
                       "general accuracy", "retention %"]
    for spec, part in zip(specs, res["datasets"]):
        code, alone, err = cli(["eval", "--data", spec, *common], capsys)
        assert code == 0, err
        single = json.loads(alone)
        assert part["rows"] == single["rows"] and part["n"] == single["n"]
        assert part["class_names"] == single["class_names"]
    code, _, err = cli(["eval", "--data", specs[0], "--data", specs[0]], capsys)
    assert code == 2 and "twice" in err
