"""Sites of kind "sequence" (role "prompt") and the built-in `vpt` variant: tokens a variant inserts at block
inputs, the masks and pooling each backbone keeps right, and exactness when no prompt adapter is active."""
from __future__ import annotations

import json

import pytest
import torch

import vlkit
from vlkit.adapters.inject import adapter_layers, merge_adapter
from vlkit.backbones.base import resolve_module
from vlkit.backbones.sequence import AdaptedSequence, grow_mask
from vlkit.errors import ConfigError, InjectionError

from cli_helpers import cli
from vlkit.adapters.model import AdaptedModel

BACKBONES = ("tiny", "open_clip", "hf")


def _encode(bb, pixels, tokens):
    with torch.no_grad():
        return (bb.encode_image(pixels), bb.encode_text(tokens), *bb.encode_image_tokens(pixels))


def _perturb(bb, name="default", seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, layer in sorted(adapter_layers(bb, name).items()):
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=g))


def _prompts(bb, name, tower):
    """block index -> that block's prompt tokens (n, D) of adapter `name` in `tower`."""
    rec = AdaptedModel.of(bb).records[name]
    layers = adapter_layers(bb, name)
    return {s.layer: layers[s.path].prompts.detach() for s in rec.sites if s.tower == tower}


def _blocks(bb, tower):
    """The frozen blocks of `tower` (hosts seen through)."""
    out = []
    for b in bb.blocks(tower):
        m = resolve_module(bb.model, b.path)
        out.append(m.base if isinstance(m, AdaptedSequence) else m)
    return out


def _causal(length):
    return torch.full((length, length), float("-inf")).triu(1)


# --- the sites ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", BACKBONES)
def test_every_block_has_one_prompt_site(kind, make_backbone):
    bb = make_backbone(kind)
    for tower in ("vision", "text"):
        blocks = bb.blocks(tower)
        sites = [b.sites["prompt"] for b in blocks]
        assert [s.kind for s in sites] == ["sequence"] * len(blocks)
        assert [s.path for s in sites] == [b.path for b in blocks] == [s.host_path for s in sites]
        assert all(s.in_features == s.out_features == b.width for s, b in zip(sites, blocks))
        assert bb.sequence_layout(tower).insert_at == 1  # after the class / start-of-text token
    assert bb.sequence_layout("text").causal and not bb.sequence_layout("vision").causal


def test_grow_mask_keeps_causal_and_padding():
    for n in (1, 3):
        torch.testing.assert_close(grow_mask(_causal(5), 1, n, causal=True), _causal(5 + n), rtol=0, atol=0)
    # boolean (True attends), per sample, the last key of sample 0 padding
    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    mask = torch.ones(4, 4, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    grown = grow_mask(mask, 1, 2, causal=True)
    keep2 = torch.cat([keep[:, :1], torch.ones(2, 2, dtype=torch.bool), keep[:, 1:]], dim=1)
    want = torch.ones(6, 6, dtype=torch.bool).tril()[None, None] & keep2[:, None, None, :]
    assert torch.equal(grown, want)
    # a full (bidirectional) mask stays full
    assert grow_mask(torch.zeros(3, 3), 1, 2, causal=False).eq(0).all()


# --- no prompt adapter active: exactly the frozen backbone --------------------------------------------------------

@pytest.mark.parametrize("kind", BACKBONES)
def test_inactive_is_bit_exact(kind, make_backbone, sample_inputs):
    plain = make_backbone(kind)
    pixels, tokens = sample_inputs(plain)
    ref = _encode(plain, pixels, tokens)
    bb = make_backbone(kind)
    vlkit.inject(bb, "vpt")
    vlkit.inject(bb, "lora", name="other")  # another adapter active: the prompt hosts pass through too
    _perturb(bb)
    lora_only = _encode(bb, pixels, tokens)
    AdaptedModel.of(bb).set_adapter()
    off = _encode(bb, pixels, tokens)
    for a, b in zip(ref, off):
        assert torch.equal(a, b)
    AdaptedModel.of(bb).set_adapter("default")
    on = _encode(bb, pixels, tokens)
    assert not torch.allclose(on[0], ref[0]) and not torch.allclose(on[1], ref[1])
    AdaptedModel.of(bb).set_adapter("other")
    assert all(torch.equal(a, b) for a, b in zip(_encode(bb, pixels, tokens), lora_only))


@pytest.mark.parametrize("kind", BACKBONES)
def test_shapes_unchanged_with_prompts(kind, make_backbone, sample_inputs):
    bb = make_backbone(kind)
    pixels, tokens = sample_inputs(bb)
    ref = _encode(bb, pixels, tokens)
    vlkit.inject(bb, "vpt", num_tokens=5)
    got = _encode(bb, pixels, tokens)
    assert got[0].shape == ref[0].shape and got[1].shape == ref[1].shape
    assert got[2].shape == ref[2].shape and got[3].shape == ref[3].shape
    assert not torch.allclose(got[3], ref[3])  # the patch tokens attended to the prompts
    # one sample, and a batch size other than the last forward's (no state left between forwards)
    with torch.no_grad():
        one = bb.encode_text(tokens[:1])
    torch.testing.assert_close(one[0], got[1][0], atol=1e-5, rtol=1e-5)


# --- where the tokens go and where pooling reads: against a computation that keeps the prompts in ------------

def _open_clip_reference(bb, pixels, tokens, prompts_v, prompts_t):
    """open_clip towers computed by hand with the prompts kept in the sequence from their first block to the
    end (replaced in place at every block that has its own): text pools at argmax(tokens) + n."""
    m = bb.model
    visual = m.visual
    assert visual.attn_pool is None and visual.pool_type == "tok" and not visual.final_ln_after_pool
    x = visual._embeds(pixels)
    x = _run_kept(x, _blocks(bb, "vision"), prompts_v, lambda length: None)
    img = visual.ln_post(x[:, 0]) @ visual.proj
    x = m.token_embedding(tokens) + m.positional_embedding
    n = next(iter(prompts_t.values())).shape[0]
    x = _run_kept(x, _blocks(bb, "text"), prompts_t, _causal)
    x = m.ln_final(x)
    txt = x[torch.arange(len(tokens)), tokens.argmax(dim=-1) + n] @ m.text_projection
    return img, txt


def _run_kept(x, blocks, prompts, mask_of, call=lambda blk, x, mask: blk(x, attn_mask=mask)):
    started = False
    for i, blk in enumerate(blocks):
        if i in prompts:
            p = prompts[i].unsqueeze(0).expand(x.shape[0], -1, -1)
            n = p.shape[1]
            x = torch.cat([x[:, :1], p, x[:, 1 + n:] if started else x[:, 1:]], dim=1)
            started = True
        x = call(blk, x, mask_of(x.shape[1]))
    return x


@pytest.mark.parametrize("layers", [None, [0], [1], [0, -1]], ids=["deep", "shallow", "from-1", "first-last"])
@pytest.mark.parametrize("kind", ["tiny", "open_clip"])
def test_open_clip_prompts_match_reference(kind, layers, make_backbone, sample_inputs):
    bb = make_backbone(kind)
    pixels, tokens = sample_inputs(bb)
    vlkit.inject(bb, "vpt", num_tokens=3, layers=layers)
    _perturb(bb)
    with torch.no_grad():
        img, txt = bb.encode_image(pixels), bb.encode_text(tokens)
        ref_img, ref_txt = _open_clip_reference(bb, pixels, tokens, _prompts(bb, "default", "vision"),
                                                _prompts(bb, "default", "text"))
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)


def _hf_reference(bb, pixels, tokens, prompts_v, prompts_t):
    """transformers CLIP towers by hand, prompts kept in: text mask causal over L + n with the padding of the
    tokenizer's end-of-text padding, pooled at the first end-of-text token + n."""
    m = bb.model
    vm, tm = m.vision_model, m.text_model
    x = vm.pre_layrnorm(vm.embeddings(pixels))

    def call(blk, x, mask):
        out = blk(x, mask)
        return out[0] if isinstance(out, tuple) else out

    x = _run_kept(x, _blocks(bb, "vision"), prompts_v, lambda length: None, call)
    img = m.visual_projection(vm.post_layernorm(x[:, 0]))
    eos = bb._tokenizer.eos_token_id
    is_pad = (tokens == eos) & ((tokens == eos).long().cumsum(dim=1) > 1)
    n = next(iter(prompts_t.values())).shape[0]
    keep = torch.cat([~is_pad[:, :1], torch.ones(len(tokens), n, dtype=torch.bool), ~is_pad[:, 1:]], dim=1)
    length = keep.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    x = tm.embeddings(input_ids=tokens)
    x = _run_kept(x, _blocks(bb, "text"), prompts_t, lambda length: mask, call)
    x = tm.final_layer_norm(x)
    assert tm.eos_token_id == eos != 2
    idx = (tokens == eos).int().argmax(dim=-1) + n
    txt = m.text_projection(x[torch.arange(len(tokens)), idx])
    return img, txt


@pytest.mark.parametrize("layers", [None, [0]], ids=["deep", "shallow"])
def test_hf_prompts_match_reference(layers, make_backbone, sample_inputs):
    bb = make_backbone("hf")
    pixels, tokens = sample_inputs(bb)
    assert (tokens == bb._tokenizer.eos_token_id).sum(dim=1).max() > 1, "a caption is padded"
    vlkit.inject(bb, "vpt", num_tokens=2, layers=layers)
    _perturb(bb)
    with torch.no_grad():
        img, txt = bb.encode_image(pixels), bb.encode_text(tokens)
        ref_img, ref_txt = _hf_reference(bb, pixels, tokens, _prompts(bb, "default", "vision"),
                                         _prompts(bb, "default", "text"))
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)


def test_stacked_prompt_adapters_concatenate(make_backbone, sample_inputs):
    bb = make_backbone("tiny")
    pixels, tokens = sample_inputs(bb)
    vlkit.inject(bb, "vpt", name="a", num_tokens=2)
    vlkit.inject(bb, "vpt", name="b", num_tokens=3, layers=[0, 2])
    _perturb(bb, "a", seed=1)
    _perturb(bb, "b", seed=2)
    pa = {t: _prompts(bb, "a", t) for t in ("vision", "text")}
    pb = {t: _prompts(bb, "b", t) for t in ("vision", "text")}
    AdaptedModel.of(bb).set_adapter("a", "b")
    with torch.no_grad():
        img, txt = bb.encode_image(pixels), bb.encode_text(tokens)
        # b's tokens follow a's; where b has none of its own its previous ones travel on (computed by hand)
        ref = _stacked_reference(bb, pixels, tokens, pa, pb)
    torch.testing.assert_close(img, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, ref[1], atol=1e-5, rtol=1e-5)
    AdaptedModel.of(bb).set_adapter("a", "b", mode="parallel")  # unweighted parallel: the same concatenation
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_text(tokens), txt, atol=0, rtol=0)
    AdaptedModel.of(bb).set_adapter("a", "b", mode="parallel", weights=[0.5, 0.5])
    with pytest.raises(ConfigError, match="weighted"):
        bb.encode_text(tokens)
    AdaptedModel.of(bb).route(["a", None])
    with pytest.raises(ConfigError, match="routing"):
        bb.encode_text(tokens)
    AdaptedModel.of(bb).clear_route()


def _stacked_reference(bb, pixels, tokens, pa, pb):
    """Both adapters' prompts kept in the sequence: [first][a tokens][b tokens][rest]."""
    m = bb.model

    def run(x, blocks, a, b, mask_of):
        na, nb = next(iter(a.values())).shape[0], next(iter(b.values())).shape[0]
        x = torch.cat([x[:, :1], torch.zeros(len(x), na + nb, x.shape[2]), x[:, 1:]], dim=1)
        for i, blk in enumerate(blocks):
            x = x.clone()
            if i in a:
                x[:, 1:1 + na] = a[i]
            if i in b:
                x[:, 1 + na:1 + na + nb] = b[i]
            x = blk(x, attn_mask=mask_of(x.shape[1]))
        return x, na + nb

    x, _ = run(m.visual._embeds(pixels), _blocks(bb, "vision"), pa["vision"], pb["vision"], lambda length: None)
    img = m.visual.ln_post(x[:, 0]) @ m.visual.proj
    x, n = run(m.token_embedding(tokens) + m.positional_embedding, _blocks(bb, "text"), pa["text"], pb["text"],
               _causal)
    x = m.ln_final(x)
    return img, x[torch.arange(len(tokens)), tokens.argmax(dim=-1) + n] @ m.text_projection


# --- training, files, merge, CLI --------------------------------------------------------------------------------

def test_gradients_only_in_prompts(make_backbone, sample_inputs):
    bb = make_backbone("tiny")
    pixels, tokens = sample_inputs(bb)
    rec = vlkit.inject(bb, "vpt", towers="text")
    assert {s.tower for s in rec.sites} == {"text"}
    bb.train()
    img, txt = bb(pixels, tokens)[:2]
    (img @ txt.T).logsumexp(dim=1).sum().backward()
    own = {id(p) for layer in adapter_layers(bb, "default").values() for p in layer.parameters()}
    assert len(own) == len(bb.blocks("text"))
    for name, p in bb.named_parameters():
        if id(p) in own:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    assert vlkit.parameter_report(bb)["trainable"] == len(own) * 4 * bb.blocks("text")[0].width


@pytest.mark.parametrize("kind", ["tiny", "hf"])
def test_save_load_round_trip_is_exact(kind, make_backbone, sample_inputs, tmp_path):
    bb = make_backbone(kind)
    pixels, tokens = sample_inputs(bb)
    rec = vlkit.inject(bb, "vpt", name="p", num_tokens=3, layers=[0, 1], init_std=0.5)
    _perturb(bb, "p")
    out = _encode(bb, pixels, tokens)
    path = vlkit.save_adapter(bb, tmp_path / "p", name="p")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["variant"] == "vpt" and cfg["config"]["num_tokens"] == 3 and cfg["config"]["layers"] == [0, 1]
    fresh = make_backbone(kind)
    loaded = vlkit.load_adapter(fresh, path)
    assert loaded.targets == rec.targets and len(loaded.targets) == 4
    got = _encode(fresh, pixels, tokens)
    assert torch.equal(got[0], out[0]) and torch.equal(got[1], out[1]) and torch.equal(got[3], out[3])


def test_vpt_cannot_merge_and_bad_options(make_backbone):
    bb = make_backbone("tiny")
    vlkit.inject(bb, "vpt")
    with pytest.raises(InjectionError, match="merge"):
        merge_adapter(bb, "default")
    for bad in ({"num_tokens": 0}, {"init_std": -1}, {"rank": 4}):
        with pytest.raises(ConfigError):
            vlkit.inject(make_backbone("tiny"), "vpt", **bad)
    with pytest.raises(InjectionError, match="sequence"):
        vlkit.inject(make_backbone("tiny"), "vpt", targets=["attn"])


def test_cli_inject_vpt(tmp_path, capsys):
    out = tmp_path / "vpt"
    code, stdout, err = cli(["inject", "--backbone", "tiny@random", "--adapter", "vpt", "-O", "num_tokens=2",
                             "-o", str(out)], capsys)
    assert code == 0, err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["variant"] == "vpt" and cfg["config"]["num_tokens"] == 2
    bb = vlkit.load_backbone("tiny@random")
    rec = vlkit.load_adapter(bb, out)
    assert {s.role for s in rec.sites} == {"prompt"} and {s.tower for s in rec.sites} == {"vision", "text"}


RECIPE = """
name: p
backbone: tiny
method: adapter
adapter: {variant: lora, rank: 2}
task: {name: classification}
data:
  train: {kind: world, domain: photo, task: classification, n: 16, seed: 0}
  eval: {kind: world, domain: photo, task: classification, n: 8, seed: 9}
optim: {lr: 5.0e-3, steps: 6, batch_size: 16}
checkpoint: {every_steps: 100, keep: 1}
logging: {tensorboard: false, plot: false, every_steps: 1}
"""


def test_training_vpt_reduces_the_loss(tmp_path):
    from vlkit.train.engine import train
    from vlkit.train.recipe import load_recipe

    (tmp_path / "r.yaml").write_text(RECIPE)
    cfg = load_recipe(tmp_path / "r.yaml", ["adapter.variant=vpt", "adapter.num_tokens=4"])
    train(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]
    rec = vlkit.load_adapter(vlkit.load_backbone("tiny"), tmp_path / "run")
    assert rec.variant == "vpt"


def test_prompts_under_a_joint_fusion_adapter(make_backbone, sample_inputs):
    """Cross-modal (joint) layers inside prompted blocks read the text mask grown by the prompt tokens."""
    bb = make_backbone("tiny")
    pixels, tokens = sample_inputs(bb)
    vlkit.inject(bb, "fusion", name="f")
    vlkit.inject(bb, "vpt", name="p")
    _perturb(bb, "f")
    with torch.no_grad():
        AdaptedModel.of(bb).set_adapter("f")
        fused = bb.encode_pair(pixels, tokens)
        AdaptedModel.of(bb).set_adapter("f", "p")
        both = bb.encode_pair(pixels, tokens)
        AdaptedModel.of(bb).set_adapter("p", "f")
        again = bb.encode_pair(pixels, tokens)
    assert both[0].shape == fused[0].shape and both[1].shape == fused[1].shape
    assert not torch.allclose(both[1], fused[1])
    assert torch.equal(both[0], again[0]) and torch.equal(both[1], again[1])  # order of the two does not matter
