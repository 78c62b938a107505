"""transformers vision-language models from a local directory as generative backbones: `hf:/path/to/dir`.

`load_hf` dispatches on the config's `model_type`: `llava` (`LlavaForConditionalGeneration`), `idefics3` and
`smolvlm` (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`), `blip`
(`BlipForConditionalGeneration`) and `vision-encoder-decoder` (`VisionEncoderDecoderModel`). Each comes with its own
processor from the same directory: its image processor turns a PIL image (in its own mode: see `ProcessorImages`)
into pixels, its tokenizer and prompt format build the text.

- Image-token models (LLaVA, Idefics3, SmolVLM): the prompt goes through the processor's chat template when it has
  one (a user turn of K images and the prompt, then the generation prompt), else it is `<image>`·K + prompt; a prompt
  that already holds K `<image>` tokens is kept as written. Each `<image>` expands as the processor expands it
  (`replace_image_token`); the projected image features replace those tokens' embeddings, as the models' own
  forward does. Idefics3/SmolVLM images are one global tile each (no splitting), so a batch is one tensor.
- Cross-attention models (BLIP, vision-encoder-decoder): the vision encoder's tokens are the decoder's memory; the
  decoder starts from its start token, the prompt's tokens follow as a caption prefix (BLIP's "a picture of";
  vision-encoder-decoder models are usually prompted with nothing: the decoder then starts from BOS alone).

Towers: `vision`, `projector` (where the model has one) and `decoder`; sites per block: the attention and MLP
outputs (`attn`, `mlp`, `xattn` for cross-attention) and the linear projections (`attn.q`/`k`/`v`/`out`, `attn.qkv`
where fused, `xattn.*`, `mlp.fc1`/`fc2`); a `prefix` site takes prompt tuning: learned tokens before the language
model's input (image-token models) or the decoder's memory (cross-attention models). Site paths are the
transformers model's own module paths, which is what PEFT's `target_modules` names.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackboneLoadError, ConfigError
from .base import Block, Site, as_triple, resolve_module, to_rgb
from .composed import PREFIX_KIND, PREFIX_ROLE, PrefixPoint
from .generative import GenerativeBackbone, as_image_batch
from .hosts import AdapterHost

PREFIX_PATH = "vlkit_prefix"


@dataclass(frozen=True)
class BlockLayout:
    """Where a transformer block keeps its parts, relative to the block (None: absent)."""

    attn: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str | None = None
    qkv: str | None = None
    mlp: str | None = None
    fc1: str | None = None
    fc2: str | None = None
    xattn: str | None = None
    xq: str | None = None
    xk: str | None = None
    xv: str | None = None
    xo: str | None = None


CLIP_LIKE = BlockLayout("self_attn", "q_proj", "k_proj", "v_proj", "out_proj", mlp="mlp", fc1="mlp.fc1", fc2="mlp.fc2")
LAYOUTS: dict[str, BlockLayout] = {
    "clip": CLIP_LIKE,
    "vit": BlockLayout("attention", "q_proj", "k_proj", "v_proj", "o_proj", mlp="mlp", fc1="mlp.fc1", fc2="mlp.fc2"),
    "blip_vision": BlockLayout("self_attn", o="projection", qkv="qkv", mlp="mlp", fc1="mlp.fc1", fc2="mlp.fc2"),
    "llama": BlockLayout(
        "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", mlp="mlp", fc1="mlp.up_proj", fc2="mlp.down_proj"
    ),
    "bert": BlockLayout(
        "attention",
        "self.query",
        "self.key",
        "self.value",
        "output.dense",
        mlp="output",
        fc1="intermediate.dense",
        fc2="output.dense",
        xattn="crossattention",
        xq="self.query",
        xk="self.key",
        xv="self.value",
        xo="output.dense",
    ),
    "bart": BlockLayout(
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        fc1="fc1",
        fc2="fc2",
        xattn="encoder_attn",
        xq="q_proj",
        xk="k_proj",
        xv="v_proj",
        xo="out_proj",
    ),
    "gpt2": BlockLayout("attn", mlp="mlp", xattn="crossattention"),
}
"""Block layouts by family; a tower's layout is the first whose attention (and MLP) paths exist in its blocks."""

STACKS = (
    "vision_model.encoder.layers",
    "encoder.layer",
    "encoder.layers",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "model.decoder.layers",
    "transformer.h",
    "layers",
)
"""Where a vision encoder or a causal LM keeps its blocks (relative to the tower's root), tried in order."""


def _has(root: nn.Module, path: str) -> bool:
    try:
        resolve_module(root, path)
    except (AttributeError, IndexError, KeyError):
        return False
    return True


def _unwrap(module: nn.Module) -> nn.Module:
    while isinstance(module, AdapterHost):
        module = module.base
    return module


def find_stack(root: nn.Module, prefix: str) -> str:
    """The module path (from the model) of the block list under `prefix`."""
    base = resolve_module(root, prefix) if prefix else root
    for cand in STACKS:
        if _has(base, cand) and isinstance(resolve_module(base, cand), nn.ModuleList):
            return f"{prefix}.{cand}" if prefix else cand
    raise BackboneLoadError(
        f"cannot find the transformer blocks of {type(base).__name__}; known block lists: {', '.join(STACKS)}"
    )


def find_layout(block: nn.Module) -> BlockLayout:
    """The first layout all of whose self-attention and MLP paths exist in `block`."""
    for lay in LAYOUTS.values():
        paths = [
            lay.attn,
            lay.mlp,
            lay.fc1,
            lay.fc2,
            *(f"{lay.attn}.{p}" for p in (lay.q, lay.k, lay.v, lay.o, lay.qkv) if p),
        ]
        if all(_has(block, p) for p in paths if p):
            return lay
    raise BackboneLoadError(
        f"vlkit does not know the block layout of {type(block).__name__}; known: {', '.join(LAYOUTS)}"
    )


class ProcessorImages:
    """One PIL image through a transformers image processor: its pixels, (3, H, W) float32. The image reaches the
    processor in its own mode where the processor converts modes itself (`do_convert_rgb`, as CLIP's, SigLIP's,
    BLIP's and Idefics3's do), so the pixels are the library's own; a processor that does not (ViT's) gets it made
    RGB by `to_rgb` first, as every vlkit backbone makes it."""

    def __init__(self, processor, **options):
        self.processor = processor
        self.options = options
        self.converts = bool(getattr(processor, "do_convert_rgb", False))

    def __call__(self, image) -> torch.Tensor:
        px = self.processor(images=image if self.converts else to_rgb(image), return_tensors="pt", **self.options)[
            "pixel_values"
        ]
        return px.reshape(-1, *px.shape[-3:])[0].to(torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.processor).__name__})"


class HFVLMBackbone(GenerativeBackbone):
    """A transformers VLM: the shared loading, structure and scoring; subclasses build the model inputs."""

    family = "hf-vlm"
    stacks: dict[str, str] = {}
    """Tower -> its root module path (the block list is found under it)."""
    projector: tuple[str, ...] = ()
    """Linear layers of the projector (fc1, fc2) and the projector module, or nothing."""
    image_options: dict[str, Any] = {}
    """Options the image processor is called with."""

    def __init__(self, model: nn.Module, spec: str, tokenizer, image_processor, processor=None):
        model.add_module(PREFIX_PATH, PrefixPoint())
        super().__init__(model, spec)
        self.tokenizer = tokenizer
        self.processor = processor
        self.image_processor = image_processor
        self.__dict__["_image_transform"] = ProcessorImages(image_processor, **self.image_options)
        from PIL import Image

        self.image_size = int(self.image_transform(Image.new("RGB", (32, 32))).shape[-1])
        self.mean = as_triple(getattr(image_processor, "image_mean", self.mean))
        self.std = as_triple(getattr(image_processor, "image_std", self.std))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._paths = {t: find_stack(model, root) for t, root in self.stacks.items()}
        self.towers = tuple(
            t for t in ("vision", "projector", "decoder") if t in self._paths or (t == "projector" and self.projector)
        )
        self.tower_aliases = {"lm": ("decoder",), "text": ("decoder",)}

    # --- sequences ----------------------------------------------------------------------------------------
    def _target_ids(self, target: str) -> list[int]:
        ids = self.tokenizer(" " + target, add_special_tokens=False)["input_ids"][: self.max_length - 1]
        return list(ids) + [self.eos_id]

    def _pad(self, rows: list[list[int]], left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(n - len(r), n) if left else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return ids.to(device), mask.to(device)

    def _teacher_forced(self, prompt_ids: list[list[int]], targets: list[str], device):
        """[prompt; target] rows padded on the right (every token at its own position), and the labels: -100 but
        at the target tokens."""
        tgt = [self._target_ids(t) for t in targets]
        ids, mask = self._pad([p + t for p, t in zip(prompt_ids, tgt)], False, device)
        labels = torch.full_like(ids, -100)
        for i, (p, t) in enumerate(zip(prompt_ids, tgt)):
            labels[i, len(p) : len(p) + len(t)] = torch.tensor(t, device=device)
        return ids, mask, labels

    def _scores(self, pixels, prompts, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """(next-token logits, their labels): the token logits shifted by one."""
        logits, labels = self._token_logits(pixels, list(prompts), list(targets))
        return logits[:, :-1], labels[:, 1:]

    def loss(self, pixels, prompts, targets) -> torch.Tensor:
        logits, labels = self._scores(pixels, prompts, targets)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)

    def sequence_logprob(self, pixels, prompts, targets) -> torch.Tensor:
        logits, labels = self._scores(pixels, prompts, targets)
        logp = logits.float().log_softmax(-1)
        tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (tok * (labels != -100)).sum(-1)

    @abstractmethod
    def _token_logits(self, pixels, prompts, targets) -> tuple[torch.Tensor, torch.Tensor]: ...

    def _decode(self, out: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _gen_kwargs(self, max_new_tokens: int, num_beams: int) -> dict[str, Any]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return {
            "max_new_tokens": int(max_new_tokens),
            "num_beams": int(num_beams),
            "do_sample": False,
            "use_cache": True,
            "pad_token_id": self.pad_id,
            "eos_token_id": sorted({*eos, self.eos_id}),
        }

    # --- structure ----------------------------------------------------------------------------------------
    @abstractmethod
    def tower_prefixes(self) -> dict[str, tuple[str, ...]]: ...

    def blocks(self, tower: str) -> list[Block]:
        if tower == "projector":
            return self._projector_blocks()
        if tower not in self._paths:
            return []
        path = self._paths[tower]
        layers: Any = resolve_module(self.model, path)  # a ModuleList
        out = []
        for i in range(len(layers)):
            bpath = f"{path}.{i}"
            block = resolve_module(self.model, bpath)
            lay = find_layout(block)
            b = Block(tower, i, bpath, self._width(tower))
            self._sites(b, lay)
            if tower == "decoder" and i == 0:
                w = self.prefix_width()
                b.sites[PREFIX_ROLE] = Site(tower, 0, PREFIX_ROLE, PREFIX_PATH, PREFIX_PATH, PREFIX_KIND, w, w)
            out.append(b)
        return out

    def _sites(self, b: Block, lay: BlockLayout) -> None:
        w, t, i = b.width, b.tower, b.index

        def linear(role: str, rel: str | None) -> None:
            if rel and _has(self.model, f"{b.path}.{rel}"):
                lin = _unwrap(resolve_module(self.model, f"{b.path}.{rel}"))
                if isinstance(lin, nn.Linear):
                    p = f"{b.path}.{rel}"
                    b.sites[role] = Site(t, i, role, p, p, "linear", lin.in_features, lin.out_features)

        def output(role: str, rel: str | None) -> None:
            if rel and _has(self.model, f"{b.path}.{rel}"):
                p = f"{b.path}.{rel}"
                b.sites[role] = Site(t, i, role, p, p, "output", w, w)

        output("attn", lay.attn)
        for role, rel in (
            ("attn.q", lay.q),
            ("attn.k", lay.k),
            ("attn.v", lay.v),
            ("attn.out", lay.o),
            ("attn.qkv", lay.qkv),
        ):
            linear(role, f"{lay.attn}.{rel}" if rel else None)
        if lay.xattn and _has(self.model, f"{b.path}.{lay.xattn}"):
            output("xattn", lay.xattn)
            for role, rel in (("xattn.q", lay.xq), ("xattn.k", lay.xk), ("xattn.v", lay.xv), ("xattn.out", lay.xo)):
                linear(role, f"{lay.xattn}.{rel}" if rel else None)
        output("mlp", lay.mlp)
        linear("mlp.fc1", lay.fc1)
        linear("mlp.fc2", lay.fc2)

    def _projector_blocks(self) -> list[Block]:
        if not self.projector:
            return []
        *linears, module = self.projector
        mods: list[Any] = [_unwrap(resolve_module(self.model, p)) for p in linears]  # nn.Linear
        w = mods[-1].out_features
        b = Block("projector", 0, module, w)
        for j, (p, m) in enumerate(zip(linears, mods)):
            role = "mlp.fc1" if j == 0 else "mlp.fc2"
            b.sites[role] = Site("projector", 0, role, p, p, "linear", m.in_features, m.out_features)
        b.sites["mlp"] = Site("projector", 0, "mlp", module, module, "output", w, w)
        return [b]

    def _width(self, tower: str) -> int:
        cfg = self.model.config
        return int(cfg.vision_config.hidden_size if tower == "vision" else cfg.text_config.hidden_size)

    def prefix_width(self) -> int:
        return self._width("decoder")

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "architecture": type(self.model).__name__,
            "processor": type(self.processor or self.image_processor).__name__,
        }


class ImageTokenVLM(HFVLMBackbone):
    """LLaVA, Idefics3, SmolVLM: image features in place of the prompt's expanded `<image>` tokens."""

    image_token = "<image>"

    def __init__(self, model, spec, tokenizer, image_processor, processor):
        super().__init__(model, spec, tokenizer, image_processor, processor)
        self.image_token = getattr(processor, "image_token", self.image_token)
        self.image_token_id = int(model.config.image_token_id)
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        self.eos_id = (
            tokenizer.eos_token_id
            if tokenizer.eos_token_id is not None
            else (gen_eos[0] if isinstance(gen_eos, list) else gen_eos)
        )
        s = self.image_size
        info = {"pixel_values": torch.zeros(1, 3, s, s), "rows": [[0]], "cols": [[0]]}
        self._image_text = processor.replace_image_token(info, 0)

    def prompt_text(self, prompt: str, k: int) -> str:
        """The prompt with K images, in the model's format (see the module docstring), before expansion."""
        n = prompt.count(self.image_token)
        if n:
            if n != k:
                raise ConfigError(f"the prompt holds {n} {self.image_token} tokens for {k} image(s): {prompt!r}")
            return prompt
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}] * k + [{"type": "text", "text": prompt}]
            return self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        return self.image_token * k + prompt

    def _prompt_ids(self, prompts: list[str], k: int) -> list[list[int]]:
        texts = [self.prompt_text(p, k) for p in prompts]
        n = sum(t.count(self.image_token) for t in texts)
        texts, _ = self.processor.get_text_with_replacements(list(texts), [self._image_text] * n)
        bos = self.tokenizer.bos_token
        return [list(self.tokenizer(t, add_special_tokens=not (bos and t.startswith(bos)))["input_ids"]) for t in texts]

    @abstractmethod
    def image_features(self, flat: torch.Tensor) -> torch.Tensor:
        """(B·K, N, D) projected image tokens."""
        ...

    def _embeds(self, pixels, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
        flat, _ = as_image_batch(pixels)
        embeds = self.model.get_input_embeddings()(ids)
        feats = self.image_features(flat).to(embeds.dtype)
        where = (ids == self.image_token_id).unsqueeze(-1)
        if int(where.sum()) != feats.shape[0] * feats.shape[1]:
            raise ConfigError(
                f"the prompts hold {int(where.sum())} image tokens for {feats.shape[0]} image(s) of "
                f"{feats.shape[1]} tokens"
            )
        embeds = embeds.masked_scatter(where, feats.reshape(-1, feats.shape[-1]))
        embeds2 = getattr(self.model, PREFIX_PATH)(embeds)
        extra = embeds2.shape[1] - embeds.shape[1]
        if extra:
            mask = torch.cat([torch.ones(mask.shape[0], extra, dtype=mask.dtype, device=mask.device), mask], 1)
        return embeds2, mask

    def _token_logits(self, pixels, prompts, targets):
        _, k = as_image_batch(pixels)
        ids, mask, labels = self._teacher_forced(self._prompt_ids(prompts, k), targets, pixels.device)
        embeds, mask2 = self._embeds(pixels, ids, mask)
        logits = self.model(inputs_embeds=embeds, attention_mask=mask2, use_cache=False).logits
        return logits[:, logits.shape[1] - ids.shape[1] :], labels

    @torch.no_grad()
    def generate(self, pixels, prompts, *, max_new_tokens: int = 20, num_beams: int = 1) -> list[str]:
        _, k = as_image_batch(pixels)
        ids, mask = self._pad(self._prompt_ids(list(prompts), k), True, pixels.device)
        embeds, mask = self._embeds(pixels, ids, mask)
        out = self.model.generate(
            inputs_embeds=embeds, attention_mask=mask, **self._gen_kwargs(max_new_tokens, num_beams)
        )
        return self._decode(out)


class LlavaBackbone(ImageTokenVLM):
    stacks = {"vision": "model.vision_tower", "decoder": "model.language_model"}
    projector = (
        "model.multi_modal_projector.linear_1",
        "model.multi_modal_projector.linear_2",
        "model.multi_modal_projector",
    )

    def image_features(self, flat):
        return torch.stack(list(self.model.model.get_image_features(pixel_values=flat).pooler_output))

    def tower_prefixes(self):
        return {
            "vision": ("model.vision_tower.",),
            "projector": ("model.multi_modal_projector.", f"{PREFIX_PATH}."),
            "decoder": ("model.language_model.", "lm_head."),
        }


class Idefics3Backbone(ImageTokenVLM):
    """Idefics3 and SmolVLM (the same structure): SigLIP-style vision, pixel-shuffle connector, Llama decoder."""

    stacks = {"vision": "model.vision_model", "decoder": "model.text_model"}
    projector = ("model.connector.modality_projection.proj", "model.connector")

    image_options = {"do_image_splitting": False}  # one global tile per image

    def image_features(self, flat):
        inner = self.model.model
        return inner.connector(inner.vision_model(pixel_values=flat).last_hidden_state)

    def tower_prefixes(self):
        return {
            "vision": ("model.vision_model.",),
            "projector": ("model.connector.", f"{PREFIX_PATH}."),
            "decoder": ("model.text_model.", "lm_head."),
        }


class CrossAttentionVLM(HFVLMBackbone):
    """BLIP, vision-encoder-decoder: a causal text decoder that cross-attends to the vision encoder's tokens."""

    start_id: int
    eos_id: int
    positions_follow_mask = True
    """Whether generation gives the decoder position ids from the attention mask (prompts may then be padded on
    the left); otherwise prompts of one length generate together, unpadded."""

    @abstractmethod
    def memory(self, flat: torch.Tensor) -> torch.Tensor:
        """(B·K, N, D) tokens the decoder attends to."""
        ...

    @abstractmethod
    def decoder_logits(self, ids, mask, mem, mem_mask) -> torch.Tensor: ...

    @abstractmethod
    def decoder_generate(self, ids, mask, mem, mem_mask, **kw) -> torch.Tensor:
        """New token ids (the prompt's cut off)."""
        ...

    def _memory(self, pixels) -> tuple[torch.Tensor, torch.Tensor]:
        flat, k = as_image_batch(pixels)
        mem = self.memory(flat)
        mem = mem.reshape(pixels.shape[0], k * mem.shape[1], mem.shape[2])
        mem = getattr(self.model, PREFIX_PATH)(mem)
        return mem, torch.ones(mem.shape[:2], dtype=torch.long, device=mem.device)

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return [
            [self.start_id, *self.tokenizer(p, add_special_tokens=False)["input_ids"]] if p.strip() else [self.start_id]
            for p in prompts
        ]

    def _token_logits(self, pixels, prompts, targets):
        ids, mask, labels = self._teacher_forced(self._prompt_ids(prompts), targets, pixels.device)
        return self.decoder_logits(ids, mask, *self._memory(pixels)), labels

    @torch.no_grad()
    def generate(self, pixels, prompts, *, max_new_tokens: int = 20, num_beams: int = 1) -> list[str]:
        rows = self._prompt_ids(list(prompts))
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(0 if self.positions_follow_mask else len(r), []).append(i)
        out: list[str] = [""] * len(rows)
        mem, mem_mask = self._memory(pixels)
        for idx in groups.values():
            ids, mask = self._pad([rows[i] for i in idx], True, pixels.device)
            sel = torch.tensor(idx, device=pixels.device)
            gen = self.decoder_generate(
                ids, mask, mem[sel], mem_mask[sel], **self._gen_kwargs(max_new_tokens, num_beams)
            )
            for i, text in zip(idx, self._decode(gen)):
                out[i] = text
        return out


class BlipBackbone(CrossAttentionVLM):
    """BLIP's captioner: its text decoder (BERT-style, with cross-attention) called as BLIP's generate calls it."""

    stacks = {"vision": "vision_model", "decoder": "text_decoder"}

    def __init__(self, model, spec, tokenizer, image_processor, processor=None):
        super().__init__(model, spec, tokenizer, image_processor, processor)
        tc = model.config.text_config
        self.start_id, self.eos_id = int(tc.bos_token_id), int(tc.sep_token_id)
        self.pad_id = int(tc.pad_token_id)

    def memory(self, flat):
        return self.model.vision_model(pixel_values=flat).last_hidden_state

    def decoder_logits(self, ids, mask, mem, mem_mask):
        return self.model.text_decoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=mem,
            encoder_attention_mask=mem_mask,
            use_cache=False,
        ).logits

    def decoder_generate(self, ids, mask, mem, mem_mask, **kw):
        out = self.model.text_decoder.generate(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=mem, encoder_attention_mask=mem_mask, **kw
        )
        return out[:, ids.shape[1] :]

    def prefix_width(self):
        return int(self.model.config.vision_config.hidden_size)

    def tower_prefixes(self):
        return {"vision": ("vision_model.",), "decoder": ("text_decoder.", f"{PREFIX_PATH}.")}


class VisionEncoderDecoderBackbone(CrossAttentionVLM):
    """`VisionEncoderDecoderModel`: the model's own forward and generate, with the encoder's output given (after
    the prefix site); it projects that output itself where the widths differ (`enc_to_dec_proj`, the projector)."""

    stacks = {"vision": "encoder", "decoder": "decoder"}
    positions_follow_mask = False

    def __init__(self, model, spec, tokenizer, image_processor, processor=None):
        if getattr(model, "enc_to_dec_proj", None) is not None:
            self.projector = ("enc_to_dec_proj", "enc_to_dec_proj")
        super().__init__(model, spec, tokenizer, image_processor, processor)
        cfg, dc = model.config, model.config.decoder
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else dc.bos_token_id
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else dc.eos_token_id
        if start is None or eos is None:
            raise BackboneLoadError(f"{spec}: the config names no decoder_start_token_id or eos_token_id")
        self.start_id, self.eos_id = int(start), int(eos)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else dc.pad_token_id
        if pad is not None:
            self.pad_id = int(pad)

    def _projector_blocks(self):
        if not self.projector:
            return []
        lin: Any = _unwrap(self.model.enc_to_dec_proj)
        n_in, n_out = int(lin.in_features), int(lin.out_features)
        b = Block("projector", 0, "enc_to_dec_proj", n_out)
        b.sites["mlp.fc1"] = Site(
            "projector", 0, "mlp.fc1", "enc_to_dec_proj", "enc_to_dec_proj", "linear", n_in, n_out
        )
        return [b]

    def memory(self, flat):
        return self.model.encoder(pixel_values=flat).last_hidden_state

    def decoder_logits(self, ids, mask, mem, mem_mask):
        return self.model(
            encoder_outputs=(mem,), decoder_input_ids=ids, decoder_attention_mask=mask, use_cache=False
        ).logits

    def decoder_generate(self, ids, mask, mem, mem_mask, **kw):
        from transformers.modeling_outputs import BaseModelOutput

        out = self.model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=mem),
            decoder_input_ids=ids,
            decoder_attention_mask=mask,
            **kw,
        )
        return out[:, ids.shape[1] :]

    def _width(self, tower):
        cfg = self.model.config
        c = cfg.encoder if tower == "vision" else cfg.decoder
        return int(getattr(c, "hidden_size", None) or getattr(c, "d_model", None) or c.n_embd)

    def prefix_width(self):
        return self._width("vision")

    def tower_prefixes(self):
        if self.projector:
            return {
                "vision": ("encoder.",),
                "projector": ("enc_to_dec_proj.", f"{PREFIX_PATH}."),
                "decoder": ("decoder.",),
            }
        return {"vision": ("encoder.",), "decoder": ("decoder.", f"{PREFIX_PATH}.")}


VLM_TYPES: dict[str, type[HFVLMBackbone]] = {
    "llava": LlavaBackbone,
    "idefics3": Idefics3Backbone,
    "smolvlm": Idefics3Backbone,
    "blip": BlipBackbone,
    "vision-encoder-decoder": VisionEncoderDecoderBackbone,
}


def _parts(src: str, model_type: str):
    """(processor or None, image processor, tokenizer) saved in `src`."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    processor = None
    try:
        processor = AutoProcessor.from_pretrained(src)
    except ImportError as exc:
        raise BackboneLoadError(
            f"the {model_type} processor in {src} needs a package that is not installed: {exc}",
            hint="pip install it (SmolVLM's processor needs num2words)",
        ) from None
    except Exception:  # no processor_config.json: image processor and tokenizer saved apart
        processor = None
    images = getattr(processor, "image_processor", None)
    tokenizer = getattr(processor, "tokenizer", None)
    try:
        images = images or AutoImageProcessor.from_pretrained(src)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(src)
    except Exception as exc:
        raise BackboneLoadError(
            f"could not load the image processor or tokenizer in {src}: {exc}",
            hint="save_pretrained() the model's processor (or its image processor and tokenizer) "
            "into the same directory",
        ) from None
    if model_type in ("llava", "idefics3", "smolvlm") and not hasattr(processor, "replace_image_token"):
        raise BackboneLoadError(
            f"{src} holds no {model_type} processor (processor_config.json)",
            hint="save the model's AutoProcessor into the directory with save_pretrained()",
        )
    return (processor if hasattr(processor, "image_processor") else None), images, tokenizer


def load_hf_vlm(spec: str, src: str, model_type: str, device: str | None = None) -> HFVLMBackbone:
    """A transformers VLM directory (see the module docstring) as a generative backbone."""
    from transformers import AutoModelForImageTextToText, BlipForConditionalGeneration, VisionEncoderDecoderModel

    cls = VLM_TYPES[model_type]
    auto: Any = {"blip": BlipForConditionalGeneration, "vision-encoder-decoder": VisionEncoderDecoderModel}.get(
        model_type, AutoModelForImageTextToText
    )
    try:
        model = auto.from_pretrained(src, use_safetensors=True)
    except Exception as exc:
        raise BackboneLoadError(f"could not load the {model_type} model in {src}: {exc}") from None
    processor, images, tokenizer = _parts(src, model_type)
    model.eval()
    bb = cls(model, spec, tokenizer, images, processor)
    if device:
        bb.to(device)
    return bb
