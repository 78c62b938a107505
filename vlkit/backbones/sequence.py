"""Sites of kind "sequence": a variant adds tokens to the sequence entering a transformer block (prompt tuning).

Every transformer block of a tower that supports them has one site of kind `"sequence"`, role `"prompt"`,
whose path is the block's own path. A variant with `"sequence"` in its `kinds` gets a layer there; the layer's
contract is

    forward(x) -> tokens | None

where `x` is the hidden sequence entering the block, batch first `(B, L, D)` whatever the tower's own layout,
prompt tokens excluded, and `tokens` is `(B, n, D)` or `(n, D)`: the tokens to insert. `None` (or no layer at a
block) carries on the tokens the previous block produced. So deep prompt tuning (VPT-deep, MaPLe) is a layer
at every block; prompts inserted at block i replace the outputs of those inserted at block i-1; a block with no
prompts before it has them added; shallow prompt tuning is one layer at block 0 whose tokens then travel
through every later block.

The backbone says how its blocks see their sequence with a `SequenceLayout` (`Backbone.sequence_layout(tower)`):
where the tokens go (after the class token for vision, after the start-of-text token for text), the layout of
the block input, whether the tower's attention is causal, and where the block takes its attention mask. The
hosts here (`AdaptedSequence`, one per block of the tower, installed together) insert the tokens, grow the
block's attention mask to match (causal masks stay causal, padding masks keep padding; the prompts see what the
token before them sees), and strip the tokens off the block's output. The tower's own code (final norm,
pooling at the class token or at the end-of-text token, patch-token outputs) therefore sees the sequence it
always sees: its output shapes are unchanged, and the pooled text feature is the end-of-text token's, which
inside the blocks sits `n` positions later and attends to the prompts.

With no sequence adapter active the hosts call the block exactly as before (bit-identical outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import Site, resolve_module, set_module
from .hosts import AdapterHost
from .state import AdapterState

SEQUENCE_KIND = "sequence"
PROMPT_ROLE = "prompt"
PROMPT_KEY = "prompt"


@dataclass(frozen=True)
class SequenceLayout:
    """How one tower's blocks take their token sequence; a backbone returns one per tower that can hold prompts.

    insert_at: tokens go after the first `insert_at` positions (1: after the class / start-of-text token).
    batch_first: the block input is (B, L, D); False: (L, B, D).
    causal: the tower's attention mask is causal (inserted tokens then see only what comes before them).
    hidden_arg, hidden_index: keyword and positional index of the hidden sequence in the block's call.
    mask_arg, mask_index: keyword and positional index of the block's attention mask (None: it takes none).
    """

    insert_at: int = 1
    batch_first: bool = True
    causal: bool = False
    hidden_arg: str = "hidden_states"
    hidden_index: int = 0
    mask_arg: str | None = None
    mask_index: int | None = None


def prompt_site(tower: str, index: int, path: str, width: int) -> Site:
    """The sequence site of block `index` at `path`: its host is the block itself."""
    return Site(tower, index, PROMPT_ROLE, path, path, SEQUENCE_KIND, width, width)


def grow_mask(mask: torch.Tensor, at: int, n: int, causal: bool) -> torch.Tensor:
    """An attention mask (..., L, L) (boolean: True attends; or additive float) for `n` tokens inserted at `at`.

    Old positions keep their entries. Inserted keys are seen by whoever sees the token now at `at` (the first
    token after them); inserted queries see what the token before them sees, and each other (under a causal
    mask: the inserted tokens before them and themselves). A causal mask so grown is the causal mask of L + n."""
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        raise ConfigError(f"cannot insert tokens under an attention mask of shape {tuple(mask.shape)}")
    length = mask.shape[-1]
    col = min(at, length - 1)
    row = max(at - 1, 0)
    cols = mask[..., :, col : col + 1].expand(*mask.shape[:-1], n)
    wide = torch.cat([mask[..., :, :at], cols, mask[..., :, at:]], dim=-1)
    rows = wide[..., row : row + 1, :].expand(*wide.shape[:-2], n, wide.shape[-1]).clone()
    tri = torch.ones(n, n, dtype=torch.bool, device=mask.device)
    if causal:
        tri = tri.tril()
    if mask.dtype == torch.bool:
        block = tri
    else:
        block = torch.zeros(n, n, dtype=mask.dtype, device=mask.device).masked_fill(~tri, float("-inf"))
    rows[..., :, at : at + n] = block
    return torch.cat([wide[..., :at, :], rows, wide[..., at:, :]], dim=-2)


class TowerCarry:
    """The prompt tokens one block of a tower hands to the next (adapter name -> (B, n, D)), shared by the
    tower's sequence hosts; the tower's first block clears it, its last block drops it."""

    def __init__(self) -> None:
        self.tokens: dict[str, torch.Tensor] = {}
        self.hosts: list[AdaptedSequence] = []

    def owners(self) -> set[str]:
        """Adapters with a sequence layer in any block of the tower."""
        return {n for h in self.hosts for n in h.adapters}

    def clear(self) -> None:
        self.tokens = {}


class AdaptedSequence(AdapterHost):
    """A transformer block whose input sequence active sequence adapters add tokens to (see the module doc)."""

    def __init__(
        self,
        base: nn.Module,
        state: AdapterState,
        layout: SequenceLayout,
        carry: TowerCarry,
        first: bool,
        last: bool,
        tower: str = "",
    ):
        super().__init__(base, state)
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "carry", carry)
        self.tower = tower
        self.first = first
        self.last = last
        carry.hosts.append(self)

    # --- which adapters put tokens into this tower now --------------------------------------------------
    def _names(self) -> list[str]:
        st = self._state
        owners = self.carry.owners()
        if st.route is not None:
            if any(n in owners for n in st.route_names if n):
                raise ConfigError(
                    "per-sample routing cannot route to a prompt (sequence) adapter: "
                    f"{', '.join(n for n in st.route_names if n in owners)}",
                    hint="activate it with set_active for the whole batch instead",
                )
            return []
        names = [n for n in st.active if n in owners]
        if not names:
            return []
        if st.mode == "fuse":
            raise ConfigError(
                f"prompt (sequence) adapters cannot be fused: {', '.join(names)}",
                hint="stack them (mode stack) or activate them alone",
            )
        if st.mode == "parallel" and any(st.weights.get(n, 1.0) != 1.0 for n in names):
            raise ConfigError(
                f"prompt (sequence) adapters cannot be weighted: {', '.join(names)}",
                hint="their tokens are concatenated; give them weight 1 or stack them",
            )
        return names

    def _tokens(self, names: list[str], xb: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        batch = xb.shape[0]
        out = []
        for n in names:
            layer = self.layer(n, PROMPT_KEY)
            tokens = layer(xb) if layer is not None else None
            if tokens is None:
                tokens = self.carry.tokens.get(n)
                if tokens is not None and tokens.shape[0] != batch:
                    tokens = None
            else:
                if tokens.dim() == 2:
                    tokens = tokens.unsqueeze(0).expand(batch, -1, -1)
                if tokens.dim() != 3 or tokens.shape[0] != batch or tokens.shape[2] != xb.shape[2]:
                    raise ConfigError(
                        f"sequence adapter {n!r} returned tokens of shape {tuple(tokens.shape)}; "
                        f"expected (n, {xb.shape[2]}) or ({batch}, n, {xb.shape[2]})"
                    )
                tokens = tokens.to(xb.dtype)
            if tokens is not None and tokens.shape[1] > 0:
                out.append((n, tokens))
        return out

    # --- the block call -----------------------------------------------------------------------------------
    def _get(self, args, kwargs, key, index):
        if key is not None and key in kwargs:
            return kwargs[key]
        if index is not None and len(args) > index:
            return args[index]
        return None

    def _put(self, args, kwargs, key, index, value):
        if key is not None and key in kwargs:
            return args, {**kwargs, key: value}
        if index is not None and len(args) > index:
            args = list(args)
            args[index] = value
            return tuple(args), kwargs
        raise ConfigError(f"cannot find the block argument {key!r} to replace")

    def forward(self, *args, **kwargs):
        carry = self.carry
        if self.first:
            carry.clear()
        names = self._names()
        if not names:
            if self.last:
                carry.clear()
            return self.base(*args, **kwargs)
        lay = self.layout
        x = self._get(args, kwargs, lay.hidden_arg, lay.hidden_index)
        xb = x if lay.batch_first else x.transpose(0, 1)
        groups = self._tokens(names, xb)
        if not groups:
            carry.clear()
            return self.base(*args, **kwargs)
        at = min(lay.insert_at, xb.shape[1])
        n = sum(t.shape[1] for _, t in groups)
        seq = torch.cat([xb[:, :at], *(t for _, t in groups), xb[:, at:]], dim=1)
        args, kwargs = self._put(
            args, kwargs, lay.hidden_arg, lay.hidden_index, seq if lay.batch_first else seq.transpose(0, 1)
        )
        mask = self._get(args, kwargs, lay.mask_arg, lay.mask_index)
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise ConfigError(
                    f"cannot insert prompt tokens under an attention mask of type {type(mask).__name__}",
                    hint="use the model's sdpa or eager attention",
                )
            args, kwargs = self._put(args, kwargs, lay.mask_arg, lay.mask_index, grow_mask(mask, at, n, lay.causal))
        masks = self._state.context.get("masks")
        valid = masks.get(self.tower) if isinstance(masks, dict) else None
        if valid is not None:  # joint (cross-modal) layers inside the block read this tower's valid-token mask
            masks[self.tower] = torch.cat([valid[:, :at], valid.new_ones(valid.shape[0], n), valid[:, at:]], dim=1)
        try:
            out = self.base(*args, **kwargs)
        finally:
            if valid is not None:
                masks[self.tower] = valid
        y = out[0] if isinstance(out, tuple) else out
        yb = y if lay.batch_first else y.transpose(0, 1)
        real = torch.cat([yb[:, :at], yb[:, at + n :]], dim=1)
        if self.last:
            carry.clear()
        else:
            tokens, i = {}, at
            for name, t in groups:
                tokens[name] = yb[:, i : i + t.shape[1]]
                i += t.shape[1]
            carry.tokens = tokens
        real = real if lay.batch_first else real.transpose(0, 1)
        return (real, *out[1:]) if isinstance(out, tuple) else real


def sequence_host(backbone, site: Site) -> AdaptedSequence:
    """The sequence host of `site`'s block; the first call for a tower wraps every block of that tower at once
    (later blocks carry the tokens on and the last one strips them)."""
    layout = backbone.sequence_layout(site.tower)
    if layout is None:
        raise ConfigError(f"the {site.tower} tower of {backbone.spec} has no sequence sites")
    module = resolve_module(backbone.model, site.host_path)
    if isinstance(module, AdaptedSequence):
        return module
    blocks = [b for b in backbone.blocks(site.tower) if PROMPT_ROLE in b.sites]
    carry = TowerCarry()
    for k, block in enumerate(blocks):
        mod = resolve_module(backbone.model, block.path)
        if isinstance(mod, AdaptedSequence):
            continue
        if isinstance(mod, AdapterHost):
            raise ConfigError(f"block {block.path} is already wrapped by a {type(mod).__name__}")
        host = AdaptedSequence(
            mod, backbone.adapter_state, layout, carry, first=k == 0, last=k == len(blocks) - 1, tower=site.tower
        )
        set_module(backbone.model, block.path, host)
    wrapped = resolve_module(backbone.model, site.host_path)
    assert isinstance(wrapped, AdaptedSequence)
    return wrapped
