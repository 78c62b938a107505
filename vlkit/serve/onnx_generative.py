"""`vlkit serve --engine onnx` over a generative `vlkit export` (`vlkit.export.generative`): `/v1/generate` from the
exported graphs through onnxruntime, with neither PyTorch's models nor transformers.

`PromptCodec` tokenizes prompts and decodes answers as the LM's transformers tokenizer does (`tokenizer/`, read
with `tokenizers`): its special tokens, truncation to the backbone's `max_length` on the tokenizer's side, padding
on its side with the pad token, and on decoding the special tokens skipped and, where the tokenizer asks for it,
its clean-up of spaces before punctuation. `generate_texts` answers a group of requests that share their adapter
and decoding settings in one batch: greedy with `vlkit.export.generative.onnx_generate`, beam search with
`beam_search`, a numpy copy of transformers' vectorised beam search (the same top-2k candidates per step, length
penalty, early-stopping heuristic and key-value cache reordering) under the settings the export recorded
(`generation.length_penalty`, `generation.early_stopping`). Both give the text the PyTorch server gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AdapterFileError, RequestError
from ..export.generative import FORMAT, onnx_generate

GRAPHS = {
    "seq2seq": ("vision", "encoder", "decoder", "decoder_with_past"),
    "causal": ("vision", "prefill", "decoder_with_past"),
}
NEG = np.float32(-1.0e9)


def is_generative_export(manifest: dict) -> bool:
    return manifest.get("format") == FORMAT


def check_graphs(path: Path, manifest: dict, sessions: dict) -> None:
    """A generative export of a `vl:` backbone (its prompts are the tokenizer's own encoding), with the graphs of
    one LM kind (encoder-decoder or decoder-only)."""
    family = (manifest.get("backbone") or {}).get("family")
    if family != "vl":
        raise AdapterFileError(
            f"{path} is an export of a {family or 'generative'} backbone, whose prompts go through the model's own "
            "processor: the onnx engine serves exports of vl: backbones (tiny-vl, vl:lm=...); serve this model "
            "with --engine torch"
        )
    if not any(all(g in sessions for g in need) for need in GRAPHS.values()):
        have = ", ".join(sorted(sessions)) or "none"
        raise AdapterFileError(
            f"{path} lacks the graphs of a generative export (vision, encoder, decoder, decoder_with_past; or "
            f"vision, prefill, decoder_with_past); it has {have}"
        )


def _cleanup(text: str) -> str:
    """transformers' `clean_up_tokenization` (tokenizers whose config sets `clean_up_tokenization_spaces`)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m")):
        text = text.replace(a, b)
    for a, b in ((" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class PromptCodec:
    """The exported LM's tokenizer, with `tokenizers` alone (see the module docstring)."""

    def __init__(self, directory: Path, manifest: dict):
        from tokenizers import Tokenizer

        d = directory / ((manifest.get("tokenizer") or {}).get("dir") or "tokenizer")
        if not (d / "tokenizer.json").is_file():
            raise AdapterFileError(f"{directory} has no {d.name}/tokenizer.json; the onnx engine tokenizes with it")
        try:
            config = (
                json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").is_file() else {}
            )
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterFileError(f"{d / 'tokenizer_config.json'} is not valid JSON: {exc}") from None
        gen = manifest.get("generation") or {}
        self.tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.tok.no_padding()
        self.max_length = int(gen.get("max_prompt_tokens") or 0)
        if self.max_length:
            self.tok.enable_truncation(self.max_length, direction=str(config.get("truncation_side") or "right"))
        self.left = str(config.get("padding_side") or "right") == "left"
        self.pad = int(gen["pad_token_id"])
        bpe = type(self.tok.model).__name__ == "BPE"
        self.cleanup = bool(config.get("clean_up_tokenization_spaces")) and not bpe

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), padded to the longest prompt on the tokenizer's side."""
        rows = [e.ids for e in self.tok.encode_batch([str(p) for p in prompts])]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            at = slice(width - len(r), width) if self.left else slice(0, len(r))
            ids[i, at], mask[i, at] = r, 1
        return ids, mask

    def decode(self, rows) -> list[str]:
        texts = self.tok.decode_batch([[int(t) for t in r] for r in rows], skip_special_tokens=True)
        return [(_cleanup(t) if self.cleanup else t).strip() for t in texts]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = x.max(-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))).astype(np.float32)


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of each row, largest first (ties: the lower index first)."""
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """a[b, idx[b, j], ...]: beams gathered along axis 1."""
    return np.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


def _first_step(sessions, vis, ids, mask, k: int, start: int | None):
    """The prompt through the LM, each example's rows repeated `k` times: (logits, past, step state)."""
    if "prefill" in sessions:
        first = sessions["prefill"]
        out = first.run(None, {"visual_tokens": vis, "input_ids": ids, "attention_mask": mask})
        out = [np.repeat(o, k, axis=0) for o in out]
        state = {"mask": out[1], "position": out[2]}
        if "visual_tokens" in {i.name for i in sessions["decoder_with_past"].get_inputs()}:
            state["visual_tokens"] = np.repeat(vis, k, axis=0)  # a cross-attention decoder reads them every step
        past = {o.name.replace("present.", "past."): v for o, v in zip(first.get_outputs()[3:], out[3:])}
        return out[0], past, state
    hidden, emask = sessions["encoder"].run(None, {"visual_tokens": vis, "input_ids": ids, "attention_mask": mask})
    enc = {"encoder_hidden_states": np.repeat(hidden, k, axis=0), "encoder_attention_mask": np.repeat(emask, k, axis=0)}
    first = sessions["decoder"]
    out = first.run(None, {"input_ids": np.full((len(hidden) * k, 1), start, dtype=np.int64), **enc})
    past = {o.name.replace("present.", "past."): v for o, v in zip(first.get_outputs()[1:], out[1:])}
    return out[0], past, {"enc": enc}


def _next_step(sessions, tokens: np.ndarray, past: dict, state: dict, order: np.ndarray) -> np.ndarray:
    """One decoder step for the running beams (`order`: the row each came from); updates `past` in place."""
    later = sessions["decoder_with_past"]
    for name in list(past):
        past[name] = past[name][order]
    if "enc" in state:
        feed = {"input_ids": tokens[:, None], **state["enc"], **past}
    else:
        mask = state["mask"][order]
        state["mask"] = np.concatenate([mask, np.ones((len(mask), 1), dtype=mask.dtype)], axis=1)
        state["position"] = state["position"][order] + 1
        feed = {
            "input_ids": tokens[:, None],
            "attention_mask": state["mask"],
            "position_ids": state["position"],
            **{k: v for k, v in state.items() if k == "visual_tokens"},  # the same for every beam of an example
            **past,
        }
    out = later.run(None, feed)
    own = [o.name.replace("present.", "past.") for o in later.get_outputs()[1:]]
    past.update(zip(own, out[1:]))
    return out[0]


def _processed(logp: np.ndarray, cur: int, max_length: int, gen: dict) -> np.ndarray:
    """transformers' forced first / last token processors on the log-probabilities (BART forces EOS last)."""
    forced = gen.get("forced_bos_token_id") if cur == 1 else None
    if cur == max_length - 1 and gen.get("forced_eos_token_id") is not None:
        forced = gen["forced_eos_token_id"]
    if forced is None:
        return logp
    out = np.full_like(logp, -np.inf)
    out[:, int(forced)] = 0.0
    return out


def beam_search(
    sessions: dict[str, Any],
    pixel_values: np.ndarray,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    num_beams: int,
    max_new_tokens: int,
    generation: dict,
) -> list[np.ndarray]:
    """Beam search with the sessions of a generative export as transformers' `generate(num_beams=k)` runs it: the
    best finished hypothesis of each example, led by the decoder start token for an encoder-decoder LM."""
    k, gen = int(num_beams), generation
    ends = np.asarray(np.atleast_1d(gen["eos_token_id"]), dtype=np.int64)  # one end token, or several
    lp, stop = float(gen["length_penalty"]), gen["early_stopping"]
    vis = sessions["vision"].run(None, {"pixel_values": pixel_values.astype(np.float32)})[0]
    logits, past, state = _first_step(sessions, vis, input_ids, attention_mask, k, gen.get("decoder_start_token_id"))
    n, lead = len(vis), 0 if "prefill" in sessions else 1
    max_length, keep = lead + int(max_new_tokens), max(2, 1 + len(ends)) * k
    running = np.full((n, k, max_length), int(ends[0]), dtype=np.int64)
    if lead:
        running[:, :, 0] = int(gen["decoder_start_token_id"])
    finished_seq = running.copy()
    run_scores = np.zeros((n, k), dtype=np.float32)
    run_scores[:, 1:] = NEG
    scores = np.full((n, k), NEG, dtype=np.float32)
    done = np.zeros((n, k), dtype=bool)
    open_ = np.ones((n, 1), dtype=bool)  # the early-stopping heuristic: a running beam may still improve
    run_src = np.full((n, k, max_new_tokens), -1, dtype=np.int64)
    src = run_src.copy()
    top_mask = np.arange(keep) < k
    cur = lead
    while True:
        logp = _processed(_log_softmax(logits[:, -1]), cur, max_length, gen)
        vocab = logp.shape[-1]
        acc = (logp.reshape(n, k, vocab) + run_scores[:, :, None]).reshape(n, k * vocab)
        pick = _top(acc, keep)
        cand_scores, beam, token = np.take_along_axis(acc, pick, axis=1), pick // vocab, pick % vocab
        cand_seq, cand_src = _take(running, beam), _take(run_src, beam)
        cand_seq[:, :, cur] = token
        cand_src[:, :, cur - lead] = beam + np.arange(n)[:, None] * k
        hits = np.isin(token, ends) | (cur + 1 >= max_length)
        alive = cand_scores + hits.astype(np.float32) * NEG
        nxt = _top(alive, k)
        running, run_scores, run_src = _take(cand_seq, nxt), _take(alive, nxt), _take(cand_src, nxt)
        just = hits & top_mask[None, :]
        final = cand_scores / np.float32((cur + 1 - lead) ** lp)
        final = final + (done.all(-1, keepdims=True) & (stop is True)).astype(np.float32) * NEG
        final = final + (~open_).astype(np.float32) * NEG + (~just).astype(np.float32) * NEG
        merged = np.concatenate([scores, final], axis=1)
        best = _top(merged, k)
        finished_seq = _take(np.concatenate([finished_seq, cand_seq], axis=1), best)
        src = _take(np.concatenate([src, cand_src], axis=1), best)
        done = _take(np.concatenate([done, just], axis=1), best)
        scores = _take(merged, best)
        order = run_src[:, :, cur - lead].reshape(-1)
        cur += 1
        length = (max_length if stop == "never" and lp > 0.0 else cur) - lead
        hope = run_scores[:, :1] / np.float32(length**lp)
        worst = np.where(done, scores.min(1, keepdims=True), NEG)
        open_ = open_ & (hope > worst).any(-1, keepdims=True)
        if not open_.any() or (done.all() and stop is True) or hits.all():
            break
        logits = _next_step(sessions, running[:, :, cur - 1].reshape(-1), past, state, order)
    steps = (src[:, 0] >= 0).sum(-1)
    return [finished_seq[i, 0, : lead + int(steps[i])] for i in range(n)]


def generate_texts(entry, codec: PromptCodec, items: list) -> list[str]:
    """The answers of `items` (`GenerateItem`s of one export, sharing max_new_tokens and num_beams), in one batch."""
    gen = entry.manifest.get("generation") or {}
    px = np.stack([np.asarray(it.pixels, dtype=np.float32) for it in items])
    ids, mask = codec.encode([it.prompt for it in items])
    steps, beams = int(items[0].max_new_tokens), int(items[0].num_beams)
    if beams == 1:
        rows: Any = onnx_generate(
            entry.sessions,
            px,
            ids,
            mask,
            max_new_tokens=steps,
            start=gen.get("decoder_start_token_id"),
            eos=gen["eos_token_id"],
            pad=int(gen["pad_token_id"]),
            forced_bos=gen.get("forced_bos_token_id"),
            forced_eos=gen.get("forced_eos_token_id"),
        )
    else:
        if "length_penalty" not in gen or "early_stopping" not in gen:
            raise RequestError(
                f"export {entry.name!r} does not record the LM's beam settings (written by an older vlkit "
                "export): ask with num_beams 1, or export it again"
            )
        rows = beam_search(entry.sessions, px, ids, mask, num_beams=beams, max_new_tokens=steps, generation=gen)
    return codec.decode(rows)
