"""The `caption-match` task: binary image–caption matching with a tiny head over the CLIP cosine.

Each image is paired with its own caption (a match) and with the caption of another example of the batch (a
mismatch, unless that caption is the same string, which is then labelled a match too). The head is two
numbers: p(match) = sigmoid(exp(log_scale) · cos(image, caption) + bias); the loss is binary cross-entropy
over both pairs of every image. The adapters move the embeddings, the head learns the threshold.

Columns (`required`): `image` and `caption` — the world's retrieval data (`{kind: world, domain: photo, task:
retrieval}`) or any local manifest / image folder with a caption column. The caption is the text an input
of this task carries (`text_column`), which the router of `vlkit compose --mode route` reads.

Options: `scale` (initial scale, default 10) and `bias` (initial bias, default -4: the threshold at cosine
0.4); `offset` (which other example an eval image is paired with: i + offset mod N, default N // 2).

Prepared tensors: `pixels` (lazy), `tokens` (N, L), `caption_ids` (N,) — equal caption strings share an id.

Metrics (percent): `accuracy` (primary: pairs classified right, the N matched and N mismatched pairs of the
eval set), `matched_accuracy`, `mismatched_accuracy`. `answer()` (for `vlkit compose run`) gives the match
probability of the image and the given text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from vlkit.errors import ConfigError
from vlkit.tasks.base import (Evaluating, Task, batches, check_options, device_of, prepare_pixels,
                              require_columns, to_device, tokenize_texts)
from vlkit.tasks.features import image_embed, text_embed
from vlkit.tasks.metrics import string_keys


@dataclass
class CaptionMatchOptions:
    """The options of the `caption-match` task."""

    scale: float = 10.0
    """Initial scale of the cosine in the match logit exp(log_scale) · cosine + bias (> 0)."""
    bias: float = -4.0
    """Initial bias of the match logit (-4 with scale 10: the threshold at cosine 0.4)."""
    offset: int | None = None
    """Which other example an eval image is paired with: i + offset mod N (>= 1); None: N // 2."""


OPTIONS = tuple(f.name for f in fields(CaptionMatchOptions))


class MatchHead(nn.Module):
    """p(match) logit = exp(log_scale) · cosine + bias."""

    def __init__(self, scale: float, bias: float):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    def forward(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * cosine + self.bias


class CaptionMatchTask(Task):
    name = "caption-match"
    metric = "accuracy"
    required = ("image", "caption")
    text_column = "caption"
    show_columns = ("caption",)
    options_cls = CaptionMatchOptions

    def __init__(self, backbone, train_data=None, **options: Any):
        check_options(self.name, options, OPTIONS)
        super().__init__(backbone, train_data, **options)
        scale = float(options.get("scale", CaptionMatchOptions.scale))
        if not scale > 0:
            raise ConfigError(f"caption-match scale must be > 0, got {scale}")
        self.offset = options.get("offset")
        if self.offset is not None and int(self.offset) < 1:
            raise ConfigError(f"caption-match offset must be >= 1, got {self.offset}")
        self.head = MatchHead(scale, float(options.get("bias", CaptionMatchOptions.bias)))

    # --- model ------------------------------------------------------------------------------------
    def pair_logits(self, backbone, pixels, tokens, other: torch.Tensor):
        """Logits of (image i, caption i) and (image i, caption other[i]) for a batch."""
        if backbone.joint_active():  # a joint (fusion) adapter scores each pair on its own
            img, txt = backbone.encode_pair(pixels, tokens)
            img2, txt2 = backbone.encode_pair(pixels, tokens[other])
            pos, neg = (img * txt).sum(-1), (img2 * txt2).sum(-1)
        else:
            img = image_embed(backbone, pixels, normalize=True).float()
            txt = text_embed(backbone, tokens, normalize=True).float()
            pos, neg = (img * txt).sum(-1), (img * txt[other]).sum(-1)
        return self.head(pos.float()), self.head(neg.float())

    # --- Task API ---------------------------------------------------------------------------------
    def prepare(self, backbone, ds) -> dict[str, torch.Tensor]:
        require_columns(self, ds)
        captions = [str(c) for c in ds["caption"]]
        keys, _ = string_keys(captions)
        return {"pixels": prepare_pixels(backbone, ds), "tokens": tokenize_texts(backbone, captions),
                "caption_ids": keys}

    def cache_features(self, backbone, data, frozen, cache, *, train=False):
        from vlkit.data.pipeline import LazyImages

        if backbone.joint_active():
            return data
        out = dict(data)
        px = out.get("pixels")
        if "vision" in frozen and isinstance(px, LazyImages) and px.augment is None:
            out["pixels"] = cache.images(backbone, px)
        if "text" in frozen:
            out["tokens"] = cache.texts(backbone, out["tokens"])
        return out

    def loss(self, backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = to_device(batch, device_of(backbone))
        ids = batch["caption_ids"]
        n = len(ids)
        other = (torch.arange(n, device=ids.device) + 1) % n  # the next example's caption
        pos, neg = self.pair_logits(backbone, batch["pixels"], batch["tokens"], other)
        neg_target = (ids[other] == ids).float()  # the same caption string is a match
        return 0.5 * (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
                      + F.binary_cross_entropy_with_logits(neg, neg_target))

    def evaluate(self, backbone, data: dict[str, torch.Tensor], batch_size: int = 256) -> dict[str, float]:
        device = device_of(backbone)
        ids = data["caption_ids"]
        n = len(ids)
        if n == 0:
            return {"accuracy": float("nan"), "matched_accuracy": float("nan"), "mismatched_accuracy": float("nan")}
        offset = int(self.offset) if self.offset is not None else max(1, n // 2)
        other = (torch.arange(n) + offset) % n
        with Evaluating(self.head):
            if backbone.joint_active():  # each pair scored jointly
                pos, neg = [], []
                for b in batches({"p": data["pixels"], "t": data["tokens"], "o": data["tokens"][other]}, batch_size):
                    b = to_device(b, device)
                    img, txt = backbone.encode_pair(b["p"], b["t"])
                    img2, txt2 = backbone.encode_pair(b["p"], b["o"])
                    pos.append((img * txt).sum(-1).float().cpu())
                    neg.append((img2 * txt2).sum(-1).float().cpu())
                pos_cos, neg_cos = torch.cat(pos), torch.cat(neg)
            else:  # one embedding per image and caption
                image = torch.cat([image_embed(backbone, b["p"].to(device), normalize=True).float().cpu()
                                   for b in batches({"p": data["pixels"]}, batch_size)])
                text = torch.cat([text_embed(backbone, b["t"].to(device), normalize=True).float().cpu()
                                  for b in batches({"t": data["tokens"]}, batch_size)])
                pos_cos, neg_cos = (image * text).sum(-1), (image * text[other]).sum(-1)
            hdev = self.head.bias.device
            pos_p = (self.head(pos_cos.to(hdev)) > 0).cpu()
            neg_p = (self.head(neg_cos.to(hdev)) > 0).cpu()
        neg_target = ids[other] == ids
        matched = pos_p.float()
        mismatched = (neg_p == neg_target).float()
        return {"accuracy": 100.0 * float(torch.cat([matched, mismatched]).mean()),
                "matched_accuracy": 100.0 * float(matched.mean()),
                "mismatched_accuracy": 100.0 * float(mismatched.mean())}

    def answer(self, backbone, pixels: torch.Tensor, tokens: torch.Tensor | None, top: int = 3) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.name}
        if tokens is None:
            out["note"] = "caption-match answers for an image and a text (--text)"
            return out
        device = device_of(backbone)
        with Evaluating(self.head):
            img, txt = backbone.encode_pair(pixels.to(device), tokens.to(device))
            cosine = (img * txt).sum(-1).float()
            p = float(torch.sigmoid(self.head.to(cosine.device)(cosine))[0])
        out.update(answer=f"{'match' if p > 0.5 else 'no match'} (p={p:.2f})", p_match=round(p, 4),
                   match=p > 0.5, cosine=round(float(cosine[0]), 4))
        return out

