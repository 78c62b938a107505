"""The CLIP adaptation methods of issue 16 as built-in variants: coop, maple, clip-adapter, tip-adapter,
tip-adapter-f, dora (vpt is tested in test_sequence_sites.py). Per variant: identity (or the documented
initial prompt) at init, gradients only in adapter parameters, bit-exact save / load, a few training steps
through `vlkit train` reduce the loss, clear errors; Tip-Adapter built with no training beats zero-shot."""
from __future__ import annotations

import json

import pytest
import torch

import vlkit
from vlkit.adapters.inject import adapter_layers, adapter_parameters, merge_adapter
from vlkit.errors import ConfigError, InjectionError
from vlkit.plugins import registry
from vlkit.adapters.model import AdaptedModel

NEW = ("coop", "maple", "clip-adapter", "tip-adapter", "tip-adapter-f", "dora")
TEXTS = ["a photo of a red cube", "that hat"]


def _encode(bb, pixels, tokens):
    with torch.no_grad():
        return bb.encode_image(pixels, normalize=True), bb.encode_text(tokens, normalize=True)


def _inputs(bb):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, bb.image_size, bb.image_size, generator=g), bb.tokenize(TEXTS)


def _perturb(bb, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(bb, name).values():
            for _, t in sorted(layer.state_dict(keep_vars=True).items()):
                if t.is_floating_point():
                    t.add_(0.1 * torch.randn(t.shape, generator=g))


def test_registered_through_the_builtin_hook():
    reg = registry("adapter")
    for v in NEW + ("vpt",):
        assert v in reg and reg.entry(v).plugin == "vlkit.adapters.builtin", v
        assert reg.get(v).name == v


# --- at init -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tiny", "open_clip", "hf"])
def test_coop_equals_the_initial_prompt_at_init_and_learns_only_its_texts(kind, make_backbone):
    bb = make_backbone(kind)
    pixels, tokens = _inputs(bb)
    ref = _encode(bb, pixels, tokens)
    rec = vlkit.inject(bb, "coop")
    [site] = rec.sites
    assert (site.tower, site.role, site.kind) == ("text", "tokens", "tokens")
    assert rec.config["init_prompt"] == "a photo of a" and len(rec.config["context_ids"]) >= 4
    [layer] = adapter_layers(bb, "default").values()
    emb = vlkit.backbones.base.resolve_module(bb.model, site.host_path).weight
    assert torch.equal(layer.context[0], emb[torch.tensor(rec.config["context_ids"])].detach())
    out = _encode(bb, pixels, tokens)
    assert torch.equal(out[0], ref[0]) and (out[1] - ref[1]).abs().max() <= 1e-6
    _perturb(bb)
    moved = _encode(bb, pixels, tokens)
    assert not torch.allclose(moved[1][0], ref[1][0])          # "a photo of a ..." gets the learned context
    assert torch.equal(moved[1][1], ref[1][1])                 # "that hat" does not start with it: untouched
    assert torch.equal(moved[0], ref[0])                       # text tower only


def test_coop_class_specific_contexts(make_backbone):
    bb = make_backbone("tiny")
    names = ["lake", "road"]
    rec = vlkit.inject(bb, "coop", class_specific=True, class_names=names, init_prompt="a satellite image of a")
    [layer] = adapter_layers(bb, "default").values()
    assert layer.context.shape[0] == 2
    tokens = bb.tokenize([f"a satellite image of a {n}" for n in names] + ["a satellite image of a cat"])
    with torch.no_grad():
        ref = bb.encode_text(tokens, normalize=True)
        layer.context[1].add_(0.5)                              # change only the context of "road"
        out = bb.encode_text(tokens, normalize=True)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2]) and not torch.allclose(out[1], ref[1])
    assert rec.config["class_ids"] and len(rec.config["class_ids"]) == 2


@pytest.mark.parametrize("variant", ["clip-adapter", "tip-adapter", "tip-adapter-f", "dora"])
@pytest.mark.parametrize("kind", ["tiny", "open_clip", "hf"])
def test_unchanged_at_init(kind, variant, make_backbone):
    bb = make_backbone(kind)
    pixels, tokens = _inputs(bb)
    ref = _encode(bb, pixels, tokens)
    rec = vlkit.inject(bb, variant)
    out = _encode(bb, pixels, tokens)
    assert (out[0] - ref[0]).abs().max() <= 1e-6 and (out[1] - ref[1]).abs().max() <= 1e-6
    if variant != "dora":
        assert {s.role for s in rec.sites} == {"proj"}
    assert {s.tower for s in rec.sites} == ({"vision"} if variant.startswith("tip") else {"vision", "text"})


@pytest.mark.parametrize("kind", ["tiny", "open_clip", "hf"])
def test_proj_sites_are_the_final_features(kind, make_backbone):
    """The `proj` site sees exactly what encode_image / encode_text return before normalisation."""
    bb = make_backbone(kind)
    pixels, tokens = _inputs(bb)
    with torch.no_grad():
        ref = bb.encode_image(pixels), bb.encode_text(tokens)
    vlkit.inject(bb, "clip-adapter")
    seen = {}
    for path, layer in adapter_layers(bb, "default").items():
        layer.register_forward_hook(lambda m, a, o, p=path: seen.__setitem__(p, a[0].detach().clone()))
    with torch.no_grad():
        bb.encode_image(pixels), bb.encode_text(tokens)
    got = sorted(seen.values(), key=lambda t: t.sum().item())
    want = sorted(ref, key=lambda t: t.sum().item())
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    AdaptedModel.of(bb).set_adapter()  # inactive: the frozen model's outputs exactly
    with torch.no_grad():
        assert torch.equal(bb.encode_image(pixels), ref[0]) and torch.equal(bb.encode_text(tokens), ref[1])


def test_maple_couples_the_vision_prompts_to_the_text_prompts(make_backbone):
    bb = make_backbone("tiny")
    pixels, tokens = _inputs(bb)
    rec = vlkit.inject(bb, "maple", depth=3, num_tokens=2)
    assert sorted({(s.tower, s.layer) for s in rec.sites}) == sorted((t, j) for t in ("vision", "text") for j in range(3))
    layers = adapter_layers(bb, "default")
    text = {s.layer: layers[s.path] for s in rec.sites if s.tower == "text"}
    vision = {s.layer: layers[s.path] for s in rec.sites if s.tower == "vision"}
    for j in range(3):
        assert vision[j]._text_prompts is text[j].prompts      # one P_j, saved once (at the text site)
        assert set(vision[j].state_dict()) == {"proj.weight", "proj.bias"}
    bb.train()
    img, txt = bb.encode_image(pixels, normalize=True), bb.encode_text(tokens, normalize=True)
    img.sum().backward()                                        # a vision-only loss reaches the text prompts
    assert all(text[j].prompts.grad is not None and text[j].prompts.grad.abs().sum() > 0 for j in range(3))
    with pytest.raises(ConfigError, match="towers must be both"):
        vlkit.inject(make_backbone("tiny"), "maple", towers="vision")


def test_dora_merges_exactly(make_backbone):
    bb = make_backbone("tiny")
    pixels, tokens = _inputs(bb)
    vlkit.inject(bb, "dora", rank=4, modules="all")
    _perturb(bb)
    tuned = _encode(bb, pixels, tokens)
    merge_adapter(bb, "default")
    merged = _encode(bb, pixels, tokens)
    torch.testing.assert_close(merged[0], tuned[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged[1], tuned[1], atol=1e-5, rtol=0)


# --- gradients, save / load -------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", NEW)
def test_gradients_only_in_adapter_parameters_and_exact_reload(variant, make_backbone, tmp_path):
    bb = make_backbone("tiny")
    pixels, tokens = _inputs(bb)
    vlkit.inject(bb, variant)
    _perturb(bb)
    own = {id(p) for layer in adapter_layers(bb, "default").values() for p in layer.parameters()}
    if registry("adapter").get(variant).training_free:
        assert not own and not any(p.requires_grad for p in bb.parameters())
    else:
        bb.train()
        img, txt = bb.encode_image(pixels, normalize=True), bb.encode_text(tokens, normalize=True)
        ((img @ txt.T) * torch.tensor([[1.0, -1.0], [-2.0, 0.5]])).sum().backward()
        for name, p in bb.named_parameters():
            if id(p) in own:
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            else:
                assert p.grad is None and not p.requires_grad, name
        bb.eval()
    out = _encode(bb, pixels, tokens)
    path = vlkit.save_adapter(bb, tmp_path / "a")
    fresh = make_backbone("tiny")
    vlkit.load_adapter(fresh, path)
    a, b = adapter_parameters(bb, "default"), adapter_parameters(fresh, "default")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    again = _encode(fresh, pixels, tokens)
    assert torch.equal(out[0], again[0]) and torch.equal(out[1], again[1])


# --- training through `vlkit train` -----------------------------------------------------------------------------

def _train(tmp_path, variant, *extra):
    from vlkit.tasks.base import Evaluating
    from vlkit.train.engine import load_datasets, run
    from vlkit.train.recipe import load_recipe

    cfg = load_recipe("recipes/quickstart.yaml", [
        f"adapter.variant={variant}", "task.options.head=text", "data.train.n=40", "data.eval.n=20",
        "optim.steps=10", "optim.batch_size=20", "optim.lr=5e-3", "optim.warmup_steps=0", "eval.every_steps=0",
        "checkpoint.every_steps=0", "backbone=tiny", *extra])
    result, bb, task = run(cfg, tmp_path / "run", progress=False)
    train_ds, _ = load_datasets(cfg)
    data = task.prepare(bb, train_ds)
    batch = {"pixels": data["pixels"][:], "labels": data["labels"]}
    with torch.no_grad(), Evaluating(task.head):
        after = float(task.loss(bb, batch))
        AdaptedModel.of(bb).set_adapter()
        before = float(task.loss(bb, batch))
    return result, before, after


@pytest.mark.parametrize("variant,extra", [
    ("coop", ()), ("coop", ("adapter.class_specific=true",)), ("maple", ()), ("clip-adapter", ()),
    ("tip-adapter-f", ()), ("dora", ()),
], ids=["coop", "coop-csc", "maple", "clip-adapter", "tip-adapter-f", "dora"])
def test_a_few_training_steps_reduce_the_loss(variant, extra, tmp_path):
    result, before, after = _train(tmp_path, variant, *extra)
    assert result["steps"] == 10 and result["parameters"]["trainable"] > 0
    assert after < before, (variant, before, after)
    cfg = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert cfg["variant"] == variant
    if variant == "coop":  # the initial prompt is the task's class prompt before {}: the world's satellite one
        assert cfg["config"]["init_prompt"] == cfg["task"]["options"]["prompt"].split("{}")[0].strip()
    if variant == "tip-adapter-f":  # the cache was filled from the 40 training images before training
        assert cfg["config"]["cache_size"] == 40 and cfg["config"]["num_classes"] == 5


def test_tip_adapter_through_vlkit_train_builds_with_no_steps(tmp_path):
    from vlkit.train.engine import train
    from vlkit.train.recipe import load_recipe

    with pytest.raises(ConfigError, match="without training"):
        load_recipe("recipes/quickstart.yaml", ["adapter.variant=tip-adapter"])
    cfg = load_recipe("recipes/quickstart.yaml", ["adapter.variant=tip-adapter", "task.options.head=text",
                                                  "optim.steps=0", "data.train.n=30", "data.eval.n=20",
                                                  "checkpoint.every_steps=0", "eval.every_steps=0"],
                      allow_untrained=True)
    result = train(cfg, tmp_path / "run", progress=False)
    result = result[0] if isinstance(result, tuple) else result
    assert result["steps"] == 0 and result["parameters"]["trainable"] == 0
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["config"]["cache_size"] == 30
    from safetensors.torch import load_file

    values = [t for k, t in load_file(str(tmp_path / "run" / "adapter_model.safetensors")).items()
              if k.endswith(".values")]
    assert values and float(values[0].sum()) == 30  # one one-hot label per cached example


# --- Tip-Adapter without training --------------------------------------------------------------------------------

@pytest.mark.parametrize("domain", ["medical", "satellite"])
def test_tip_adapter_beats_zero_shot_at_16_shots(domain, tmp_path):
    from vlkit.adapters.tip_adapter import build_tip_adapter
    from vlkit.data import load_data
    from vlkit.tasks.classification import ClassificationTask
    from vlkit.train.engine import few_shot

    bb = vlkit.load_backbone("tiny")
    shots = few_shot(load_data({"kind": "world", "domain": domain, "task": "classification", "n": 300, "seed": 0}),
                     16, seed=1)
    ev = load_data({"kind": "world", "domain": domain, "task": "classification", "n": 150, "seed": 1000})
    task = ClassificationTask(bb, shots)
    ev_data = task.prepare(bb, ev)
    zero_shot = task.evaluate(bb, ev_data)["accuracy"]
    rec = build_tip_adapter(bb, shots, task=task, out=tmp_path / "tip")
    assert not any(p.requires_grad for p in bb.parameters())
    assert rec.config["cache_size"] == 16 * len(task.class_names)
    tip = task.evaluate(bb, ev_data)["accuracy"]
    assert tip > zero_shot, (domain, zero_shot, tip)
    # the directory holds the cache and the task: it reloads bit-exactly onto a fresh backbone
    fresh = vlkit.load_backbone("tiny")
    vlkit.load_adapter(fresh, tmp_path / "tip")
    assert task.evaluate(fresh, ev_data)["accuracy"] == tip
    cfg = json.loads((tmp_path / "tip" / "adapter_config.json").read_text())
    assert cfg["task"]["name"] == "classification" and cfg["config"]["class_names"] == task.class_names


# --- errors and composition -------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,opts,match", [
    ("coop", {"towers": "vision"}, "towers must be text"),
    ("coop", {"init": "zeros"}, "init must be one of"),
    ("coop", {"class_specific": True}, "needs class_names"),
    ("maple", {"num_tokens": 0}, "num_tokens"),
    ("clip-adapter", {"ratio": 0}, "ratio"),
    ("clip-adapter", {"reduction": 0}, "reduction"),
    ("tip-adapter", {"towers": "text"}, "towers must be vision"),
    ("tip-adapter", {"beta": -1}, "beta"),
    ("tip-adapter", {"num_classes": 3, "class_names": ["a"]}, "class_names"),
    ("dora", {"rank": 0}, "rank"),
])
def test_bad_options_are_one_clear_error(variant, opts, match, make_backbone):
    bb = make_backbone("tiny")
    with pytest.raises(ConfigError, match=match):
        vlkit.inject(bb, variant, **opts)
    assert AdaptedModel.of(bb).records == {}


def test_what_cannot_merge_or_stack_says_so(make_backbone, tmp_path):
    from vlkit.compose.merge import merge_adapters

    bb = make_backbone("tiny")
    for v in ("coop", "maple", "clip-adapter", "tip-adapter"):
        vlkit.inject(bb, v, name=v.replace("-", "_"))
        with pytest.raises(InjectionError, match="cannot be merged into the weights"):
            merge_adapter(bb, v.replace("-", "_"))
    vlkit.inject(bb, "coop", name="coop2")
    with pytest.raises(ConfigError, match="only one can act"):
        AdaptedModel.of(bb).set_adapter("coop", "coop2", mode="stack")
    AdaptedModel.of(bb).set_adapter("coop", "clip_adapter", mode="stack")  # coop stacks with other kinds
    paths = [vlkit.save_adapter(bb, tmp_path / n, name=n) for n in ("tip_adapter",)] * 2
    with pytest.raises(ConfigError, match="hold different examples"):
        merge_adapters(paths, tmp_path / "merged")


def test_inspect_shows_each_variants_state(make_backbone, tmp_path):
    from vlkit.adapters.inspect import inspect_adapter

    for v, what in [("coop", "initial prompt"), ("maple", "prompts"), ("clip-adapter", "ratio (alpha)"),
                    ("tip-adapter", "cache"), ("tip-adapter-f", "alpha / beta"), ("dora", "rank / alpha")]:
        bb = make_backbone("tiny")
        vlkit.inject(bb, v)
        info = inspect_adapter(vlkit.save_adapter(bb, tmp_path / v))
        assert what in [row[0] for row in info["summary"]], v
        assert info["state"] and all(r["elements"] > 0 for r in info["state"])
