"""`vlkit adapt` on a generative backbone (tiny-vl): the adapter trains through the engine and changes the in-domain
score, retention on the photo domain is reported against the frozen model's own evaluation, the adapter directory
loads back, dual-encoder-only methods and options are refused in one line, and the --json fields."""
from __future__ import annotations

import json

import pytest
from cli_helpers import cli

import vlkit
from vlkit.backbones.loading import load_backbone
from vlkit.data.api import load_data
from vlkit.errors import ConfigError
from vlkit.plugins import registry
from vlkit.train import adapt_generative
from vlkit.train.adapt_generative import check_methods_for, resolve_task, run_adapt_generative, run_fewshot_generative
from vlkit.train.baselines import score_on

N_EVAL = 8


@pytest.fixture(scope="module")
def tiny_vl():
    return load_backbone("tiny-vl")


@pytest.mark.slow
def test_adapt_trains_changes_the_score_and_reports_retention(tmp_path, tiny_vl):
    out = tmp_path / "med"
    res = run_adapt_generative("tiny-vl", shots=4, steps=12, lr=1e-2, n_eval=N_EVAL, out=out, progress=False,
                               frozen=tiny_vl)
    assert res["task"] == "captioning" and res["metric"] == "cider" and res["shots_mean"] == "training examples"
    frozen, off, on = res["rows"]
    assert on["in_domain"] != frozen["in_domain"]  # trained: the adapter changed what the model writes
    assert set(on["in_domain_metrics"]) == {"cider", "bleu4"} and on["trainable_percent"] > 0
    assert res["adapter"]["towers"] == "lm"  # VL-Adapter: the adapter in the language model

    # the frozen general score is the frozen model's own evaluation of the same photo-domain data
    photo = load_data({"kind": "world", "domain": "photo", "task": "captioning", "n": N_EVAL, "seed": 20_000})
    own = score_on(load_backbone("tiny-vl"), "captioning", photo, {})
    assert frozen["general"] == round(own, 2) and frozen["retention"] == 100.0
    assert off["verified_unchanged"] is True and off["general"] == frozen["general"] and res["adapter_off_verified"]
    assert on["retention"] == pytest.approx(100 * on["general_metrics"]["cider"] / frozen["general_metrics"]["cider"],
                                            abs=0.01)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["general_frozen"] == frozen["general"] and metrics["retention"] == on["retention"]
    assert metrics["score"] == on["in_domain"]

    # the adapter directory loads back and scores what the run reported
    medical = load_data({"kind": "world", "domain": "medical", "task": "captioning", "n": N_EVAL, "seed": 10_000})
    model = vlkit.load("tiny-vl")
    model.load_adapter(out)
    assert round(score_on(model.backbone, "captioning", medical, {}), 2) == on["in_domain"]


def test_dual_encoder_only_methods_are_refused_from_their_declarations(tiny_vl):
    reg = registry("adapter")
    refused = [n for n in reg.names() if "generative" not in reg.get(n).backbone_kinds]
    assert {"coop", "tip-adapter", "maple"} <= set(refused)
    for m in [*refused, "linear", "linear-sgd"]:
        with pytest.raises(ConfigError, match=f"method '{m}' works on contrastive backbones"):
            check_methods_for(tiny_vl, [m])
    assert check_methods_for(tiny_vl, ["zeroshot", "full", "bottleneck", "lora"]) == [
        "zeroshot", "full", "bottleneck", "lora"]
    assert resolve_task(tiny_vl, None) == "captioning"
    with pytest.raises(ConfigError, match="runs on contrastive backbones"):
        resolve_task(tiny_vl, "classification")


@pytest.mark.parametrize("argv,words", [
    (["--method", "linear"], ["linear", "contrastive"]),
    (["--method", "bottleneck,tip-adapter", "--shots", "1,2"], ["tip-adapter", "contrastive"]),
    (["--baselines", "linear-sgd"], ["linear-sgd", "contrastive"]),
    (["--adapter", "coop"], ["coop", "contrastive"]),
    (["--task", "classification"], ["classification", "--task for it"]),
    (["--prompt", "a {}"], ["--prompt", "generative"]),
])
def test_adapt_cli_refuses_in_one_line(capsys, tmp_path, argv, words):
    code, out, err = cli(["adapt", "--backbone", "tiny-vl", "-o", str(tmp_path / "x"), *argv], capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(w in lines[0] for w in words), err
    assert not (tmp_path / "x").exists()


def test_a_dual_encoder_runs_only_its_default_task(capsys, tmp_path):
    code, _, err = cli(["adapt", "--backbone", "tiny@random", "--task", "captioning", "-o", str(tmp_path / "x")],
                       capsys)
    assert code == 2 and "runs on generative backbones" in err
    code, _, err = cli(["adapt", "--backbone", "tiny@random", "--task", "retrieval", "-o", str(tmp_path / "x")],
                       capsys)
    assert code == 2 and "adapts a dual encoder" in err and "vlkit train" in err


def test_adapt_cli_json_on_a_question_task(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(adapt_generative, "DEFAULT_EVAL", 6)
    out = tmp_path / "gqa"
    code, stdout, err = cli(["adapt", "--backbone", "tiny-vl", "--task", "gqa", "--domain", "satellite", "--shots",
                             "4", "--steps", "4", "-O", "reduction=8", "-o", str(out), "--json"], capsys)
    assert code == 0, err[-2000:]
    res = json.loads(stdout)
    assert {"backbone", "task", "domain", "shots", "shots_mean", "metric", "metrics", "rows", "hyperparameters",
            "adapter_dir", "adapter_off_verified", "general_domain", "n_eval"} <= set(res)
    assert res["task"] == "gqa" and res["metric"] == "accuracy" and res["n_eval"] == 6 and res["shots"] == 4
    assert res["adapter"]["reduction"] == "8" and res["hyperparameters"]["steps"] == 4
    assert [r["method"] for r in res["rows"]] == ["frozen (zero-shot)", "bottleneck adapter, off",
                                                 "bottleneck adapter, on"]
    for r in res["rows"]:
        assert {"in_domain", "general", "general_change", "retention", "trainable_percent"} <= set(r)
    assert "satellite gqa adaptation" in err and "retention" in err and "adapter written to" in err
    assert json.loads((out / "task.json").read_text())["name"] == "gqa"


def test_fewshot_protocol_on_tiny_vl(tmp_path, tiny_vl):
    res = run_fewshot_generative("tiny-vl", ["zeroshot", "bottleneck"], shots=[2], seeds=[1, 2], n_eval=4,
                                 steps=3, out=tmp_path / "fs", frozen=tiny_vl)
    assert [(r["method"], r["seeds"]) for r in res["summary"]] == [("zeroshot", 2), ("bottleneck", 2)]
    zs = res["summary"][0]
    assert zs["retention"] == 100.0 and zs["general"] == res["general"]["frozen"] and zs["trainable"] == 0
    assert res["summary"][1]["trainable"] > 0 and res["shots_mean"] == "training examples"
    assert json.loads((tmp_path / "fs" / "fewshot.json").read_text())["summary"] == res["summary"]
    run = json.loads((tmp_path / "fs" / "bottleneck" / "2shot-seed1" / "metrics.json").read_text())
    assert run["shots"] == 2 and "retention" in run and run["task"] == "captioning"


def test_a_method_declares_the_backbone_kinds_it_trains(tiny_vl):
    from vlkit.train.methods import check_backbone_kind, get_method

    for name in ("linear", "linear-sgd"):
        assert get_method(name).backbone_kinds == ("contrastive",)
        with pytest.raises(ConfigError, match=f"method '{name}' trains contrastive backbones; tiny-vl is a generative"):
            check_backbone_kind(get_method(name), tiny_vl)
        check_backbone_kind(get_method(name), load_backbone("tiny@random"))
    check_backbone_kind(get_method("full"), tiny_vl)
