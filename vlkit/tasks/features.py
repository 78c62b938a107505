"""The frozen-tower feature cache: a tower with no trainable parameter is run once per dataset, not per step.

When a run trains nothing in a tower (the text tower under a vision-only adapter, both towers for a linear
probe or zero-shot evaluation), that tower's output for a given input never changes during the run. A task
then swaps the prepared input column (`pixels`, `tokens`) for the tower's embeddings, computed once by
streaming the column through the DataLoader, and reuses them across epochs and evaluations. Task code
reads either form through `image_embed` / `text_embed` (a 2-D float tensor is an embedding).

Entries are keyed by a fingerprint of the tower's weights (its parameters and buffers, adapters included,
and the active adapters) and of the data (the dataset's fingerprint, column and transform), so a changed
weight or changed data misses the cache.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
import torch.nn.functional as F

from ..data.pipeline import LazyImages
from .base import batches, device_of

MAX_ENTRIES = 16


def image_embed(backbone, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Image embeddings of pixels (B, 3, S, S) or of cached features (B, D)."""
    if x.dim() == 2 and x.is_floating_point():
        return F.normalize(x, dim=-1) if normalize else x
    return backbone.encode_image(x, normalize=normalize)


def text_embed(backbone, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Text embeddings of token ids (B, L) or of cached features (B, D, floating point)."""
    if x.is_floating_point():
        return F.normalize(x, dim=-1) if normalize else x
    return backbone.encode_text(x, normalize=normalize)


def tower_fingerprint(backbone, tower: str) -> str:
    """A hash of every parameter and buffer of `tower` (adapters included) and of the active adapters."""
    prefixes = backbone.tower_prefixes()[tower]
    h = hashlib.blake2b(digest_size=16)
    h.update(str(backbone.spec).encode())
    h.update(backbone.activation_key().encode())
    items = list(backbone.model.named_parameters()) + list(backbone.model.named_buffers())
    for name, t in sorted(items, key=lambda kv: kv[0]):
        if not name.startswith(prefixes):
            continue
        h.update(name.encode())
        t = t.detach()
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(column) -> str:
    """The identity of a lazy image column or a token tensor."""

    if isinstance(column, LazyImages):
        ds = column.reader.ds
        return f"{getattr(ds, '_fingerprint', id(ds))}:{column.reader.column}:{len(ds)}:{column.transform!r}"
    h = hashlib.blake2b(column.cpu().contiguous().numpy().tobytes(), digest_size=16)
    return f"tokens:{tuple(column.shape)}:{h.hexdigest()}"


class FeatureCache:
    """Process-wide cache of tower embeddings, least recently used entries dropped first."""

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self.entries.clear()
        self.hits = self.misses = 0

    def _get(self, key, compute):
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        value = compute()
        self.entries[key] = value
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return value

    def images(self, backbone, column, batch_size: int = 256) -> torch.Tensor:
        """Unnormalised image embeddings (N, D) of a lazy image column, float32 on the CPU."""
        key = ("vision", tower_fingerprint(backbone, "vision"), data_fingerprint(column))
        return self._get(key, lambda: _encode(backbone, {"x": column}, batch_size, backbone.encode_image))

    def texts(self, backbone, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Unnormalised text embeddings (N, D) of token ids, float32 on the CPU."""
        key = ("text", tower_fingerprint(backbone, "text"), data_fingerprint(tokens))
        return self._get(key, lambda: _encode(backbone, {"x": tokens}, batch_size, backbone.encode_text))


def _encode(backbone, data, batch_size: int, fn) -> torch.Tensor:

    device = device_of(backbone)
    was = backbone.training
    backbone.eval()
    out = []
    try:
        with torch.no_grad():
            for b in batches(data, batch_size):
                out.append(fn(b["x"].to(device), normalize=False).float().cpu())
    finally:
        backbone.train(was)
    return torch.cat(out) if out else torch.zeros(0, backbone.embed_dim)


CACHE = FeatureCache()


def frozen_towers(backbone, trainable_names) -> set[str]:
    """Towers none of whose parameters is in `trainable_names` (names as `backbone.<model path>`)."""
    names = [n[len("backbone.model.") :] for n in trainable_names if n.startswith("backbone.model.")]
    other = [n for n in trainable_names if n.startswith("backbone.") and not n.startswith("backbone.model.")]
    if other:
        return set()
    return {t for t, ps in backbone.tower_prefixes().items() if not any(n.startswith(ps) for n in names)}
