"""`vlkit export` of a generative backbone: ONNX graphs that generate text without PyTorch, checked against
onnxruntime by generating the same tokens.

Backbones: `vl:` (a vision tower, a projector and a T5, BART, GPT-2 or Llama-style LM), `tiny-vl`, and the
transformers VLMs of `hf:DIR` (LLaVA, Idefics3/SmolVLM, BLIP, vision-encoder-decoder). Each exposes the pieces the
graphs trace (`GenerativeBackbone.export_lm` and the methods after it): the family-specific model calls live in
the backbone classes, the graphs (`vlkit.export.generative_graphs`, whose docstring lists their inputs and
outputs) and this module are one code path for all.

Files (in the output directory): `vision.onnx`, then `encoder.onnx`, `decoder.onnx` and `decoder_with_past.onnx`
(seq2seq LMs) or `prefill.onnx` and `decoder_with_past.onnx` (causal LMs, cross-attention decoders included);
`tokenizer/` (the tokenizer, or the model's processor) and `export.json` (graphs, generation settings, the prompt
format, preprocessing, checks).

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
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..adapters.model import AdaptedModel
from ..errors import ConfigError, ExportError
from ..io import write_json
from .base import Check
from .generative_graphs import write_graphs
from .model import load_sources, merge_where_possible
from .onnx_export import DEFAULT_OPSET, MIN_OPSET
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
    eos: int | list[int],
    pad: int,
    forced_bos: int | None = None,
    forced_eos: int | None = None,
    logits: list | None = None,
) -> np.ndarray:
    """Greedy generation with the sessions of an export (see the module docstring), as transformers' `generate`
    does it: (batch, steps) token ids, led by the decoder start token for an encoder-decoder LM, with
    `forced_bos` first and `forced_eos` at the length limit as its logits processors force them; `eos` is one
    end token or several. `logits`, when given, collects each step's."""
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
    seen = {"visual_tokens": vis} if "visual_tokens" in {i.name for i in later.get_inputs()} else {}
    ends = np.asarray([eos] if np.isscalar(eos) else list(eos), dtype=np.int64)  # type: ignore[arg-type]
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
        done |= np.isin(nxt, ends)
        if done.all() or step == last:
            break
        if causal:
            mask = np.concatenate([mask, np.ones((n, 1), dtype=mask.dtype)], axis=1)
            position = position + 1
            feed = {"input_ids": nxt[:, None], "attention_mask": mask, "position_ids": position, **seen, **past}
        else:
            feed = {"input_ids": nxt[:, None], **enc, **past}
        out = later.run(None, feed)
        past.update(zip(own, out[1:]))
    return np.stack(tokens, axis=1)


def relative_diff(got: np.ndarray, want: np.ndarray) -> float:
    """Largest absolute difference in units of the reference's largest magnitude (at least 1): merged adapters
    change the float rounding of every weight they fold into, in proportion to the values. Entries the reference
    leaves NaN (steps after a row's batch had stopped) are not compared."""
    if got.shape == want.shape and np.isnan(want).any():
        keep = ~np.isnan(want)
        got, want = got[keep], want[keep]
    return max_abs_diff(got, want) / max(1.0, float(np.abs(want).max()) if want.size else 1.0)


def _prompt_batch(backbone, seed: int, prompts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(int(seed))
    ids, mask = backbone.prompt_tokens(list(prompts))
    pixels = torch.randn(len(prompts), 3, backbone.image_size, backbone.image_size, generator=g)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}


def _reference(backbone, batch: dict[str, torch.Tensor], prompts: tuple[str, ...]) -> dict[str, np.ndarray]:
    """What PyTorch computes, adapters as vlkit runs them: visual tokens, encoder states (seq2seq LMs), greedy
    tokens and the raw logits of every step, from the `generate` call behind `GenerativeBackbone.generate`."""
    bb, px = backbone, batch["pixel_values"]
    with torch.no_grad():
        vis = bb.visual_tokens(px)
        tokens, logits = bb.generate_ids(px, list(prompts), max_new_tokens=VERIFY_NEW_TOKENS, logits=True)
        out = {"visual_tokens": vis.numpy(), "tokens": tokens.numpy(), "logits": logits.numpy()}
        if bb.export_lm == "seq2seq":
            out["encoder_hidden_states"] = bb.encode(vis, batch["input_ids"], batch["attention_mask"])[0].numpy()
    return out


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
    """Export `backbone` (a generative backbone) with `adapters` through `output` (a `vlkit.outputs`
    OutputTarget), verified; returns the summary `vlkit export` prints."""
    t0 = time.perf_counter()
    unused = [k for k, v in (given or {}).items() if v not in (None, False)]
    if unused:
        raise ConfigError(
            f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to a generative "
            f"backbone ({backbone.spec}): its export is the fp32 vision, encoder and decoder graphs"
        )
    if getattr(backbone, "export_lm", None) not in ("seq2seq", "causal"):
        raise ConfigError(
            f"ONNX export of {backbone.spec} ({type(backbone).__name__}) is not supported: its backbone class "
            "exposes no graphs to trace (GenerativeBackbone.export_lm)"
        )
    opset = int(options.opset or DEFAULT_OPSET)
    if opset < MIN_OPSET:
        raise ConfigError(f"--opset must be at least {MIN_OPSET}, got {opset}")
    providers = resolve_providers(options.providers)
    settings = backbone.generation_settings()
    forced = greedy_settings(settings["config"])
    if forced["forced_bos"] is not None and backbone.export_lm != "seq2seq":
        raise ConfigError(
            "the language model's generation config sets forced_bos_token_id, which the exported "
            "greedy generation of a decoder that reads a prompt first does not reproduce"
        )
    prompts = tuple(backbone.export_prompts or PROMPTS)
    loaded = (
        load_sources(backbone, adapters)
        if adapters
        else {"names": [], "mode": "stack", "weights": None, "adapters": []}
    )
    batch = _prompt_batch(backbone, int(options.seed or 0), prompts)
    ref = _reference(backbone, batch, prompts)
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
        for f in files:  # what each graph reads once traced (an input no output depends on is dropped)
            f["inputs"] = [i.name for i in sessions[f["graph"]].get_inputs()]
        tok = backbone.tokenizer
        eos = [int(e) for e in settings["eos"]]
        gen: dict[str, Any] = {
            "start": settings["start"],
            "eos": eos[0] if len(eos) == 1 else eos,
            "pad": int(settings["pad"]),
            **forced,
        }
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
        verified = {"prompts": list(prompts), "checks": checks, "texts": texts, "ref": ref, "got": got}
        manifest = _manifest(backbone, describe, opset, files, gen, settings, verified, options)
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
                f"{len(prompts)} prompts"
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
        backbone.save_prompt_files(str(staging / "tokenizer"))
        write_json(staging / "export.json", manifest)
        summary["written"] = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        summary["timings"] = {"total": time.perf_counter() - t0}
    except BaseException as exc:
        output.__exit__(type(exc), exc, exc.__traceback__)
        raise
    output.__exit__(None, None, None)
    return summary


def _checks(backbone, sessions, ref, px, ids, mask, vis, steps, same: bool, mismatched: float) -> list[Check]:
    """The export's checks: visual tokens, encoder states (seq2seq LMs), every step's logits and the generated
    tokens, each graph run on PyTorch's inputs."""
    step_logits = np.stack(steps, axis=1)
    provider = sessions["vision"].get_providers()[0]
    n = len(px)
    seq2seq = backbone.export_lm == "seq2seq"
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
    if seq2seq:  # each graph on PyTorch's inputs
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
    lm_graphs = "decoder+past" if seq2seq else "prefill+past"
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


def _manifest(backbone, describe, opset, files, gen, settings, verified, options) -> dict[str, Any]:
    """export.json of a generative export."""
    checks, ref, got = verified["checks"], verified["ref"], verified["got"]
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
            "prompt_start_token_id": settings.get("prompt_start"),
            "eos_token_id": gen["eos"],
            "pad_token_id": gen["pad"],
            "forced_bos_token_id": gen["forced_bos"],
            "forced_eos_token_id": gen["forced_eos"],
            "max_prompt_tokens": backbone.max_length,
            "decoder_layers": int(settings["layers"]),
            "lm": backbone.export_lm,
            "cross_attention": bool(backbone.cross_attention),
            "prompt_format": backbone.prompt_format,
            "strategy": "greedy with the key-value cache (vlkit.export.generative.onnx_generate)",
            **beam_settings(settings["config"]),
        },
        "graphs": files,
        "tokenizer": {"dir": "tokenizer"},
        "verification": {
            "passed": all(c.passed for c in checks),
            "seed": options.seed,
            "prompts": verified["prompts"],
            "max_new_tokens": VERIFY_NEW_TOKENS,
            "checks": [c.to_dict() for c in checks],
            "texts": verified["texts"],
            "tokens": {"pytorch": ref["tokens"].tolist(), "onnxruntime": got.tolist()},
        },
    }
    return manifest


def load_sessions(directory: str | Path, providers: list[str] | None = None) -> tuple[dict[str, Any], dict]:
    """The sessions of a generative export directory (one per graph) and its export.json."""
    import json

    d = Path(directory)
    manifest = json.loads((d / "export.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{d} is not a generative vlkit export (export.json format {manifest.get('format')!r})")
    chosen = resolve_providers(providers)
    return {g["graph"]: make_session(d / g["file"], chosen) for g in manifest["graphs"]}, manifest


__all__ = ["export_generative", "onnx_generate", "load_sessions"]
