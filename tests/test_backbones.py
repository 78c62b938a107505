"""Backbones: the built-in tiny CLIP, open_clip models from a user's config and checkpoint, transformers CLIP dirs."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import vlkit
from vlkit.errors import BackboneLoadError, ConfigError, UnknownNameError


def _go_offline(monkeypatch):
    """HF_HUB_OFFLINE, also for a huggingface_hub that already read its environment at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


# --- tiny ---------------------------------------------------------------------------------------------------------

def test_tiny_random_loads_frozen_in_eval_mode():
    bb = vlkit.load_backbone("tiny@random")
    assert bb.family == "tiny" and bb.spec == "tiny@random"
    assert not bb.training and not bb.model.training
    assert not any(p.requires_grad for p in bb.parameters())
    from vlkit.world.tiny import tiny_config

    cfg = tiny_config()
    assert bb.image_size == cfg["vision_cfg"]["image_size"] and bb.embed_dim == cfg["embed_dim"]
    assert bb.context_length == cfg["text_cfg"]["context_length"]
    assert tuple(bb.mean) == tuple(cfg["preprocess"]["mean"])
    # seeded: a second load has the same weights and fingerprint
    other = vlkit.load_backbone("tiny@random")
    assert bb.fingerprint() == other.fingerprint()
    for (k, a), (_, b) in zip(bb.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_module_apply_reaches_the_adapter_hosts():
    """torch's `Module.apply(fn)` recurses through the injected hosts (their own entry point must not shadow it)."""
    bb = vlkit.load_backbone("tiny")
    vlkit.inject(bb, "lora", rank=2, towers="both")
    seen: list[str] = []
    bb.model.apply(lambda m: seen.append(type(m).__name__))
    assert any(name.startswith("Adapted") for name in seen)
    assert "LoraLayer" in seen


def test_tiny_encoders_and_tokenizer():
    bb = vlkit.load_backbone("tiny@random")
    tokens = bb.tokenize(["a red cube", "two small dogs on grass"])
    assert tokens.shape == (2, bb.context_length) and tokens.dtype == torch.long
    assert bb.tokenize("a red cube").shape == (1, bb.context_length)
    assert torch.equal(bb.tokenize("a red cube")[0], tokens[0])
    assert (tokens[:, 0] == 1).all()  # start token
    eot = tokens.max()
    assert (tokens.argmax(dim=1) > 0).all() and (tokens == eot).sum() == 2
    with torch.no_grad():
        img = bb.encode_image(torch.randn(3, 3, bb.image_size, bb.image_size))
        txt = bb.encode_text(tokens)
        img_n, txt_n, scale = bb(torch.randn(2, 3, bb.image_size, bb.image_size), tokens)
    assert img.shape == (3, bb.embed_dim) and txt.shape == (2, bb.embed_dim)
    torch.testing.assert_close(img_n.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt_n.norm(dim=-1), torch.ones(2))
    assert scale.ndim == 0 and scale > 0


def _word_ids(words: list[str], text: str, context_length: int) -> list[int]:
    """The tiny tokenizer's ids as the former hand-written WordTokenizer computed them."""
    import re

    index = {w: i + 3 for i, w in enumerate(words)}
    eot = len(words) + 3
    ids = [1] + [index.get(w, 2) for w in re.findall(r"[a-z0-9]+", text.lower())][: context_length - 2] + [eot]
    return ids + [0] * (context_length - len(ids))


def test_tiny_tokenizer_is_the_world_vocabulary_as_a_tokenizers_file():
    """The shipped tokenizer.json is a `tokenizers` WordLevel file built from the world vocabulary, and its
    ids are those the shipped weights were trained with, on every kind of world text and on odd input."""
    from tokenizers import Tokenizer

    from vlkit import world
    from vlkit.world.tiny import TOKENIZER_PATH, build_tokenizer

    words = list(world.vocabulary(generative=False))
    shipped = Tokenizer.from_file(str(TOKENIZER_PATH))
    assert shipped.to_str() == build_tokenizer(words, 32).to_str()
    bb = vlkit.load_backbone("tiny@random")
    texts = ["", "A Red-circle, LEFT of the   blue square!", "zebra 123 <sot> <pad>", " ".join(["red"] * 50)]
    for domain in world.DOMAINS:
        for task, cols in (("retrieval", ("caption",)), ("vqa", ("question", "answer")),
                           ("grounding", ("expression",)), ("winoground", ("caption_0", "caption_1"))):
            ds = world.generate(domain, task, 12, seed=1)
            texts += [str(t) for c in cols for t in ds[c]]
        texts += [world.class_prompt(domain).format(c) for c in world.class_names(domain)]
    assert bb.tokenize(texts).tolist() == [_word_ids(words, t, bb.context_length) for t in texts]
    assert bb.tokenizer_files() == {"tokenizer.json": TOKENIZER_PATH.read_bytes()}


@pytest.mark.parametrize("size,mode", [((64, 64), "RGB"), ((50, 30), "RGB"), ((17, 90), "RGBA"), ((40, 40), "L")])
def test_tiny_preprocess(size, mode):
    bb = vlkit.load_backbone("tiny@random")
    im = Image.new(mode, size, 200 if mode == "L" else (200, 10, 30, 255)[: len(mode)])
    x = bb.preprocess(im)
    assert x.shape == (3, bb.image_size, bb.image_size) and x.dtype == torch.float32
    batch = bb.preprocess_batch([im, im])
    assert batch.shape == (2, 3, bb.image_size, bb.image_size)
    with pytest.raises(TypeError):
        bb.preprocess(torch.zeros(3, 8, 8))


def test_backbone_spec_errors():
    with pytest.raises(UnknownNameError) as exc:
        vlkit.load_backbone("nosuch:thing")
    assert "tiny" in str(exc.value) and "open_clip" in str(exc.value) and "hf" in str(exc.value)
    with pytest.raises(ConfigError):
        vlkit.load_backbone("")
    with pytest.raises(BackboneLoadError, match="exist"):
        vlkit.load_backbone("tiny@/no/such/weights.safetensors")


# --- open_clip ----------------------------------------------------------------------------------------------------

def test_open_clip_local_config_and_checkpoint(tmp_path, tiny_open_clip):
    import open_clip
    from safetensors.torch import save_file

    config = json.loads(tiny_open_clip["config"].read_text())
    assert config["vision_cfg"]["image_size"] == 32 and config["text_cfg"]["context_length"] == 16
    cfg_path = tmp_path / "tinyoc.json"
    cfg_path.write_text(json.dumps(config))
    open_clip.add_model_config(cfg_path)
    model = open_clip.create_model("tinyoc", pretrained=None).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(state, str(ckpt))

    bb = vlkit.load_backbone(f"open_clip:{cfg_path}@{ckpt}")
    assert bb.family == "open_clip"
    assert bb.image_size == 32 and bb.context_length == 16 and bb.embed_dim == 32
    loaded = bb.model.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k

    for p in model.parameters():  # the same frozen model, so the same kernels run
        p.requires_grad_(False)
    pixels = torch.randn(2, 3, 32, 32)
    tokens = bb.tokenize(["a photo of a cat", "a dog"])
    assert tokens.shape == (2, 16)
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(pixels), model.encode_image(pixels), atol=1e-6, rtol=0)
        # vlkit runs texts at the batch's true length (test_text_length.py): the same values up to kernel rounding
        torch.testing.assert_close(bb.encode_text(tokens), model.encode_text(tokens), atol=1e-5, rtol=0)
        torch.testing.assert_close(bb.encode_image(pixels, normalize=True),
                                   model.encode_image(pixels, normalize=True), atol=1e-6, rtol=0)


def test_open_clip_checkpoint_errors(tiny_open_clip, tmp_path):
    cfg = tiny_open_clip["config"]
    pt = tmp_path / "weights.pt"
    torch.save({"x": torch.zeros(1)}, pt)
    with pytest.raises(BackboneLoadError, match="safetensors") as exc:
        vlkit.load_backbone(f"open_clip:{cfg}@{pt}")
    assert str(pt) in str(exc.value)

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(BackboneLoadError, match="does not exist") as exc:
        vlkit.load_backbone(f"open_clip:{cfg}@{missing}")
    assert str(missing) in str(exc.value)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(BackboneLoadError, match="cannot read"):
        vlkit.load_backbone(f"open_clip:{cfg}@{garbage}")

    with pytest.raises(BackboneLoadError, match="does not exist"):
        vlkit.load_backbone(f"open_clip:{tmp_path / 'nope.json'}")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(BackboneLoadError, match="not valid JSON"):
        vlkit.load_backbone(f"open_clip:{bad_json}")


def test_open_clip_checkpoint_that_does_not_fit(tiny_open_clip, tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(3, 3)}, str(other))
    with pytest.raises(BackboneLoadError, match="does not fit"):
        vlkit.load_backbone(f"open_clip:{tiny_open_clip['config']}@{other}")


def test_open_clip_unknown_names():
    with pytest.raises(UnknownNameError) as exc:
        vlkit.load_backbone("open_clip:ViT-B-32@no_such_tag")
    assert "no_such_tag" in str(exc.value) and "laion2b_s34b_b79k" in str(exc.value)
    with pytest.raises(UnknownNameError, match="NoSuchModel") as exc:
        vlkit.load_backbone("open_clip:NoSuchModel")
    assert "ViT-B-32" in exc.value.known and "none registered" not in str(exc.value)


def test_open_clip_hub_weights_offline(monkeypatch):
    _go_offline(monkeypatch)
    with pytest.raises(BackboneLoadError) as exc:
        vlkit.load_backbone("open_clip:ViT-B-32@laion2b_s34b_b79k")
    msg = str(exc.value)
    assert "ViT-B-32" in msg and "laion2b_s34b_b79k" in msg
    assert "open_clip:ViT-B-32@/path/to/" in msg and ".safetensors" in msg


def test_vit_b_32_bottleneck_reduction_8_under_5_percent():
    """Bottleneck with reduction 8 on both towers of ViT-B-32 must come out under 5% trainable."""
    bb = vlkit.load_backbone("open_clip:ViT-B-32")  # random init: no weights needed to count parameters
    vlkit.inject(bb, "bottleneck", reduction=8, towers="both")
    report = vlkit.parameter_report(bb)
    assert report["backbone_parameters"] > 100_000_000
    assert 0 < report["trainable_percent"] < 5
    assert set(report["towers"]) >= {"vision", "text"}
    assert report["towers"]["vision"]["trainable"] > 0 and report["towers"]["text"]["trainable"] > 0
    assert report["adapters"]["default"]["sites"] == 2 * (12 + 12)


# --- transformers -------------------------------------------------------------------------------------------------

def test_hf_local_dir(hf_clip_dir):
    from transformers import CLIPModel

    bb = vlkit.load_backbone(f"hf:{hf_clip_dir}")
    assert bb.family == "hf"
    assert bb.image_size == 32 and bb.context_length == 16 and bb.embed_dim == 16
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())
    model = CLIPModel.from_pretrained(hf_clip_dir).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pixels = torch.randn(2, 3, 32, 32)
    texts = ["the cat", "that hat on a mat"]
    tokens = bb.tokenize(texts)
    assert tokens.shape == (2, 16)
    tok = bb._tokenizer
    enc = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert torch.equal(tokens, enc["input_ids"])
    with torch.no_grad():
        ref_img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        ref_txt = model.text_projection(
            model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output)
        torch.testing.assert_close(bb.encode_image(pixels), ref_img, atol=1e-6, rtol=0)
        torch.testing.assert_close(bb.encode_text(tokens), ref_txt, atol=1e-6, rtol=0)
        # a tokenizer dict with its own mask gives the same
        torch.testing.assert_close(bb.encode_text(dict(enc)), ref_txt, atol=1e-6, rtol=0)
    im = Image.new("RGB", (45, 20), (10, 200, 30))
    assert bb.preprocess(im).shape == (3, 32, 32)


def test_hf_errors(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackboneLoadError, match="not a transformers model directory"):
        vlkit.load_backbone(f"hf:{empty}")
    _go_offline(monkeypatch)
    with pytest.raises(BackboneLoadError) as exc:
        vlkit.load_backbone("hf:openai/clip-vit-base-patch32")
    msg = str(exc.value)
    assert "openai/clip-vit-base-patch32" in msg and "hf:/path/to/dir" in msg
