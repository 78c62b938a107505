"""`tiny-vl`: the embedded generative backbone, VL-T5 in miniature, so that every generative command works offline.

The `tiny` CLIP's image tower (its 8 x 8 patch tokens), a linear projector and a small T5 (2 + 2 blocks, width 128)
over the world's own vocabulary (`tiny_vl_tokenizer.json`: a `tokenizers` WordLevel model of every word the world
writes, plus the task prefixes). Its weights (`weights/tiny-vl.safetensors`, the whole model) come from
`recipes/pretrain-tiny-vl.yaml`: captions and questions of the photo world.

Specs: `tiny-vl` (shipped weights), `tiny-vl@init` (tiny's pre-trained image tower, the rest freshly initialised
with a fixed seed: where pre-training starts), `tiny-vl@random`, `tiny-vl@/path/to/weights.safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..backbones.composed import ComposedVLBackbone
from ..errors import BackboneLoadError
from .language import vocabulary
from .tiny import HERE, WEIGHTS_DIR, load_tiny

TOKENIZER_PATH = HERE / "configs" / "tiny_vl_tokenizer.json"
WEIGHTS_PATH = WEIGHTS_DIR / "tiny-vl.safetensors"
SPECIALS = ["<pad>", "</s>", "<unk>"]
EXTRA_WORDS = [
    "caption",
    "vqa",
    "gqa",
    "nlvr",
    "true",
    "false",
    "yes",
    "no",
    "does",
    "this",
    "image",
    "show",
    "please",
    "answer",
    "or",
    "describe",
    "question",
    "statement",
    "size",
    "total",
    "both",
    "images",
    "contain",
    "contains",
    "exactly",
    "shows",
    "show",
    "image",
    "left",
    "right",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
]
LM_CONFIG: dict[str, Any] = {
    "d_model": 128,
    "d_ff": 256,
    "d_kv": 32,
    "num_heads": 4,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "relative_attention_num_buckets": 16,
    "relative_attention_max_distance": 64,
    "dropout_rate": 0.0,
    "feed_forward_proj": "relu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "tie_word_embeddings": True,
}
INIT_SEED = 0


def tokenizer_json(words: list[str]) -> dict:
    """A WordLevel tokenizer over `words` that lowercases, splits on anything but letters and digits, and ends every
    sequence with `</s>` (T5's convention)."""
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words) - set(SPECIALS)))}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(SPECIALS)
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Lowercase"},
                {"type": "Replace", "pattern": {"Regex": "[^a-z0-9]+"}, "content": " "},
            ],
        },
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
                {"SpecialToken": {"id": "</s>", "type_id": 0}},
            ],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}},
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def write_tokenizer(path: Path = TOKENIZER_PATH) -> Path:
    """(Re)write the tokenizer file from the world's vocabulary (done once, before pre-training: the weights
    depend on the ids)."""
    path.write_text(json.dumps(tokenizer_json(vocabulary() + EXTRA_WORDS), indent=1))
    return path


def tiny_vl_tokenizer():
    from transformers import PreTrainedTokenizerFast

    if not TOKENIZER_PATH.is_file():
        raise BackboneLoadError(f"{TOKENIZER_PATH} is missing from the package; reinstall vlkit")
    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_PATH), pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def build_tiny_vl(spec: str, vision) -> ComposedVLBackbone:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = tiny_vl_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(INIT_SEED)
        lm = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), **LM_CONFIG))
        bb = ComposedVLBackbone(spec, vision, lm, tok, lm.config, "linear")
    bb.max_length = 48
    return bb


def load_tiny_vl(spec: str = "tiny-vl", device: str | None = None) -> ComposedVLBackbone:
    from safetensors.torch import load_file

    _, _, weights = spec.partition("@")
    vision = load_tiny("tiny@random" if weights == "random" else "tiny")
    bb = build_tiny_vl(spec, vision)
    path = None if weights in ("random", "init") else (Path(weights) if weights else WEIGHTS_PATH)
    if path is not None:
        if not path.is_file():
            if weights:
                raise BackboneLoadError(f"tiny-vl weights {path} do not exist")
            raise BackboneLoadError(
                f"{path} is missing from the package",
                hint="use tiny-vl@init, or train it with recipes/pretrain-tiny-vl.yaml",
            )
        state = load_file(str(path))
        missing, unexpected = bb.model.load_state_dict(state, strict=False)
        tied = {"lm.encoder.embed_tokens.weight", "lm.decoder.embed_tokens.weight", "lm.lm_head.weight"}
        if unexpected or set(missing) - tied:
            raise BackboneLoadError(
                f"{path} does not fit tiny-vl: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        bb._fingerprint = bb._compute_fingerprint()
    bb.eval()
    if device:
        bb.to(device)
    return bb
