"""transformers backbones: `hf:<hub id or local dir>` for CLIPModel and SiglipModel, and the generative VLMs of
`vlkit.backbones.hf_vlm` (LLaVA, Idefics3/SmolVLM, BLIP, vision-encoder-decoder) by their config's model_type.

Model, tokenizer and image processor all come from the same checkpoint; images go through its own processor."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneLoadError
from .base import Backbone, Block, Site, as_triple, tokens_site, traced, true_length
from .hf_vlm import VLM_TYPES, HFVLMBackbone, load_hf_vlm
from .hosts import AdapterHost
from .sequence import SequenceLayout, prompt_site


def _unwrap(m):

    return m.base if isinstance(m, AdapterHost) else m


class HFBackbone(Backbone):
    """A transformers dual encoder with `vision_model` and `text_model` towers of encoder layers."""

    family = "hf"

    def __init__(
        self,
        model: nn.Module,
        spec: str,
        tokenizer,
        image_size: int,
        mean,
        std,
        context_length: int,
        image_transform=None,
    ):
        super().__init__(model, spec)
        self._tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.context_length = int(context_length)
        self.is_siglip = not hasattr(model, "visual_projection")
        self._image_transform = image_transform
        if not self.is_siglip:  # CLIP pools at its end-of-text token behind a causal mask
            self.text_pad_id = getattr(tokenizer, "pad_token_id", None)
            self.text_eos_id = getattr(tokenizer, "eos_token_id", None)

    def encode_image(self, pixels, normalize=False):
        out = self.model.vision_model(pixel_values=pixels).pooler_output
        if hasattr(self.model, "visual_projection"):
            out = self.model.visual_projection(out)
        return nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_image_tokens(self, pixels):
        vision = self.model.vision_model
        out = vision(pixel_values=pixels)
        if self.is_siglip:  # no class token; last_hidden_state already went through post_layernorm
            tokens = out.last_hidden_state
        else:  # CLIP normalises only the pooled class token; apply the same norm to the patches
            tokens = vision.post_layernorm(out.last_hidden_state[:, 1:])
        pooled = out.pooler_output
        if hasattr(self.model, "visual_projection"):
            pooled = self.model.visual_projection(pooled)
        return pooled, tokens

    def encode_text(self, tokens, normalize=False):
        if isinstance(tokens, dict):
            ids, mask = tokens["input_ids"], tokens.get("attention_mask")
            if mask is not None and not self.is_siglip and not traced():
                n = true_length(mask, 0)
                ids, mask = ids[:, :n], mask[:, :n]
        else:
            ids, mask = self.trim_tokens(tokens), None
            pad = getattr(self._tokenizer, "pad_token_id", None)
            if pad is not None and not self.is_siglip:
                is_pad = ids == pad
                if pad == getattr(self._tokenizer, "eos_token_id", None):
                    # CLIP pads with its end-of-text token: the first one ends the text and is attended to
                    is_pad = is_pad & (is_pad.long().cumsum(dim=1) > 1)
                mask = (~is_pad).long()
        out = self.model.text_model(input_ids=ids, attention_mask=mask).pooler_output
        if hasattr(self.model, "text_projection"):
            out = self.model.text_projection(out)
        return nn.functional.normalize(out, dim=-1) if normalize else out

    def unknown_words(self, texts: list[str]) -> list[str]:
        """Words the tokenizer encodes with its unknown token (none for CLIP's byte-level BPE, whose unknown
        token is its end-of-text token)."""
        import re

        tok = self._tokenizer
        unk = getattr(tok, "unk_token_id", None)
        if unk is None or unk in {getattr(tok, k, None) for k in ("eos_token_id", "bos_token_id", "pad_token_id")}:
            return []
        found: dict[str, None] = {}
        for text in texts:
            if unk not in tok(str(text), add_special_tokens=False)["input_ids"]:
                continue
            for word in re.findall(r"\w+", str(text)):
                if unk in tok(word, add_special_tokens=False)["input_ids"]:
                    found.setdefault(word, None)
        return list(found)

    def tokenize(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        enc = self._tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return enc["input_ids"]

    @property
    def embed_dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "projection_dim", None) or cfg.text_config.hidden_size)

    @property
    def logit_scale(self):
        return self.model.logit_scale.exp()

    def blocks(self, tower: str) -> list[Block]:
        prefix = "vision_model" if tower == "vision" else "text_model"
        layers = getattr(self.model, prefix).encoder.layers
        out = []
        for i, layer in enumerate(layers):
            path = f"{prefix}.encoder.layers.{i}"
            attn = _unwrap(layer.self_attn)
            mlp = _unwrap(layer.mlp)
            fc1, fc2 = _unwrap(mlp.fc1), _unwrap(mlp.fc2)
            w = fc1.in_features
            b = Block(tower, i, path, w)
            b.sites["attn"] = Site(tower, i, "attn", f"{path}.self_attn", f"{path}.self_attn", "output", w, w)
            for part, attr in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "out_proj")):
                lin = _unwrap(getattr(attn, attr))
                b.sites[f"attn.{part}"] = Site(
                    tower,
                    i,
                    f"attn.{part}",
                    f"{path}.self_attn.{attr}",
                    f"{path}.self_attn.{attr}",
                    "linear",
                    lin.in_features,
                    lin.out_features,
                )
            b.sites["mlp"] = Site(tower, i, "mlp", f"{path}.mlp", f"{path}.mlp", "output", w, w)
            b.sites["mlp.fc1"] = Site(
                tower, i, "mlp.fc1", f"{path}.mlp.fc1", f"{path}.mlp.fc1", "linear", fc1.in_features, fc1.out_features
            )
            b.sites["mlp.fc2"] = Site(
                tower, i, "mlp.fc2", f"{path}.mlp.fc2", f"{path}.mlp.fc2", "linear", fc2.in_features, fc2.out_features
            )
            out.append(b)

        for b in out:
            b.sites["prompt"] = prompt_site(tower, b.index, b.path, b.width)
        if out:
            tower_model = getattr(self.model, prefix)
            embed = "pre_layrnorm" if tower == "vision" and hasattr(tower_model, "pre_layrnorm") else "embeddings"
            w = out[0].width
            site = Site(tower, 0, "embed", f"{prefix}.{embed}", f"{prefix}.{embed}", "output", w, w)
            out[0].sites = {"embed": site, **out[0].sites}
            emb = getattr(_unwrap(tower_model.embeddings), "token_embedding", None)
            if tower == "text" and isinstance(_unwrap(emb), nn.Embedding):
                out[0].sites["tokens"] = tokens_site(0, f"{prefix}.embeddings.token_embedding", w)
            proj = "visual_projection" if tower == "vision" else "text_projection"
            lin = _unwrap(getattr(self.model, proj, None)) if hasattr(self.model, proj) else None
            if isinstance(lin, nn.Linear):
                out[-1].sites["proj"] = Site(
                    tower, out[-1].index, "proj", proj, proj, "output", lin.out_features, lin.out_features
                )
        return out

    def sequence_layout(self, tower: str):
        """Prompt tokens go after the class token (CLIP vision) or the start-of-text token (CLIP text, causal;
        its padding mask grows with them); SigLIP towers have neither and take them first. Encoder layers are
        called `layer(hidden_states, attention_mask, ...)`."""

        at = 0 if self.is_siglip else 1
        return SequenceLayout(
            insert_at=at,
            batch_first=True,
            causal=tower == "text" and not self.is_siglip,
            hidden_arg="hidden_states",
            hidden_index=0,
            mask_arg="attention_mask",
            mask_index=1,
        )

    def tower_prefixes(self):
        return {"vision": ("vision_model.", "visual_projection."), "text": ("text_model.", "text_projection.")}


class ProcessorTransform:
    """One PIL image through a transformers image processor: its `pixel_values`, (3, S, S) float32."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0].to(torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.processor).__name__})"


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _field(d, key):
    return d.get(key) if isinstance(d, dict) else getattr(d, key, None)


def _image_processor(src: str, local: bool, cfg):
    """The checkpoint's own image processor; a CLIPImageProcessor of the vision tower's size where it has none."""
    from transformers import AutoImageProcessor, CLIPImageProcessor

    if not local or any((Path(src) / f).is_file() for f in PROCESSOR_FILES):
        try:
            return AutoImageProcessor.from_pretrained(src)
        except Exception as exc:  # OSError, HTTP, offline and config errors differ across versions
            if local:
                raise BackboneLoadError(f"could not load the image processor of {src}: {exc}") from None
    s = int(cfg.vision_config.image_size)
    return CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})


def _processor_constants(processor, cfg) -> tuple[int, tuple, tuple]:
    """Output size, mean and std of `processor`; the size must be the square the vision tower takes."""
    want = int(cfg.vision_config.image_size)
    box = processor.crop_size if getattr(processor, "do_center_crop", False) else getattr(processor, "size", None)
    h, w = _field(box, "height"), _field(box, "width")
    size = (h, w) if h and w else (_field(box, "shortest_edge") or want,) * 2
    if tuple(size) != (want, want):
        raise BackboneLoadError(
            f"the image processor makes {size[0]}x{size[1]} images; the vision tower takes {want}x{want}"
        )
    if not getattr(processor, "do_normalize", True):
        return want, (0.0,) * 3, (1.0,) * 3
    return want, as_triple(processor.image_mean), as_triple(processor.image_std)


def load_hf(spec: str, device: str | None = None) -> HFBackbone | HFVLMBackbone:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    src = spec.split(":", 1)[1] if spec.startswith("hf:") else spec
    if not src:
        raise BackboneLoadError(
            f"backbone spec {spec!r} names no model", hint="hf:openai/clip-vit-base-patch32 or hf:/local/dir"
        )
    local = Path(src).exists()
    try:
        cfg = AutoConfig.from_pretrained(src)
    except Exception as exc:  # OSError, HTTP and offline errors differ across versions
        if local:
            raise BackboneLoadError(f"{src} is not a transformers model directory: {exc}") from None
        raise BackboneLoadError(
            f"could not fetch transformers model {src!r} from the hub ({type(exc).__name__})",
            hint="no hub access? run save_pretrained() elsewhere, copy the directory here, and use hf:/path/to/dir",
        ) from None
    if cfg.model_type not in ("clip", "siglip", "siglip2", *VLM_TYPES):
        raise BackboneLoadError(
            f"hf model {src} is a {cfg.model_type!r} model; vlkit adapts CLIP and SigLIP dual encoders and the "
            f"generative {', '.join(VLM_TYPES)} models"
        )
    if local and Path(src).is_dir():
        d = Path(src)
        if not any(d.glob("*.safetensors")) and any(d.glob("*.bin")):
            raise BackboneLoadError(
                f"{src} holds only pickle weights (.bin); vlkit loads safetensors only",
                hint='convert once where you trust the file: python -c "from transformers import AutoModel; '
                f"AutoModel.from_pretrained('{src}').save_pretrained('{src}', safe_serialization=True)\"",
            )
    if cfg.model_type in VLM_TYPES:
        return load_hf_vlm(spec, src, cfg.model_type, device)
    try:
        model = AutoModel.from_pretrained(src, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as exc:
        raise BackboneLoadError(
            f"could not load model or tokenizer from {src}: {exc}",
            hint="the directory needs config.json, weights and tokenizer files",
        ) from None
    processor = _image_processor(src, local, cfg)
    size, mean, std = _processor_constants(processor, cfg)
    ctx = cfg.text_config.max_position_embeddings
    model.eval()
    if device:
        model.to(device)
    return HFBackbone(model, spec, tokenizer, size, mean, std, ctx, ProcessorTransform(processor))
