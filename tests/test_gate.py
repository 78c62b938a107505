"""Domain gates (issue 26's retention): thresholds, routing rule, calibration on world data, the gate composition
(`vlkit compose A --mode gate`) running exactly the adapter or exactly the frozen backbone, and `vlkit adapt`'s
gated row and `run_fewshot`'s gated columns."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import vlkit
from cli_helpers import cli
from vlkit.adapters.model import AdaptedModel
from vlkit.compose.gate import DomainGate, calibrate_gate
from vlkit.compose.gate_scores import (GaussianScore, NearestScore, heldout_distances, ledoit_wolf, leave_one_out,
                                       mahalanobis2, nearest_threshold)
from vlkit.data import load_data
from vlkit.errors import ConfigError

SPEC = "tiny@random"
SAT = {"kind": "world", "domain": "satellite", "task": "classification", "n": 80, "seed": 0}


def _nearest(bank, tau, owner=None):
    return NearestScore(bank, torch.zeros(len(bank), dtype=torch.long) if owner is None else owner, torch.tensor(tau))


def _gate(dim=4):
    e = torch.eye(dim)
    return DomainGate(dim, ["a", None], _nearest(e[:2], [0.9]), _nearest(e[2:3], [0.9]))


def _features(image=None, text=None, dim=4):
    z = torch.zeros(dim)
    return torch.cat([image if image is not None else z, text if text is not None else z,
                      torch.tensor([float(image is not None), float(text is not None)])]).unsqueeze(0)


def test_threshold_is_the_leave_one_out_quantile():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=-1)
    loo = leave_one_out(bank)  # nearest other row: 0.8, 0.8, 0.6
    assert torch.allclose(loo, torch.tensor([0.8, 0.8, 0.6]))
    assert nearest_threshold(bank, 0.0) == pytest.approx(0.6)  # the minimum: every training row passes held out
    assert nearest_threshold(bank, 0.5) == pytest.approx(0.8)
    assert nearest_threshold(bank[:1], 0.0) == pytest.approx(1.0, abs=1e-3)  # one row admits only itself
    exact = NearestScore.fit([bank], 0.0, exact=True)
    assert exact.margins(bank).min() >= 0 and exact.margins(F.normalize(bank[:1] + 0.05 * bank[2:], dim=-1)).max() < 0


def test_ledoit_wolf_and_held_out_distances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([6.0, 0.0, 0.0])
    mean, precision, shrink = ledoit_wolf(x)
    assert 0.0 <= shrink < 0.1  # many rows, few dimensions: little shrinkage, precision near the true one
    assert torch.allclose(precision.diagonal().float(), torch.tensor([1.0, 0.25, 4.0]), rtol=0.2)
    few = torch.randn(5, 50, generator=g)
    assert ledoit_wolf(few)[2] > 0.5  # fewer rows than dimensions: shrunk hard, still invertible
    held = heldout_distances(x, folds=10)
    inside = mahalanobis2(x, mean, precision)
    assert held.shape == (400,) and bool((held.mean() > inside.mean()))  # unseen rows lie farther out
    xn = F.normalize(x, dim=-1)  # the gate fits normalised embeddings
    score, _ = GaussianScore.fit([x], quantile=0.0)
    assert float(score.threshold[0]) == pytest.approx(float(heldout_distances(xn).max()), rel=1e-4)
    assert float((score.margins(xn) >= 0).float().mean()) > 0.99  # the training rows lie inside
    assert float(score.margins(-xn).max()) < 0  # the other side of the sphere does not


def test_gate_rule_images_by_image_texts_by_text():
    g = _gate()
    e = torch.eye(4)
    near = F.normalize(e[0] + 0.1 * e[3], dim=0)  # cos 0.995 to bank row 0
    assert g.predict(_features(image=near)).tolist() == [0]  # the adapter
    assert g.predict(_features(image=e[3])).tolist() == [1]  # unlike the training images: frozen (None)
    assert g.predict(_features(text=e[2])).tolist() == [0]
    assert g.predict(_features(text=e[0])).tolist() == [1]  # a text is judged by the text bank alone
    assert g.predict(_features(image=e[3], text=e[2])).tolist() == [1]  # a pair by its image
    assert g.names[g.predict(_features(image=e[3]))[0]] is None


def test_two_adapters_go_to_the_larger_margin():
    e = torch.eye(4)
    image = _nearest(torch.stack([e[0], e[1]]), [0.5, 0.9], torch.tensor([0, 1]))
    g = DomainGate(4, ["a", "b", None], image, NearestScore.fit([torch.zeros(0, 4), torch.zeros(0, 4)], 0.0))
    x = F.normalize(0.8 * e[0] + 0.6 * e[1], dim=0)  # margins: a 0.8 - 0.5 = 0.3, b 0.6 - 0.9 < 0
    assert g.predict(_features(image=x)).tolist() == [0]
    assert g.predict(_features(image=e[1])).tolist() == [1]
    assert g.predict(_features(text=e[1])).tolist() == [2]  # no text bank: texts go to the frozen backbone


def test_bad_gates_are_config_errors():
    e = torch.eye(4)
    with pytest.raises(ConfigError, match="None"):
        DomainGate(4, ["a"], _nearest(e, [0.5]), _nearest(e, [0.5]))
    with pytest.raises(ConfigError, match="2 thresholds for 1"):
        DomainGate(4, ["a", None], _nearest(e, [0.5, 0.5]), _nearest(e, [0.5]))
    with pytest.raises(ConfigError, match="two training images"):
        GaussianScore.fit([e[:1]], 0.0)
    bb = vlkit.load_backbone(SPEC)
    with pytest.raises(ConfigError, match="quantile"):
        calibrate_gate(bb, [("a", load_data(SAT), None)], quantile=1.0)
    with pytest.raises(ConfigError, match="score"):
        calibrate_gate(bb, [("a", load_data(SAT), None)], score="knn")


@pytest.mark.parametrize("score", ["mahalanobis", "nearest"])
def test_calibrated_gate_keeps_in_domain_and_refuses_the_general_domain(score):
    bb = vlkit.load_backbone(SPEC).eval()
    meta = {"name": "classification", "options": {"prompt": "a satellite image of a {}",
                                                  "class_names": vlkit.world.class_names("satellite")}}
    gate, report = calibrate_gate(bb, [("sat", load_data(SAT), meta)], score=score)
    per = report["per_adapter"]["sat"]
    assert per["images"] == 80 and per["texts"] == 5 and per["text_threshold"] is not None
    from vlkit.compose.router import route

    def share(domain):
        ds = load_data({**SAT, "domain": domain, "n": 60, "seed": 5})
        return float((route(bb, gate, pixels=bb.preprocess_batch(ds["image"])) == 0).double().mean())

    assert share("satellite") > 0.9  # held-out in-domain images reach the adapter
    assert share("photo") < 0.1  # the general domain goes to the frozen backbone
    tokens = bb.tokenize(["a satellite image of a lake", "a photo of a circle", "a photo of a lake"])
    assert route(bb, gate, tokens=tokens).tolist() == [0, 1, 1]  # its own prompts only, not the class elsewhere


@pytest.fixture(scope="module")
def sat_adapter(tmp_path_factory):
    """A synthetic satellite adapter (perturbed bottleneck) whose recipe names its few-shot training data."""
    from omegaconf import OmegaConf

    tmp = tmp_path_factory.mktemp("gate")
    bb = vlkit.load_backbone(SPEC)
    vlkit.inject(bb, "bottleneck", name="sat", reduction=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in AdaptedModel.of(bb).adapter_parameters("sat").values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    d = tmp / "sat"
    vlkit.save_adapter(bb, d, name="sat")
    recipe = {"seed": 3, "task": {"name": "classification"}, "data": {"train": {**SAT, "n": 200, "shots": 8}}}
    (d / "recipe.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(recipe)))
    return d


def test_gate_composition_runs_the_adapter_or_exactly_the_frozen_backbone(sat_adapter, tmp_path):
    from vlkit.compose import compose, load_composition

    res = compose([str(sat_adapter)], "gate", tmp_path / "gated")
    assert res["gate"]["per_adapter"]["sat"]["images"] == 40  # the recipe's 8 shots x 5 classes
    spec = json.loads((tmp_path / "gated" / "composition.json").read_text())
    router = spec["router"]
    assert spec["mode"] == "route" and router["kind"] == "gate" and router["names"] == ["sat", None]
    assert router["score"] == "mahalanobis" and res["gate"]["per_adapter"]["sat"]["shrinkage"] > 0
    bb = vlkit.load_backbone(SPEC).eval()
    comp = load_composition(bb, tmp_path / "gated")
    view = comp.routed(bb)
    model = AdaptedModel.of(bb)
    sat = load_data({**SAT, "n": 20, "seed": 9})
    photo = load_data({**SAT, "domain": "photo", "n": 20, "seed": 9})
    for ds, expect_adapter in ((sat, True), (photo, False)):
        px = bb.preprocess_batch(ds["image"])
        with torch.no_grad():
            got = view.encode_image(px)
            with model.activated(comp.names[0]):
                adapted = bb.encode_image(px)
            with model.disabled():
                frozen = bb.encode_image(px)
        on = view.last_route == 0
        assert bool(on.float().mean() > 0.8) == expect_adapter
        assert torch.allclose(got[on], adapted[on], atol=1e-6) and torch.equal(got[~on], frozen[~on])
        assert not torch.allclose(adapted, frozen)


def test_cli_compose_gate_and_its_errors(sat_adapter, tmp_path, capsys):
    code, out, err = cli(["compose", str(sat_adapter), "--mode", "gate", "-o", str(tmp_path / "g")], capsys)
    assert code == 0 and "gate sat" in out + err and (tmp_path / "g" / "router.safetensors").is_file()
    code, out, err = cli(["compose", str(sat_adapter), "--mode", "gate", "--score", "nearest", "-o",
                          str(tmp_path / "n")], capsys)
    assert code == 0 and json.loads((tmp_path / "n" / "composition.json").read_text())["router"]["score"] == "nearest"
    for extra, msg in ((["--quantile", "1.5"], "quantile"), (["--data", "none=world:photo"], "none"),
                       (["--score", "knn"], "score"),
                       (["--alpha", "0.5"], "--alpha")):
        code, out, err = cli(["compose", str(sat_adapter), "--mode", "gate", "-o", str(tmp_path / "x"), *extra],
                             capsys)
        assert code == 2 and msg in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_adapt_writes_a_gated_adapter_and_reports_its_retention(tmp_path):
    from vlkit.compose import load_composition
    from vlkit.train.adapt import run_adapt

    res = run_adapt(SPEC, "satellite", shots=2, out=tmp_path / "sat", steps=3, n_eval=30, progress=False)
    rows = {r["method"]: r for r in res["rows"]}
    frozen, gated = rows["zero-shot (frozen)"], rows["bottleneck adapter, gated"]
    assert gated["retention"] == pytest.approx(100 * gated["general"] / frozen["general"], abs=0.01)
    assert gated["gate"]["train_images"] == 10 and gated["gate"]["dir"] == "gated"
    metrics = json.loads((tmp_path / "sat" / "metrics.json").read_text())
    assert metrics["gated"]["retention"] == gated["retention"] and metrics["gated"]["in_domain"] == gated["in_domain"]
    bb = vlkit.load_backbone(SPEC)
    assert load_composition(bb, tmp_path / "sat" / "gated").router.names[-1] is None
    res = run_adapt(SPEC, "satellite", shots=2, out=tmp_path / "plain", steps=3, n_eval=30, progress=False,
                    gate=False)
    assert not any("gate" in r for r in res["rows"]) and not (tmp_path / "plain" / "gated").exists()


@pytest.mark.slow
def test_fewshot_protocol_scores_adapters_behind_the_gate():
    from vlkit.train.fewshot import run_fewshot

    kw = dict(domain="satellite", steps=2, n_eval=30, plot=False)
    res = run_fewshot(SPEC, ["bottleneck", "zeroshot"], [1], [1], **kw)
    ad, zs = res["runs"]
    frozen = res["general"]["frozen"]
    assert ad["gated_retention"] == pytest.approx(100 * ad["gated_general"] / frozen, abs=0.02)
    assert 0.0 <= ad["gated_routed"] <= 100.0 and "gated_accuracy" in res["summary"][0]
    assert "gated_accuracy" not in zs  # nothing to gate
    res = run_fewshot(SPEC, ["bottleneck"], [1], [1], gate=False, **kw)
    assert "gated_accuracy" not in res["runs"][0]


@pytest.mark.slow
def test_cli_adapt_prints_the_gated_row_unless_no_gate(tmp_path, capsys):
    args = ["adapt", "--backbone", SPEC, "--domain", "satellite", "--shots", "1", "--steps", "2", "--json"]
    code, out, err = cli([*args, "-o", str(tmp_path / "a")], capsys)
    assert code == 0, err
    gated = [r for r in json.loads(out)["rows"] if "gate" in r]
    assert len(gated) == 1 and "gated" in err and (tmp_path / "a" / "gated" / "composition.json").is_file()
    code, out, err = cli([*args, "-o", str(tmp_path / "b"), "--no-gate"], capsys)
    assert code == 0 and not any("gate" in r for r in json.loads(out)["rows"])


def test_gate_is_refused_on_generative_backbones():
    from vlkit.cli.adapt_generative import check_options

    with pytest.raises(ConfigError, match="--gate"):
        check_options({"--gate": False})
