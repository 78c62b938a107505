"""The ONNX graphs of a generative export (`vlkit.export.generative`), traced with `torch.onnx.export`.

Each graph wraps one piece that a generative backbone exposes for export (`GenerativeBackbone.visual_tokens`,
`encode`, `decode`, `prefill`, `step`: the family-specific model calls live in the backbone classes), with the
language model's key-value cache as flat tensors in and out:

- `vision.onnx`: `pixel_values` [batch, 3, S, S] -> `visual_tokens` [batch, T, D]: the images as the LM takes them
  (a `vl:` backbone's projected patch tokens, an image-token VLM's projected image features, a cross-attention
  VLM's memory)
- seq2seq LMs (`export_lm` "seq2seq": T5, BART):
  - `encoder.onnx`: `visual_tokens`, `input_ids` [batch, L], `attention_mask` [batch, L] ->
    `encoder_hidden_states` [batch, T', D], `encoder_attention_mask` [batch, T']
  - `decoder.onnx`, the first step: `input_ids` [batch, 1] (the decoder start token), `encoder_hidden_states`,
    `encoder_attention_mask` -> `logits` [batch, 1, V] and `present.{self|cross}.{layer}.{key|value}`
  - `decoder_with_past.onnx`, every later step: `input_ids` [batch, 1], `encoder_hidden_states`,
    `encoder_attention_mask`, `past.{self|cross}.{layer}.{key|value}` -> `logits` and `present.self.*`
- causal LMs (`export_lm` "causal": GPT-2, Llama-style, LLaVA, Idefics3/SmolVLM, and with `cross_attention` the
  decoders of BLIP and vision-encoder-decoder models):
  - `prefill.onnx`: `visual_tokens`, `input_ids`, `attention_mask` -> the last position's `logits`, the
    `full_attention_mask`, the `last_position` and `present.self.{layer}.{key|value}` (and `present.cross.*`
    where the decoder cross-attends to the visual tokens)
  - `decoder_with_past.onnx`: `input_ids` [batch, 1], `attention_mask` (the full mask and a 1 per step),
    `position_ids` [batch, 1] (the last position + 1 per step), `visual_tokens` (cross-attention decoders, where
    the graph reads them), `past.*` -> `logits` and `present.self.*` (the cross keys and values are the
    prefill's throughout)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError
from .onnx_export import _quiet_export


def _caches():
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    return DynamicCache, EncoderDecoderCache


def make_cache(layers: int, past: Sequence[torch.Tensor], cross: bool) -> Any:
    """A transformers cache from flat past tensors (per layer: self key, value, and with `cross` the
    cross-attention key, value); empty without `past`."""
    dynamic, enc_dec = _caches()
    per = 4 if cross else 2
    own = dynamic([(past[per * i], past[per * i + 1]) for i in range(layers)]) if past else dynamic()
    if not cross:
        return own
    other = dynamic([(past[per * i + 2], past[per * i + 3]) for i in range(layers)]) if past else dynamic()
    return enc_dec(own, other)


def flat_cache(cache: Any, layers: int, cross: bool) -> list[torch.Tensor]:
    """Per layer the self-attention key and value, and with `cross` the cross-attention key and value."""
    own = getattr(cache, "self_attention_cache", cache)
    out: list[torch.Tensor] = []
    for i in range(layers):
        out += [own.layers[i].keys, own.layers[i].values]
        if cross:
            layer = cache.cross_attention_cache.layers[i]
            out += [layer.keys, layer.values]
    return out


class VisionGraph(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.bb = backbone

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.bb.visual_tokens(pixel_values)


class EncoderGraph(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.bb = backbone

    def forward(self, visual_tokens, input_ids, attention_mask):
        return self.bb.encode(visual_tokens, input_ids, attention_mask)


class DecoderGraph(nn.Module):
    """seq2seq: one decoder step; with `with_past`, the keys and values of the earlier steps come in as inputs."""

    def __init__(self, backbone, layers: int, with_past: bool):
        super().__init__()
        self.bb = backbone
        self.layers, self.with_past = layers, with_past

    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask, *past):
        cache = make_cache(self.layers, past if self.with_past else (), cross=True)
        logits, cache = self.bb.decode(input_ids, encoder_hidden_states, encoder_attention_mask, cache)
        return (logits, *flat_cache(cache, self.layers, cross=not self.with_past))


class PrefillGraph(nn.Module):
    """causal: the whole prompt, positions as `generate` numbers them, the last position's logits and every
    layer's keys and values."""

    def __init__(self, backbone, layers: int):
        super().__init__()
        self.bb, self.layers = backbone, layers

    def forward(self, visual_tokens, input_ids, attention_mask):
        cross = self.bb.cross_attention
        cache = make_cache(self.layers, (), cross)
        logits, mask, last, cache = self.bb.prefill(visual_tokens, input_ids, attention_mask, cache)
        return (logits, mask, last, *flat_cache(cache, self.layers, cross))


class StepGraph(nn.Module):
    """causal, every later step: the last token at its position, the mask so far, (the visual tokens,) the past."""

    def __init__(self, backbone, layers: int):
        super().__init__()
        self.bb, self.layers = backbone, layers

    def forward(self, input_ids, attention_mask, position_ids, *rest):
        cross = self.bb.cross_attention
        visual, past = (rest[0], rest[1:]) if cross else (None, rest)
        cache = make_cache(self.layers, past, cross)
        logits, cache = self.bb.step(input_ids, attention_mask, position_ids, visual, cache)
        return (logits, *flat_cache(cache, self.layers, cross=False))


def kv_names(layers: int, prefix: str, cross: bool = True) -> list[str]:
    parts = ("self", "cross") if cross else ("self",)
    return [f"{prefix}.{p}.{i}.{k}" for i in range(layers) for p in parts for k in ("key", "value")]


def _export(
    module: nn.Module,
    inputs: tuple,
    path: Path,
    names: list[str],
    outputs: list[str],
    axes: dict[str, dict[int, str]],
    opset: int,
) -> None:
    import onnx

    module.eval()
    try:
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(
                module,
                inputs,
                str(path),
                dynamo=False,
                input_names=names,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
            )
        onnx.checker.check_model(str(path))
    except Exception as exc:  # tracing / symbolic errors of arbitrary type
        raise ExportError(
            f"could not export the {path.stem} graph to ONNX: {type(exc).__name__}: {exc}",
            hint="an adapter variant may use an operation without an ONNX form",
        ) from None


def causal_specs(backbone, example: dict[str, torch.Tensor], vis: torch.Tensor, layers: int) -> list[tuple]:
    """The prefill and step graphs of a causal LM, with example inputs traced from `example`."""
    cross = bool(backbone.cross_attention)
    prefill, step = PrefillGraph(backbone, layers).eval(), StepGraph(backbone, layers).eval()
    with torch.no_grad():
        _, mask, last, *present = prefill(vis, example["input_ids"], example["attention_mask"])
    n = vis.shape[0]
    one = torch.ones(n, 1, dtype=mask.dtype)
    names = kv_names(layers, "past", cross)
    kv_in = {k: {0: "batch", 2: "source" if ".cross." in k else "past"} for k in names}
    own_out = kv_names(layers, "present", False)
    prefill_out = {
        k: {0: "batch", 2: "source" if ".cross." in k else "sequence"} for k in kv_names(layers, "present", cross)
    }
    seen = ["visual_tokens"] if cross else []
    return [
        (
            "prefill",
            prefill,
            (vis, example["input_ids"], example["attention_mask"]),
            ["visual_tokens", "input_ids", "attention_mask"],
            ["logits", "full_attention_mask", "last_position", *prefill_out],
            {
                "visual_tokens": {0: "batch"},
                "input_ids": {0: "batch", 1: "prompt"},
                "attention_mask": {0: "batch", 1: "prompt"},
                "logits": {0: "batch"},
                "full_attention_mask": {0: "batch", 1: "sequence"},
                "last_position": {0: "batch"},
                **prefill_out,
            },
        ),
        (
            "decoder_with_past",
            step,
            (
                torch.ones(n, 1, dtype=torch.long),
                torch.cat([mask, one], 1),
                last + 1,
                *([vis] if cross else []),
                *present,
            ),
            ["input_ids", "attention_mask", "position_ids", *seen, *names],
            ["logits", *own_out],
            {
                "input_ids": {0: "batch"},
                "attention_mask": {0: "batch", 1: "past_and_one"},
                "position_ids": {0: "batch"},
                **{k: {0: "batch"} for k in seen},
                "logits": {0: "batch"},
                **kv_in,
                **{k: {0: "batch", 2: "past_and_one"} for k in own_out},
            },
        ),
    ]


def seq2seq_specs(backbone, example: dict[str, torch.Tensor], vis: torch.Tensor, layers: int) -> list[tuple]:
    """The encoder, first decoder step and decoder-with-past graphs of a seq2seq LM."""
    b = {0: "batch"}
    encoder = EncoderGraph(backbone).eval()
    first, later = DecoderGraph(backbone, layers, False).eval(), DecoderGraph(backbone, layers, True).eval()
    with torch.no_grad():
        hidden, mask = encoder(vis, example["input_ids"], example["attention_mask"])
        start = torch.full((vis.shape[0], 1), int(backbone.generation_settings()["start"]), dtype=torch.long)
        present = first(start, hidden, mask)[1:]
        step = torch.full_like(start, 1)
    enc_axes = {"encoder_hidden_states": {0: "batch", 1: "source"}, "encoder_attention_mask": {0: "batch", 1: "source"}}
    kv_axes = {n: {0: "batch", 2: "source" if ".cross." in n else "past"} for n in kv_names(layers, "past")}
    out_axes = {n: {0: "batch", 2: "source" if ".cross." in n else "past_and_one"} for n in kv_names(layers, "present")}
    return [
        (
            "encoder",
            encoder,
            (vis, example["input_ids"], example["attention_mask"]),
            ["visual_tokens", "input_ids", "attention_mask"],
            ["encoder_hidden_states", "encoder_attention_mask"],
            {
                "visual_tokens": b,
                "input_ids": {0: "batch", 1: "prompt"},
                "attention_mask": {0: "batch", 1: "prompt"},
                **enc_axes,
            },
        ),
        (
            "decoder",
            first,
            (start, hidden, mask),
            ["input_ids", "encoder_hidden_states", "encoder_attention_mask"],
            ["logits", *kv_names(layers, "present")],
            {
                "input_ids": b,
                "logits": b,
                **enc_axes,
                **{n: {0: "batch", 2: "source" if ".cross." in n else "one"} for n in kv_names(layers, "present")},
            },
        ),
        (
            "decoder_with_past",
            later,
            (step, hidden, mask, *present),
            ["input_ids", "encoder_hidden_states", "encoder_attention_mask", *kv_names(layers, "past")],
            ["logits", *kv_names(layers, "present", cross=False)],
            {
                "input_ids": b,
                "logits": b,
                **enc_axes,
                **kv_axes,
                **{k: v for k, v in out_axes.items() if ".self." in k},
            },
        ),
    ]


def write_graphs(backbone, staging: Path, example: dict[str, torch.Tensor], opset: int) -> list[dict[str, Any]]:
    """Trace the vision graph and the LM's graphs into `staging` from `example` (pixel_values, input_ids,
    attention_mask with padding, so masking is traced); returns their file entries."""
    layers = int(backbone.generation_settings()["layers"])
    b = {0: "batch"}
    vision = VisionGraph(backbone).eval()
    with torch.no_grad():
        vis = vision(example["pixel_values"])
    lm = (causal_specs if backbone.export_lm == "causal" else seq2seq_specs)(backbone, example, vis, layers)
    specs = [
        (
            "vision",
            vision,
            (example["pixel_values"],),
            ["pixel_values"],
            ["visual_tokens"],
            {"pixel_values": b, "visual_tokens": b},
        ),
        *lm,
    ]
    files = []
    for name, module, inputs, in_names, out_names, axes in specs:
        _export(module, inputs, staging / f"{name}.onnx", in_names, out_names, axes, opset)
        files.append(
            {"graph": name, "precision": "fp32", "file": f"{name}.onnx", "inputs": in_names, "outputs": out_names}
        )
    return files


__all__ = ["write_graphs", "kv_names", "make_cache", "flat_cache"]
