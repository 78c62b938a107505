"""The built-in `tiny` CLIP: open_clip's model classes from a config kept as data, weights shipped with the world.

Its vocabulary is the world's, so it lives in the world plugin. The config's `preprocess` section (size, mean,
std, interpolation) gives the eval transform: torchvision's shorter-side resize, centre crop, to tensor and
normalise. The tokenizer is a `tokenizers` WordLevel ``tokenizer.json`` (configs/tiny_tokenizer.json), built
once from the world vocabulary by `build_tokenizer` and shipped as-is with exports: lower-case words,
pad=0, start=1, unknown=2, words from 3, end-of-text = the largest id (open_clip pools at argmax).

Specs: `tiny` (shipped pre-trained weights; a seeded init when none are shipped), `tiny@random`
(seeded init), `tiny@/path/weights.safetensors` (weights of a run, e.g. recipes/pretrain-tiny.yaml).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from ..backbones.base import shortest_edge_transform
from ..backbones.openclip import OpenClipBackbone, _load_safetensors_into
from ..errors import BackboneLoadError
from .tiny_model import TinyCLIP

HERE = Path(__file__).parent
CONFIG_PATH = HERE / "configs" / "tiny.json"
TOKENIZER_PATH = HERE / "configs" / "tiny_tokenizer.json"
WEIGHTS_DIR = HERE / "weights"
WEIGHTS_PATH = WEIGHTS_DIR / "tiny.safetensors"
INIT_SEED = 0
SPECIALS = ("<pad>", "<sot>", "<unk>")
EOT = "<eot>"


def tiny_config() -> dict:
    return json.loads(CONFIG_PATH.read_text())


def build_tokenizer(words: list[str], context_length: int = 32):
    """The WordLevel `tokenizers.Tokenizer` of `words`: lower-cased, split on anything but [a-z0-9], unknown
    words to <unk>, <sot> ... <eot> around at most context_length - 2 words, padded with 0 to context_length."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    eot_id = len(vocab)
    vocab[EOT] = eot_id
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex("[^a-z0-9]+"), " ")])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"<sot> $A {EOT}", special_tokens=[("<sot>", 1), (EOT, eot_id)]
    )
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(length=context_length, pad_id=0, pad_token="<pad>")
    return tok


class TinyTokenizer:
    """texts -> (B, context_length) int64 ids through the shipped `tokenizer.json`."""

    def __init__(self, path: str | Path = TOKENIZER_PATH):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.tokenizer = Tokenizer.from_file(str(self.path))
        truncation = self.tokenizer.truncation
        if truncation is None:
            raise BackboneLoadError(f"{self.path} sets no truncation (the context length)")
        self.context_length = int(truncation["max_length"])
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.eot_id = self.tokenizer.token_to_id(EOT)

    def get_vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab()

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer.encode_batch([str(t) for t in texts])
        if not enc:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        return torch.tensor([e.ids for e in enc], dtype=torch.long)


def tiny_tokenizer() -> TinyTokenizer:
    return TinyTokenizer(TOKENIZER_PATH)


def build_tiny_model(tokenizer: TinyTokenizer, seed: int = INIT_SEED) -> TinyCLIP:
    """The tiny CLIP (`vlkit.world.tiny_model`, open_clip's CLIP written out), seeded."""
    cfg = tiny_config()
    text_cfg = dict(cfg["text_cfg"], vocab_size=tokenizer.vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyCLIP(cfg["embed_dim"], copy.deepcopy(cfg["vision_cfg"]), text_cfg)
    return model


class TinyBackbone(OpenClipBackbone):
    """The built-in tiny CLIP; its eval transform comes from the `preprocess` section of configs/tiny.json.

    The transform takes a PIL image of any mode and converts it as `vlkit.backbones.base.to_rgb` states: RGB
    as is; transparency (RGBA, LA, PA, a palette with a transparent entry) composited onto white; 16-bit grey
    (I;16) scaled to 8 bits; L, P, CMYK and the rest by PIL's own conversion."""

    family = "tiny"

    def _preprocess_cfg(self, cfg: dict):
        """The config's `preprocess` section (size, mean, std, interpolation), read without open_clip."""
        size = int(cfg.get("size", self.image_size))
        if size != self.image_size:
            raise ValueError(f"preprocess size {size} differs from the vision tower's {self.image_size}")
        return SimpleNamespace(
            size=size,
            mean=cfg.get("mean", self.mean),
            std=cfg.get("std", self.std),
            interpolation=cfg.get("interpolation", "bicubic"),
        )

    def _encode_text_short(self, text: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(text)  # TinyCLIP runs any length up to the context

    def _build_transform(self, pre):
        return shortest_edge_transform(self.image_size, self.mean, self.std, pre.interpolation)

    def _pad_id(self) -> int | None:
        return int((self._tokenizer.tokenizer.padding or {}).get("pad_id", 0))

    def tokenizer_files(self):
        return {"tokenizer.json": self._tokenizer.path.read_bytes()}

    def unknown_words(self, texts: list[str]) -> list[str]:
        """Words outside the world vocabulary (the WordLevel tokenizer maps each to <unk>)."""
        tok = self._tokenizer.tokenizer
        unk = tok.token_to_id("<unk>")
        found: dict[str, None] = {}
        for text in texts:
            enc = tok.encode(str(text))
            for i, (a, b) in zip(enc.ids, enc.offsets):
                if i == unk:
                    found.setdefault(str(text)[a:b], None)
        return list(found)


def load_tiny(spec: str = "tiny", device: str | None = None) -> TinyBackbone:
    _, _, weights = spec.partition("@")
    cfg = tiny_config()
    tok = tiny_tokenizer()
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
