"""Minimal-pair matching (Winoground form): two images, two captions that swap words between them.

Training pushes each image's own caption above the swapped one and each caption's own image above
the other (cross-entropy over the 2x2 pair scores, both ways); joint adapters score pairs jointly
through `Backbone.encode_pair`. Metrics are Winoground's text, image and group scores (strict `>`),
overall and per `collapsed_tag`.

Columns: `image_0`, `image_1`, `caption_0`, `caption_1`, optional `collapsed_tag`.
Prepared tensors: `pixels_0`, `pixels_1`, `tokens_0`, `tokens_1`, `tag` (index into the task's tag list).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..scoring import winoground_correct
from .base import Task, batches, check_options, device_of, prepare_pixels, require_columns, to_device, tokenize_texts

TAGS = ("Object", "Relation", "Both")


class PairsTask(Task):
    name = "pairs"
    metric = "group_score"
    required = ("image_0", "image_1", "caption_0", "caption_1")
    show_columns = ("caption_0", "caption_1")

    def __init__(self, backbone, train_data=None, **options: Any):
        super().__init__(backbone, train_data, **options)
        check_options(self.name, options, ())

    def prepare(self, backbone, ds) -> dict[str, torch.Tensor]:
        require_columns(self, ds)
        tags = ds["collapsed_tag"] if "collapsed_tag" in ds.column_names else [""] * len(ds)
        return {
            "pixels_0": prepare_pixels(backbone, ds, "image_0"),
            "pixels_1": prepare_pixels(backbone, ds, "image_1"),
            "tokens_0": tokenize_texts(backbone, ds["caption_0"]),
            "tokens_1": tokenize_texts(backbone, ds["caption_1"]),
            "tag": torch.tensor([TAGS.index(t) if t in TAGS else -1 for t in tags], dtype=torch.long),
        }

    def scores(self, backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 2, 2) scores [caption][image], each pair scored on its own (jointly when fused)."""
        scale = backbone.logit_scale

        def s(px, tk):
            img, txt = backbone.encode_pair(px, tk)
            return scale * (img * txt).sum(-1)

        p0, p1, t0, t1 = batch["pixels_0"], batch["pixels_1"], batch["tokens_0"], batch["tokens_1"]
        return torch.stack([torch.stack([s(p0, t0), s(p1, t0)], -1), torch.stack([s(p0, t1), s(p1, t1)], -1)], 1)

    def loss(self, backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sc = self.scores(backbone, batch)
        n = sc.shape[0]
        zero = torch.zeros(n, dtype=torch.long, device=sc.device)
        one = torch.ones_like(zero)
        text = F.cross_entropy(sc[:, :, 0], zero) + F.cross_entropy(sc[:, :, 1], one)
        image = F.cross_entropy(sc[:, 0, :], zero) + F.cross_entropy(sc[:, 1, :], one)
        return (text + image) / 4

    def evaluate(self, backbone, data: dict[str, torch.Tensor], batch_size: int = 256) -> dict[str, float]:

        dev = device_of(backbone)
        with torch.no_grad():
            sc = torch.cat([self.scores(backbone, to_device(b, dev)).float().cpu() for b in batches(data, batch_size)])
        correct = winoground_correct(sc)
        out = {}
        for metric in ("text", "image", "group"):
            out[f"{metric}_score"] = 100.0 * float(correct[metric].mean())
            for i, tag in enumerate(TAGS):
                mask = (data["tag"] == i).numpy()
                if mask.any():
                    out[f"{metric}_score_{tag.lower()}"] = 100.0 * float(correct[metric][mask].mean())
        return out
