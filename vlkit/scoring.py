"""One pair-scoring API for tasks, probes, compose and export: s(text, image).

For dual-encoder adapters a score is the cosine of the normalised embeddings times the logit scale.
Adapters that fuse the modalities (see the `fusion` variant) score pairs jointly: the backbone then
exposes `joint_scores`, and `pair_scores` routes through it. Each pair's score depends only on that
pair, never on the other members of the batch. A generative backbone scores a pair as VQAScore does
(`answer_scores`): the probability that it answers "Yes" to whether the image shows the text.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def uses_joint_scoring(backbone) -> bool:
    """True when an active adapter makes the image and text towers see each other."""
    fn = getattr(backbone, "joint_active", None)
    return bool(fn and fn())


@torch.no_grad()
def embed_images(backbone, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat(
        [backbone.encode_image(pixels[i : i + batch_size], normalize=True) for i in range(0, len(pixels), batch_size)]
    )


@torch.no_grad()
def embed_texts(backbone, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat(
        [backbone.encode_text(tokens[i : i + batch_size], normalize=True) for i in range(0, len(tokens), batch_size)]
    )


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


VQASCORE_QUESTION = 'Does this image show "{}"? Please answer yes or no.'
VQASCORE_ANSWER = "Yes"


@torch.no_grad()
def answer_scores(
    backbone,
    pixels: torch.Tensor,
    texts: list[str],
    batch_size: int = 64,
    *,
    question: str = VQASCORE_QUESTION,
    answer: str = VQASCORE_ANSWER,
) -> torch.Tensor:
    """Score of text i with image i on a generative backbone, as VQAScore (Lin et al. 2024) scores it: the
    probability of `answer` ("Yes") to `question` about the text: a (n,) vector in [0, 1]."""
    prompts = [question.format(t) for t in texts]
    return torch.cat(
        [
            backbone.answer_probability(pixels[i : i + batch_size], prompts[i : i + batch_size], answer)
            for i in range(0, len(prompts), batch_size)
        ]
    )


def is_generative(backbone) -> bool:
    return getattr(backbone, "kind", "contrastive") == "generative"


def rerank_matrix(dual: torch.Tensor, joint_fn, k: int, dim: int = 1) -> torch.Tensor:
    """Two-stage ranking: keep dual scores, but put each query's top-k candidates first, ordered by joint score.

    `dual` is (n_texts, n_images); `dim=1` ranks images for each text, `dim=0` texts for each image.
    `joint_fn(text_idx, image_idx)` returns joint scores of those pairs. Cost: n_queries * k joint pairs.
    """
    k = min(k, dual.shape[dim])
    top = dual.topk(k, dim=dim).indices
    if dim == 1:
        t_idx = torch.arange(dual.shape[0]).unsqueeze(1).expand_as(top)
        i_idx = top
    else:
        i_idx = torch.arange(dual.shape[1]).unsqueeze(0).expand_as(top)
        t_idx = top
    joint = joint_fn(t_idx.reshape(-1), i_idx.reshape(-1)).view_as(top).to(dual.dtype)
    out = dual.clone()
    offset = (dual.max() - dual.min()).abs() + joint.abs().max() + 1.0
    out[t_idx, i_idx] = joint + offset + dual.max()
    return out


def two_stage_scores(
    backbone, pixels: torch.Tensor, tokens: torch.Tensor, k: int = 10, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text->image, image->text) score matrices: dual-encoder top-k, then joint re-ranking of the k.

    With no joint adapter active both are the dual-encoder matrix. Cost stays linear in the gallery.
    """
    img = embed_images(backbone, pixels, batch_size)
    txt = embed_texts(backbone, tokens, batch_size)
    dual = float(backbone.logit_scale) * txt @ img.T
    if not uses_joint_scoring(backbone):
        return dual, dual

    def joint_fn(ti: torch.Tensor, ii: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return backbone.joint_pair_scores(pixels[ii], tokens[ti], batch_size).cpu()

    return rerank_matrix(dual.cpu(), joint_fn, k, dim=1), rerank_matrix(dual.cpu(), joint_fn, k, dim=0)


# --- Winoground's text / image / group criteria (Thrush et al.), shared by the pairs task and the probes ---
def as_score_array(scores: Any) -> np.ndarray:
    """Scores as a float64 (N, 2, 2) array [caption][image]; accepts torch tensors and nested lists."""
    if hasattr(scores, "detach"):
        scores = scores.detach().cpu().numpy()
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[1:] != (2, 2):
        raise ValueError(f"Winoground scores must have shape (N, 2, 2) [caption][image], got {arr.shape}")
    return arr


def winoground_correct(scores: Any) -> dict[str, np.ndarray]:
    """Per-example booleans ``{"text", "image", "group"}`` from (N, 2, 2) scores, with strict comparisons."""
    s = as_score_array(scores)
    c0_i0, c0_i1, c1_i0, c1_i1 = s[:, 0, 0], s[:, 0, 1], s[:, 1, 0], s[:, 1, 1]
    text = (c0_i0 > c1_i0) & (c1_i1 > c0_i1)
    image = (c0_i0 > c0_i1) & (c1_i1 > c1_i0)
    return {"text": text, "image": image, "group": text & image}
