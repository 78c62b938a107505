"""Composition: exact switching, mixed-batch routing, merging, fusion, router, sharing, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vlkit
from vlkit.errors import ConfigError, IncompatibleAdapterError
from vlkit.adapters.model import AdaptedModel

SPEC = "tiny@random"


def perturb(backbone, name: str, seed: int, scale: float = 0.05) -> None:
    from vlkit.adapters.inject import adapter_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(backbone, name).values():
            for p in layer.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))


def make_adapter(tmp: Path, name: str, seed: int, variant: str = "bottleneck", recipe: dict | None = None,
                 **opts) -> Path:
    """A synthetic adapter directory: inject on a fresh backbone, perturb every parameter, save."""
    bb = vlkit.load_backbone(SPEC)
    opts = opts or ({"reduction": 8} if variant == "bottleneck" else {"rank": 4, "modules": "all"})
    vlkit.inject(bb, variant, name=name, **opts)
    perturb(bb, name, seed)
    d = tmp / name
    vlkit.save_adapter(bb, d, name=name)
    if recipe is not None:
        from omegaconf import OmegaConf

        (d / "recipe.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(recipe)))
    return d


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    return {"a": make_adapter(tmp, "a", 1), "b": make_adapter(tmp, "b", 2),
            "la": make_adapter(tmp, "la", 3, "lora"), "lb": make_adapter(tmp, "lb", 4, "lora"), "tmp": tmp}


@pytest.fixture(scope="module")
def inputs():
    bb = vlkit.load_backbone(SPEC)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(6, 3, bb.image_size, bb.image_size, generator=g)
    tokens = bb.tokenize(["a red circle", "a radiograph showing a mass", "a sketch of a star", "what colour is it",
                          "there is a small square", "a photo of a cross"])
    return pixels, tokens


def encode(bb, pixels, tokens):
    with torch.no_grad():
        return bb.encode_image(pixels), bb.encode_text(tokens)


def test_switching_is_exact_and_memory_grows_by_adapter_only(adapters, inputs):
    bb = vlkit.load_backbone(SPEC)
    base_numel = sum(p.numel() for p in bb.parameters())
    base_ptrs = {n: p.data_ptr() for n, p in bb.base_parameters().items()}
    vlkit.load_adapter(bb, adapters["a"], name="a")
    AdaptedModel.of(bb).set_adapter("a")
    a_before = encode(bb, *inputs)
    vlkit.load_adapter(bb, adapters["b"], name="b")
    n_b = json.loads((adapters["b"] / "adapter_config.json").read_text())["num_parameters"]
    n_a = json.loads((adapters["a"] / "adapter_config.json").read_text())["num_parameters"]
    assert sum(p.numel() for p in bb.parameters()) == base_numel + n_a + n_b
    AdaptedModel.of(bb).set_adapter("b")
    b_out = encode(bb, *inputs)
    AdaptedModel.of(bb).set_adapter("a")
    a_after = encode(bb, *inputs)
    for x, y, z in zip(a_before, a_after, b_out):
        assert torch.equal(x, y)
        assert not torch.allclose(x, z)
    AdaptedModel.of(bb).set_adapter()
    frozen = encode(bb, *inputs)
    ref = encode(vlkit.load_backbone(SPEC), *inputs)
    assert all(torch.equal(x, y) for x, y in zip(frozen, ref))
    assert {n: p.data_ptr() for n, p in bb.base_parameters().items()} == base_ptrs  # nothing copied


@pytest.mark.parametrize("pair", [("a", "b"), ("la", "lb"), ("a", "lb")])
def test_mixed_batch_routing_equals_per_sample(adapters, inputs, pair):
    pixels, tokens = inputs
    bb = vlkit.load_backbone(SPEC)
    for n in pair:
        vlkit.load_adapter(bb, adapters[n], name=n, activate=False)
    route = torch.tensor([0, 1, -1, 1, 0, -1])
    AdaptedModel.of(bb).route(list(pair), route)
    mixed = encode(bb, pixels, tokens)
    AdaptedModel.of(bb).clear_route()
    full = {}
    for i, n in [(0, pair[0]), (1, pair[1]), (-1, None)]:
        AdaptedModel.of(bb).set_adapter(*(() if n is None else (n,)))
        full[i] = encode(bb, pixels, tokens)
    for j, r in enumerate(route.tolist()):
        for t in range(2):  # identical to the whole batch run with that adapter
            assert torch.equal(mixed[t][j], full[r][t][j])
        AdaptedModel.of(bb).set_adapter(*(() if r == -1 else (pair[r],)))
        alone = encode(bb, pixels[j:j + 1], tokens[j:j + 1])
        for t in range(2):  # and to the sample run alone
            torch.testing.assert_close(mixed[t][j], alone[t][0], rtol=1e-5, atol=1e-5)
    AdaptedModel.of(bb).route(["a" if "a" in pair else pair[0], None], [0, 1, 0, 1, 0, 1])  # names form, None = frozen
    with pytest.raises(RuntimeError, match="route for 6 samples"):
        encode(bb, pixels[:2], tokens[:2])
    AdaptedModel.of(bb).clear_route()


def _weights(d):
    from vlkit.adapters.files import read_adapter_weights

    return read_adapter_weights(d)


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_merging_two_copies_gives_the_adapter(adapters, tmp_path, method):
    from vlkit.compose.merge import merge_adapters

    cfg = merge_adapters([adapters["a"], adapters["a"]], tmp_path / "m", method=method, weights=[0.5, 0.5],
                         density=1.0)
    w, ref = _weights(tmp_path / "m"), _weights(adapters["a"])
    assert set(w) == set(ref) and all(torch.allclose(w[k], ref[k], atol=1e-7) for k in ref)
    assert cfg["composition"]["method"] == method
    bb = vlkit.load_backbone(SPEC)
    vlkit.load_adapter(bb, tmp_path / "m")  # a normal adapter directory


def test_task_arithmetic_removal_gives_zero_adapter(adapters, tmp_path, inputs):
    from vlkit.compose.merge import merge_adapters

    merge_adapters([adapters["a"], adapters["a"]], tmp_path / "z", method="task_arithmetic", weights=[1, -1])
    assert all(float(t.abs().max()) == 0.0 for t in _weights(tmp_path / "z").values())
    bb = vlkit.load_backbone(SPEC)
    vlkit.load_adapter(bb, tmp_path / "z")
    ref = encode(vlkit.load_backbone(SPEC), *inputs)
    assert all(torch.equal(x, y) for x, y in zip(encode(bb, *inputs), ref))  # zero bottleneck = identity


def test_ties_trims_and_elects_sign():
    from vlkit.compose.merge import ties_merge

    a, b = torch.tensor([1.0, -2.0, 0.1, 3.0]), torch.tensor([1.5, 1.0, -0.1, -1.2])
    out = ties_merge([a, b], [1.0, 1.0], density=0.5)
    # trimmed: a -> [0, -2, 0, 3], b -> [1.5, 0, 0, -1.2]; elected signs +, -, 0, +; disjoint means
    assert torch.allclose(out, torch.tensor([1.5, -2.0, 0.0, 3.0]))


def test_lora_concat_exact_and_svd(adapters, tmp_path):
    from vlkit.compose.merge import merge_adapters

    la, lb = adapters["la"], adapters["lb"]
    cfg = merge_adapters([la, lb], tmp_path / "c", method="concat", weights=[0.7, 0.3])
    assert cfg["config"]["rank"] == 8
    wa, wb, wc = _weights(la), _weights(lb), _weights(tmp_path / "c")
    s = 16.0 / 4
    site = next(k[:-7] for k in wa if k.endswith(".lora_A"))
    want = 0.7 * s * wa[f"{site}.lora_B"] @ wa[f"{site}.lora_A"] + 0.3 * s * wb[f"{site}.lora_B"] @ wb[f"{site}.lora_A"]
    got = wc[f"{site}.lora_B"] @ wc[f"{site}.lora_A"]  # scaling 1 (alpha = rank)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    cfg = merge_adapters([la, lb], tmp_path / "s", method="svd", weights=[0.7, 0.3], rank=8)
    assert cfg["composition"]["svd_relative_error"] < 1e-5  # rank 8 holds the sum of two rank-4 updates
    ws = _weights(tmp_path / "s")
    torch.testing.assert_close(ws[f"{site}.lora_B"] @ ws[f"{site}.lora_A"], want, rtol=1e-4, atol=1e-5)
    cfg = merge_adapters([la, lb], tmp_path / "s2", method="svd", rank=2)
    assert cfg["config"]["rank"] == 2 and 0 < cfg["composition"]["svd_relative_error"] < 1
    bb = vlkit.load_backbone(SPEC)
    vlkit.load_adapter(bb, tmp_path / "c")
    vlkit.load_adapter(bb, tmp_path / "s2", name="s2")


def test_incompatible_merges_name_both_and_the_difference(adapters, tmp_path):
    from vlkit.compose.merge import merge_adapters

    with pytest.raises(IncompatibleAdapterError, match=r"a.*la.*variant"):
        merge_adapters([adapters["a"], adapters["la"]], tmp_path / "x")
    other = make_adapter(tmp_path, "r16", 5, reduction=16)
    with pytest.raises(IncompatibleAdapterError, match=r"config differs: reduction \(8\.0 vs 16"):
        merge_adapters([adapters["a"], other], tmp_path / "y")
    cfg_file = other / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    a_config = json.loads((adapters["a"] / "adapter_config.json").read_text())["config"]
    cfg.update(backbone_fingerprint="0" * 16, config=a_config)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleAdapterError, match="backbone fingerprint"):
        merge_adapters([adapters["a"], other], tmp_path / "w")
    with pytest.raises(ConfigError, match=r"svd.*is for lora adapters"):
        merge_adapters([adapters["a"], adapters["b"]], tmp_path / "v", method="svd")


def test_compositions_load_and_resolve(adapters, tmp_path, inputs):
    from vlkit.compose import compose, load_composition, resolve_adapter_arg
    from vlkit.compose.adapter_fusion import add_fusion, save_fusion

    pixels, tokens = inputs
    bb = vlkit.load_backbone(SPEC)
    vlkit.load_adapter(bb, adapters["a"], name="a", activate=False)
    vlkit.load_adapter(bb, adapters["b"], name="b", activate=False)
    outs = {}
    for mode, act in (("stack", dict(mode="stack")), ("average", dict(mode="parallel", weights=[0.25, 0.75])),
                      ("parallel", dict(mode="parallel", weights=[1.0, 0.5]))):
        w = {"average": [1.0, 3.0], "parallel": [1.0, 0.5]}.get(mode)
        compose([str(adapters["a"]), str(adapters["b"])], mode, tmp_path / mode, weights=w)
        AdaptedModel.of(bb).set_adapter("a", "b", **act)
        outs[mode] = encode(bb, pixels, tokens)
        fresh = vlkit.load_backbone(SPEC)
        load_composition(fresh, tmp_path / mode)
        assert all(torch.equal(x, y) for x, y in zip(encode(fresh, pixels, tokens), outs[mode]))
        system = resolve_adapter_arg(vlkit.load_backbone(SPEC), str(tmp_path / mode))
        assert len(system.names) == 2
    assert not torch.allclose(outs["stack"][0], outs["average"][0])
    # a+b is the stack; an untrained fusion is the average of the adapters
    fresh = vlkit.load_backbone(SPEC)
    resolve_adapter_arg(fresh, f"{adapters['a']}+{adapters['b']}").activate(fresh)
    assert all(torch.equal(x, y) for x, y in zip(encode(fresh, pixels, tokens), outs["stack"]))
    add_fusion(bb, "fz", ["a", "b"])
    for layer in __import__("vlkit.compose.adapter_fusion", fromlist=["x"]).fusion_layers(bb, "fz").values():
        torch.nn.init.zeros_(layer.query.weight)
    AdaptedModel.of(bb).set_adapter("a", "b", mode="fuse", fusion="fz")
    AdaptedModel.of(bb).set_adapter("a", "b", mode="parallel", weights=[0.5, 0.5])
    avg = encode(bb, pixels, tokens)
    AdaptedModel.of(bb).set_adapter("a", "b", mode="fuse", fusion="fz")
    torch.testing.assert_close(encode(bb, pixels, tokens)[0], avg[0], rtol=1e-5, atol=1e-5)
    save_fusion(bb, "fz", tmp_path / "fusion.safetensors")
    from vlkit.compose.composition import write_composition

    write_composition(tmp_path / "fused", "fuse", bb, [("a", adapters["a"]), ("b", adapters["b"])],
                      extra={"fusion": {"name": "fz", "file": "../fusion.safetensors"}})
    fresh = vlkit.load_backbone(SPEC)
    comp = load_composition(fresh, tmp_path / "fused")
    assert comp.fusion and AdaptedModel.of(fresh).state.mode == "fuse"
    torch.testing.assert_close(encode(fresh, pixels, tokens)[0], avg[0], rtol=1e-5, atol=1e-5)


ROUTE_TRAIN = {"photo": {"kind": "world", "domain": "photo", "task": "classification", "n": 200, "seed": 0},
               "medical": {"kind": "world", "domain": "medical", "task": "classification", "n": 200, "seed": 0}}


def test_router_beats_chance_on_held_out_world_data(tmp_path):
    from vlkit.compose import compose, load_composition
    from vlkit.data import load_data

    dirs = []
    for i, (domain, spec) in enumerate(ROUTE_TRAIN.items()):
        dirs.append(str(make_adapter(tmp_path, domain, 10 + i, recipe={"task": {"name": "classification"},
                                                                       "data": {"train": spec}})))
    res = compose(dirs, "route", tmp_path / "router", router_steps=200, n_per_adapter=200)
    assert res["routing"]["heldout_accuracy"] > 90.0 and res["routing"]["chance"] == 50.0
    bb = vlkit.load_backbone(SPEC)
    comp = load_composition(bb, tmp_path / "router")
    routed = comp.routed(bb)
    correct = total = 0
    for i, domain in enumerate(ROUTE_TRAIN):  # fresh held-out data: other seed
        ds = load_data({"kind": "world", "domain": domain, "task": "classification", "n": 60, "seed": 777})
        pixels = bb.preprocess_batch(ds["image"])
        with torch.no_grad():
            routed.encode_image(pixels)
        correct += int((routed.last_route == i).sum())
        total += len(ds)
    assert correct / total > 0.9
    assert AdaptedModel.of(bb).state.route is None  # the routed view leaves no route behind


def test_multitask_sharing_ties_parameters(tmp_path):
    from vlkit.adapters.inject import adapter_layers
    from vlkit.compose import load_composition
    from vlkit.train.engine import run
    from vlkit.train.recipe import load_recipe

    recipe = tmp_path / "mt.yaml"
    recipe.write_text("""
name: mt
backbone: tiny@random
adapter: {variant: bottleneck, reduction: 16}
sharing: half_shared_down
tasks:
  - name: classification
    data: {train: {kind: world, domain: medical, task: classification, n: 16, seed: 0},
           eval: {kind: world, domain: medical, task: classification, n: 8, seed: 1}}
  - name: vqa
    data: {train: {kind: world, domain: photo, task: vqa, n: 16, seed: 0},
           eval: {kind: world, domain: photo, task: vqa, n: 8, seed: 1}}
optim: {steps: 4, batch_size: 4, lr: 1.0e-3}
logging: {tensorboard: false, plot: false}
""")
    cfg = load_recipe(recipe)
    result, bb, tasks = run(cfg, tmp_path / "mt", progress=False)
    assert set(tasks) == {"classification", "vqa"} and result["steps"] == 4
    la, lb = adapter_layers(bb, "classification"), adapter_layers(bb, "vqa")
    path = next(iter(la))
    assert la[path].down is lb[path].down and la[path].up is not lb[path].up
    assert not torch.equal(la[path].up.weight, lb[path].up.weight)  # each task trained its own up
    comp_dir = tmp_path / "mt"
    spec = json.loads((comp_dir / "composition.json").read_text())
    assert spec["sharing"] == "half_shared_down" and (comp_dir / "shared.safetensors").is_file()
    fresh = vlkit.load_backbone(SPEC)
    n0 = sum(p.numel() for p in fresh.parameters())
    comp = load_composition(fresh, comp_dir)
    la2, lb2 = adapter_layers(fresh, comp.names[0]), adapter_layers(fresh, comp.names[1])
    assert la2[path].down is lb2[path].down  # re-tied on load: one copy in memory
    grown = sum(p.numel() for p in fresh.parameters()) - n0
    assert grown == result["parameters"]["adapter"]
    assert comp.pick(task="vqa") == comp.names[1]
    with pytest.raises(ConfigError, match="sharing"):
        load_recipe(recipe, ["adapter.variant=lora", "sharing=bogus"])
    assert load_recipe(recipe, ["tasks.1.data.train.n=8"]).tasks[1].data.train.n == 8  # list items


def test_cli_compose_merge_and_errors(adapters, tmp_path):
    from vlkit.cli.app import main

    out = tmp_path / "merged"
    main(["compose", f"{adapters['a']},{adapters['b']}", "--mode", "merge", "--weights", "0.5,0.5", "-o",
          str(out), "--json"])
    assert (out / "adapter_config.json").is_file() and (out / "composition.json").is_file()


def test_cli_compose_reports_incompatible(adapters, tmp_path, capsys):
    from vlkit.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(["compose", f"{adapters['a']},{adapters['la']}", "--mode", "merge", "-o", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "variant" in capsys.readouterr().err


def test_fuse_trains_fusion_only_and_writes_a_composition(adapters, tmp_path, inputs):
    from vlkit.compose import compose, load_composition, resolve_adapter_arg
    from vlkit.adapters.files import read_adapter_weights

    recipe = tmp_path / "fuse.yaml"
    recipe.write_text("""
task: {name: classification}
data:
  train: {kind: world, domain: medical, task: classification, n: 16, seed: 0}
  eval: {kind: world, domain: medical, task: classification, n: 8, seed: 1}
optim: {steps: 3, batch_size: 8, lr: 1.0e-2}
logging: {plot: false}
""")
    from vlkit.train.fuse import fuse_adapters

    res = fuse_adapters([str(adapters["a"]), str(adapters["b"])], tmp_path / "fused", recipe=recipe, backbone=SPEC)
    d = tmp_path / "fused"
    assert res["steps"] == 3 and res["fusion_parameters"] > 0
    assert {"composition.json", "fusion.safetensors", "task.json", "metrics.json"} <= {p.name for p in d.iterdir()}
    for n in ("a", "b"):  # adapters stayed frozen: the copies equal the sources
        w, ref = read_adapter_weights(d / "adapters" / n), read_adapter_weights(adapters[n])
        assert all(torch.equal(w[k], ref[k]) for k in ref)
    bb = vlkit.load_backbone(SPEC)
    comp = load_composition(bb, d)
    fused = encode(bb, *inputs)
    AdaptedModel.of(bb).set_adapter(*comp.names, mode="parallel", weights=[0.5, 0.5])
    assert not torch.allclose(fused[0], encode(bb, *inputs)[0], atol=1e-6)  # the fusion was trained
    system = resolve_adapter_arg(vlkit.load_backbone(SPEC), str(d))
    assert system.mode == "fuse" and system.fusion


def test_train_on_top_of_a_composition(adapters, tmp_path, inputs):
    from vlkit.compose import compose, load_composition
    from vlkit.train.engine import run
    from vlkit.train.recipe import load_recipe

    compose([str(adapters["a"]), str(adapters["b"])], "stack", tmp_path / "base")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: top
backbone: {SPEC}
adapter: {{variant: lora, rank: 2}}
compose: {{base: {tmp_path / 'base'}}}
task: {{name: classification}}
data: {{train: {{kind: world, domain: medical, task: classification, n: 16, seed: 0}}}}
optim: {{steps: 2, batch_size: 8}}
logging: {{tensorboard: false, plot: false}}
""")
    result, bb, _ = run(load_recipe(recipe), tmp_path / "top", progress=False)
    top_cfg = json.loads((tmp_path / "top" / "adapter_config.json").read_text())
    assert top_cfg["variant"] == "lora" and result["parameters"]["trainable"] == top_cfg["num_parameters"]
    spec = json.loads((tmp_path / "top" / "composition.json").read_text())
    assert spec["mode"] == "stack" and [a["path"] for a in spec["adapters"]][-1] == "."
    want = encode(bb, *inputs)
    fresh = vlkit.load_backbone(SPEC)
    load_composition(fresh, tmp_path / "top")
    assert all(torch.equal(x, y) for x, y in zip(encode(fresh, *inputs), want))


def test_router_texts_are_what_the_task_encodes():
    from vlkit.compose.router import example_texts as _texts
    from vlkit.data import load_data

    ds = load_data({"kind": "world", "domain": "satellite", "task": "vqa", "n": 2, "seed": 0})
    assert _texts(ds, {"name": "vqa"}) == list(ds["question"])
    ds = load_data({"kind": "world", "domain": "medical", "task": "classification", "n": 2, "seed": 0})
    meta = {"name": "classification", "options": {"prompt": "a radiograph showing a {}",
                                                  "class_names": ds.features["label"].names}}
    assert _texts(ds, meta)[0].startswith("a radiograph showing a ")
