"""Probes: Winoground metrics on hand-worked cases, tag breakdowns, bootstrap, data sources, adapters, CLI, plugins."""
from __future__ import annotations

import io
import itertools
import json
import os

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from vlkit import plugins  # noqa: E402
from vlkit.errors import ConfigError, DataError  # noqa: E402
from vlkit.hookspecs import hookimpl  # noqa: E402
from vlkit.probe import metrics as M  # noqa: E402
from vlkit.probe.base import Probe, build_result, summarize  # noqa: E402
from cli_helpers import cli
from vlkit.adapters.model import AdaptedModel

BACKBONE = "tiny@random"


# ---------------------------------------------------------------- metric functions, hand-worked

def wino(c0_i0, c0_i1, c1_i0, c1_i1):
    return [[c0_i0, c0_i1], [c1_i0, c1_i1]]


def test_winoground_correct_hand_worked_with_ties():
    scores = np.array([
        wino(2, 1, 1, 2),  # both right: text, image, group
        wino(1, 2, 0, 3),  # text: 1>0, 3>2 yes; image: 1>2 no
        wino(2, 1, 3, 4),  # text: 2>3 no; image: 2>1, 4>3 yes
        wino(1, 1, 0, 2),  # text yes; image: tie 1 vs 1 is not a win
        wino(1, 0, 1, 2),  # text: tie 1 vs 1 is not a win; image yes
        wino(5, 5, 5, 5),  # all tied: nothing
        wino(0, 1, 1, 0),  # all wrong
    ])
    c = M.winoground_correct(torch.tensor(scores))
    assert c["text"].tolist() == [True, True, False, True, False, False, False]
    assert c["image"].tolist() == [True, False, True, False, True, False, False]
    assert c["group"].tolist() == [True, False, False, False, False, False, False]
    s = M.winoground_scores(c)
    assert s == pytest.approx({"text": 300 / 7, "image": 300 / 7, "group": 100 / 7})
    with pytest.raises(ValueError, match=r"\(N, 2, 2\)"):
        M.winoground_correct(np.zeros((3, 4)))


def test_chance_levels_are_those_of_random_distinct_scores():
    perms = np.array([wino(*p) for p in itertools.permutations(range(4))], dtype=float)
    s = M.winoground_scores(M.winoground_correct(perms))
    assert s == pytest.approx(M.CHANCE)
    assert M.CHANCE["group"] == pytest.approx(16.6667, abs=1e-3)


def test_caption_pair_accuracy_macro_and_ties():
    correct = M.caption_pair_correct([1.0, 2.0, 3.0, 0.5], [0.0, 2.0, 4.0, 0.1])  # the tie is a miss
    assert correct.tolist() == [True, False, False, True]
    acc = M.caption_pair_accuracy(correct, ["a", "a", "b", "c"])
    assert acc["per_category"] == {"a": {"n": 2, "accuracy": 50.0}, "b": {"n": 1, "accuracy": 0.0},
                                   "c": {"n": 1, "accuracy": 100.0}}
    assert acc["macro"] == pytest.approx(50.0) and acc["micro"] == pytest.approx(50.0)
    assert M.caption_pair_accuracy([True, True, False], ["x", "y", "y"])["macro"] == pytest.approx(75.0)


def test_breakdowns_count_each_tag_on_a_fixture():
    tags = {"collapsed_tag": ["Object", "Relation", "Both", "Relation", "Object"],
            "num_main_preds": [1, 1, 2, 2, 1],
            "secondary_tag": ["", "Symbolic", "Symbolic, Pragmatics", "Morpheme-Level,Symbolic", " , "]}
    correct = {"text": np.array([1, 0, 1, 1, 0], bool), "image": np.array([1, 1, 0, 0, 0], bool)}
    correct["group"] = correct["text"] & correct["image"]
    b = M.winoground_breakdowns(correct, tags)
    assert {k: v["n"] for k, v in b["collapsed_tag"].items()} == {"Both": 1, "Object": 2, "Relation": 2}
    assert {k: v["n"] for k, v in b["num_main_preds"].items()} == {"1": 3, "2": 2}
    assert {k: v["n"] for k, v in b["secondary_tag"].items()} == {"Morpheme-Level": 1, "Pragmatics": 1,
                                                                  "Symbolic": 3}
    assert b["collapsed_tag"]["Relation"] == {"n": 2, "text": 50.0, "image": 50.0, "group": 0.0}
    assert b["secondary_tag"]["Symbolic"]["text"] == pytest.approx(200 / 3)
    assert b["num_main_preds"]["1"]["group"] == pytest.approx(100 / 3)
    assert M.split_tags("Symbolic, Series ,") == ["Symbolic", "Series"] and M.split_tags(None) == []


def test_bootstrap_reproducible_with_a_seed():
    rng = np.random.default_rng(3)
    a = rng.random(400) < 0.3
    b = a.copy()
    b[rng.choice(400, 40, replace=False)] = True  # b = a plus some wins
    ci = M.bootstrap_ci(a, n_boot=500, seed=0)
    assert ci == M.bootstrap_ci(a, n_boot=500, seed=0)
    assert ci != M.bootstrap_ci(a, n_boot=500, seed=1)
    assert ci[0] < 100 * a.mean() < ci[1]
    d = M.paired_bootstrap_diff(a, b, n_boot=500, seed=0)
    assert d == M.paired_bootstrap_diff(a, b, n_boot=500, seed=0)
    assert d["value"] == pytest.approx(100 * (b.mean() - a.mean())) and 0 < d["low"] <= d["value"] <= d["high"]
    assert d["p_le_0"] == 0.0
    # paired: the same resamples for both systems, so the interval is much tighter than the separate ones
    ci_b = M.bootstrap_ci(b, n_boot=500, seed=0)
    assert d["high"] - d["low"] < 0.5 * ((ci[1] - ci[0]) + (ci_b[1] - ci_b[0]))
    same = M.paired_bootstrap_diff(a, a, n_boot=100, seed=0)
    assert (same["value"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    cats = ["x"] * 200 + ["y"] * 200
    macro = M.bootstrap_ci(statistic=M.macro_statistic(a, cats), n=400, n_boot=200, seed=0)
    assert macro == M.bootstrap_ci(statistic=M.macro_statistic(a, cats), n=400, n_boot=200, seed=0)
    summary = summarize(["base", "other"], {"base": {"m": a}, "other": {"m": b}}, {"m": M.mean_statistic}, 400,
                        n_boot=500, seed=0)
    assert summary["base"]["diff"] is None
    assert summary["other"]["diff"]["m"] == pytest.approx(d)
    assert (summary["base"]["scores"]["m"]["low"], summary["base"]["scores"]["m"]["high"]) == pytest.approx(ci)


# ---------------------------------------------------------------- Winoground sources give the same scores

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
WINO_ROWS = [
    {"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1", "caption_0": f"a red {w} left of a blue star",
     "caption_1": f"a blue {w} left of a red star", "tag": "Adjective-Color",
     "secondary_tag": "Symbolic" if i else "", "num_main_preds": 1 + i % 2,
     "collapsed_tag": ["Object", "Relation", "Both"][i]}
    for i, w in enumerate(["circle", "square", "cross"])
]


def image(i: int, k: int) -> Image.Image:
    im = Image.new("RGBA" if (i, k) == (1, 0) else "RGB", (8, 8), COLORS[(2 * i + k) % 6])
    im.putpixel((k, i), (9, 9, 9) if im.mode == "RGB" else (9, 9, 9, 255))
    return im


@pytest.fixture
def wino_copies(tmp_path):
    """The same three examples in the official layout (examples.jsonl + images/) and the hub parquet layout."""
    repo = tmp_path / "winoground"
    (repo / "images").mkdir(parents=True)
    (repo / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in WINO_ROWS))
    cols = {c: [r[c] for r in WINO_ROWS] for c in WINO_ROWS[0]}
    for k in (0, 1):
        blobs = []
        for r in WINO_ROWS:
            image(r["id"], k).save(repo / "images" / f"ex_{r['id']}_img_{k}.png")
            buf = io.BytesIO()
            image(r["id"], k).save(buf, format="PNG")
            blobs.append({"bytes": buf.getvalue(), "path": f"ex_{r['id']}_img_{k}.png"})
        cols[f"image_{k}"] = blobs
    feats = datasets.Features({c: datasets.Image() if c.startswith("image_") else
                               datasets.Value("int64" if c in ("id", "num_main_preds") else "string") for c in cols})
    hub = tmp_path / "hubcopy"
    (hub / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(cols, features=feats).to_parquet(str(hub / "data" / "test-00000-of-00001.parquet"))
    return repo, hub


@pytest.fixture(scope="module")
def backbone():
    import vlkit

    return vlkit.load_backbone(BACKBONE)


def test_three_winoground_sources_give_the_same_probe_scores(wino_copies, backbone, monkeypatch):
    from vlkit.probe.systems import frozen_system
    from vlkit.probe.winoground import WinogroundProbe

    repo, hub = wino_copies
    probe, systems = WinogroundProbe(), [frozen_system()]
    r_jsonl = probe.run(backbone, systems, data=str(repo), n_boot=20)
    r_parquet = probe.run(backbone, systems, data=str(hub), n_boot=20)
    real_load, calls = datasets.load_dataset, []

    def fake_hub(path, name=None, split=None, token=None, **kw):
        calls.append((path, split, token))
        return real_load("parquet", data_files=[str(p) for p in sorted(hub.rglob("*.parquet"))], split="train")

    monkeypatch.setenv("HF_TOKEN", "hf_user_token")
    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    r_hub = probe.run(backbone, systems, data="hub", n_boot=20)
    assert calls == [("facebook/winoground", "test", "hf_user_token")]
    assert r_hub["dataset"] == "facebook/winoground" and r_jsonl["dataset"] == "winoground:winoground"
    assert r_jsonl["per_example"]["ids"] == r_parquet["per_example"]["ids"] == r_hub["per_example"]["ids"] == [0, 1, 2]
    for other in (r_parquet, r_hub):
        assert other["per_example"]["scores"] == r_jsonl["per_example"]["scores"]
        assert other["systems"] == r_jsonl["systems"]
    assert r_jsonl["tag_counts"]["collapsed_tag"] == {"Both": 1, "Object": 1, "Relation": 1}
    assert r_jsonl["tag_counts"]["secondary_tag"] == {"Symbolic": 2}
    assert r_jsonl["tag_counts"]["tag"] == {"Adjective-Color": 3}
    assert r_jsonl["tag_counts"]["num_main_preds"] == {"1": 2, "2": 1}
    # the per-example scores are the backbone's scores of each (caption, image) combination
    from vlkit.scoring import pair_scores

    ims = [image(1, 0).convert("RGB"), image(1, 1)]
    direct = pair_scores(backbone, backbone.preprocess_batch(ims),
                         backbone.tokenize([WINO_ROWS[1]["caption_0"], WINO_ROWS[1]["caption_1"]]))
    assert r_jsonl["per_example"]["scores"]["backbone"][1] == pytest.approx(direct.flatten().tolist(), abs=1e-5)


def test_hub_offline_is_a_clear_error(backbone, monkeypatch):
    from vlkit.probe.systems import frozen_system
    from vlkit.probe.winoground import WinogroundProbe

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="synth"):
        WinogroundProbe().run(backbone, [frozen_system()], data="hub")


# ---------------------------------------------------------------- adapters: dirs, stacks, compositions

@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """Two perturbed adapters (lora, bottleneck) saved as directories, made on a separate backbone."""
    import vlkit
    from vlkit.adapters.inject import adapter_parameters

    d = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, variant in (("lo", "lora"), ("bn", "bottleneck")):
        bb = vlkit.load_backbone(BACKBONE)
        vlkit.inject(bb, variant, name=name)
        g = torch.Generator().manual_seed(len(name) + len(variant))
        with torch.no_grad():
            for p in adapter_parameters(bb, name).values():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        out[name] = vlkit.save_adapter(bb, d / name, name=name)
    return out


def test_resolve_adapter_args(adapter_dirs, tmp_path):
    import vlkit
    from vlkit.probe.systems import resolve_systems

    bb = vlkit.load_backbone(BACKBONE)
    lo, bn = str(adapter_dirs["lo"]), str(adapter_dirs["bn"])
    comp = tmp_path / "comp"
    comp.mkdir()
    members = [{"name": "lo", "path": lo}, {"name": "bn", "path": os.path.relpath(bn, comp)}]  # relative to comp
    (comp / "composition.json").write_text(json.dumps({"mode": "parallel", "adapters": members,
                                                       "weights": [0.7, 0.3]}))
    systems = resolve_systems(bb, f"{lo},{bn},{lo}+{bn},{comp}")
    assert [s.label for s in systems] == ["backbone", lo, bn, f"{lo}+{bn}", str(comp)]
    assert sorted(AdaptedModel.of(bb).records) == ["bn", "lo"]  # each directory loaded once
    assert systems[3].names == ("lo", "bn") and systems[3].mode == "stack"
    assert systems[4].names == ("lo", "bn") and systems[4].mode == "parallel" and systems[4].weights == [0.7, 0.3]
    with pytest.raises(ConfigError, match="not found"):
        resolve_systems(bb, "no/such/adapter")
    with pytest.raises(ConfigError, match="twice"):
        resolve_systems(bb, f"{lo},{lo}")


class StubBackbone(torch.nn.Module):
    """Scores pair (caption c, image i) as 10 * caption_code + image_code; `joint` routes through joint scoring."""

    logit_scale = 1.0

    def __init__(self, joint: bool):
        super().__init__()
        from vlkit.backbones.state import AdapterState

        self.w = torch.nn.Parameter(torch.zeros(1))
        self.adapter_state, self.joint = AdapterState(), joint  # the site switchboard the owner writes
        self.joint_calls = 0

    def joint_active(self):
        return self.joint

    def preprocess_batch(self, images):
        return torch.tensor([[float(im.getpixel((0, 0))[0])] for im in images])

    def tokenize(self, texts):
        return torch.tensor([[float(t)] for t in texts])

    def joint_pair_scores(self, pixels, tokens, batch_size=256):
        self.joint_calls += 1
        return 10 * tokens[:, 0] + pixels[:, 0]


@pytest.mark.parametrize("joint", [False, True])
def test_score_examples_indexing_and_joint_routing(joint, monkeypatch):
    from vlkit.probe.systems import frozen_system, score_examples

    bb = StubBackbone(joint)
    if not joint:  # the dual-encoder path: a full (texts x images) matrix from vlkit.scoring.pair_scores
        monkeypatch.setattr("vlkit.probe.systems.pair_scores",
                            lambda b, px, tk, batch_size=256: 10 * tk[:, :1] + px[:, 0][None, :])

    def get(start, stop):  # example e: images with red = 2e, 2e+1; captions "3e", "3e+1"
        ims = [[Image.new("RGB", (2, 2), (2 * e + k, 0, 0)) for k in (0, 1)] for e in range(start, stop)]
        return ims, [[str(3 * e), str(3 * e + 1)] for e in range(start, stop)]

    out = score_examples(bb, [frozen_system()], 5, get, batch_size=2)["backbone"]
    expected = [[[10 * (3 * e + c) + 2 * e + i for i in (0, 1)] for c in (0, 1)] for e in range(5)]
    assert out.tolist() == expected and out.shape == (5, 2, 2)
    assert bb.joint_calls == (3 if joint else 0)


def test_fusion_adapter_is_scored_jointly(tmp_path):
    import vlkit
    from vlkit.adapters.inject import adapter_parameters
    from vlkit.probe.systems import resolve_systems
    from vlkit.probe.winoground import WinogroundProbe

    src = vlkit.load_backbone(BACKBONE)
    vlkit.inject(src, "fusion", name="fu")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapter_parameters(src, "fu").values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    vlkit.save_adapter(src, tmp_path / "fu", name="fu")
    bb = vlkit.load_backbone(BACKBONE)
    systems = resolve_systems(bb, str(tmp_path / "fu"))
    calls = []
    real = type(bb).joint_pair_scores
    bb.joint_pair_scores = lambda *a, **kw: calls.append(len(a[0])) or real(bb, *a, **kw)
    r = WinogroundProbe().run(bb, systems, n=6, n_boot=10, batch_size=4)
    assert calls == [16, 8]  # 4 combinations per example, only while the fusion adapter is active
    from vlkit.data import load_data  # the last example again, its four pairs scored jointly by hand

    ex = load_data("winoground:synth", n=6)[5]
    AdaptedModel.of(bb).set_adapter(systems[1].names[0])
    px = bb.preprocess_batch([ex["image_0"], ex["image_1"]] * 2)
    tk = bb.tokenize([ex["caption_0"]] * 2 + [ex["caption_1"]] * 2)
    expected = real(bb, px, tk).tolist()  # c0_i0, c0_i1, c1_i0, c1_i1
    assert r["per_example"]["scores"][str(tmp_path / "fu")][5] == pytest.approx(expected, abs=1e-4)
    assert r["per_example"]["scores"]["backbone"][5] != pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- caption pairs

def test_caption_pair_probe_local_json_and_synth(tmp_path, backbone):
    from vlkit.probe.caption_pairs import CaptionPairProbe
    from vlkit.probe.systems import frozen_system
    from vlkit.world.probes import attribute_swap_probe, relation_swap_probe

    (tmp_path / "img").mkdir()
    for i in range(4):
        image(i % 3, i % 2).save(tmp_path / "img" / f"{i}.png")
    rows = [{"image": f"img/{i}.png", "true_caption": f"a red circle {i}", "false_caption": f"a circle red {i}",
             "category": "order" if i < 2 else "attribute"} for i in range(4)]
    (tmp_path / "aro.json").write_text(json.dumps(rows))
    probe = CaptionPairProbe()
    r = probe.run(backbone, [frozen_system()], data=str(tmp_path / "aro.json"), n_boot=30)
    per = r["per_example"]["scores"]["backbone"]
    correct = [t > f for t, f in per]
    cats = r["systems"][0]["breakdowns"]["category"]
    assert cats["order"]["n"] == 2 and cats["order"]["accuracy"] == 50.0 * sum(correct[:2])
    assert r["systems"][0]["scores"]["accuracy"]["value"] == pytest.approx(
        (cats["order"]["accuracy"] + cats["attribute"]["accuracy"]) / 2)
    # SugarCrepe's layout: {id: {filename, caption, negative_caption}}, one category per file
    sugar = tmp_path / "sugar"
    sugar.mkdir()
    (sugar / "replace_att.json").write_text(json.dumps(
        {"0": {"filename": "0.png", "caption": "a red cube", "negative_caption": "a blue cube"}}))
    r2 = probe.run(backbone, [frozen_system()], data=str(sugar), image_root=str(tmp_path / "img"), n_boot=10)
    assert list(r2["systems"][0]["breakdowns"]["category"]) == ["replace_att"]
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "img/missing.png", "caption": "x",
                                                    "negative_caption": "y"}]))
    with pytest.raises(DataError, match=r"bad.json, row 1: image file not found"):
        probe.run(backbone, [frozen_system()], data=str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="needs --data"):
        probe.run(backbone, [frozen_system()])
    for p, cats in ((attribute_swap_probe(), {"swap-colour", "swap-size"}),
                    (relation_swap_probe(), {"swap-objects", "swap-prepositions"})):
        ex, _ = p.examples("synth", n=8, data_seed=0)
        assert len(ex) == 8 and {e["category"] for e in ex} == cats
        assert ex[0]["true"] == ex[1]["false"] and sorted(ex[0]["true"].split()) == sorted(ex[0]["false"].split())


# ---------------------------------------------------------------- CLI end to end


def test_cli_probe_winoground_end_to_end(tmp_path, capsys, adapter_dirs):
    ad_dir = tmp_path / "rel" / "adapter"  # the layout of a training run's output
    code, _, err = cli(["inject", "--backbone", BACKBONE, "--adapter", "lora", "-o", str(ad_dir),
                        "--name", "rel"], capsys)
    assert code == 0, err
    import vlkit
    from vlkit.adapters.inject import adapter_parameters

    bb = vlkit.load_backbone(BACKBONE)
    vlkit.load_adapter(bb, ad_dir, name="rel")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(bb, "rel").values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    vlkit.save_adapter(bb, ad_dir, name="rel")

    res, scores, plot = tmp_path / "res", tmp_path / "scores.jsonl", tmp_path / "wino.png"
    args = ["probe", "winoground", "--backbone", BACKBONE, "--data", "synth", "-n", "24", "--bootstrap", "50",
            "--adapters", str(ad_dir), "--no-progress"]
    code, out, err = cli(args + ["--json", "-o", str(res), "--scores", str(scores), "--plot", str(plot)], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["dataset"] == "winoground:synth" and result["backbone"] == BACKBONE and result["n"] == 24
    assert "per_example" not in result and result["adapters"] == [str(ad_dir)]
    base, ad = result["systems"]
    assert base["label"] == "backbone" and base["diff"] is None and ad["label"] == str(ad_dir)
    for m in ("text", "image", "group"):
        s = ad["scores"][m]
        assert s["low"] <= s["value"] <= s["high"]
        d = ad["diff"][m]
        assert d["value"] == pytest.approx(s["value"] - base["scores"][m]["value"]) and d["low"] <= d["high"]
    assert set(base["breakdowns"]["collapsed_tag"]) == {"Object", "Relation", "Both"}
    rel, rel_ad = base["breakdowns"]["collapsed_tag"]["Relation"], ad["breakdowns"]["collapsed_tag"]["Relation"]
    assert rel["ci"]["text"][0] <= rel["text"] <= rel["ci"]["text"][1] and "diff" not in rel
    assert rel_ad["diff"]["group"]["value"] == pytest.approx(rel_ad["group"] - rel["group"])
    assert "Δ group" in err and "by collapsed_tag" in err and "16.67" in err  # the table on stderr

    written = sorted(res.iterdir())
    assert [p.name for p in written] == ["winoground-synth__tiny-random__rel-adapter.json"]
    assert json.loads(written[0].read_text())["systems"] == result["systems"]
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(rows) == 48 and set(rows[0]) == {"id", "system", "c0_i0", "c0_i1", "c1_i0", "c1_i1"}
    by_sys = {s: [r for r in rows if r["system"] == s] for s in ("backbone", str(ad_dir))}
    assert [r["id"] for r in by_sys["backbone"]] == list(range(24))
    assert any(a["c0_i0"] != b["c0_i0"] for a, b in zip(*by_sys.values()))  # the adapter changes the scores
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run never overwrites the first run's file: it takes the next free name; --overwrite replaces
    small = args[:7] + ["8", "--bootstrap", "10"] + args[10:]
    assert cli(small + ["-o", str(res)], capsys)[0] == 0
    assert sorted(p.name for p in res.iterdir()) == ["winoground-synth__tiny-random__rel-adapter-2.json",
                                                     "winoground-synth__tiny-random__rel-adapter.json"]
    assert json.loads(written[0].read_text())["n"] == 24
    code, _, err = cli(small + ["-o", str(res), "--overwrite"], capsys)
    assert code == 0 and len(list(res.iterdir())) == 2 and json.loads(written[0].read_text())["n"] == 8


class ToyProbe(Probe):
    """A third-party probe: no model call, fixed per-example outcomes."""

    name = "toy-probe"
    summary = "a toy probe from a plugin"

    def run(self, backbone, systems, *, data=None, seed=0, n=None, n_boot=1000, level=0.95):
        k = n or 10
        values = {s.label: {"accuracy": np.arange(k) % (2 + j) == 0} for j, s in enumerate(systems)}
        summary = summarize([s.label for s in systems], values, {"accuracy": M.mean_statistic}, k,
                            n_boot=n_boot, seed=seed, level=level)
        return build_result(self, backbone, systems, dataset=f"toy:{data}", n=k, metrics=["accuracy"],
                            primary="accuracy", chance={"accuracy": 50.0}, summary=summary, n_boot=n_boot, seed=seed)


class ToyProbePlugin:
    @hookimpl
    def register_probes(self, register):
        register("toy-probe", ToyProbe(), summary="a toy probe from a plugin")


def test_cli_list_shows_a_plugin_probe_and_runs_it(capsys, tmp_path, reset_plugins):
    plugins.reset_plugins()
    plugins.get_plugins().register_plugin(ToyProbePlugin(), name="toy-plugin")
    code, out, err = cli(["probe", "--list", "--json"], capsys)
    assert code == 0
    listed = {p["name"]: p for p in json.loads(out)}
    assert {"winoground", "caption-pairs", "synth-attribute-swap", "synth-relation-swap"} <= set(listed)
    assert listed["toy-probe"]["plugin"] == "toy-plugin" and "toy-probe" in err and "toy-plugin" in err
    code, out, err = cli(["probe", "toy-probe", "-b", BACKBONE, "--data", "x", "-n", "12", "--bootstrap", "20",
                          "--json", "--plot", str(tmp_path / "toy.png")], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["probe"] == "toy-probe" and r["systems"][0]["scores"]["accuracy"]["value"] == 50.0
    assert (tmp_path / "toy.png").is_file()
    code, out, err = cli(["probe", "toy-probe", "-b", BACKBONE, "--batch-size", "4"], capsys)
    assert code == 2 and "no option 'batch-size'" in err
    code, out, err = cli(["probe", "no-such-probe"], capsys)
    assert code == 2 and "unknown probe 'no-such-probe'" in err and "toy-probe" in err and "winoground" in err
