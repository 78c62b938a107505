"""The Backbone interface every backbone plugin implements, and the description of its injection points."""

from __future__ import annotations

import hashlib
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .hosts import AdapterHost, base_param_name
from .state import AdapterState

TOWERS = ("vision", "text")

ROLES = ("embed", "attn", "mlp", "attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc1", "mlp.fc2")
OUTPUT_ROLES = ("attn", "mlp")
TOKENS_ROLE = "tokens"
"""Role (and kind) of the text tower's token-embedding table (block 0): the layer sees the token ids."""
PROJ_ROLE = "proj"
"""Role of a tower's final, projected features (kind "output", the tower's last block): `encode_image` /
`encode_text` before normalisation."""


def traced() -> bool:
    """True inside `torch.jit.trace` / ONNX export or `torch.compile`: shapes must not depend on the data there."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or (compiling is not None and compiling()))


def true_length(ids: torch.Tensor, pad_id: int, eos_id: int | None = None) -> int:
    """The columns of (B, L) token ids up to the last one holding a real token in any row (at least 1). When the
    tokenizer pads with its end-of-text token (`eos_id == pad_id`), the first one of each row is real."""
    real = ids != pad_id
    if eos_id is not None and eos_id == pad_id:
        is_pad = ~real
        real = real | (is_pad & (is_pad.long().cumsum(dim=1) == 1))
    cols = real.any(dim=0).nonzero()
    return int(cols[-1]) + 1 if len(cols) else 1


FUSED_ROLES: dict[str, tuple[str, ...]] = {
    "attn.qkv": ("attn.q", "attn.k", "attn.v"),
    "xattn.kv": ("xattn.k", "xattn.v"),
}
"""Roles of one projection that computes several (GPT-2's `c_attn`, BLIP's `qkv`), with the roles of its parts: a
target naming a part (`attn.v`) selects the fused projection, as PEFT targets `c_attn` where others have `v_proj`."""


@dataclass
class Site:
    """One place an adapter can act: the output of a sub-layer or one linear projection in a block.

    `host_path` is the module that gets wrapped; for projections inside an `nn.MultiheadAttention`
    the host is the attention module and `path` reads `<host_path>#q` (k, v, out). A fused projection has a
    role of `FUSED_ROLES` (`attn.qkv`) and is one site.
    """

    tower: str
    layer: int
    role: str
    path: str
    host_path: str
    kind: str  # "output", "linear", "sequence" or "tokens"
    in_features: int
    out_features: int

    @property
    def key(self) -> str:
        return self.role.replace(".", "_")


@dataclass
class Block:
    """A transformer block of one tower, its width and the sites an adapter may wrap."""

    tower: str
    index: int
    path: str
    width: int
    sites: dict[str, Site] = field(default_factory=dict)


class Backbone(nn.Module, metaclass=ABCMeta):
    """A CLIP-style dual encoder: images and texts to a shared embedding space.

    Subclasses set `model`, `spec`, `family`, implement the encoders, tokenizer and preprocessing,
    and describe their blocks; everything else in vlkit (injection, training, export) uses only this API.
    """

    family: str = "base"

    text_pad_id: int | None = None
    """The id `tokenize` pads with, where `encode_text` runs a batch at its true length (`trim_tokens`): a causal
    text tower pooled at its end-of-text token, whose embeddings do not depend on padding after it. None (SigLIP,
    whose pooling reads the last position): texts run at the full context length."""
    text_eos_id: int | None = None

    def __init__(self, model: nn.Module, spec: str):
        super().__init__()
        self.model: Any = model  # the family's own model class: its attributes differ per family
        self.spec = spec
        self.adapter_state = AdapterState()
        self._fingerprint = self._compute_fingerprint()

    # --- encoders -----------------------------------------------------------------------------
    @abstractmethod
    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...

    @abstractmethod
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...

    @abstractmethod
    def encode_image_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One vision forward: the pooled image embedding (B, embed_dim, unnormalised, as `encode_image`)
        and the patch tokens (B, N_patches, vision width) after the tower's final norm, class token dropped.
        Grounding and other dense tasks read the tokens."""
        ...

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor):
        """Normalised image and text embeddings and the logit scale, as CLIP's forward returns them."""
        return self.encode_image(pixels, normalize=True), self.encode_text(tokens, normalize=True), self.logit_scale

    def trim_tokens(self, tokens):
        """(B, L) token ids cut to the batch's longest text (`true_length`) where `text_pad_id` allows it.
        `tokenize` keeps padding to the context length, so token tensors of different batches still concatenate
        and the exported text graph keeps its input shape; the forward pays only for the real tokens. Never
        under tracing or compilation (`traced`)."""
        pad = self.text_pad_id
        if pad is None or not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or traced():
            return tokens
        n = true_length(tokens, pad, self.text_eos_id)
        return tokens if n >= tokens.shape[1] else tokens[:, :n]

    # --- inputs -------------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, texts: list[str] | str) -> torch.Tensor: ...

    @property
    def image_transform(self) -> Callable:
        """The backbone's own eval transform: one PIL image (any mode, any size) to the normalised float32
        (3, image_size, image_size) tensor `encode_image` expects. Picklable, so DataLoader workers can run it.

        Subclasses set `self._image_transform` (a plain picklable object, not an nn.Module); plugins that
        set none get `shortest_edge_transform` of their `image_size`, `mean` and `std`."""
        return own_or_default_transform(self)

    def preprocess(self, image) -> torch.Tensor:
        """A PIL image to a normalised CHW float tensor through `image_transform`."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        return self.image_transform(image)

    def preprocess_batch(self, images) -> torch.Tensor:
        return torch.stack([self.preprocess(im) for im in images])

    image_size: int = 224
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    context_length: int = 77

    @property
    @abstractmethod
    def embed_dim(self) -> int: ...

    @property
    @abstractmethod
    def logit_scale(self) -> torch.Tensor: ...

    # --- structure ----------------------------------------------------------------------------
    @abstractmethod
    def blocks(self, tower: str) -> list[Block]: ...

    @abstractmethod
    def tower_prefixes(self) -> dict[str, tuple[str, ...]]:
        """Module-path prefixes of each tower, for per-tower parameter counts."""
        ...

    def sequence_layout(self, tower: str):
        """How the tower's blocks see their token sequence (`vlkit.backbones.sequence.SequenceLayout`), for
        sequence sites (prompt tuning); None: the tower offers no sequence site."""
        return None

    towers: tuple[str, ...] = TOWERS
    kind: str = "contrastive"

    def resolve_towers(self, choice: str) -> tuple[str, ...]:
        """The towers an adapter's `towers:` option names on this backbone (`both`: vision and text)."""
        if choice in ("both", "all"):
            return self.towers
        if choice in self.towers:
            return (choice,)
        raise ConfigError(f"towers must be one of both, {', '.join(self.towers)} on {self.spec}, got {choice!r}")

    def all_blocks(self) -> list[Block]:
        return [b for t in self.towers for b in self.blocks(t)]

    def tokenizer_files(self) -> dict[str, Any]:
        """Files (name -> text or bytes) a consumer needs to tokenize without vlkit; see `vlkit export`."""
        return {}

    def unknown_words(self, texts: list[str]) -> list[str]:
        """The words of `texts` the tokenizer maps to its unknown token, each once in first-seen order. Byte-level
        BPE tokenizers (CLIP's, open_clip's) know every word: the default finds none."""
        return []

    def fingerprint(self) -> str:
        """A hash of the base architecture (parameter names, shapes, dtypes), independent of adapters."""
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256(self.family.encode())
        for name, p in sorted(self.model.state_dict().items()):
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "family": self.family,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "context_length": self.context_length,
            "fingerprint": self.fingerprint(),
        }

    # --- joint (cross-modal) scoring ------------------------------------------------------------
    def joint_active(self) -> bool:
        """True when an active (or routed) adapter fuses the towers (its variant declares `joint = True`)."""
        st = self.adapter_state
        names = st.route_names if st.route is not None else st.active
        return any(n in st.joint for n in names if n)

    def activation_key(self) -> str:
        """What the adapter sites run now (active adapters, mode, weights, fusion), for cache keys."""
        st = self.adapter_state
        return repr((st.active, st.mode, sorted(st.weights.items()), st.fusion))

    def text_valid_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Which text positions hold real tokens (up to and including end-of-text)."""
        eot = tokens.argmax(dim=-1, keepdim=True)
        return torch.arange(tokens.shape[-1], device=tokens.device).unsqueeze(0) <= eot

    def encode_pair(self, pixels: torch.Tensor, tokens: torch.Tensor, normalize: bool = True):
        """Image and text embeddings of pairs (image i with text i), each tower seeing the other.

        Without a joint adapter this is the two encoders run apart.
        """
        if not self.joint_active():
            return self.encode_image(pixels, normalize=normalize), self.encode_text(tokens, normalize=normalize)
        tokens = self.trim_tokens(tokens)
        st = self.adapter_state
        saved = st.context
        st.context = {"joint": "record", "states": {}, "masks": {"text": self.text_valid_mask(tokens)}}
        try:
            self.encode_image(pixels)
            self.encode_text(tokens)
            st.context["joint"] = "fuse"
            img = self.encode_image(pixels, normalize=normalize)
            txt = self.encode_text(tokens, normalize=normalize)
        finally:
            st.context = saved
        return img, txt

    def joint_pair_scores(self, pixels, tokens, batch_size: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(pixels), batch_size):
            img, txt = self.encode_pair(pixels[i : i + batch_size], tokens[i : i + batch_size])
            out.append((img * txt).sum(-1))
        return float(self.logit_scale) * torch.cat(out)

    def joint_scores(self, pixels, tokens, batch_size: int = 256) -> torch.Tensor:
        """(n_texts, n_images) joint scores: every text paired with every image (quadratic; small sets)."""
        nt, ni = len(tokens), len(pixels)
        ti = torch.arange(nt).repeat_interleave(ni)
        ii = torch.arange(ni).repeat(nt)
        flat = self.joint_pair_scores(pixels[ii], tokens[ti], batch_size)
        return flat.view(nt, ni)

    def base_parameters(self) -> dict[str, nn.Parameter]:

        return {
            base_param_name(n): p
            for n, p in self.model.named_parameters()
            if ".adapters." not in n and ".fusions." not in n
        }


def as_triple(value) -> tuple[float, ...]:
    """Per-channel constants from a sequence or one number."""
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(image):
    """A PIL image of any mode as RGB, the first step of `shortest_edge_transform`:

    - RGB: unchanged;
    - transparency (RGBA, LA, PA, RGBa, La, or a palette/grey/RGB image with a ``transparency`` entry):
      composited onto white (as transformers' image processors do), not alpha dropped, so transparent pixels
      read as white background whatever colour they store;
    - 16-bit grey (I;16, I;16L, I;16B, I;16N): scaled from 0..65535 to 0..255 (value / 257, rounded), then grey;
    - anything else (L, 1, P, CMYK, YCbCr, LAB, HSV, I, F): PIL's own conversion (CMYK by PIL's formula, no ICC
      profile; I and F clipped to 0..255)."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ALPHA_MODES or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in SIXTEEN_BIT:
        import numpy as np

        grey = np.rint(np.asarray(image, dtype=np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def own_or_default_transform(backbone) -> Callable:
    """`backbone._image_transform` when it sets one, else `shortest_edge_transform` of its `image_size`, `mean`
    and `std` (built once per setting)."""
    own = backbone.__dict__.get("_image_transform")
    if own is not None:
        return own
    key = (int(backbone.image_size), tuple(backbone.mean), tuple(backbone.std))
    cached = backbone.__dict__.get("_default_transform")
    if cached is None or cached[0] != key:
        cached = backbone.__dict__["_default_transform"] = (key, shortest_edge_transform(*key))
    return cached[1]


def shortest_edge_transform(size: int, mean, std, interpolation: str = "bicubic"):
    """torchvision's eval pipeline: RGB (`to_rgb`: each mode as it says), shorter side resized to `size`,
    centre crop, to tensor, normalise. The default of backbones that set no transform, and `tiny`'s.

    The classic `transforms` (not v2): `ToTensor` divides by 255 exactly as earlier vlkit releases did,
    so images already `size` pixels square come out bit-identical."""
    from torchvision import transforms as T

    mode = T.InterpolationMode(interpolation)
    return T.Compose(
        [
            to_rgb,
            T.Resize(int(size), interpolation=mode),
            T.CenterCrop(int(size)),
            T.ToTensor(),
            T.Normalize(list(mean), list(std)),
        ]
    )


def resolve_module(root: nn.Module, path: str) -> nn.Module:
    """The module at `path` of the unwrapped model; adapter hosts on the way are seen through."""

    mod: Any = root
    for part in path.split(".") if path else []:
        if isinstance(mod, AdapterHost):
            mod = mod.base
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def has_module(root: nn.Module, path: str) -> bool:
    """Whether `resolve_module(root, path)` finds a module."""
    try:
        resolve_module(root, path)
    except (AttributeError, IndexError, KeyError):
        return False
    return True


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:

    parent_path, _, leaf = path.rpartition(".")
    parent: Any = resolve_module(root, parent_path) if parent_path else root
    if isinstance(parent, AdapterHost):
        parent = parent.base
    if leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def tokens_site(index: int, path: str, width: int) -> Site:
    """The text tower's token-embedding site (kind and role "tokens") at the nn.Embedding `path`.

    A layer there is called like a linear one, `forward(ids, y, weight, bias=None) -> y'`: `ids` the token ids
    (B, L), `y = weight[ids]` their embeddings (B, L, D), `weight` the live embedding table (vocab, D). Prompt
    learners that replace the embeddings of some words (CoOp's learned context) use it."""
    return Site("text", index, TOKENS_ROLE, path, path, TOKENS_ROLE, width, width)


BackboneFactory = Callable[..., Backbone]
