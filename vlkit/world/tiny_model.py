"""The `tiny` CLIP's modules, written out so a `tiny` process never imports open_clip (nor, through it,
transformers and timm): a server of the tiny backbone holds only torch (issue 25).

`TinyCLIP` is open_clip's `CLIP` for the config kind configs/tiny.json uses (ViT towers, class-token pooling, causal
text pooled at the end-of-text token by argmax, GELU, pre-norm residual blocks, no layer scale): the same module
tree and parameter names (weights and adapters load either way), the same forward, and the same seeded init (modules
built in open_clip's order, the text tower's `init_parameters` as open_clip's), so `tiny@random` is unchanged.
tests/test_serve_light.py checks all three against open_clip.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm, cast back to the input dtype (open_clip's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ls_1 = nn.Identity()
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width))])
        )
        self.ls_2 = nn.Identity()

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        x = self.ln_1(q_x)
        mask = attn_mask.to(x.dtype) if attn_mask is not None else None
        x = q_x + self.ls_1(self.attn(x, x, x, need_weights=False, attn_mask=mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.width, self.layers, self.batch_first, self.grad_checkpointing = width, layers, True, False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def blocks(self) -> list[ResidualAttentionBlock]:
        return [cast(ResidualAttentionBlock, b) for b in self.resblocks]

    def get_cast_dtype(self) -> torch.dtype:
        return cast(nn.Linear, self.blocks()[0].mlp.c_fc).weight.dtype

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(
        self, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: float, output_dim: int
    ):
        super().__init__()
        self.output_tokens = False
        self.image_size, self.patch_size = (image_size, image_size), (patch_size, patch_size)
        grid = image_size // patch_size
        self.grid_size = (grid, grid)
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.patch_dropout = nn.Identity()
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        self.attn_pool = None
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    pool_type = "tok"
    final_ln_after_pool = False

    def _embeds(self, x: torch.Tensor) -> torch.Tensor:
        """Patches, the class token and positions, `ln_pre`: what enters the first block (open_clip's name)."""
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(self.patch_dropout(x))

    def forward(self, x: torch.Tensor):
        x = self.ln_post(self.transformer(self._embeds(x)))
        pooled, tokens = x[:, 0] @ self.proj, x[:, 1:]
        return (pooled, tokens) if self.output_tokens else pooled


class TinyCLIP(nn.Module):
    """open_clip's `CLIP` for the tiny config (`embed_dim`, `vision_cfg`, `text_cfg` as configs/tiny.json)."""

    attn_mask: torch.Tensor

    def __init__(self, embed_dim: int, vision_cfg: dict, text_cfg: dict):
        super().__init__()
        v, t = vision_cfg, text_cfg
        v_width = int(v["width"])
        self.visual = VisionTransformer(
            int(v["image_size"]),
            int(v["patch_size"]),
            v_width,
            int(v["layers"]),
            v_width // int(v.get("head_width", 64)),
            float(v.get("mlp_ratio", 4.0)),
            embed_dim,
        )
        width, ctx = int(t["width"]), int(t["context_length"])
        self.context_length, self.vocab_size = ctx, int(t["vocab_size"])
        self.token_embedding = nn.Embedding(self.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(ctx, width))
        self.transformer = Transformer(width, int(t["layers"]), int(t["heads"]), float(t.get("mlp_ratio", 4.0)))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.text_pool_type, self.text_eos_id = "argmax", 2
        self.register_buffer("attn_mask", torch.full((ctx, ctx), float("-inf")).triu_(1), persistent=False)
        self._init_text()
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.logit_bias = None

    def _init_text(self) -> None:
        """open_clip's TextTransformer.init_parameters."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std, attn_std, fc_std = width**-0.5 * (2 * layers) ** -0.5, width**-0.5, (2 * width) ** -0.5
        for block in self.transformer.blocks():
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(cast(nn.Linear, block.mlp.c_fc).weight, std=fc_std)
            nn.init.normal_(cast(nn.Linear, block.mlp.c_proj).weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        n = text.shape[1]
        cast = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast) + self.positional_embedding[:n].to(cast)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask[:n, :n]))
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x
