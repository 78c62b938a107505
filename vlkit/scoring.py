"""One pair-scoring API for tasks, probes, compose and export: s(text, image).

For dual-encoder adapters a score is the cosine of the normalised embeddings times the logit scale.
Adapters that fuse the modalities (see the `fusion` variant) score pairs jointly: the backbone then
exposes `joint_scores`, and `pair_scores` routes through it. Each pair's score depends only on that
pair, never on the other members of the batch.
"""
from __future__ import annotations

import torch


def uses_joint_scoring(backbone) -> bool:
    """True when an active adapter makes the image and text towers see each other."""
    fn = getattr(backbone, "joint_active", None)
    return bool(fn and fn())


@torch.no_grad()
def embed_images(backbone, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([backbone.encode_image(pixels[i:i + batch_size], normalize=True)
                      for i in range(0, len(pixels), batch_size)])


@torch.no_grad()
def embed_texts(backbone, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([backbone.encode_text(tokens[i:i + batch_size], normalize=True)
                      for i in range(0, len(tokens), batch_size)])


def pair_scores(backbone, pixels: torch.Tensor, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Scores of every text against every image: a (n_texts, n_images) matrix."""
    if uses_joint_scoring(backbone):
        return backbone.joint_scores(pixels, tokens, batch_size=batch_size)
    img = embed_images(backbone, pixels, batch_size)
    txt = embed_texts(backbone, tokens, batch_size)
    return float(backbone.logit_scale) * txt @ img.T


def paired_scores(backbone, pixels: torch.Tensor, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Score of text i with image i for each i: a (n,) vector."""
    if uses_joint_scoring(backbone):
        return backbone.joint_pair_scores(pixels, tokens, batch_size=batch_size)
    img = embed_images(backbone, pixels, batch_size)
    txt = embed_texts(backbone, tokens, batch_size)
    return float(backbone.logit_scale) * (txt * img).sum(-1)
