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
transformers model's own module paths, which is what PEFT's `target_modules` names. The structure they share
(block layouts, the base class) is in `vlkit.backbones.hf_vlm_base`.

ONNX export (`vlkit export`, `vlkit.export.generative_graphs`): every family is a causal decoder with a key-value
cache. `visual_tokens` is the vision graph (image-token models: the projected image features, which the prefill
merges in place of the image tokens; cross-attention models: the decoder's memory, whose keys and values the
prefill caches for every later step). LLaVA's image features are computed as one tensor (its `get_image_features`
returns a list per image) and Idefics3/SmolVLM's patch positions once, from the model's own code (their bucketize
has no faithful ONNX form), so that both trace; `tests/test_hf_vlm_export.py` holds them to the models' own.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from typing import Any

import torch

from ..errors import BackboneLoadError, ConfigError
from .base import Block, Site
from .generative import as_image_batch, mask_positions, output_cache
from .hf_vlm_base import PREFIX_PATH, HFVLMBackbone, _unwrap


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

    def visual_tokens(self, pixels):
        """(B, K·N, D): the projected features of each example's K images, in a row."""
        flat, k = as_image_batch(pixels)
        feats = self.image_features(flat)
        return feats.reshape(pixels.shape[0], k * feats.shape[1], feats.shape[2])

    def _merge(self, visual, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM's input embeddings: the image features in place of the image tokens, through the prefix site."""
        embeds = self.model.get_input_embeddings()(ids)
        where = (ids == self.image_token_id).unsqueeze(-1)
        if not torch.jit.is_tracing() and int(where.sum()) != visual.shape[0] * visual.shape[1]:
            raise ConfigError(
                f"the prompts hold {int(where.sum())} image tokens for {visual.shape[0]} example(s) of "
                f"{visual.shape[1]} image tokens"
            )
        embeds = embeds.masked_scatter(where, visual.to(embeds.dtype).reshape(-1, visual.shape[-1]))
        embeds2 = getattr(self.model, PREFIX_PATH)(embeds)
        extra = embeds2.shape[1] - embeds.shape[1]
        if extra:
            mask = torch.cat([torch.ones(mask.shape[0], extra, dtype=mask.dtype, device=mask.device), mask], 1)
        return embeds2, mask

    def _embeds(self, pixels, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
        return self._merge(self.visual_tokens(pixels), ids, mask)

    def _token_logits(self, pixels, prompts, targets):
        _, k = as_image_batch(pixels)
        ids, mask, labels = self._teacher_forced(self._prompt_ids(prompts, k), targets, pixels.device)
        embeds, mask2 = self._embeds(pixels, ids, mask)
        logits = self.model(inputs_embeds=embeds, attention_mask=mask2, use_cache=False).logits
        return logits[:, logits.shape[1] - ids.shape[1] :], labels

    def generate_ids(self, pixels, prompts, *, max_new_tokens=20, num_beams=1, logits=False):
        _, k = as_image_batch(pixels)
        ids, mask = self._pad(self._prompt_ids(list(prompts), k), True, pixels.device)
        embeds, mask = self._embeds(pixels, ids, mask)
        kw = self._gen_kwargs(max_new_tokens, num_beams, logits)
        return self._generated(self.model.generate(inputs_embeds=embeds, attention_mask=mask, **kw), 0, logits)

    # --- export: a prefill over the merged embeddings, then one token a step ------------------------------
    prompt_format = (
        "the prompt in the model's format (its chat template with one image), the image token expanded as the "
        "processor expands it, tokenized, padded on the left (tokenizer/ holds the processor)"
    )

    def prompt_tokens(self, prompts):
        return self._pad(self._prompt_ids(list(prompts), 1), True, torch.device("cpu"))

    def prefill(self, visual, ids, mask, cache):
        embeds, mask = self._merge(visual, ids, mask)
        positions = mask_positions(mask)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        return out.logits[:, -1:], mask, positions[:, -1:], output_cache(out)

    def step(self, ids, mask, positions, visual, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        return out.logits, output_cache(out)


class LlavaBackbone(ImageTokenVLM):
    stacks = {"vision": "model.vision_tower", "decoder": "model.language_model"}
    projector = (
        "model.multi_modal_projector.linear_1",
        "model.multi_modal_projector.linear_2",
        "model.multi_modal_projector",
    )

    def image_features(self, flat):
        """What the model's `get_image_features` computes (the configured vision layers, the class token dropped
        for "default", the projector) as one tensor, not its list of one per image: a graph can trace it."""
        cfg, inner = self.model.config, self.model.model
        layers = cfg.vision_feature_layer
        states = inner.vision_tower(flat, output_hidden_states=True).hidden_states
        picked = [states[i] for i in ([layers] if isinstance(layers, int) else layers)]
        if cfg.vision_feature_select_strategy == "default":
            picked = [h[:, 1:] for h in picked]
        return inner.multi_modal_projector(torch.cat(picked, dim=-1))

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

    def __init__(self, model, spec, tokenizer, image_processor, processor):
        super().__init__(model, spec, tokenizer, image_processor, processor)
        self._patch_positions = self._own_patch_positions()

    def _own_patch_positions(self) -> torch.Tensor:
        """(1, N): the position ids the vision embeddings give a whole image of `image_size` (every patch real),
        from the model's own code, once; `image_features` then holds them as constants (that code's bucketize and
        untyped `full` have no faithful ONNX form)."""
        emb = self.model.model.vision_model.embeddings
        seen: list[torch.Tensor] = []
        hook = emb.position_embedding.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        s, n = self.image_size, self.image_size // emb.patch_size
        try:
            with torch.no_grad():
                emb(pixel_values=torch.zeros(1, 3, s, s), patch_attention_mask=torch.ones(1, n, n, dtype=torch.bool))
        finally:
            hook.remove()
        return seen[0].clone()

    def image_features(self, flat):
        """The vision model's own forward for whole images (as vlkit feeds them: one global tile each, every patch
        real), with the position ids of `_own_patch_positions`, then the connector."""
        inner = self.model.model
        vm = inner.vision_model
        if tuple(flat.shape[-2:]) != (self.image_size, self.image_size):
            return inner.connector(vm(pixel_values=flat).last_hidden_state)
        emb = vm.embeddings
        x = emb.patch_embedding(flat).flatten(2).transpose(1, 2)
        x = x + emb.position_embedding(self._patch_positions.to(x.device))
        return inner.connector(vm.post_layernorm(vm.encoder(inputs_embeds=x).last_hidden_state))

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
    def decoder_generate(self, ids, mask, mem, mem_mask, **kw):
        """The decoder's `generate` output (the prompt's ids first)."""
        ...

    @abstractmethod
    def decoder_step(self, ids, mask, positions, mem, cache) -> tuple[torch.Tensor, Any]:
        """(logits, cache): the decoder over `ids` at `positions`, the key-value `cache` filled in place."""
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

    def generate_ids(self, pixels, prompts, *, max_new_tokens=20, num_beams=1, logits=False):
        rows = self._prompt_ids(list(prompts))
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(0 if self.positions_follow_mask else len(r), []).append(i)
        mem, mem_mask = self._memory(pixels)
        kw = self._gen_kwargs(max_new_tokens, num_beams, logits)
        parts = []
        for idx in groups.values():
            ids, mask = self._pad([rows[i] for i in idx], True, pixels.device)
            sel = torch.tensor(idx, device=pixels.device)
            out = self.decoder_generate(ids, mask, mem[sel], mem_mask[sel], **kw)
            parts.append((sel, *self._generated(out, ids.shape[1], logits)))
        if len(parts) == 1:
            return parts[0][1], parts[0][2]
        steps = max(p[1].shape[1] for p in parts)
        tokens = torch.full((len(rows), steps), self.pad_id, dtype=torch.long, device=pixels.device)
        scores = None
        for sel, ids, lg in parts:
            tokens[sel, : ids.shape[1]] = ids
            if lg is not None:
                if scores is None:
                    scores = torch.full((len(rows), steps, lg.shape[-1]), float("nan"), device=pixels.device)
                scores[sel, : lg.shape[1]] = lg
        return tokens, scores

    # --- export: the decoder's prefill over the prompt, then one token a step, cross-attending to the memory --
    cross_attention = True
    prompt_format = "the decoder start token, then the prompt's tokens without special tokens, padded on the left"

    def visual_tokens(self, pixels):
        """(B, K·N, D): the memory the decoder attends to (the vision encoder's tokens, through the prefix site)."""
        return self._memory(pixels)[0]

    def prompt_tokens(self, prompts):
        return self._pad(self._prompt_ids(list(prompts)), True, torch.device("cpu"))

    def prefill(self, visual, ids, mask, cache):
        positions = mask_positions(mask)
        logits, cache = self.decoder_step(ids, mask, positions, visual, cache)
        return logits[:, -1:], mask, positions[:, -1:], cache

    def step(self, ids, mask, positions, visual, cache):
        return self.decoder_step(ids, mask, positions, visual, cache)


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
        return self.model.text_decoder.generate(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=mem, encoder_attention_mask=mem_mask, **kw
        )

    def decoder_step(self, ids, mask, positions, mem, cache):
        out = self.model.text_decoder(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            encoder_hidden_states=mem,
            encoder_attention_mask=torch.ones(mem.shape[:2], dtype=torch.long, device=mem.device),
            cache=cache,
            use_cache=True,
        )
        return out.logits, output_cache(out)

    @property
    def generation_config(self):
        return self.model.text_decoder.generation_config

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
        self._decoder_positions = "position_ids" in inspect.signature(model.decoder.forward).parameters
        if not self._decoder_positions:  # a padded batch would shift its rows' positions: verify one length
            self.export_prompts = ("",) * 4

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

        return self.model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=mem),
            decoder_input_ids=ids,
            decoder_attention_mask=mask,
            **kw,
        )

    def decoder_step(self, ids, mask, positions, mem, cache):
        """The model's forward; the decoder's positions follow the mask where it takes position ids (a padded row
        then writes as it does alone, as `generate` writes prompts of one length together), else its own."""
        extra = {"decoder_position_ids": positions} if self._decoder_positions else {}
        out = self.model(
            encoder_outputs=(mem,),
            decoder_input_ids=ids,
            decoder_attention_mask=mask,
            cache=cache,
            use_cache=True,
            **extra,
        )
        return out.logits, output_cache(out)

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
