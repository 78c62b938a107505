"""The built-in `tiny` CLIP: open_clip's model classes from a config kept as data, weights shipped in vlkit.

The config's `preprocess` section (size, mean, std, interpolation) gives the eval transform: torchvision's
shorter-side resize, centre crop, to tensor and normalise.

Specs: `tiny` (shipped pre-trained weights; a seeded init when none are shipped), `tiny@random`
(seeded init), `tiny@/path/weights.safetensors` (weights of a run, e.g. recipes/pretrain-tiny.yaml).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..errors import BackboneLoadError
from .base import shortest_edge_transform
from .openclip import OpenClipBackbone, _load_safetensors_into
from .tokenizer import WordTokenizer

HERE = Path(__file__).parent
CONFIG_PATH = HERE / "configs" / "tiny.json"
WEIGHTS_DIR = HERE / "weights"
WEIGHTS_PATH = WEIGHTS_DIR / "tiny.safetensors"
VOCAB_PATH = WEIGHTS_DIR / "tiny_vocab.json"
INIT_SEED = 0


def tiny_config() -> dict:
    return json.loads(CONFIG_PATH.read_text())


def tiny_tokenizer(context_length: int) -> WordTokenizer:
    if VOCAB_PATH.is_file():
        return WordTokenizer.from_file(VOCAB_PATH, context_length)
    from ..world import vocabulary

    return WordTokenizer(vocabulary(), context_length)


def build_tiny_model(tokenizer: WordTokenizer, seed: int = INIT_SEED):
    from open_clip.model import CLIP

    cfg = tiny_config()
    text_cfg = dict(cfg["text_cfg"], vocab_size=tokenizer.vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(cfg["embed_dim"], copy.deepcopy(cfg["vision_cfg"]), text_cfg)
    return model


class TinyBackbone(OpenClipBackbone):
    """The built-in tiny CLIP; its eval transform comes from the `preprocess` section of configs/tiny.json."""

    family = "tiny"

    def _build_transform(self, pre):
        return shortest_edge_transform(self.image_size, self.mean, self.std, pre.interpolation)

    def tokenizer_files(self):
        return {"tokenizer.json": self._tokenizer.to_json()}


def load_tiny(spec: str = "tiny", device: str | None = None) -> TinyBackbone:
    _, _, weights = spec.partition("@")
    cfg = tiny_config()
    tok = tiny_tokenizer(cfg["text_cfg"]["context_length"])
    model = build_tiny_model(tok)
    if weights == "random":
        pass
    elif weights:
        path = Path(weights)
        if not path.is_file():
            raise BackboneLoadError(f"tiny weights {path} do not exist")
        if path.suffix != ".safetensors":
            raise BackboneLoadError(f"tiny weights {path} must be a .safetensors file")
        _load_safetensors_into(model, path, spec)
    elif WEIGHTS_PATH.is_file():
        _load_safetensors_into(model, WEIGHTS_PATH, spec)
    model.eval()
    if device:
        model.to(device)
    return TinyBackbone(model, spec, tok, cfg.get("preprocess"))
