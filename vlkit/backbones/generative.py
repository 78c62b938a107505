"""The interface of generative vision-language backbones: images and a text prompt in, text out.

A `GenerativeBackbone` is what VL-T5 / VL-BART, LLaVA, SmolVLM, BLIP and vision-encoder-decoder models have in
common for vlkit: a frozen model with adapter sites in each of its parts (`towers`), a teacher-forced loss, the
log-probability of given answers, and generation. The adapter machinery (sites, hosts, the owner
`vlkit.AdaptedModel`) is the same as for the contrastive `Backbone`s; tasks that generate (captioning, open-ended
VQA, GQA, NLVR2) call only the methods below.

Inputs: `pixels` is (B, 3, H, W) for one image per example, or (B, K, 3, H, W) for K images (NLVR2's pairs);
`prompts` and `targets` are lists of B strings.
"""

from __future__ import annotations

import hashlib
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import Block, own_or_default_transform
from .hosts import base_param_name
from .state import AdapterState

GENERATIVE_TOWERS = ("vision", "projector", "encoder", "decoder")


class GenerativeBackbone(nn.Module, metaclass=ABCMeta):
    """A vision-language model that writes text. Subclasses set `model`, `spec`, `family`, `towers`, implement
    the three model calls and describe their blocks."""

    family: str = "generative"
    kind: str = "generative"
    towers: tuple[str, ...] = GENERATIVE_TOWERS
    tower_aliases: dict[str, tuple[str, ...]] = {}
    """Names that stand for several towers in `towers:` options; `both` and `all` are every tower, `lm` the
    language model's towers."""
    image_size: int = 224
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    max_length: int = 64
    """Longest prompt or target, in tokens, the backbone reads (longer ones are cut)."""

    def __init__(self, model: nn.Module, spec: str):
        super().__init__()
        self.model: Any = model  # the family's own model class: its attributes differ per family
        self.spec = spec
        self.adapter_state = AdapterState()
        self._fingerprint = self._compute_fingerprint()

    # --- the model calls --------------------------------------------------------------------------------
    @abstractmethod
    def loss(self, pixels: torch.Tensor, prompts: list[str], targets: list[str]) -> torch.Tensor:
        """Mean token cross-entropy of `targets` given the images and `prompts` (teacher forcing)."""

    @abstractmethod
    def sequence_logprob(self, pixels: torch.Tensor, prompts: list[str], targets: list[str]) -> torch.Tensor:
        """(B,) summed log-probability of each target given its images and prompt."""

    @abstractmethod
    def generate(
        self, pixels: torch.Tensor, prompts: list[str], *, max_new_tokens: int = 20, num_beams: int = 1
    ) -> list[str]:
        """Greedy (num_beams 1) or beam-search answers, batched, with the key-value cache."""

    def answer_probability(self, pixels: torch.Tensor, prompts: list[str], answer: str = "Yes") -> torch.Tensor:
        """(B,) probability of `answer` as the whole reply (VQAScore's P("Yes" | image, question))."""
        return self.sequence_logprob(pixels, prompts, [answer] * len(prompts)).exp()

    # --- the pieces `vlkit export` traces into ONNX graphs (vlkit/export/generative_graphs.py) -------------
    export_lm: str | None = None
    """How generation splits into graphs: "seq2seq" (`encode` reads the visual tokens and the prompt, `decode` writes
    from the decoder start token), "causal" (`prefill` reads the prompt, `step` writes one token at a time); None:
    the backbone does not export."""
    cross_attention: bool = False
    """Whether a causal decoder cross-attends to the visual tokens: its cache then holds cross-attention keys and
    values too (a transformers `EncoderDecoderCache`), filled by `prefill`, read by every `step`."""
    export_prompts: tuple[str, ...] | None = None
    """Prompts the export is verified with where the exporter's own do not suit the model."""
    prompt_format: str = ""
    """How a prompt becomes `prompt_tokens`' ids, in words (export.json records it)."""

    def _not_exported(self) -> ConfigError:
        return ConfigError(f"ONNX export of {self.spec} ({type(self).__name__}) is not supported")

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, T, D): the images as the language model takes them (its input tokens or its memory)."""
        raise self._not_exported()

    def prompt_tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of `prompts` as generation batches them (what the prompt graphs take)."""
        raise self._not_exported()

    def encode(self, visual: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """seq2seq: (encoder states, their mask)."""
        raise self._not_exported()

    def decode(self, ids: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[Any, Any]:
        """seq2seq: one decoder step over `cache` (filled in place): (logits, cache)."""
        raise self._not_exported()

    def prefill(self, visual: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[Any, ...]:
        """causal: the whole prompt into `cache`: (the last position's logits, the full attention mask, the last
        position id, cache), positions numbered as `generate` numbers them."""
        raise self._not_exported()

    def step(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, visual: torch.Tensor, cache: Any):
        """causal: the next token at `positions`, the mask so far: (logits, cache)."""
        raise self._not_exported()

    def generate_ids(
        self, pixels: torch.Tensor, prompts: list[str], *, max_new_tokens: int = 20, num_beams: int = 1, logits=False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The token ids `generate` decodes, (B, steps): led by the decoder start token for a seq2seq LM, padded after
        the end; with `logits` also each step's raw logits (B, steps, V; NaN where a row's batch had stopped)."""
        raise self._not_exported()

    def generation_settings(self) -> dict[str, Any]:
        """{"config": the generation config `generate` runs under, "start": the decoder start token (seq2seq) or
        None, "eos": end tokens, "pad": the pad token, "layers": decoder layers, and where a causal decoder's
        prompt begins with a start token, "prompt_start": that token}."""
        raise self._not_exported()

    def save_prompt_files(self, directory: str) -> None:
        """Save what turns prompts into `prompt_tokens` and answers into text (tokenizer, processor)."""
        raise self._not_exported()

    # --- inputs -----------------------------------------------------------------------------------------
    @property
    def image_transform(self) -> Callable:
        """The backbone's own eval transform: a PIL image (any mode) to a normalised (3, S, S) tensor."""
        return own_or_default_transform(self)

    def preprocess(self, image) -> torch.Tensor:
        return self.image_transform(image)

    def preprocess_batch(self, images) -> torch.Tensor:
        return torch.stack([self.preprocess(im) for im in images])

    # --- structure --------------------------------------------------------------------------------------
    @abstractmethod
    def blocks(self, tower: str) -> list[Block]: ...

    @abstractmethod
    def tower_prefixes(self) -> dict[str, tuple[str, ...]]: ...

    def resolve_towers(self, choice: str) -> tuple[str, ...]:
        """The towers an adapter's `towers:` option names on this backbone."""
        aliases = {"both": self.towers, "all": self.towers, **self.tower_aliases}
        if choice in aliases:
            return tuple(aliases[choice])
        if choice in self.towers:
            return (choice,)
        raise ConfigError(f"towers must be one of {', '.join([*aliases, *self.towers])} on {self.spec}, got {choice!r}")

    def all_blocks(self) -> list[Block]:
        return [b for t in self.towers for b in self.blocks(t)]

    def sequence_layout(self, tower: str):
        return None

    def activation_key(self) -> str:
        st = self.adapter_state
        return repr((st.active, st.mode, sorted(st.weights.items()), st.fusion))

    def joint_active(self) -> bool:
        return False

    def fingerprint(self) -> str:
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256(self.family.encode())
        for name, p in sorted(self.model.state_dict().items()):
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        return h.hexdigest()[:16]

    def base_parameters(self) -> dict[str, nn.Parameter]:
        return {
            base_param_name(n): p
            for n, p in self.model.named_parameters()
            if ".adapters." not in n and ".fusions." not in n
        }

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "family": self.family,
            "kind": self.kind,
            "towers": list(self.towers),
            "image_size": self.image_size,
            "max_length": self.max_length,
            "fingerprint": self.fingerprint(),
        }


def as_image_batch(pixels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B·K, 3, H, W) and K from (B, 3, H, W) or (B, K, 3, H, W)."""
    if pixels.dim() == 4:
        return pixels, 1
    if pixels.dim() == 5:
        b, k = pixels.shape[:2]
        return pixels.reshape(b * k, *pixels.shape[2:]), k
    raise ConfigError(f"images must be (B, 3, H, W) or (B, K, 3, H, W), got shape {tuple(pixels.shape)}")


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' `generate` numbers a padded prompt: the mask's running count from 0, padding
    at 0."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def output_cache(out) -> Any:
    """The key-value cache a transformers model call returned (`cache`, formerly `past_key_values`)."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token `logits` (B, T, V) at `labels` (B, T), -100 where no target token."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def target_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probability of the target tokens `labels` (B, T) under next-token `logits` (B, T, V);
    -100 labels do not count."""
    logp = logits.float().log_softmax(-1)
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * (labels != -100)).sum(-1)
