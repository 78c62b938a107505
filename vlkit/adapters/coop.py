"""CoOp (context optimisation): learned context vectors replace the embeddings of the prompt's context words
in the text tower.

The layer sits at the text tower's token-embedding site (kind and role `tokens`, see
`vlkit.backbones.base.tokens_site`). A text whose first words (right after the start-of-text token) are the
**initial prompt** `init_prompt` (e.g. "a photo of a" of the class prompt "a photo of a {}") has the
embeddings of those M tokens replaced by M learned vectors; every other position, and every text that does
not begin with the initial prompt, is untouched. The positional embeddings, the causal mask and the
end-of-text pooling are those of the frozen model.

- **Initial prompt.** `init_prompt` unset: the class prompt's words before `{}` when trained through
  `vlkit train` (the classification task's `prompt`, e.g. the world's "a radiograph showing a {}" gives
  "a radiograph showing a"), else "a photo of a". With `init: prompt` (default) the vectors start as the
  token embeddings of the initial prompt, so **at init the model is exactly the frozen model** on
  "<init_prompt> <class>" (the conformance suite checks identity); `init: random` starts them from
  N(0, init_std²) as CoOp does without initial words.
- **Shared or class-specific.** `class_specific: false` (default): one context for every class.
  `class_specific: true`: one context per class of `class_names` (filled in from the task by `vlkit train`);
  the class of a text is the longest class name whose tokens follow the context; texts naming no class are
  untouched.
- Filled in by `prepare_config` and saved: `context_ids` (the initial prompt's token ids), `context_start`
  (the position of the first context token) and, class-specific, `class_ids`.

Text tower only (`towers: text`; `both` means text). Not mergeable (tokens are not a weight update); two CoOp
adapters cannot be stacked or run in parallel (both replace the same context: only one could act).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import AdapterConfig, AdapterVariant

DEFAULT_INIT_PROMPT = "a photo of a"
INITS = ("prompt", "random")


@dataclass
class CoopConfig(AdapterConfig):
    towers: str = "text"
    """text: the context is learned at the text tower's token embeddings (both is read as text)."""
    init_prompt: str | None = None
    """The context words learned, e.g. 'a photo of a'; None: the class prompt's words before {} (vlkit train),
    else 'a photo of a'."""
    init: str = "prompt"
    """How the context vectors start: prompt (the initial prompt's token embeddings: the frozen model at init)
    or random (N(0, init_std²))."""
    init_std: float = 0.02
    """Standard deviation of the random init (init: random), >= 0."""
    class_specific: bool = False
    """One context per class of class_names (true) or one shared by every class (false)."""
    class_names: list[str] | None = None
    """The classes of a class-specific context, no duplicates (vlkit train fills them in from the task)."""
    context_ids: list[int] | None = None
    """Set by vlkit and saved: the initial prompt's token ids under the backbone's tokenizer."""
    context_start: int | None = None
    """Set by vlkit and saved: the token position of the first context word."""
    class_ids: list[list[int]] | None = None
    """Set by vlkit and saved (class-specific only): each class name's token ids."""

    def validate(self) -> None:
        super().validate()
        if self.towers == "both":  # only the text tower has a token-embedding site
            self.towers = "text"
        if self.towers != "text":
            raise ConfigError(f"coop learns the text tower's context: towers must be text, got {self.towers!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init_prompt is not None and not self.init_prompt.strip():
            raise ConfigError("init_prompt must hold at least one word (e.g. 'a photo of a')")
        if not self.init_std >= 0:
            raise ConfigError(f"init_std must be >= 0, got {self.init_std}")
        if self.class_names is not None and len(set(self.class_names)) != len(self.class_names):
            raise ConfigError("class_names has duplicates")


def word_tokens(backbone, text: str) -> tuple[int, list[int]]:
    """(position of the first word token, the token ids of `text`'s words) under the backbone's tokenizer:
    what `tokenize(text)` holds beyond `tokenize("")` (start / end tokens and padding)."""
    empty = [int(v) for v in backbone.tokenize([""])[0].tolist()]
    full = [int(v) for v in backbone.tokenize([text])[0].tolist()]
    n = len(full)
    start = next((i for i in range(n) if full[i] != empty[i]), None)
    if start is None:
        raise ConfigError(f"the tokenizer of {backbone.spec} gives no tokens for {text!r}")
    for k in range(1, n - start + 1):
        if full[start + k :] == empty[start : n - k]:
            return start, full[start : start + k]
    raise ConfigError(f"cannot find the tokens of {text!r} in its tokenization (truncated by the context length?)")


class CoopContext(nn.Module):
    """`context` (S, M, D): S = 1 (shared) or one per class; replaces the M context embeddings of matching texts."""

    context_ids: torch.Tensor
    class_table: torch.Tensor | None
    class_lengths: torch.Tensor

    def __init__(
        self,
        base: nn.Embedding,
        context_ids: list[int],
        start: int,
        class_ids: list[list[int]] | None,
        init: str,
        std: float,
    ):
        super().__init__()
        ids = torch.tensor(context_ids, dtype=torch.long)
        emb = base.weight.detach().float()[ids]
        sets = len(class_ids) if class_ids else 1
        first = emb.clone() if init == "prompt" else torch.randn(emb.shape) * std
        self.context = nn.Parameter(first.unsqueeze(0).repeat(sets, 1, 1))
        self.start = int(start)
        self.register_buffer("context_ids", ids, persistent=False)
        if class_ids:
            width = max(len(c) for c in class_ids)
            table = torch.full((len(class_ids), width), -1, dtype=torch.long)
            for i, c in enumerate(class_ids):
                table[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            self.register_buffer("class_table", table, persistent=False)
            self.register_buffer("class_lengths", torch.tensor([len(c) for c in class_ids]), persistent=False)
        else:
            self.class_table = None

    def class_of(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,) the class whose name follows the context (the longest that matches), -1 where none does."""
        m = self.context.shape[1]
        table = self.class_table
        assert table is not None, "class_of needs a class-specific context"
        width = table.shape[1]
        after = ids[:, self.start + m : self.start + m + width]
        if after.shape[1] < width:
            after = torch.cat([after, after.new_full((after.shape[0], width - after.shape[1]), -2)], dim=1)
        want = table.unsqueeze(0)  # (1, C, W)
        ok = ((after.unsqueeze(1) == want) | (want < 0)).all(dim=-1)  # (B, C)
        score = torch.where(ok, self.class_lengths.unsqueeze(0), torch.full_like(ok, -1, dtype=torch.long))
        best, which = score.max(dim=1)
        return torch.where(best > 0, which, torch.full_like(which, -1))

    def forward(self, ids, y, weight, bias=None):
        m = self.context.shape[1]
        s = self.start
        window = ids[:, s : s + m]
        if window.shape[1] < m:
            return y
        match = (window == self.context_ids.unsqueeze(0)).all(dim=1)  # (B,)
        if self.class_table is not None:
            which = self.class_of(ids)
            match = match & (which >= 0)
            ctx = self.context[which.clamp(min=0)]  # (B, M, D)
        else:
            ctx = self.context.expand(ids.shape[0], -1, -1)
        delta = (ctx.to(y.dtype) - weight[self.context_ids].to(y.dtype).unsqueeze(0)) * match.to(y.dtype)[:, None, None]
        return torch.cat([y[:, :s], y[:, s : s + m] + delta, y[:, s + m :]], dim=1)


def task_prompt_prefix(task) -> str | None:
    """The words before `{}` of a classification task's class prompt, or None for a task without one."""
    prompt = getattr(task, "prompt", None)
    if not isinstance(prompt, str) or "{}" not in prompt:
        return None
    return prompt.split("{}", 1)[0].strip()


class CoopVariant(AdapterVariant[CoopConfig]):
    name = "coop"
    summary = "CoOp: learned context vectors replacing the class prompt's context words (shared or class-specific)"
    config_cls = CoopConfig
    kinds = ("tokens",)
    backbone_kinds = ("contrastive",)  # the class prompt of a dual encoder's text tower
    default_roles = ("tokens",)
    composition_limits = {
        "stack": "coop adapters replace the same context embeddings, so only one can act: activate one",
        "parallel": "coop adapters replace the same context embeddings, so only one can act: activate one",
    }

    def options_from_data(self, backbone, task, train_data, options: dict[str, Any]) -> dict[str, Any]:
        opts = dict(options)
        prefix = task_prompt_prefix(task)
        if prefix is not None:
            init = opts.get("init_prompt")
            if init in (None, "none", "null"):
                if not prefix:
                    raise ConfigError(
                        f"coop learns the class prompt's context words, and the prompt "
                        f"{task.prompt!r} has none before '{{}}'",
                        hint="set task.options.prompt, e.g. 'a photo of a {}'",
                    )
                opts["init_prompt"] = prefix
            elif not " ".join(prefix.lower().split()).startswith(" ".join(str(init).lower().split())):
                raise ConfigError(
                    f"coop's init_prompt {init!r} must begin the class prompt {task.prompt!r}",
                    hint=f"leave init_prompt unset (it becomes {prefix!r}) or set task.options.prompt='{init} {{}}'",
                )
        names = getattr(task, "class_names", None)
        if str(opts.get("class_specific", False)).lower() in ("true", "1", "yes", "on") and not opts.get("class_names"):
            if not names:
                raise ConfigError("class_specific coop needs the task's class names")
            opts["class_names"] = list(names)
        return opts

    def prepare_config(self, backbone, config: CoopConfig, sites) -> CoopConfig:
        prompt = config.init_prompt or DEFAULT_INIT_PROMPT
        start, ids = word_tokens(backbone, prompt)
        if config.context_ids is not None and (list(config.context_ids) != ids or config.context_start != start):
            raise ConfigError(
                f"coop's saved context_ids {config.context_ids} are not the tokens of {prompt!r} "
                f"under {backbone.spec}'s tokenizer ({ids})"
            )
        config.init_prompt = prompt
        config.context_ids, config.context_start = ids, start
        if config.class_specific:
            if not config.class_names:
                raise ConfigError("class_specific coop needs class_names (vlkit train fills them in from the task)")
            config.class_ids = [word_tokens(backbone, n)[1] for n in config.class_names]
        return config

    def create_layer(self, site, config: CoopConfig, base=None) -> nn.Module:
        assert config.context_ids is not None and config.context_start is not None, "set by prepare_config"
        return CoopContext(
            base,
            config.context_ids,
            config.context_start,
            config.class_ids if config.class_specific else None,
            config.init,
            config.init_std,
        )

    def describe_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]):
        ctx = next((t for k, t in tensors.items() if k.endswith(".context")), None)
        n_classes = len(config.get("class_names") or [])
        sets = "shared" if not config.get("class_specific") else f"class-specific ({n_classes} classes)"
        yield "initial prompt", repr(config.get("init_prompt"))
        yield "context", f"{len(config.get('context_ids') or [])} tokens, {sets}, init {config.get('init')}"
        if ctx is not None:
            yield "context vector norm (mean)", f"{float(ctx.float().norm(dim=-1).mean()):.4g}"
