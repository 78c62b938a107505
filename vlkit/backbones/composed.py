"""VL-T5 / VL-BART style generative backbones: a vision tower, a projector and a transformers language model.

    vl:lm=/models/t5-base,vision=open_clip:ViT-B-32,projector=linear

The vision tower is any vlkit backbone's image tower (its text tower is dropped); its patch tokens go through the
projector (`linear`, or `mlp2x`: Linear, GELU, Linear) into the language model's input, before the prompt's token
embeddings, as VL-Adapter does. The language model is read from a local directory (`save_pretrained`): an
encoder-decoder (T5, BART: the visual tokens and the prompt enter the encoder, the decoder writes the answer) or a
decoder-only model (GPT-2, Llama, Qwen2, SmolLM: the answer follows the visual tokens and the prompt).

Adapter sites: the vision tower's own, the projector's linear layers, and per LM block the attention and MLP
outputs and projections (`LM_LAYOUTS`, architecture as data; GPT-2's `Conv1D` projections are linear sites like
any nn.Linear, its fused `c_attn` one `attn.qkv` site, as PEFT treats it). A `prefix` site on the LM's input sequence
takes prompt tuning (variant `prompt-tuning`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..errors import BackboneLoadError, ConfigError
from .base import Block, Site, has_module, resolve_module
from .generative import (
    GenerativeBackbone,
    as_image_batch,
    mask_positions,
    output_cache,
    target_logprob,
    token_loss,
)
from .hosts import linear_params
from .loading import load_backbone

PREFIX_KIND = "prefix"
PREFIX_ROLE = "prefix"


@dataclass(frozen=True)
class LMLayout:
    """Where a transformers LM keeps its blocks and, inside a block, its attention and MLP (None: absent)."""

    encoder: str | None
    decoder: str
    attn: str
    q: str | None
    k: str | None
    v: str | None
    o: str | None
    mlp: str | None
    fc1: str | None
    fc2: str | None
    enc_mlp: str | None = None  # where an encoder block's MLP differs from a decoder block's (T5)
    qkv: str | None = None  # one fused q, k, v projection (GPT-2's c_attn)


LM_LAYOUTS: dict[str, LMLayout] = {
    "t5": LMLayout(
        "encoder.block",
        "decoder.block",
        "layer.0.SelfAttention",
        "q",
        "k",
        "v",
        "o",
        "layer.2.DenseReluDense",
        "wi",
        "wo",
        enc_mlp="layer.1.DenseReluDense",
    ),
    "bart": LMLayout(
        "model.encoder.layers",
        "model.decoder.layers",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        None,
        "fc1",
        "fc2",
    ),
    "llama": LMLayout(
        None, "model.layers", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "mlp", "up_proj", "down_proj"
    ),
    "gpt2": LMLayout(None, "transformer.h", "attn", None, None, None, "c_proj", "mlp", "c_fc", "c_proj", qkv="c_attn"),
}
for _alias in ("qwen2", "mistral", "smollm3"):
    LM_LAYOUTS[_alias] = LM_LAYOUTS["llama"]
for _alias in ("mt5", "umt5"):
    LM_LAYOUTS[_alias] = LM_LAYOUTS["t5"]
LM_LAYOUTS["mbart"] = LM_LAYOUTS["bart"]

PROJECTORS = ("linear", "mlp2x")
PROJECTOR_SEED = 0


class PrefixPoint(nn.Module):
    """The LM's input sequence (visual tokens and prompt embeddings), where prompt-tuning layers prepend."""

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds


class ComposedVLModel(nn.Module):
    vision: nn.Module
    projector: nn.Module
    prefix: PrefixPoint
    lm: Any

    def __init__(self, vision: nn.Module, projector: nn.Module, lm: nn.Module):
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.prefix = PrefixPoint()
        self.lm = lm


def parse_vl_spec(spec: str) -> dict[str, str]:
    """`vl:lm=DIR,vision=SPEC,projector=linear` (or `vl:DIR`) to its parts, with the defaults filled in."""
    body = spec.split(":", 1)[1] if spec.startswith("vl:") else spec
    parts: dict[str, str] = {"vision": "tiny", "projector": "linear"}
    for item in [p for p in body.split(",") if p.strip()]:
        key, eq, value = item.partition("=")
        if not eq:
            key, value = "lm", item
        key = key.strip()
        if key not in ("lm", "vision", "projector"):
            raise ConfigError(f"backbone spec {spec!r}: unknown part {key!r}; parts: lm, vision, projector")
        parts[key] = value.strip()
    if not parts.get("lm"):
        raise ConfigError(
            f"backbone spec {spec!r} names no language model",
            hint="vl:lm=/path/to/t5-or-gpt2-dir,vision=tiny,projector=linear",
        )
    if parts["projector"] not in PROJECTORS:
        raise ConfigError(f"backbone spec {spec!r}: projector must be one of {', '.join(PROJECTORS)}")
    return parts


def load_lm(src: str):
    """(model, tokenizer, config) of a transformers language model directory, seq2seq or causal."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    local = Path(src).exists()
    try:
        cfg = AutoConfig.from_pretrained(src)
    except Exception as exc:  # OSError, HTTP and offline errors differ across versions
        if local:
            raise BackboneLoadError(f"{src} is not a transformers model directory: {exc}") from None
        raise BackboneLoadError(
            f"could not fetch language model {src!r} from the hub ({type(exc).__name__})",
            hint="no hub access? save_pretrained() the model and its tokenizer elsewhere, copy "
            "the directory here, and use vl:lm=/path/to/dir",
        ) from None
    if cfg.model_type not in LM_LAYOUTS:
        raise BackboneLoadError(
            f"{src} is a {cfg.model_type!r} model; vl: backbones take {', '.join(sorted(LM_LAYOUTS))} language models"
        )
    auto = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(src)
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as exc:
        raise BackboneLoadError(f"could not load the language model or tokenizer in {src}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, cfg


def _drop_text_tower(vb) -> None:
    """The vision backbone's text tower is not used: its modules and parameters leave the model."""
    for prefix in vb.tower_prefixes().get("text", ()):
        name = prefix.rstrip(".")
        if "." not in name and hasattr(vb.model, name):
            if name in vb.model._modules:
                del vb.model._modules[name]
            elif name in vb.model._parameters:
                del vb.model._parameters[name]


class ComposedVLBackbone(GenerativeBackbone):
    """A vision tower, a projector and a transformers LM (see the module docstring)."""

    family = "vl"
    model: ComposedVLModel

    def __init__(self, spec: str, vision, lm: nn.Module, tokenizer, lm_config, projector: str = "linear"):
        _drop_text_tower(vision)
        vwidth = int(vision.blocks("vision")[-1].width)
        d = int(lm_config.d_model if hasattr(lm_config, "d_model") else lm_config.hidden_size)
        with torch.random.fork_rng(devices=[]):  # a spec names one model: the projector's init is seeded
            torch.manual_seed(PROJECTOR_SEED)
            proj: nn.Module = (
                nn.Sequential(nn.Linear(vwidth, d))
                if projector == "linear"
                else nn.Sequential(nn.Linear(vwidth, d), nn.GELU(), nn.Linear(d, d))
            )
        self.layout = LM_LAYOUTS[lm_config.model_type]
        self.seq2seq = bool(lm_config.is_encoder_decoder)
        self.export_lm = "seq2seq" if self.seq2seq else "causal"
        self.towers = (
            ("vision", "projector", "encoder", "decoder") if self.seq2seq else ("vision", "projector", "decoder")
        )
        self.tower_aliases = {"lm": self.towers[2:], "text": self.towers[2:]}
        super().__init__(ComposedVLModel(vision.model, proj, lm), spec)
        self.__dict__["_vision_backbone"] = vision  # its encoders run `self.model.vision`; not a second submodule
        self.tokenizer = tokenizer
        self.lm_config = lm_config
        self.image_size, self.mean, self.std = vision.image_size, vision.mean, vision.std
        self.__dict__["_image_transform"] = vision.image_transform
        self.width = d
        self.vwidth = vwidth

    @property
    def vision_backbone(self) -> Any:
        """The vlkit backbone whose image tower this is (its `model` is `self.model.vision`)."""
        return self.__dict__["_vision_backbone"]

    # --- inputs to the LM -------------------------------------------------------------------------------
    def _tokens(self, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The vision tower's patch tokens, (B, N, W) or (B, K, N, W): what `visual_tokens` takes in place of
        images when the tower is frozen (a feature cache computes them once per image)."""
        flat, k = as_image_batch(pixels)
        _, patches = self.vision_backbone.encode_image_tokens(flat)
        return patches if pixels.dim() == 4 else patches.reshape(pixels.shape[0], k, *patches.shape[1:])

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, K·N, D): each image's patch tokens through the projector, the K images of an example in a row.
        `pixels` may also be `image_features` output: (B, N, W) or (B, K, N, W)."""
        is_images = (
            pixels.dim() in (4, 5) and pixels.shape[-3] == 3 and pixels.shape[-1] == pixels.shape[-2] == self.image_size
        )
        if is_images:
            patches = self.image_features(pixels)
        else:
            patches = pixels
        if patches.dim() == 3:
            patches = patches.unsqueeze(1)
        b, k, n, w = patches.shape
        vis = self.model.projector(patches.reshape(b * k, n, w))
        return vis.reshape(b, k * n, vis.shape[-1])

    def _inputs(self, pixels: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings [visual tokens; prompt] and their mask, through the prefix site."""
        ids, mask = self._tokens(prompts, pixels.device)
        return self._lm_inputs(self.visual_tokens(pixels), ids, mask)

    def _lm_inputs(self, visual, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """`_inputs` from the visual tokens and the prompt's token ids and mask."""
        device = mask.device
        text = self.model.lm.get_input_embeddings()(ids)
        vis = visual.to(text.dtype)
        embeds = torch.cat([vis, text], dim=1)
        mask = torch.cat([torch.ones(vis.shape[:2], dtype=mask.dtype, device=device), mask], dim=1)
        embeds2 = self.model.prefix(embeds)
        extra = embeds2.shape[1] - embeds.shape[1]
        if extra:
            mask = torch.cat([torch.ones(mask.shape[0], extra, dtype=mask.dtype, device=device), mask], dim=1)
        return embeds2, mask

    def _labels(self, targets: list[str], device) -> torch.Tensor:
        enc = self.tokenizer(
            list(targets), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = enc["input_ids"].to(device)
        return ids.masked_fill(enc["attention_mask"].to(device) == 0, -100)

    def _token_logits(self, pixels, prompts, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits over each target token, labels with -100 at padding)."""
        embeds, mask = self._inputs(pixels, prompts)
        if self.seq2seq:
            labels = self._labels(targets, pixels.device)
            out = self.model.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels)
            return out.logits, labels
        tgt = [" " + t + (self.tokenizer.eos_token or "") for t in targets]
        enc = self.tokenizer(
            tgt,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            add_special_tokens=False,
        )
        ids, tmask = enc["input_ids"].to(pixels.device), enc["attention_mask"].to(pixels.device)
        temb = self.model.lm.get_input_embeddings()(ids)
        embeds, mask = pads_first(embeds, mask)  # the target follows its own prompt, as for the example alone
        full = torch.cat([embeds, temb], dim=1)
        fmask = torch.cat([mask, tmask], dim=1)
        positions = (fmask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self.model.lm(inputs_embeds=full, attention_mask=fmask, position_ids=positions).logits
        n = ids.shape[1]
        return logits[:, -n - 1 : -1], ids.masked_fill(tmask == 0, -100)

    # --- the model calls --------------------------------------------------------------------------------
    def loss(self, pixels, prompts, targets) -> torch.Tensor:
        return token_loss(*self._token_logits(pixels, prompts, targets))

    def sequence_logprob(self, pixels, prompts, targets) -> torch.Tensor:
        return target_logprob(*self._token_logits(pixels, prompts, targets))

    @torch.no_grad()
    def generate(self, pixels, prompts, *, max_new_tokens: int = 20, num_beams: int = 1) -> list[str]:
        ids, _ = self.generate_ids(pixels, prompts, max_new_tokens=max_new_tokens, num_beams=num_beams)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def generate_ids(self, pixels, prompts, *, max_new_tokens=20, num_beams=1, logits=False):
        embeds, mask = self._inputs(pixels, prompts)
        if not self.seq2seq:
            embeds, mask = pads_first(embeds, mask)
        tok = self.tokenizer
        out = self.model.lm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=int(max_new_tokens),
            num_beams=int(num_beams),
            do_sample=False,
            use_cache=True,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            output_logits=bool(logits),
            return_dict_in_generate=True,
        )
        return out.sequences, (torch.stack(out.logits, dim=1).float() if logits else None)

    # --- export: encoder and decoder (T5, BART), or prefill and steps (decoder-only) ----------------------
    prompt_format = "the tokenizer's own encoding of the prompt (tokenizer/), padded as it pads"

    def prompt_tokens(self, prompts):
        return self._tokens(list(prompts), torch.device("cpu"))

    def encode(self, visual, ids, mask):
        embeds, mask = self._lm_inputs(visual, ids, mask)
        return self.model.lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, mask

    def decode(self, ids, hidden, mask, cache):
        out = self.model.lm(
            encoder_outputs=(hidden,),
            attention_mask=mask,
            decoder_input_ids=ids,
            cache=cache,
            use_cache=True,
            return_dict=True,
        )
        return out.logits, output_cache(out)

    def prefill(self, visual, ids, mask, cache):
        """Each row's padding first, positions the mask's running count (as `generate` runs a decoder-only LM)."""
        embeds, mask = pads_first(*self._lm_inputs(visual, ids, mask))
        positions = mask_positions(mask)
        out = self.model.lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            return_dict=True,
        )
        return out.logits[:, -1:], mask, positions[:, -1:], output_cache(out)

    def step(self, ids, mask, positions, visual, cache):
        out = self.model.lm(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, return_dict=True
        )
        return out.logits, output_cache(out)

    def generation_settings(self) -> dict[str, Any]:
        cfg, tok = self.lm_config, self.tokenizer
        if self.seq2seq:
            layers = getattr(cfg, "num_decoder_layers", None) or cfg.decoder_layers
        else:
            layers = cfg.num_hidden_layers
        return {
            "config": self.model.lm.generation_config,
            "start": int(cfg.decoder_start_token_id) if self.seq2seq else None,
            "eos": [int(tok.eos_token_id)],
            "pad": int(tok.pad_token_id),
            "layers": int(layers),
        }

    def save_prompt_files(self, directory: str) -> None:
        self.tokenizer.save_pretrained(directory)

    # --- structure --------------------------------------------------------------------------------------
    def tower_prefixes(self) -> dict[str, tuple[str, ...]]:
        lay = self.layout
        out = {"vision": ("vision.",), "projector": ("projector.", "prefix.")}
        if self.seq2seq and lay.encoder:
            out["encoder"] = (f"lm.{lay.encoder}.",)
            out["decoder"] = ("lm.",)
        else:
            out["decoder"] = ("lm.",)
        return out

    def blocks(self, tower: str) -> list[Block]:
        if tower == "vision":
            return [self._vision_block(b) for b in self.vision_backbone.blocks("vision")]
        if tower == "projector":
            return self._projector_blocks()
        if tower not in self.towers:
            return []
        lay = self.layout
        root = (lay.encoder if tower == "encoder" else lay.decoder) or lay.decoder
        layers = cast(nn.ModuleList, resolve_module(self.model.lm, root))
        blocks = []
        for i in range(len(layers)):
            path = f"lm.{root}.{i}"
            b = Block(tower, i, path, self.width)
            w = self.width
            attn = f"{path}.{lay.attn}"
            b.sites["attn"] = Site(tower, i, "attn", attn, attn, "output", w, w)
            attn_parts = (("attn.q", lay.q), ("attn.k", lay.k), ("attn.v", lay.v), ("attn.qkv", lay.qkv))
            for role, attr in (*attn_parts, ("attn.out", lay.o)):
                if attr:
                    self._linear_site(b, role, f"{attn}.{attr}")
            mlp = lay.enc_mlp if (tower == "encoder" and lay.enc_mlp) else lay.mlp
            if mlp:
                b.sites["mlp"] = Site(tower, i, "mlp", f"{path}.{mlp}", f"{path}.{mlp}", "output", w, w)
            ff = f"{path}.{mlp}" if mlp else path
            for role, attr in (("mlp.fc1", lay.fc1), ("mlp.fc2", lay.fc2)):
                if attr and has_module(self.model, f"{ff}.{attr}"):
                    self._linear_site(b, role, f"{ff}.{attr}")
            if i == 0 and tower == self.towers[2]:
                b.sites[PREFIX_ROLE] = Site(tower, 0, PREFIX_ROLE, "prefix", "prefix", PREFIX_KIND, w, w)
            blocks.append(b)
        return blocks

    def _linear_site(self, b: Block, role: str, path: str) -> None:
        """A linear site of block `b` at the projection `path` (an nn.Linear or GPT-2's Conv1D)."""
        lin = linear_params(resolve_module(self.model, path))
        if lin is None:
            raise BackboneLoadError(f"{path} of {self.lm_config.model_type} is not a linear projection")
        b.sites[role] = Site(b.tower, b.index, role, path, path, "linear", lin.in_features, lin.out_features)

    def _vision_block(self, block: Block) -> Block:
        b = Block("vision", block.index, f"vision.{block.path}", block.width)
        for key, s in block.sites.items():
            b.sites[key] = Site(
                "vision",
                s.layer,
                s.role,
                f"vision.{s.path}",
                f"vision.{s.host_path}",
                s.kind,
                s.in_features,
                s.out_features,
            )
        return b

    def _projector_blocks(self) -> list[Block]:
        b = Block("projector", 0, "projector", self.width)
        linears = [(n, m) for n, m in self.model.projector.named_children() if isinstance(m, nn.Linear)]
        for j, (n, m) in enumerate(linears):
            role = "mlp.fc1" if j == 0 else "mlp.fc2"
            b.sites[role] = Site(
                "projector", 0, role, f"projector.{n}", f"projector.{n}", "linear", m.in_features, m.out_features
            )
        b.sites["mlp"] = Site("projector", 0, "mlp", "projector", "projector", "output", self.width, self.width)
        return [b]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "lm": self.lm_config.model_type,
            "seq2seq": self.seq2seq,
            "vision": self.vision_backbone.spec,
        }


def pads_first(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's padding moved before its tokens, in order: a decoder-only LM then writes every row's answer
    right after its own prompt, as it does for the row alone (`generate` numbers positions by the mask's
    running count), so a batch answers as its examples one by one."""
    n = mask.shape[1]
    key = mask.float() * n + torch.arange(n, device=mask.device, dtype=torch.float32)
    order = key.argsort(dim=1)
    return embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])), mask.gather(1, order)


def load_composed(spec: str, device: str | None = None) -> ComposedVLBackbone:
    """Build `vl:lm=DIR,vision=SPEC,projector=linear|mlp2x` (see the module docstring)."""
    parts = parse_vl_spec(spec)
    vision = load_backbone(parts["vision"])
    if vision.kind != "contrastive":
        raise ConfigError(f"the vision tower of {spec!r} must be a CLIP-style backbone's, got {parts['vision']!r}")
    lm, tokenizer, cfg = load_lm(parts["lm"])
    bb = ComposedVLBackbone(spec, vision, lm, tokenizer, cfg, parts["projector"])
    if device:
        bb.to(device)
    return bb
