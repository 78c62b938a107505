"""A word-level tokenizer for the tiny backbone: lower-case words of a fixed vocabulary, CLIP-style ids."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

WORD_RE = re.compile(r"[a-z0-9]+")
SPECIALS = ("<pad>", "<sot>", "<unk>")


class WordTokenizer:
    """pad=0, start=1, unknown=2, words from 3, end-of-text = the largest id (open_clip pools at argmax)."""

    def __init__(self, words: list[str], context_length: int = 32):
        self.words = list(words)
        self.index = {w: i + len(SPECIALS) for i, w in enumerate(self.words)}
        self.eot_id = len(SPECIALS) + len(self.words)
        self.vocab_size = self.eot_id + 1
        self.context_length = context_length

    @classmethod
    def from_file(cls, path: str | Path, context_length: int = 32) -> "WordTokenizer":
        data = json.loads(Path(path).read_text())
        return cls(data["words"], context_length=data.get("context_length", context_length))

    def to_json(self) -> str:
        return json.dumps({"type": "word", "words": self.words, "context_length": self.context_length,
                           "pad_id": 0, "sot_id": 1, "unk_id": 2, "eot_id": self.eot_id}, indent=1)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, 2) for w in WORD_RE.findall(text.lower())]

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1] + self.encode(t)[: self.context_length - 2] + [self.eot_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out
