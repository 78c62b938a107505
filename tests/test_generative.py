"""Generative backbones (`vl:`: a vlkit vision tower, a projector and a transformers LM from a local directory):
adapter sites in every part, outputs unchanged at init, gradients only in adapters, merged equals unmerged
generation, a bit-exact save/load round trip, prompt tuning on the LM input, and clear errors."""
from __future__ import annotations

import pytest
import torch

import vlkit
from vl_models import make_lm
from vlkit.adapters.model import AdaptedModel
from vlkit.errors import BackboneLoadError, ConfigError, InjectionError

PROMPTS = ["caption:", "vqa: what color is the circle ?"]
TARGETS = ["a red circle", "red"]


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return {k: make_lm(k, root) for k in ("t5", "bart", "llama", "gpt2")}


def _model(lm_dirs, kind) -> AdaptedModel:
    torch.manual_seed(0)
    return vlkit.load(f"vl:lm={lm_dirs[kind]},vision=tiny@random,projector=linear")


def _pixels(bb, n=2):
    return torch.randn(n, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(1))


def _perturb(model, name, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.adapter_parameters(name).values():
            if t.is_floating_point():
                t.add_(scale * torch.randn(t.shape, generator=g).to(t))


@pytest.mark.parametrize("kind,variant,opts", [
    ("t5", "lora", {"rank": 4, "modules": "all", "towers": "all"}),
    ("t5", "bottleneck", {"towers": "lm"}),
    ("bart", "lora", {"rank": 4, "towers": "lm"}),
    ("llama", "dora", {"rank": 4, "modules": "all", "towers": "lm"}),
    ("llama", "vera", {"rank": 8, "towers": "lm"}),
    ("gpt2", "bottleneck", {"towers": "lm"}),
    ("gpt2", "lora", {"rank": 4, "modules": "all", "towers": "all"}),
    ("gpt2", "dora", {"rank": 4, "modules": "all", "towers": "lm"}),
    ("gpt2", "vera", {"rank": 8, "modules": "all", "towers": "lm"}),
    ("gpt2", "ia3", {"towers": "lm"}),
])
def test_unchanged_at_init_and_gradients_only_in_adapters(lm_dirs, kind, variant, opts):
    m = _model(lm_dirs, kind)
    bb = m.backbone
    px = _pixels(bb)
    with torch.no_grad():
        loss0, gen0 = bb.loss(px, PROMPTS, TARGETS), bb.generate(px, PROMPTS, max_new_tokens=4)
    h = m.add_adapter("a", variant, **opts)
    assert h.sites and {s.tower for s in h.sites} <= set(bb.towers)
    with torch.no_grad():
        assert torch.allclose(bb.loss(px, PROMPTS, TARGETS), loss0, atol=1e-5)
        assert bb.generate(px, PROMPTS, max_new_tokens=4) == gen0
    bb.loss(px, PROMPTS, TARGETS).backward()
    grads = {n for n, p in bb.named_parameters() if p.grad is not None}
    assert grads and all(".adapters." in n for n in grads)


LORA_ALL = {"rank": 4, "modules": "all", "towers": "all"}


@pytest.mark.parametrize("kind,variant,opts", [
    ("t5", "lora", LORA_ALL),
    ("llama", "lora", LORA_ALL),
    ("gpt2", "lora", LORA_ALL),
    ("gpt2", "dora", {"rank": 4, "modules": "all", "towers": "lm"}),
    ("gpt2", "vera", {"rank": 8, "modules": "all", "towers": "lm"}),
    ("gpt2", "ia3", {"towers": "lm"}),
    ("gpt2", "bottleneck", {"towers": "lm"}),  # no merge: an activation between its projections
])
def test_merged_equals_unmerged_generation_and_save_load_is_bit_exact(lm_dirs, kind, variant, opts, tmp_path):
    m = _model(lm_dirs, kind)
    bb = m.backbone
    m.add_adapter("lo", variant, **opts)
    _perturb(m, "lo", scale=1.0 if variant == "vera" else 0.05)  # VeRA's vectors scale small frozen projections
    px = _pixels(bb)
    with torch.no_grad():
        unmerged = bb.generate(px, PROMPTS, max_new_tokens=5)
        lp = bb.sequence_logprob(px, PROMPTS, TARGETS)
        with m.disabled():
            assert not torch.allclose(bb.sequence_logprob(px, PROMPTS, TARGETS), lp, atol=1e-3)
        if variant != "bottleneck":
            m.merge_adapter("lo")
            assert bb.generate(px, PROMPTS, max_new_tokens=5) == unmerged
            assert torch.allclose(bb.sequence_logprob(px, PROMPTS, TARGETS), lp, atol=1e-4)
            m.unmerge_adapter("lo")
            assert torch.equal(bb.sequence_logprob(px, PROMPTS, TARGETS), lp)
    m.save_adapter(tmp_path / "lo", "lo")
    other = _model(lm_dirs, kind)
    other.load_adapter(tmp_path / "lo")
    mine, theirs = m.adapter_parameters("lo"), other.adapter_parameters("lo")
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        assert other.backbone.generate(px, PROMPTS, max_new_tokens=5) == unmerged
        assert torch.equal(other.backbone.sequence_logprob(px, PROMPTS, TARGETS), lp)


def test_gpt2_conv1d_projections_are_linear_sites_and_merge_into_the_transposed_weight(lm_dirs):
    m = _model(lm_dirs, "gpt2")
    bb = m.backbone
    sites = bb.blocks("decoder")[0].sites
    attn = "lm.transformer.h.0.attn"
    assert {r: (s.path, s.kind, s.in_features, s.out_features) for r, s in sites.items() if s.kind == "linear"} == {
        "attn.qkv": (f"{attn}.c_attn", "linear", 32, 96),  # q, k, v fused: one site, as PEFT targets c_attn
        "attn.out": (f"{attn}.c_proj", "linear", 32, 32),
        "mlp.fc1": ("lm.transformer.h.0.mlp.c_fc", "linear", 32, 128),
        "mlp.fc2": ("lm.transformer.h.0.mlp.c_proj", "linear", 128, 32),
    }
    h = m.add_adapter("v", "lora", rank=2, targets=["attn.v"], towers="lm")  # a part's role selects the fused one
    assert [s.path for s in h.sites] == [f"lm.transformer.h.{i}.attn.c_attn" for i in range(2)]
    _perturb(m, "v")
    conv = bb.model.lm.transformer.h[0].attn.c_attn.base
    layer = m.adapter_layers("v")[f"{attn}.c_attn"]
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        adapted = bb.model.lm.transformer.h[0].attn.c_attn(x)
        m.merge_adapter("v")
        assert torch.allclose(conv.weight, w0 + layer.delta_weight().t(), atol=1e-6)  # stored (in, out)
        assert torch.equal(conv.bias, b0) and torch.allclose(conv(x), adapted, atol=1e-5)
        m.unmerge_adapter("v")
    assert torch.equal(conv.weight, w0)
    m.delete_adapter("v")
    m.add_adapter("d", "dora", rank=2, targets=["attn.qkv"], towers="lm")
    magnitude = m.adapter_layers("d")[f"{attn}.c_attn"].magnitude
    assert torch.allclose(magnitude, w0.norm(dim=0))  # the norms of the output rows of W = Conv1D.weight.t()


def test_prompt_tuning_prepends_tokens_and_trains(lm_dirs):
    m = _model(lm_dirs, "t5")
    bb = m.backbone
    px = _pixels(bb)
    with torch.no_grad():
        before = bb.loss(px, PROMPTS, TARGETS)
    h = m.add_adapter("p", "prompt-tuning", num_tokens=3)
    assert [s.kind for s in h.sites] == ["prefix"]
    embeds, mask = bb._inputs(px, PROMPTS)
    assert embeds.shape[1] == mask.shape[1] and mask[:, :3].all()
    loss = bb.loss(px, PROMPTS, TARGETS)
    assert not torch.allclose(loss, before)
    loss.backward()
    assert all(".adapters." in n for n, p in bb.named_parameters() if p.grad is not None)
    with m.disabled(), torch.no_grad():
        assert torch.allclose(bb.loss(px, PROMPTS, TARGETS), before, atol=1e-6)


def test_two_images_per_example(lm_dirs):
    bb = _model(lm_dirs, "t5").backbone
    one = _pixels(bb)
    two = torch.stack([one, one.flip(0)], dim=1)
    assert bb.visual_tokens(two).shape[1] == 2 * bb.visual_tokens(one).shape[1]
    with torch.no_grad():
        assert len(bb.generate(two, ["nlvr: the circle is left of the square", "nlvr: a"], max_new_tokens=2)) == 2


def test_errors(lm_dirs, tmp_path):
    with pytest.raises(BackboneLoadError, match="vl:lm=/path/to/dir"):
        vlkit.load("vl:lm=someone/t5-base")
    with pytest.raises(BackboneLoadError, match="not a transformers model directory"):
        vlkit.load(f"vl:lm={tmp_path}")
    with pytest.raises(ConfigError, match="unknown part"):
        vlkit.load(f"vl:lm={lm_dirs['t5']},vison=tiny")
    m = _model(lm_dirs, "gpt2")
    with pytest.raises(InjectionError, match="no site matched"):  # GPT-2 has no q_proj: q, k, v are one c_attn
        m.add_adapter("lo", "lora", towers="lm", targets=["q_proj"])
    with pytest.raises(ConfigError, match="towers must be one of"):
        m.add_adapter("b", "bottleneck", towers="encoder")  # a decoder-only LM has no encoder


def test_tiny_vl_ships_pretrained_and_loads_offline(tmp_path):
    from vlkit.world import generate

    m = vlkit.load("tiny-vl")
    bb = m.backbone
    assert bb.kind == "generative" and bb.towers == ("vision", "projector", "encoder", "decoder")
    ds = generate("photo", "captioning", 4, seed=99)
    px = bb.preprocess_batch(ds["image"])
    with torch.no_grad():
        caps = bb.generate(px, ["caption:"] * 4, max_new_tokens=16)
        init = vlkit.load("tiny-vl@init").backbone
        assert bb.loss(px, ["caption:"] * 4, list(ds["caption"])) < init.loss(px, ["caption:"] * 4, list(ds["caption"]))
    known = set(bb.tokenizer.get_vocab())
    assert all(c and set(c.split()) <= known for c in caps)
    with pytest.raises(BackboneLoadError, match="do not exist"):
        vlkit.load(f"tiny-vl@{tmp_path / 'none.safetensors'}")


def test_a_variant_refuses_a_backbone_kind_it_does_not_adapt():
    m = vlkit.load("tiny@random")
    with pytest.raises(InjectionError, match="adapts generative backbones"):
        m.add_adapter("p", "prompt-tuning")
    assert not m.records
