"""`vlkit export` of a generative `vl:` backbone (a vision tower, a projector and a T5, BART, GPT-2 or Llama-style
LM): ONNX graphs that generate text without PyTorch, checked against onnxruntime by generating the same tokens.

Files (in the output directory):

- `vision.onnx`: `pixel_values` [batch, 3, S, S] -> `visual_tokens` [batch, N, D] (vision tower and projector;
  an example of K images concatenates its K rows of tokens along N)
- encoder-decoder LMs:
  - `encoder.onnx`: `visual_tokens`, `input_ids` [batch, L], `attention_mask` [batch, L] (the prompt's tokens and
    mask) -> `encoder_hidden_states` [batch, T, D], `encoder_attention_mask` [batch, T] (visual tokens, any
    prompt-tuning prefix and the prompt, through the LM's encoder)
  - `decoder.onnx`, the first step: `input_ids` [batch, 1] (the decoder start token), `encoder_hidden_states`,
    `encoder_attention_mask` -> `logits` [batch, 1, V] and `present.{self|cross}.{layer}.{key|value}`
  - `decoder_with_past.onnx`, every later step: `input_ids` [batch, 1] (the last token), `encoder_hidden_states`,
    `encoder_attention_mask`, `past.{self|cross}.{layer}.{key|value}` -> `logits` and `present.self.*` (the
    cross keys and values are the first step's throughout)
- decoder-only LMs:
  - `prefill.onnx`: `visual_tokens`, `input_ids`, `attention_mask` -> the last position's `logits`, the
    `full_attention_mask`, the `last_position` and `present.self.{layer}.{key|value}` (each row's padding first,
    as the backbone batches it, and positions the mask's running count, as transformers' `generate` numbers them)
  - `decoder_with_past.onnx`: `input_ids` [batch, 1], `attention_mask` (the full mask and a 1 per step),
    `position_ids` [batch, 1] (the last position + 1 per step), `past.self.*` -> `logits` and `present.self.*`
- `tokenizer/` (the LM's tokenizer) and `export.json` (graphs, generation settings, preprocessing, checks)

`onnx_generate` is greedy generation with these sessions (the KV cache in numpy), as transformers' `generate`
does it: finished rows continue with the pad token until every row has ended or `max_new_tokens` is reached;
forced first and last tokens (BART's forced EOS) as its logits processors force them.
Verification: fresh seeded images with several prompts; PyTorch (adapters as vlkit runs them, unmerged) and
onnxruntime (adapters merged where exact) must generate the same tokens end to end, the per-step logits must
agree, and so must the visual tokens and the encoder states (the encoder given PyTorch's visual tokens), each
within `TOLERANCE` of the largest magnitude of the reference.

Why not `optimum-onnx`: its release (0.1.0) requires transformers < 4.58 (vlkit runs on 5.x), and it exports a
hub checkpoint's own architecture, not a vision tower and projector feeding the LM's input embeddings with
adapters inside, so the graphs here are traced with `torch.onnx.export` (TorchScript exporter) as optimum's are.
transformers VLMs (`hf:` LLaVA, SmolVLM, BLIP, ...) are not exported.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..adapters.model import AdaptedModel
from ..backbones.composed import pads_first
from ..errors import ConfigError, ExportError
from ..io import write_json
from .base import Check
from .model import load_sources, merge_where_possible
from .onnx_export import DEFAULT_OPSET, MIN_OPSET, _quiet_export
from .verify import make_session, max_abs_diff, resolve_providers

PROMPTS = (
    "caption:",
    "vqa: what color is the circle ?",
    "gqa: is the square left of the triangle ?",
    "nlvr: there is a red circle",
)
VERIFY_NEW_TOKENS = 12
TOLERANCE = 1e-3  # visual tokens, encoder states and logits, fp32, relative to the reference's largest magnitude
FORMAT = "vlkit.export.generative"
FORMAT_VERSION = 1


def _caches():
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    return DynamicCache, EncoderDecoderCache


class VisionGraph(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.bb = backbone

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.bb.visual_tokens(pixel_values)


def lm_inputs(model, visual_tokens, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM's input embeddings [visual tokens; prompt] through the prefix site, and their mask (as the
    backbone's `_inputs` builds them from strings)."""
    text = model.lm.get_input_embeddings()(input_ids)
    embeds = torch.cat([visual_tokens.to(text.dtype), text], dim=1)
    ones = torch.ones(visual_tokens.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
    mask = torch.cat([ones, attention_mask], dim=1)
    embeds2 = model.prefix(embeds)
    extra = embeds2.shape[1] - embeds.shape[1]
    if extra:
        lead = torch.ones(mask.shape[0], extra, dtype=mask.dtype, device=mask.device)
        mask = torch.cat([lead, mask], dim=1)
    return embeds2, mask


class EncoderGraph(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.bb = backbone

    def forward(self, visual_tokens, input_ids, attention_mask):
        embeds, mask = lm_inputs(self.bb.model, visual_tokens, input_ids, attention_mask)
        hidden = self.bb.model.lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return hidden, mask


class PrefillGraph(nn.Module):
    """Decoder-only LMs, the first step: the whole input sequence, positions as `generate` numbers them (the
    mask's running count), the last position's logits and every layer's keys and values."""

    def __init__(self, backbone, layers: int):
        super().__init__()
        self.bb, self.layers = backbone, layers

    def forward(self, visual_tokens, input_ids, attention_mask):
        dynamic, _ = _caches()
        embeds, mask = pads_first(*lm_inputs(self.bb.model, visual_tokens, input_ids, attention_mask))
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = self.bb.model.lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=dynamic(),
            use_cache=True,
            return_dict=True,
        )
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        flat = [t for layer in cache.layers[: self.layers] for t in (layer.keys, layer.values)]
        return (out.logits[:, -1:], mask, positions[:, -1:], *flat)


class StepGraph(nn.Module):
    """Decoder-only LMs, every later step: the last token at its position, the mask so far, the past."""

    def __init__(self, backbone, layers: int):
        super().__init__()
        self.bb, self.layers = backbone, layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        dynamic, _ = _caches()
        cache = dynamic([(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        out = self.bb.model.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            return_dict=True,
        )
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        flat = [t for layer in cache.layers[: self.layers] for t in (layer.keys, layer.values)]
        return (out.logits, *flat)


class DecoderGraph(nn.Module):
    """One decoder step; with `with_past`, the keys and values of the earlier steps come in as inputs."""

    def __init__(self, backbone, layers: int, with_past: bool):
        super().__init__()
        self.bb = backbone
        self.layers, self.with_past = layers, with_past

    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask, *past):
        dynamic, enc_dec = _caches()
        if self.with_past:
            own = dynamic([(past[4 * i], past[4 * i + 1]) for i in range(self.layers)])
            cross = dynamic([(past[4 * i + 2], past[4 * i + 3]) for i in range(self.layers)])
            cache = enc_dec(own, cross)
        else:
            cache = enc_dec(dynamic(), dynamic())
        out = self.bb.model.lm(
            encoder_outputs=(encoder_hidden_states,),
            attention_mask=encoder_attention_mask,
            decoder_input_ids=input_ids,
            cache=cache,
            use_cache=True,
            return_dict=True,
        )
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        flat = []
        for i in range(self.layers):
            own_layer, cross_layer = cache.self_attention_cache.layers[i], cache.cross_attention_cache.layers[i]
            flat += [own_layer.keys, own_layer.values]
            if not self.with_past:
                flat += [cross_layer.keys, cross_layer.values]
        return (out.logits, *flat)


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


def decoder_layers(config) -> int:
    if not getattr(config, "is_encoder_decoder", False):
        return int(config.num_hidden_layers)
    return int(getattr(config, "num_decoder_layers", None) or config.decoder_layers)


def causal_specs(backbone, example: dict[str, torch.Tensor], vis: torch.Tensor, layers: int) -> list[tuple]:
    """The prefill and step graphs of a decoder-only LM, with example inputs traced from `example`."""
    prefill, step = PrefillGraph(backbone, layers).eval(), StepGraph(backbone, layers).eval()
    with torch.no_grad():
        _, mask, last, *present = prefill(vis, example["input_ids"], example["attention_mask"])
    n = vis.shape[0]
    one = torch.ones(n, 1, dtype=mask.dtype)
    names = kv_names(layers, "past", cross=False)
    kv_in = {k: {0: "batch", 2: "past"} for k in names}
    kv_out = {k.replace("past.", "present."): {0: "batch", 2: "past_and_one"} for k in names}
    return [
        (
            "prefill",
            prefill,
            (vis, example["input_ids"], example["attention_mask"]),
            ["visual_tokens", "input_ids", "attention_mask"],
            ["logits", "full_attention_mask", "last_position", *kv_names(layers, "present", cross=False)],
            {
                "visual_tokens": {0: "batch"},
                "input_ids": {0: "batch", 1: "prompt"},
                "attention_mask": {0: "batch", 1: "prompt"},
                "logits": {0: "batch"},
                "full_attention_mask": {0: "batch", 1: "sequence"},
                "last_position": {0: "batch"},
                **{k.replace("past.", "present."): {0: "batch", 2: "sequence"} for k in names},
            },
        ),
        (
            "decoder_with_past",
            step,
            (torch.ones(n, 1, dtype=torch.long), torch.cat([mask, one], 1), last + 1, *present),
            ["input_ids", "attention_mask", "position_ids", *names],
            ["logits", *kv_names(layers, "present", False)],
            {
                "input_ids": {0: "batch"},
                "attention_mask": {0: "batch", 1: "past_and_one"},
                "position_ids": {0: "batch"},
                "logits": {0: "batch"},
                **kv_in,
                **kv_out,
            },
        ),
    ]


def write_graphs(backbone, staging: Path, example: dict[str, torch.Tensor], opset: int) -> list[dict[str, Any]]:
    """Trace the four graphs into `staging` from `example` (pixel_values, input_ids, attention_mask with padding,
    so masking is traced); returns their file entries."""
    layers = decoder_layers(backbone.lm_config)
    b = {0: "batch"}
    vision, encoder = VisionGraph(backbone).eval(), EncoderGraph(backbone).eval()
    first, later = DecoderGraph(backbone, layers, False).eval(), DecoderGraph(backbone, layers, True).eval()
    with torch.no_grad():
        vis = vision(example["pixel_values"])
    if not backbone.seq2seq:
        specs = [
            (
                "vision",
                vision,
                (example["pixel_values"],),
                ["pixel_values"],
                ["visual_tokens"],
                {"pixel_values": b, "visual_tokens": b},
            ),
            *causal_specs(backbone, example, vis, layers),
        ]
        return _write(specs, staging, opset)
    with torch.no_grad():
        hidden, mask = encoder(vis, example["input_ids"], example["attention_mask"])
        start = torch.full((vis.shape[0], 1), int(backbone.lm_config.decoder_start_token_id), dtype=torch.long)
        present = first(start, hidden, mask)[1:]
        step = torch.full_like(start, 1)
    enc_axes = {"encoder_hidden_states": {0: "batch", 1: "source"}, "encoder_attention_mask": {0: "batch", 1: "source"}}
    kv_axes = {n: {0: "batch", 2: "source" if ".cross." in n else "past"} for n in kv_names(layers, "past")}
    out_axes = {n: {0: "batch", 2: "source" if ".cross." in n else "past_and_one"} for n in kv_names(layers, "present")}
    specs = [
        (
            "vision",
            vision,
            (example["pixel_values"],),
            ["pixel_values"],
            ["visual_tokens"],
            {"pixel_values": b, "visual_tokens": b},
        ),
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
    return _write(specs, staging, opset)


def _write(specs: list[tuple], staging: Path, opset: int) -> list[dict[str, Any]]:
    files = []
    for name, module, inputs, in_names, out_names, axes in specs:
        _export(module, inputs, staging / f"{name}.onnx", in_names, out_names, axes, opset)
        files.append(
            {"graph": name, "precision": "fp32", "file": f"{name}.onnx", "inputs": in_names, "outputs": out_names}
        )
    return files


UNSUPPORTED = {
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "repetition_penalty": 1.0,
    "min_length": 0,
    "min_new_tokens": None,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
}


def greedy_settings(generation_config) -> dict[str, int | None]:
    """The forced first and last tokens of the LM's generation config (BART forces EOS at the length limit); a
    setting `onnx_generate` does not reproduce (no_repeat_ngram_size, repetition_penalty, ...) is refused."""
    odd = [
        k
        for k, default in UNSUPPORTED.items()
        if getattr(generation_config, k, default) not in (default, None)
        and not (k == "min_length" and getattr(generation_config, k) == 0)
    ]
    if odd:
        raise ConfigError(
            f"the language model's generation config sets {', '.join(odd)}, which the exported greedy "
            "generation does not reproduce; remove it from generation_config.json to export"
        )
    return {
        "forced_bos": getattr(generation_config, "forced_bos_token_id", None),
        "forced_eos": getattr(generation_config, "forced_eos_token_id", None),
    }


def beam_settings(generation_config) -> dict[str, Any]:
    """The LM's beam-search settings as `generate` applies them (transformers' defaults where unset), for a beam
    search over the exported graphs (`vlkit serve --engine onnx`, `num_beams` above 1)."""
    penalty = getattr(generation_config, "length_penalty", None)
    stopping = getattr(generation_config, "early_stopping", None)
    return {
        "length_penalty": 1.0 if penalty is None else float(penalty),
        "early_stopping": False if stopping is None else stopping,
    }


def onnx_generate(
    sessions: dict[str, Any],
    pixel_values: np.ndarray,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    max_new_tokens: int,
    start: int | None,
    eos: int,
    pad: int,
    forced_bos: int | None = None,
    forced_eos: int | None = None,
    logits: list | None = None,
) -> np.ndarray:
    """Greedy generation with the sessions of an export (see the module docstring), as transformers' `generate`
    does it: (batch, steps) token ids, led by the decoder start token for an encoder-decoder LM, with
    `forced_bos` first and `forced_eos` at the length limit as its logits processors force them. `logits`, when
    given, collects each step's."""
    vis = sessions["vision"].run(None, {"pixel_values": pixel_values.astype(np.float32)})[0]
    prompt = {
        "visual_tokens": vis,
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": attention_mask.astype(np.int64),
    }
    n = len(pixel_values)
    causal = "prefill" in sessions
    if causal:
        first = sessions["prefill"]
        out = first.run(None, prompt)
        mask, position = out[1], out[2]
        kv_from, tokens = 3, []
        enc: dict[str, np.ndarray] = {}
    else:
        hidden, mask = sessions["encoder"].run(None, prompt)
        tokens = [np.full(n, start, dtype=np.int64)]
        enc = {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}
        first = sessions["decoder"]
        out = first.run(None, {"input_ids": tokens[0][:, None], **enc})
        kv_from = 1
    past = {o.name.replace("present.", "past."): v for o, v in zip(first.get_outputs()[kv_from:], out[kv_from:])}
    later = sessions["decoder_with_past"]
    own = [o.name.replace("present.", "past.") for o in later.get_outputs()[1:]]
    done = np.zeros(n, dtype=bool)
    last = int(max_new_tokens) - 1
    for step in range(int(max_new_tokens)):
        step_logits = out[0][:, -1]
        if logits is not None:
            logits.append(step_logits)
        pick = step_logits.argmax(-1)
        if step == 0 and forced_bos is not None:
            pick = np.full(n, forced_bos)
        elif step == last and forced_eos is not None:
            pick = np.full(n, forced_eos)
        nxt = np.where(done, pad, pick).astype(np.int64)
        tokens.append(nxt)
        done |= nxt == eos
        if done.all() or step == last:
            break
        if causal:
            mask = np.concatenate([mask, np.ones((n, 1), dtype=mask.dtype)], axis=1)
            position = position + 1
            feed = {"input_ids": nxt[:, None], "attention_mask": mask, "position_ids": position, **past}
        else:
            feed = {"input_ids": nxt[:, None], **enc, **past}
        out = later.run(None, feed)
        past.update(zip(own, out[1:]))
    return np.stack(tokens, axis=1)


def relative_diff(got: np.ndarray, want: np.ndarray) -> float:
    """Largest absolute difference in units of the reference's largest magnitude (at least 1): merged adapters
    change the float rounding of every weight they fold into, in proportion to the values."""
    return max_abs_diff(got, want) / max(1.0, float(np.abs(want).max()) if want.size else 1.0)


def _prompt_batch(backbone, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(int(seed))
    n = len(PROMPTS)
    ids, mask = backbone._tokens(list(PROMPTS), torch.device("cpu"))
    pixels = torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=g)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}


def _reference(backbone, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """What PyTorch computes, adapters as vlkit runs them: visual tokens, encoder states (encoder-decoder LMs),
    greedy tokens and the raw logits of every step, from the same `generate` call as
    `GenerativeBackbone.generate`."""
    bb, lm, tok = backbone, backbone.model.lm, backbone.tokenizer
    with torch.no_grad():
        vis = bb.visual_tokens(batch["pixel_values"])
        embeds, mask = bb._inputs(batch["pixel_values"], list(PROMPTS))
        out = {"visual_tokens": vis.numpy()}
        if not bb.seq2seq:  # as `generate` batches a decoder-only LM
            embeds, mask = pads_first(embeds, mask)
        if bb.seq2seq:
            hidden = lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            out["encoder_hidden_states"] = hidden.numpy()
        gen = lm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=VERIFY_NEW_TOKENS,
            num_beams=1,
            do_sample=False,
            use_cache=True,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return {**out, "tokens": gen.sequences.numpy(), "logits": torch.stack(gen.logits, dim=1).float().numpy()}


def export_generative(
    output,
    backbone,
    adapters: list[str],
    *,
    options,
    merge: bool = True,
    unload: bool = False,
    given: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export `backbone` (a generative `vl:` backbone) with `adapters` through `output` (a `vlkit.outputs`
    OutputTarget), verified; returns the summary `vlkit export` prints."""
    t0 = time.perf_counter()
    unused = [k for k, v in (given or {}).items() if v not in (None, False)]
    if unused:
        raise ConfigError(
            f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to a generative "
            f"backbone ({backbone.spec}): its export is the fp32 vision, encoder and decoder graphs"
        )
    if not hasattr(backbone, "visual_tokens") or not hasattr(backbone, "seq2seq"):
        raise ConfigError(
            f"ONNX export of {backbone.spec} is not supported: vlkit exports vl: backbones (a vision "
            "tower, a projector and a T5, BART, GPT-2 or Llama-style LM)"
        )
    opset = int(options.opset or DEFAULT_OPSET)
    if opset < MIN_OPSET:
        raise ConfigError(f"--opset must be at least {MIN_OPSET}, got {opset}")
    providers = resolve_providers(options.providers)
    forced = greedy_settings(backbone.model.lm.generation_config)
    if forced["forced_bos"] is not None and not backbone.seq2seq:
        raise ConfigError(
            "the language model's generation config sets forced_bos_token_id, which the exported "
            "greedy generation of a decoder-only LM does not reproduce"
        )
    loaded = (
        load_sources(backbone, adapters)
        if adapters
        else {"names": [], "mode": "stack", "weights": None, "adapters": []}
    )
    batch = _prompt_batch(backbone, int(options.seed or 0))
    ref = _reference(backbone, batch)
    model = AdaptedModel.of(backbone)
    merged = model.merge_and_unload() if unload else merge_where_possible(backbone, enabled=merge)
    for a in loaded["adapters"]:
        a["merged"] = a["name"] in merged
    output.__enter__()
    try:
        staging = output.staging
        try:
            files = write_graphs(backbone, staging, batch, opset)
        finally:
            backbone.eval()
        sessions = {f["graph"]: make_session(staging / f["file"], providers) for f in files}
        cfg = backbone.lm_config
        tok = backbone.tokenizer
        start = int(cfg.decoder_start_token_id) if backbone.seq2seq else None
        gen: dict[str, Any] = {"start": start, "eos": int(tok.eos_token_id), "pad": int(tok.pad_token_id), **forced}
        steps: list[np.ndarray] = []
        px, ids, mask = (batch[k].numpy() for k in ("pixel_values", "input_ids", "attention_mask"))
        got = onnx_generate(sessions, px, ids, mask, max_new_tokens=VERIFY_NEW_TOKENS, logits=steps, **gen)
        vis = sessions["vision"].run(None, {"pixel_values": px})[0]
        same = got.shape == ref["tokens"].shape and bool((got == ref["tokens"]).all())
        mismatched = (
            0.0
            if same
            else float(
                (got[:, : ref["tokens"].shape[1]] != ref["tokens"][:, : got.shape[1]]).sum()
                + abs(got.shape[1] - ref["tokens"].shape[1])
            )
        )
        checks = _checks(backbone, sessions, ref, px, ids, mask, vis, steps, same, mismatched)
        texts = {
            "pytorch": tok.batch_decode(ref["tokens"], skip_special_tokens=True),
            "onnxruntime": tok.batch_decode(got, skip_special_tokens=True),
        }
        worst = max(c.max_abs_diff for c in checks[:-1])
        describe = {
            "backbone": backbone.describe(),
            "adapters": loaded["adapters"],
            "mode": loaded["mode"],
            "weights": loaded["weights"],
            "merged": list(merged),
        }
        manifest = _manifest(backbone, describe, opset, files, gen, forced, checks, texts, ref, got, options)
        summary = {
            "output_dir": str(output.target),
            "target": "onnx",
            "passed": all(c.passed for c in checks),
            "backbone": backbone.spec,
            "adapters": loaded["adapters"],
            "merged": list(merged),
            "files": files,
            "checks": [c.to_dict() for c in checks],
            "scores": [],
            "max_abs_diff": {"fp32": worst},
            "manifest": manifest,
            "notes": [
                f"onnxruntime generated the same {VERIFY_NEW_TOKENS}-token greedy answers as PyTorch for "
                f"{len(PROMPTS)} prompts"
                if same
                else "onnxruntime generated other tokens than PyTorch"
            ],
        }
        failed = [c for c in checks if not c.passed]
        if failed:
            c = failed[0]
            raise ExportError(
                f"{len(failed)} verification check(s) failed: {c.graph} output {c.output} differs "
                f"from PyTorch by {c.max_abs_diff:.3g} (tolerance {c.tolerance:.3g}); nothing was "
                f"written to {output.target}",
                summary=summary,
            )
        tok.save_pretrained(str(staging / "tokenizer"))
        write_json(staging / "export.json", manifest)
        summary["written"] = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        summary["timings"] = {"total": time.perf_counter() - t0}
    except BaseException as exc:
        output.__exit__(type(exc), exc, exc.__traceback__)
        raise
    output.__exit__(None, None, None)
    return summary


def _checks(backbone, sessions, ref, px, ids, mask, vis, steps, same: bool, mismatched: float) -> list[Check]:
    """The export's checks: visual tokens, encoder states (encoder-decoder LMs), every step's logits and the
    generated tokens, each graph run on PyTorch's inputs."""
    step_logits = np.stack(steps, axis=1)
    provider = sessions["vision"].get_providers()[0]
    n = len(PROMPTS)
    checks = [
        Check(
            "vision",
            "fp32",
            "random",
            "visual_tokens (rel.)",
            n,
            relative_diff(vis, ref["visual_tokens"]),
            TOLERANCE,
            provider,
        )
    ]
    if backbone.seq2seq:  # each graph on PyTorch's inputs
        hidden = sessions["encoder"].run(
            None, {"visual_tokens": ref["visual_tokens"], "input_ids": ids, "attention_mask": mask}
        )[0]
        checks.append(
            Check(
                "encoder",
                "fp32",
                "random",
                "encoder_hidden_states (rel.)",
                n,
                relative_diff(hidden, ref["encoder_hidden_states"]),
                TOLERANCE,
                provider,
            )
        )
    lm_graphs = "decoder+past" if backbone.seq2seq else "prefill+past"
    checks += [
        Check(
            lm_graphs,
            "fp32",
            "random",
            "logits, every step (rel.)",
            n,
            relative_diff(step_logits, ref["logits"]) if same else float("inf"),
            TOLERANCE,
            provider,
        ),
        Check("generate", "fp32", "random", "tokens differing", n, mismatched, 0.0, provider),
    ]
    return checks


def _manifest(backbone, describe, opset, files, gen, forced, checks, texts, ref, got, options) -> dict[str, Any]:
    """export.json of a generative export."""
    cfg = backbone.lm_config
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vlkit_version": __version__,
        "target": "onnx",
        "kind": "generative",
        **describe,
        "opset": opset,
        "preprocessing": {
            "image_size": backbone.image_size,
            "mean": list(backbone.mean),
            "std": list(backbone.std),
            "channel_order": "RGB",
            "layout": "NCHW",
            "transform": re.sub(r" at 0x[0-9a-f]+", "", repr(backbone.image_transform)),
        },
        "generation": {
            "decoder_start_token_id": gen["start"],
            "eos_token_id": gen["eos"],
            "pad_token_id": gen["pad"],
            "forced_bos_token_id": forced["forced_bos"],
            "forced_eos_token_id": forced["forced_eos"],
            "max_prompt_tokens": backbone.max_length,
            "decoder_layers": decoder_layers(cfg),
            "strategy": "greedy with the key-value cache (vlkit.export.generative.onnx_generate)",
            **beam_settings(backbone.model.lm.generation_config),
        },
        "graphs": files,
        "tokenizer": {"dir": "tokenizer"},
        "verification": {
            "passed": all(c.passed for c in checks),
            "seed": options.seed,
            "prompts": list(PROMPTS),
            "max_new_tokens": VERIFY_NEW_TOKENS,
            "checks": [c.to_dict() for c in checks],
            "texts": texts,
            "tokens": {"pytorch": ref["tokens"].tolist(), "onnxruntime": got.tolist()},
        },
    }
    return manifest


def load_sessions(directory: str | Path, providers: list[str] | None = None) -> tuple[dict[str, Any], dict]:
    """The four sessions of a generative export directory and its export.json."""
    import json

    d = Path(directory)
    manifest = json.loads((d / "export.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{d} is not a generative vlkit export (export.json format {manifest.get('format')!r})")
    chosen = resolve_providers(providers)
    return {g["graph"]: make_session(d / g["file"], chosen) for g in manifest["graphs"]}, manifest


__all__ = ["export_generative", "onnx_generate", "load_sessions"]
