"""Texts run at their true length (issue 25): `encode_text` cuts a batch after its longest text on causal CLIP text
towers (tiny, open_clip, transformers CLIP) and the embeddings equal those of each text padded to the full context
length, for texts of 1 to 70 tokens, with adapters (LoRA, bottleneck, prompt tokens, CoOp) and joint scoring;
SigLIP-style towers (no pad id) and traced graphs keep the full length."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import write_tiny_clip_tokenizer

import vlkit
from vlkit.backbones.base import true_length

WORDS = "red blue green circle square star cross left of right above below a the two one big small".split()


def _texts(n_max: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    lengths = [0, 1, 2, 3, 5, 8, 13, 21, 25, 29, 40, 70]
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (min(k, n_max),), generator=g))
            for k in lengths]


@pytest.fixture(scope="module")
def long_specs(tmp_path_factory):
    """tiny (context 32), an open_clip CLIP and a transformers CLIP with 77 positions."""
    import open_clip
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    d = tmp_path_factory.mktemp("long")
    cfg = d / "oc77.json"
    cfg.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64,
                                                               "layers": 1, "head_width": 32},
                               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                                            "layers": 2}}))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in open_clip.create_model("oc77").state_dict().items()},
              str(d / "oc.safetensors"))
    hf = d / "hf"
    tok = write_tiny_clip_tokenizer(hf)
    eot, sot = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|startoftext|>")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=77, vocab_size=len(tok), eos_token_id=eot, bos_token_id=sot,
                         pad_token_id=eot),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64), projection_dim=16)).save_pretrained(hf)
    return {"tiny": "tiny@random", "open_clip": f"open_clip:{cfg}@{d / 'oc.safetensors'}", "hf": f"hf:{hf}"}


def _full(bb, tokens, fn="encode_text"):
    """What the backbone computes with the padding kept (no trimming)."""
    pad = bb.text_pad_id
    bb.text_pad_id = None
    try:
        return getattr(bb, fn)(tokens) if fn == "encode_text" else bb.encode_pair(*tokens)
    finally:
        bb.text_pad_id = pad


def _randomise(bb):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kind", ["tiny", "open_clip", "hf"])
def test_one_batch_equals_each_text_at_full_length(long_specs, kind):
    bb = vlkit.load_backbone(long_specs[kind]).eval()
    assert bb.text_pad_id is not None
    texts = _texts(bb.context_length - 2)
    tokens = bb.tokenize(texts)
    assert tokens.shape[1] == bb.context_length  # tokenize keeps the context length: batches concatenate
    lengths = [true_length(tokens[i:i + 1], bb.text_pad_id, bb.text_eos_id) for i in range(len(texts))]
    assert max(lengths) > 20 and min(lengths) <= 3
    short = tokens[[i for i, n in enumerate(lengths) if n <= 10]]
    assert bb.trim_tokens(short).shape[1] <= 10 < tokens.shape[1]
    with torch.no_grad():
        batch = bb.encode_text(tokens)
        alone = torch.cat([_full(bb, tokens[i:i + 1]) for i in range(len(texts))])
        few = bb.encode_text(short)
    assert (batch - alone).abs().max() <= 1e-5
    assert (few - alone[[i for i, n in enumerate(lengths) if n <= 10]]).abs().max() <= 1e-5


@pytest.mark.parametrize("variant,opts", [("lora", {"rank": 4, "modules": "all"}), ("bottleneck", {}), ("maple", {}),
                                          ("vpt", {"towers": "text"}), ("coop", {}), ("fusion", {})])
def test_adapters_and_joint_scoring_see_the_same_texts(variant, opts):
    bb = vlkit.load_backbone("tiny@random").eval()
    vlkit.inject(bb, variant, name="x", **opts)
    _randomise(bb)
    tokens = bb.tokenize(_texts(30)[:8])
    pixels = torch.randn(len(tokens), 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (bb.encode_text(tokens) - _full(bb, tokens)).abs().max() <= 1e-5
        got, want = bb.encode_pair(pixels, tokens), _full(bb, (pixels, tokens), "encode_pair")
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(got, want))


def test_padding_with_the_end_token_and_no_pad_id():
    ids = torch.tensor([[5, 7, 9, 9, 9], [5, 9, 9, 9, 9]])
    assert true_length(ids, pad_id=9, eos_id=9) == 3 and true_length(ids, pad_id=0) == 5
    assert true_length(torch.zeros(2, 4, dtype=torch.long), 0) == 1
    bb = vlkit.load_backbone("tiny@random")
    tok = bb.tokenize(["a red circle"])
    bb.text_pad_id = None
    assert bb.trim_tokens(tok) is tok


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traced_text_graph_keeps_the_full_length():
    bb = vlkit.load_backbone("tiny@random").eval()
    tokens = bb.tokenize(["a red circle", "a star"])
    traced = torch.jit.trace(lambda t: bb.encode_text(t), (tokens,), check_trace=False)
    longer = bb.tokenize(["two big blue squares left of a small green star above the cross"])
    with torch.no_grad():
        assert torch.allclose(traced(longer), bb.encode_text(longer), atol=1e-5)
