"""Fixtures shared by the test suite: small thread count, tiny backbones of every built-in kind, plugin reset."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

# A tiny open_clip model config, kept as data like a user's own config file.
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# A tiny CLIP byte-pair vocabulary: letters, end-of-word letters, two merges and the two specials.
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_MERGES = ["h e", "a t</w>"]


@pytest.fixture
def reset_plugins():
    """Forget the process-wide plugin system after the test (for tests that register plugins or set env)."""
    yield
    from vlkit.plugins import reset_plugins as _reset

    _reset()


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory) -> dict[str, Path]:
    """A tiny open_clip config `tinyoc.json` and its seeded weights `ckpt.safetensors`."""
    import open_clip
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("open_clip")
    cfg_path = d / "tinyoc.json"
    cfg_path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(cfg_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("tinyoc", pretrained=None)
    ckpt = d / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return {"config": cfg_path, "checkpoint": ckpt, "spec": f"open_clip:{cfg_path}@{ckpt}"}


def write_tiny_clip_tokenizer(d: Path):
    """Save a tiny `CLIPTokenizer` (hand-written vocab.json / merges.txt) into `d`; returns the tokenizer."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for c in _LETTERS:
        vocab[c] = len(vocab)
    for c in _LETTERS:
        vocab[c + "</w>"] = len(vocab)
    for m in _MERGES:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    src = d / "_tok_src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    tok = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"))
    shutil.rmtree(src)
    tok.save_pretrained(d)
    return tok


@pytest.fixture(scope="session")
def hf_clip_dir(tmp_path_factory) -> Path:
    """A tiny transformers CLIPModel saved with save_pretrained, tokenizer files beside it."""
    from transformers import CLIPConfig, CLIPModel

    d = tmp_path_factory.mktemp("hf_clip")
    tok = write_tiny_clip_tokenizer(d)
    eot, sot = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|startoftext|>")
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=16, vocab_size=len(tok), eos_token_id=eot, bos_token_id=sot,
                         pad_token_id=eot),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(cfg).eval()
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def backbone_specs(tiny_open_clip, hf_clip_dir) -> dict[str, str]:
    """Spec of a tiny backbone of every built-in kind; loading a spec twice gives identical weights."""
    return {"tiny": "tiny@random", "open_clip": tiny_open_clip["spec"], "hf": f"hf:{hf_clip_dir}"}


@pytest.fixture
def make_backbone(backbone_specs):
    """make_backbone(kind) -> a fresh frozen backbone in eval mode (kind: tiny, open_clip, hf)."""
    import vlkit

    def make(kind: str):
        return vlkit.load_backbone(backbone_specs[kind]).eval()

    return make


@pytest.fixture
def sample_inputs():
    """sample_inputs(backbone, seed=0) -> (pixels, tokens): two random images and two captions."""

    def make(backbone, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn(2, 3, backbone.image_size, backbone.image_size, generator=g)
        tokens = backbone.tokenize(["a red cube on the mat", "that hat"])
        return pixels, tokens

    return make
