"""transformers VLMs from a local directory (`hf:DIR`: LLaVA, Idefics3, SmolVLM, BLIP, vision-encoder-decoder), each
built from a tiny random config with `save_pretrained`: the model's own processor and prompt format (our inputs give
the model's own forward and generate the same results), a LoRA trained for a few steps on each with outputs
unchanged at init, gradients only in adapters, merged equals unmerged generation and a bit-exact save/load round
trip; prompt tuning on the prefix site; clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from vlm_models import make_vlm

import vlkit
from vlkit.adapters.model import AdaptedModel
from vlkit.errors import BackboneLoadError, ConfigError

KINDS = ["llava", "idefics3", "smolvlm", "blip", "vision-encoder-decoder"]
PROMPTS = ["caption:", "vqa: what color is the circle ?"]
TARGETS = ["a red circle", "red"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("vlms")


def _load(root, kind) -> AdaptedModel:
    if kind == "smolvlm":
        pytest.importorskip("num2words", reason="SmolVLM's processor needs num2words")
    torch.manual_seed(0)
    return vlkit.load(f"hf:{make_vlm(kind, root)}")


def _images():
    return [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("L", (30, 50), 90)]


def _prompts(kind):
    return [""] * 2 if kind.startswith("vision-encoder-decoder") else PROMPTS


@pytest.mark.parametrize("kind", [*KINDS, "vision-encoder-decoder-gpt2"])
def test_lora_trains_with_unchanged_init_adapter_only_gradients_merge_and_exact_round_trip(root, kind, tmp_path):
    m = _load(root, kind)
    bb = m.backbone
    assert bb.kind == "generative" and {"vision", "decoder"} <= set(bb.towers)
    px, prompts = bb.preprocess_batch(_images()), _prompts(kind)
    assert px.shape == (2, 3, bb.image_size, bb.image_size)
    with torch.no_grad():
        loss0, gen0 = bb.loss(px, prompts, TARGETS), bb.generate(px, prompts, max_new_tokens=4)
    h = m.add_adapter("lo", "lora", rank=4, modules="all", towers="all")
    assert {s.tower for s in h.sites} == set(bb.towers)
    with torch.no_grad():
        assert torch.allclose(bb.loss(px, prompts, TARGETS), loss0, atol=1e-5)
        assert bb.generate(px, prompts, max_new_tokens=4) == gen0
    params = list(m.trainable_parameters().values())
    opt = torch.optim.AdamW(params, lr=2e-2)
    for _ in range(3):
        opt.zero_grad()
        bb.loss(px, prompts, TARGETS).backward()
        grads = {n for n, p in bb.named_parameters() if p.grad is not None}
        assert grads and all(".adapters." in n for n in grads)
        opt.step()
    with torch.no_grad():
        assert float(bb.loss(px, prompts, TARGETS)) < float(loss0)
        unmerged = bb.generate(px, prompts, max_new_tokens=5)
        beams = bb.generate(px, prompts, max_new_tokens=5, num_beams=2)
        lp = bb.sequence_logprob(px, prompts, TARGETS)
        m.merge_adapter("lo")
        assert bb.generate(px, prompts, max_new_tokens=5) == unmerged
        assert bb.generate(px, prompts, max_new_tokens=5, num_beams=2) == beams
        assert torch.allclose(bb.sequence_logprob(px, prompts, TARGETS), lp, atol=1e-4)
        m.unmerge_adapter("lo")
    m.save_adapter(tmp_path / "lo", "lo")
    other = _load(root, kind)
    other.load_adapter(tmp_path / "lo")
    mine, theirs = m.adapter_parameters("lo"), other.adapter_parameters("lo")
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        assert torch.equal(other.backbone.sequence_logprob(px, prompts, TARGETS), lp)
        assert other.backbone.generate(px, prompts, max_new_tokens=5) == unmerged


@pytest.mark.parametrize("kind", KINDS)
def test_other_variants_at_every_part(root, kind):
    m = _load(root, kind)
    bb = m.backbone
    px, prompts = bb.preprocess_batch(_images()), _prompts(kind)
    sites = {s.path for b in bb.all_blocks() for s in b.sites.values()}
    with torch.no_grad():
        loss0 = bb.loss(px, prompts, TARGETS)
    for variant, opts in [("bottleneck", {"towers": "all"}), ("dora", {"rank": 2, "modules": "all", "towers": "all"}),
                          ("ia3", {"towers": "all"}), ("vera", {"rank": 4, "towers": "lm"})]:
        h = m.add_adapter(variant, variant, **opts)
        assert h.sites
        loss = bb.loss(px, prompts, TARGETS)
        assert torch.allclose(loss, loss0, atol=1e-5), variant
        loss.backward()
        grads = {n for n, p in bb.named_parameters() if p.grad is not None}
        assert grads and all(".adapters." in n for n in grads), variant
        m.delete_adapter(variant)
        bb.zero_grad(set_to_none=True)
    assert {s.path for b in bb.all_blocks() for s in b.sites.values()} == sites  # hosts left behind hide nothing


def _own_outputs(bb, kind, images, prompts):
    """The transformers model's own generate, fed as its processor and docs feed it."""
    model, tok = bb.model, bb.tokenizer
    if kind in ("llava", "idefics3", "smolvlm"):
        extra = {"do_image_splitting": False} if kind != "llava" else {}
        texts = [bb.prompt_text(p, 1) for p in prompts]
        inputs = bb.processor(text=texts, images=[[im] for im in images] if extra else images, padding=True,
                              padding_side="left", return_tensors="pt", **extra)
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=bb.pad_id)
        return tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    px = bb.image_processor(images=images, return_tensors="pt")["pixel_values"]
    if kind == "blip":  # BLIP's generate: the prompt tokenized whole ([CLS] ... [SEP]), one at a time
        out = []
        for i, p in enumerate(prompts):
            ids = tok([p], return_tensors="pt")["input_ids"]
            gen = model.generate(px[i:i + 1], input_ids=ids, max_new_tokens=4)  # drops the [SEP], keeps the prompt
            out.append(tok.decode(gen[0, ids.shape[1] - 1:], skip_special_tokens=True))
        return out
    out = model.generate(pixel_values=px, max_new_tokens=4)
    return tok.batch_decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_format_and_preprocessing_follow_the_models_own(root, kind):
    m = _load(root, kind)
    bb = m.backbone
    images, prompts = _images(), _prompts(kind)
    with torch.no_grad():
        ours = bb.generate(bb.preprocess_batch(images), prompts, max_new_tokens=4)
        theirs = _own_outputs(bb, kind, [im.convert("RGB") for im in images], prompts)
    assert ours == [t.strip() for t in theirs]
    px = bb.preprocess_batch(images)
    with torch.no_grad():  # a batch (prompts of different lengths, padded) answers as each example alone
        assert bb.generate(px, PROMPTS, max_new_tokens=5) == [bb.generate(px[i:i + 1], PROMPTS[i:i + 1],
                                                                           max_new_tokens=5)[0] for i in range(2)]
        alone = torch.cat([bb.sequence_logprob(px[i:i + 1], PROMPTS[i:i + 1], TARGETS[i:i + 1]) for i in range(2)])
        assert torch.allclose(bb.sequence_logprob(px, PROMPTS, TARGETS), alone, atol=1e-5)
    if kind == "llava":
        assert bb.prompt_text("what ?", 1).startswith("user :<image>")  # the processor's chat template
        ids = bb._prompt_ids(["what ?"], 1)[0]
        assert ids.count(bb.image_token_id) == 25  # (30 / 6)^2 patches: the processor's own expansion
    if kind == "idefics3":  # no chat template: the images go first
        assert bb.prompt_text("what ?", 2) == "<image><image>what ?"
        with pytest.raises(ConfigError, match="holds 1 <image> tokens for 2 image"):
            bb.prompt_text("<image> what ?", 2)


@pytest.mark.parametrize("kind", ["llava", "blip"])
def test_prompt_tuning_on_the_prefix_site_and_two_images(root, kind):
    m = _load(root, kind)
    bb = m.backbone
    px = bb.preprocess_batch(_images())
    with torch.no_grad():
        before = bb.loss(px, PROMPTS, TARGETS)
    h = m.add_adapter("p", "prompt-tuning", num_tokens=3)
    assert [s.kind for s in h.sites] == ["prefix"] and h.sites[0].tower == "decoder"
    loss = bb.loss(px, PROMPTS, TARGETS)
    assert not torch.allclose(loss, before)
    loss.backward()
    assert all(".adapters." in n for n, p in bb.named_parameters() if p.grad is not None)
    with torch.no_grad():
        assert len(bb.generate(px, PROMPTS, max_new_tokens=3)) == 2
        with m.disabled():
            assert torch.allclose(bb.loss(px, PROMPTS, TARGETS), before, atol=1e-6)
        two = torch.stack([px, px.flip(0)], dim=1)
        assert len(bb.generate(two, ["nlvr: the circle is left of the square", "nlvr: a"], max_new_tokens=2)) == 2


@pytest.mark.parametrize("kind", ["llava", "blip", "vision-encoder-decoder"])
def test_images_reach_the_processor_in_their_own_mode(root, kind):
    from vlkit.backbones.base import to_rgb

    bb = _load(root, kind).backbone
    rgba = Image.new("RGBA", (40, 30), (200, 30, 30, 0))  # transparent red: white once composited
    grey = Image.new("L", (30, 50), 90)
    own = bb.image_processor.do_convert_rgb  # CLIP's and BLIP's processors convert, ViT's does not
    for im in (rgba, grey):
        want = bb.image_processor(images=im if own else to_rgb(im), return_tensors="pt")["pixel_values"][0]
        assert torch.equal(bb.preprocess(im), want)
    assert not torch.equal(bb.preprocess(rgba), bb.preprocess(rgba.convert("RGB")))  # alpha was not just dropped


def test_sites_are_the_transformers_module_paths(root):
    bb = _load(root, "llava").backbone
    paths = {s.path for b in bb.all_blocks() for s in b.sites.values()}
    assert "model.language_model.layers.0.self_attn.q_proj" in paths
    assert "model.vision_tower.encoder.layers.1.mlp.fc2" in paths
    assert {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"} <= paths
    blip = _load(root, "blip").backbone
    roles = {s.role for b in blip.blocks("decoder") for s in b.sites.values()}
    assert {"xattn", "xattn.q", "xattn.out", "attn.q", "mlp.fc1"} <= roles
    assert "attn.qkv" in blip.blocks("vision")[0].sites  # BLIP's vision attention is one fused projection
    ved = _load(root, "vision-encoder-decoder").backbone  # ViT 48 wide, BERT 32: the model's enc_to_dec_proj
    assert ved.towers == ("vision", "projector", "decoder")
    assert ved.blocks("decoder")[0].sites["prefix"].in_features == 48  # the prefix joins the encoder's output


def test_errors(root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneLoadError, match="hf:/path/to/dir"):
        vlkit.load("hf:someone/llava-tiny")
    d = make_vlm("idefics3", root)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((d / f).read_bytes())
    with pytest.raises(BackboneLoadError, match="processor"):
        vlkit.load(f"hf:{bare}")
    m = _load(root, "vision-encoder-decoder")
    with pytest.raises(ConfigError, match="towers must be one of"):
        m.add_adapter("b", "bottleneck", towers="encoder")


def _perturb(model, name):
    with torch.no_grad():
        for t in model.adapter_parameters(name).values():
            t.add_(0.05 * torch.randn_like(t))


@pytest.mark.parametrize("kind", ["t5", "llama", "gpt2"])
def test_lora_on_a_vl_language_model_loads_with_peft_on_the_transformers_lm(root, kind, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from vl_models import make_lm

    from vlkit.export.peft import export_peft, write_peft_dir

    lm_dir = make_lm(kind, root)
    torch.manual_seed(0)
    m = vlkit.load(f"vl:lm={lm_dir},vision=tiny@random")
    m.add_adapter("lo", "lora", rank=4, modules="all", towers="lm")
    _perturb(m, "lo")
    write_peft_dir(m.backbone, "lo", tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["fan_in_fan_out"] is (kind == "gpt2")  # GPT-2's Conv1D keeps its weight as (in, out)
    if kind == "gpt2":  # the fused q, k, v projection is one module, as PEFT targets it
        assert "transformer.h.0.attn.c_attn" in written["target_modules"]
    auto = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    peft = PeftModel.from_pretrained(auto.from_pretrained(lm_dir), str(tmp_path / "peft")).eval()
    ids = torch.tensor([[5, 6, 7, 8, 1], [9, 10, 11, 1, 0]])
    kw = {"decoder_input_ids": ids[:, :3]} if kind == "t5" else {}
    lm = m.backbone.model.lm
    with torch.no_grad():
        ours, theirs = lm(input_ids=ids, **kw).logits, peft(input_ids=ids, **kw).logits
        with m.disabled():
            assert not torch.allclose(lm(input_ids=ids, **kw).logits, ours, atol=1e-3)
    assert torch.allclose(ours, theirs, atol=1e-5)
    m.save_adapter(tmp_path / "lo", "lo")
    summary = export_peft(tmp_path / "out", tmp_path / "lo")  # the CLI's path: written, then verified by PEFT
    assert summary["base_model"] == str(lm_dir) and summary["max_abs_diff"]["logits"] <= 1e-5
    m.add_adapter("all", "lora", rank=4, towers="all")
    with pytest.raises(ConfigError, match="towers: lm"):
        write_peft_dir(m.backbone, "all", tmp_path / "no")


def test_peft_bridge_dora_on_gpt2_conv1d_merges_and_exports_to_peft(root, tmp_path):
    from vl_models import make_lm

    from vlkit.export.peft import export_peft

    lm_dir = make_lm("gpt2", root)
    torch.manual_seed(0)
    m = vlkit.load(f"vl:lm={lm_dir},vision=tiny@random")
    cfg = {"peft_type": "LORA", "r": 4, "use_dora": True, "target_modules": ["c_attn", "c_proj", "c_fc"]}
    h = m.add_adapter("d", "peft", config=cfg, towers="lm")
    assert len(h.sites) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    _perturb(m, "d")
    lm, ids = m.backbone.model.lm, torch.tensor([[5, 6, 7, 8, 1]])
    with torch.no_grad():
        ours = lm(input_ids=ids).logits
        m.merge_adapter("d")  # PEFT's own merge of the tuner, written into Conv1D's (in, out) weight
        assert torch.allclose(lm(input_ids=ids).logits, ours, atol=1e-5)
        m.unmerge_adapter("d")
    m.save_adapter(tmp_path / "d", "d")
    summary = export_peft(tmp_path / "out", tmp_path / "d")
    assert summary["max_abs_diff"]["logits"] <= 1e-5
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_lora_on_a_gpt2_decoder_targets_its_conv1d_projections_and_exports_to_peft(root, tmp_path):
    from vlkit.export.peft import export_peft

    m = _load(root, "vision-encoder-decoder-gpt2")
    dec = m.backbone.blocks("decoder")[0].sites
    h0 = "decoder.transformer.h.0"
    assert {r: s.path for r, s in dec.items() if s.kind == "linear"} == {
        "attn.qkv": f"{h0}.attn.c_attn", "attn.out": f"{h0}.attn.c_proj", "xattn.q": f"{h0}.crossattention.q_attn",
        "xattn.kv": f"{h0}.crossattention.c_attn", "xattn.out": f"{h0}.crossattention.c_proj",
        "mlp.fc1": f"{h0}.mlp.c_fc", "mlp.fc2": f"{h0}.mlp.c_proj"}
    assert (dec["xattn.kv"].in_features, dec["xattn.kv"].out_features) == (32, 64)  # keys and values, fused
    roles = ["attn.q", "attn.out", "xattn.q", "xattn.v", "xattn.out", "mlp.fc1", "mlp.fc2"]  # attn.q, xattn.v: fused
    h = m.add_adapter("lo", "lora", rank=4, targets=roles, towers="all")
    assert {s.path for s in h.sites if s.path.startswith(f"{h0}.")} == {s.path for s in dec.values() if s.kind == "linear"}
    assert {s.tower for s in h.sites} == {"vision", "projector", "decoder"}
    _perturb(m, "lo")
    m.save_adapter(tmp_path / "lo", "lo")
    summary = export_peft(tmp_path / "out", tmp_path / "lo")  # ViT's nn.Linear and GPT-2's Conv1D in one directory
    assert summary["max_abs_diff"]["logprob"] <= 1e-5 and summary["modules"] == len(h.sites)


def test_lora_on_a_vlm_exports_to_peft(root, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from vlkit.export.peft import export_peft

    m = _load(root, "llava")
    m.add_adapter("lo", "lora", rank=4, modules="all", towers="all")
    _perturb(m, "lo")
    m.save_adapter(tmp_path / "lo", "lo")
    summary = export_peft(tmp_path / "out", tmp_path / "lo")
    assert summary["max_abs_diff"]["logprob"] <= 1e-5 and summary["modules"] > 20
    d = make_vlm("llava", root)
    peft = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(d), str(tmp_path / "out")).eval()
    ids = torch.tensor([[3] + [m.backbone.image_token_id] * 25 + [5, 6]])
    px = m.backbone.preprocess_batch(_images()[:1])
    with torch.no_grad():
        assert torch.allclose(m.backbone.model(input_ids=ids, pixel_values=px).logits,
                              peft(input_ids=ids, pixel_values=px).logits, atol=1e-5)
