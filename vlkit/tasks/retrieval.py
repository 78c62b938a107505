"""Image-text retrieval: symmetric contrastive (InfoNCE) loss, recall@1/5/10 in both directions.

Columns: `image` (PIL) and `caption` (str). No head: the adapters move the two towers' embeddings.

Options:
- `chunk`: queries scored at once in `evaluate` (default 1024; bounds memory on large sets);
- `swap_groups`: word groups (e.g. the colour names); each caption gets a NegCLIP-style hard negative
  with one word swapped for another of its group, which its image must score below its own caption;
- `drop_groups`, `drop_prob`: training-time augmentation; with probability `drop_prob` a caption loses
  every word of one group (e.g. all colours), so partial descriptions are learned too;
- `augment`: training-time photometric augmentation of the images (`vlkit.tasks.augment`: grey-scale,
  contrast, brightness, illumination, noise, blur); `true` or a mapping of its options, plus
  `grayscale_drop` (words, e.g. the colour names, removed from the caption of an image turned grey);
- joint adapters (fusion): `negatives` (other captions/images each pair competes with in the loss,
  default 3) and `rerank_k` (dual-encoder candidates re-ranked jointly at evaluation, default 10).

Prepared tensors: `pixels` (N, 3, S, S), `tokens` (N, L) and `caption_ids` (N,) long — the index of
each row's caption string among the distinct captions of that prepared set.

Duplicate captions. Procedural and real caption sets repeat strings ("a red square" for several
images). Both the loss and the metrics treat equal strings as the same text:
- loss: a batch row's positives are every row with the same caption; the InfoNCE target spreads its
  mass evenly over them, so two images of "a red square" are not pushed apart (when the copies'
  text embeddings are identical this equals the one-hot loss; it differs, as it should, when the
  text side is stochastic, e.g. dropout in a text-tower adapter);
- image→text: the text gallery is the set of distinct captions (each encoded once); a retrieved
  caption is a hit when its string equals the image's caption;
- text→image: one query per row (a caption repeated k times is queried k times, as in COCO's five
  captions per image); a retrieved image is a hit when its caption equals the query caption.
Ranks are pessimistic about ties (see `vlkit.tasks.metrics.retrieval_ranks`).

Metrics (percent): `i2t_r1`, `i2t_r5`, `i2t_r10`, `t2i_r1`, `t2i_r5`, `t2i_r10` and the primary
`mean_recall`, the mean of the six.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.pipeline import LazyImages
from ..errors import ConfigError
from ..scoring import rerank_matrix
from . import metrics as M
from .augment import PhotometricAugment
from .base import (
    Evaluating,
    Task,
    batches,
    check_options,
    device_of,
    prepare_pixels,
    require_columns,
    to_device,
    tokenize_texts,
)
from .features import image_embed, text_embed

KS = (1, 5, 10)


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of normalised embeddings; rows with equal `keys` are all positives."""
    logits = scale * image @ text.t()
    if keys is None:
        target = torch.arange(len(image), device=image.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    pos = (keys.reshape(-1, 1) == keys.reshape(1, -1)).float()
    target = pos / pos.sum(dim=1, keepdim=True)  # symmetric mask, so the same targets serve both ways
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def swap_word(caption: str, groups: list[list[str]], seed: int) -> str | None:
    """The caption with one word replaced by another of its group (a hard negative), or None if no word swaps."""
    words = caption.split(" ")
    spots = [(i, g) for i, w in enumerate(words) for g in groups if w.lower().strip(",.") in g and len(g) > 1]
    if not spots:
        return None
    rng = random.Random(seed)
    i, group = spots[rng.randrange(len(spots))]
    core = words[i].lower().strip(",.")
    tail = words[i][len(words[i].rstrip(",.")) :]
    words[i] = rng.choice([w for w in group if w != core]) + tail
    return " ".join(words)


def negclip_loss(image, text, neg, neg_valid, scale, keys=None) -> torch.Tensor:
    """Symmetric InfoNCE where each image also competes against word-swapped hard-negative captions."""
    n = len(image)
    if keys is None:
        target = torch.eye(n, device=image.device)
    else:
        pos = (keys.reshape(-1, 1) == keys.reshape(1, -1)).float()
        target = pos / pos.sum(dim=1, keepdim=True)
    logits = scale * image @ text.t()
    # masked with a large finite value: -inf would turn the soft-target cross-entropy into 0 * inf = nan
    neg_logits = (scale * image @ neg.t()).masked_fill(~neg_valid.to(image.device).reshape(1, -1), -1e4)
    i2t = F.cross_entropy(torch.cat([logits, neg_logits], 1), torch.cat([target, torch.zeros_like(target)], 1))
    return 0.5 * (i2t + F.cross_entropy(logits.t(), target))


def _remove_words(tokens: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`tokens` with the words of `ids` (a tokenized word list) removed from the rows where `rows` is true."""
    words = ids[(ids > 2) & (ids != ids.max())] if ids.numel() else ids
    idx = rows.nonzero().flatten()
    if not len(idx) or not len(words):
        return tokens
    out = tokens.clone()
    sub = out[idx]
    drop = torch.isin(sub, words.to(sub.device))
    order = torch.argsort(drop.int(), dim=1, stable=True)
    sub = sub.gather(1, order)
    tail = torch.arange(sub.shape[1], device=sub.device) >= (~drop).sum(1, keepdim=True)
    out[idx] = sub.masked_fill(tail, 0)
    return out


@dataclass
class RetrievalOptions:
    """The options of the `retrieval` task."""

    chunk: int = 1024
    """Queries scored at once in evaluation (>= 1; bounds memory on large sets)."""
    rerank_k: int = 10
    """Joint (fusion) adapters: dual-encoder candidates re-ranked jointly in evaluation (>= 1)."""
    negatives: int = 3
    """Joint (fusion) adapters: other captions / images each pair competes with in the loss (>= 1)."""
    swap_groups: list[list[str]] = field(default_factory=list)
    """Word groups (e.g. the colour names): each caption gets a hard negative with one word swapped for another
    of its group."""
    drop_groups: list[list[str]] = field(default_factory=list)
    """Word groups a training caption may lose entirely (with probability drop_prob), to learn partial
    descriptions."""
    drop_prob: float = 0.5
    """Probability that a training caption loses the words of one of drop_groups."""
    augment: bool | dict[str, Any] | None = None
    """Photometric training augmentation of the images: true (the defaults) or a mapping of its options
    (grayscale, contrast, brightness, illumination, noise, blur, p, grayscale_drop); None / false: none."""


class RetrievalTask(Task):
    name = "retrieval"
    metric = "mean_recall"
    required = ("image", "caption")
    options_cls = RetrievalOptions
    text_column = "caption"
    show_columns = ("caption",)

    def __init__(self, backbone, train_data=None, **options: Any):
        check_options(self.name, options, self.OPTIONS)
        super().__init__(backbone, train_data, **options)
        self.chunk = int(options.get("chunk", RetrievalOptions.chunk))
        if self.chunk < 1:
            raise ConfigError(f"chunk must be >= 1, got {self.chunk}")
        self.swap_groups = [list(map(str, g)) for g in (options.get("swap_groups") or [])]
        self.drop_groups = [list(map(str, g)) for g in (options.get("drop_groups") or [])]
        self.drop_prob = float(options.get("drop_prob", RetrievalOptions.drop_prob))
        self._drop_ids = [backbone.tokenize(" ".join(g))[0] for g in self.drop_groups] if self.drop_groups else []
        aug = options.get("augment")
        aug = dict(aug) if isinstance(aug, dict) else aug
        grey_words = aug.pop("grayscale_drop", None) if isinstance(aug, dict) else None

        self.augment = PhotometricAugment.from_option(aug)
        self._grey_ids = backbone.tokenize(" ".join(map(str, grey_words)))[0] if grey_words else None
        self.rerank_k = int(options.get("rerank_k", RetrievalOptions.rerank_k))
        self.negatives = int(options.get("negatives", RetrievalOptions.negatives))
        if self.rerank_k < 1 or self.negatives < 1:
            raise ConfigError("rerank_k and negatives must be >= 1")
        self.head = nn.Module()

    # --- model ------------------------------------------------------------------------------------
    def embed_pair(self, backbone, pixels: torch.Tensor, tokens: torch.Tensor):
        """Normalised image and text embeddings of a batch."""
        return image_embed(backbone, pixels, normalize=True), text_embed(backbone, tokens, normalize=True)

    # --- Task API ---------------------------------------------------------------------------------
    def prepare(self, backbone, ds) -> dict[str, torch.Tensor]:
        require_columns(self, ds)
        captions = [str(c) for c in ds["caption"]]
        keys, _ = M.string_keys(captions)
        out = {
            "pixels": prepare_pixels(backbone, ds),
            "tokens": tokenize_texts(backbone, captions),
            "caption_ids": keys,
        }
        if self.swap_groups:
            negs = [swap_word(c, self.swap_groups, seed=i) for i, c in enumerate(captions)]
            out["neg_tokens"] = tokenize_texts(backbone, [n or c for n, c in zip(negs, captions)])
            out["neg_valid"] = torch.tensor([n is not None for n in negs])
        return out

    def cache_features(self, backbone, data, frozen, cache, *, train=False):

        if backbone.joint_active():
            return data
        out = dict(data)
        px = out.get("pixels")
        if "vision" in frozen and isinstance(px, LazyImages) and px.augment is None and not (train and self.augment):
            out["pixels"] = cache.images(backbone, px)
        if "text" in frozen and not (train and (self._drop_ids or self._grey_ids is not None)):
            out["tokens"] = cache.texts(backbone, out["tokens"])
            if "neg_tokens" in out:
                out["neg_tokens"] = cache.texts(backbone, out["neg_tokens"])
        return out

    def joint_loss(self, backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """With a joint adapter: each image against its caption and `negatives` other captions of the batch
        (and each caption against as many images), scored pair by pair; cost linear in the batch."""
        px, tk = batch["pixels"], batch["tokens"]
        n = len(px)
        k = min(self.negatives, n - 1)
        idx = torch.arange(n, device=px.device)
        cands = torch.stack([(idx + j) % n for j in range(k + 1)], 1)  # column 0 is the positive
        scale = backbone.logit_scale

        def scores(ii, ti):
            img, txt = backbone.encode_pair(px[ii.reshape(-1)], tk[ti.reshape(-1)])
            return (scale * (img * txt).sum(-1)).view(ii.shape)

        rows = idx.unsqueeze(1).expand_as(cands)
        target = torch.zeros(n, dtype=torch.long, device=px.device)
        i2t = scores(rows, cands)
        t2i = scores(cands, rows)
        ids = batch.get("caption_ids")
        if ids is not None:  # a "negative" with the same caption is a positive: drop it from the softmax
            same = ids[cands] == ids.unsqueeze(1)
            same[:, 0] = False
            i2t = i2t.masked_fill(same, float("-inf"))
            t2i = t2i.masked_fill(same, float("-inf"))
        return (F.cross_entropy(i2t.float(), target) + F.cross_entropy(t2i.float(), target)) / 2

    def drop_words(self, tokens: torch.Tensor) -> torch.Tensor:
        """Training-time caption augmentation: with probability `drop_prob` a caption loses every word of one
        of `drop_groups` (e.g. all colour words), so the text tower also learns partial descriptions."""
        n = len(tokens)
        pick = torch.rand(n) < self.drop_prob
        group = torch.randint(len(self._drop_ids), (n,))
        out = tokens.clone()
        for g, ids in enumerate(self._drop_ids):
            out = _remove_words(out, (pick & (group == g)).to(tokens.device), ids)
        return out

    def augment_batch(self, batch: dict[str, torch.Tensor], backbone) -> dict[str, torch.Tensor]:
        """Photometric augmentation of the batch's images; captions of images turned grey lose `grayscale_drop`."""
        assert self.augment is not None, "augment_batch runs only with an augment option"
        pixels, grey = self.augment(batch["pixels"], backbone.mean, backbone.std)
        out = {**batch, "pixels": pixels}
        if self._grey_ids is not None and bool(grey.any()):
            out["tokens"] = _remove_words(batch["tokens"], grey.to(batch["tokens"].device), self._grey_ids)
            out.pop("caption_ids", None)
            if "neg_tokens" in out:
                out["neg_valid"] = out["neg_valid"].to(grey.device) & ~grey
        return out

    def loss(self, backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = to_device(batch, device_of(backbone))
        if self.augment is not None:
            batch = self.augment_batch(batch, backbone)
        if self._drop_ids:
            batch = {**batch, "tokens": self.drop_words(batch["tokens"])}
            batch.pop("caption_ids", None)
        if backbone.joint_active() and len(batch["pixels"]) > 1:
            return self.joint_loss(backbone, batch)
        image, text = self.embed_pair(backbone, batch["pixels"], batch["tokens"])
        if "neg_tokens" in batch:
            neg = text_embed(backbone, batch["neg_tokens"], normalize=True).float()
            return negclip_loss(
                image.float(),
                text.float(),
                neg,
                batch["neg_valid"],
                backbone.logit_scale.float(),
                batch.get("caption_ids"),
            )
        return contrastive_loss(image.float(), text.float(), backbone.logit_scale.float(), batch.get("caption_ids"))

    def embed(self, backbone, data: dict[str, torch.Tensor], batch_size: int = 256):
        """Normalised embeddings of every image (N, D) and of each distinct caption (U, D), and the
        caption id of every row."""
        device = device_of(backbone)
        keys = data["caption_ids"]
        first: dict[int, int] = {}
        for i, k in enumerate(keys.tolist()):
            first.setdefault(k, i)
        order = torch.tensor([first[k] for k in range(len(first))], dtype=torch.long)
        with Evaluating(self.head):
            images = [
                image_embed(backbone, b["p"].to(device), normalize=True).float().cpu()
                for b in batches({"p": data["pixels"]}, batch_size)
            ]
            texts = [
                text_embed(backbone, b["t"].to(device), normalize=True).float().cpu()
                for b in batches({"t": data["tokens"][order]}, batch_size)
            ]
        d = backbone.embed_dim
        image = torch.cat(images) if images else torch.zeros(0, d)
        text = torch.cat(texts) if texts else torch.zeros(0, d)
        return image, text, keys

    def example_values(self, backbone, data: dict[str, torch.Tensor], batch_size: int = 256):
        """Per row: recall hits of its image (i2t) and of its caption (t2i) at each k; mean_recall their mean."""
        i2t, t2i = self.ranks(backbone, data, batch_size)
        out = {f"i2t_r{k}": ((i2t <= k).float(), None) for k in KS}
        out.update({f"t2i_r{k}": ((t2i <= k).float(), None) for k in KS})
        out["mean_recall"] = (torch.stack([v for v, _ in out.values()]).mean(0), None)
        return out

    def evaluate(self, backbone, data: dict[str, torch.Tensor], batch_size: int = 256) -> dict[str, float]:
        i2t, t2i = self.ranks(backbone, data, batch_size)
        out = {}
        for k in KS:
            out[f"i2t_r{k}"] = M.recall_at_k(i2t, k)
        for k in KS:
            out[f"t2i_r{k}"] = M.recall_at_k(t2i, k)
        out["mean_recall"] = sum(out.values()) / len(out)
        return out

    def ranks(self, backbone, data: dict[str, torch.Tensor], batch_size: int = 256):
        """Rank (1 = first) of the first hit of each row's image (i2t) and of each row's caption (t2i)."""
        image, text, keys = self.embed(backbone, data, batch_size)
        distinct = torch.arange(len(text))
        if backbone.joint_active() and len(image) and len(text):
            i2t_scores, t2i_scores = self.reranked(backbone, data, image, text, keys, batch_size)
            i2t = M.retrieval_ranks(i2t_scores, keys, distinct)
            t2i_distinct = M.retrieval_ranks(t2i_scores, distinct, keys)
        else:
            i2t = torch.cat(
                [
                    M.retrieval_ranks(image[i : i + self.chunk] @ text.t(), keys[i : i + self.chunk], distinct)
                    for i in range(0, len(image), self.chunk)
                ]
                or [torch.zeros(0, dtype=torch.long)]
            )
            # one query per distinct caption, expanded to one per row (rows with the same caption rank alike)
            t2i_distinct = torch.cat(
                [
                    M.retrieval_ranks(text[i : i + self.chunk] @ image.t(), distinct[i : i + self.chunk], keys)
                    for i in range(0, len(text), self.chunk)
                ]
                or [torch.zeros(0, dtype=torch.long)]
            )
        t2i = t2i_distinct[keys] if len(keys) else t2i_distinct
        return i2t, t2i

    def reranked(self, backbone, data, image, text, keys, batch_size):
        """Two-stage scores for joint adapters: dual-encoder top-`rerank_k`, re-ranked by joint pair scores."""

        device = device_of(backbone)
        first: dict[int, int] = {}
        for i, k in enumerate(keys.tolist()):
            first.setdefault(k, i)
        order = torch.tensor([first[k] for k in range(len(first))], dtype=torch.long)
        tokens = data["tokens"][order]

        def joint(ti, ii):
            with torch.no_grad():
                return (
                    backbone.joint_pair_scores(data["pixels"][ii].to(device), tokens[ti].to(device), batch_size)
                    .float()
                    .cpu()
                )

        dual = text @ image.t()
        t2i = rerank_matrix(dual, joint, self.rerank_k, dim=1)
        i2t = rerank_matrix(dual, joint, self.rerank_k, dim=0).t()
        return i2t, t2i

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["options"] = {
            **self.options,
            "chunk": self.chunk,
            "rerank_k": self.rerank_k,
            "drop_prob": self.drop_prob,
            "negatives": self.negatives,
        }
        return meta
