"""Host modules that wrap a backbone module and apply the active adapters at their sites.

A host keeps the original module as `base` (its parameters untouched), holds adapter layers as
`adapters[adapter_name][site_key]`, and reads the shared AdapterState to know which to run.
Modes: stack, parallel (weighted sum of deltas), fuse (AdapterFusion layers in `fusions[name][site_key]`
weigh the adapters' outputs), and per-sample routing (each sample of the batch through its own adapter).
Three hosts: AdaptedOutput (a sub-layer's output), AdaptedLinear (an nn.Linear, or transformers' `Conv1D`: GPT-2's
projections, a linear layer whose weight is stored transposed), and AdaptedMHA (an nn.MultiheadAttention, whose
fused in-projection is split into q, k, v sites).

`linear_params(module)` is the one place a linear-like module is read as a linear layer: (weight as
(out_features, in_features), bias, in_features, out_features); for a `Conv1D` the weight is a transposed view of
its parameter, so writing into it (a merge) writes the parameter.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from .state import AdapterState


def base_param_name(name: str) -> str:
    """Parameter name in the unwrapped backbone (drops the hosts' `.base` level)."""
    return name.replace(".base.", ".")


INPUT_KEY = "attn_in"  # a layer on the attention's input (bottleneck `attn_position: input`)


class LinearParams(NamedTuple):
    """A linear-like module read as y = x Wᵀ + b: `weight` (out_features, in_features) and `bias` (out_features
    or None) are the module's live parameters or views of them."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    in_features: int
    out_features: int


def conv1d_type() -> type | None:
    """transformers' `Conv1D` (GPT-2's projections: weight (in, out), y = x W + b) once transformers has loaded it;
    None before, when no instance can exist (transformers is not imported for it)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def unwrap_host(module: nn.Module) -> nn.Module:
    """The module under any adapter hosts wrapped around it."""
    while isinstance(module, AdapterHost):
        module = module.base
    return module


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` (seen through adapter hosts) is a transformers `Conv1D`."""
    conv = conv1d_type()
    return conv is not None and isinstance(unwrap_host(module), conv)


def linear_params(module: nn.Module) -> LinearParams | None:
    """`module` (seen through adapter hosts) as a linear layer, or None when it is neither an nn.Linear nor a
    transformers `Conv1D`. A Conv1D's weight comes back as `weight.t()`: (out, in), a view of the parameter."""
    module = unwrap_host(module)
    if isinstance(module, nn.Linear):
        return LinearParams(module.weight, module.bias, module.in_features, module.out_features)
    if is_conv1d(module):
        w = cast(torch.Tensor, module.weight).t()
        return LinearParams(w, cast(Any, module).bias, int(w.shape[1]), int(w.shape[0]))
    return None


class AdapterHost(nn.Module):
    """Common logic: the layer lookup and how several adapters combine at one site."""

    def __init__(self, base: nn.Module, state: AdapterState):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.fusions = nn.ModuleDict()  # AdapterFusion layers: fusions[fusion_name][site_key]
        object.__setattr__(self, "_state", state)
        self.site_kinds: dict[str, str] = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def adapter_group(self, adapter: str) -> nn.ModuleDict:
        """The layers of `adapter` at this host, by site key (KeyError when it has none here)."""
        return cast(nn.ModuleDict, self.adapters[adapter])

    def fusion_group(self, fusion: str) -> nn.ModuleDict:
        """The AdapterFusion layers `fusion` at this host, by site key (KeyError when it has none here)."""
        return cast(nn.ModuleDict, self.fusions[fusion])

    def add_layer(self, adapter: str, key: str, kind: str, layer: nn.Module) -> None:
        if adapter not in self.adapters:
            self.adapters[adapter] = nn.ModuleDict()
        self.adapter_group(adapter)[key] = layer
        self.site_kinds[key] = kind

    def remove_adapter(self, adapter: str) -> None:
        if adapter in self.adapters:
            del self.adapters[adapter]

    def layer(self, adapter: str, key: str):
        group = self.adapter_group(adapter) if adapter in self.adapters else None
        if group is None or key not in group:
            return None
        layer = group[key]
        return None if getattr(layer, "merged", False) else layer

    def has_active(self, key: str) -> bool:
        st = self._state
        names = st.route_names if st.route is not None else st.active
        return any(n is not None and self.layer(n, key) is not None for n in names)

    def _run(self, layer, key, y, x, weight, bias):
        if self.site_kinds[key] in ("output", "input", "prefix"):
            return layer(y)
        return layer(x, y, weight, bias)

    def stack_layers(self, key: str) -> list | None:
        """The active, unmerged layers at `key` in stacking order when the adapters are plainly stacked
        (no routing, mode "stack"); None in every other mode (the caller then takes `run_adapters`)."""
        st = self._state
        if st.route is not None or st.mode != "stack":
            return None
        groups = self.adapters._modules
        out = []
        for n in st.active:
            group = groups.get(n)
            layer = group._modules.get(key) if group is not None else None
            if layer is not None and not getattr(layer, "merged", False):
                out.append(layer)
        return out

    def linear_site(self, key: str, x: torch.Tensor, weight, bias, y: torch.Tensor | None = None) -> torch.Tensor:
        """The output of linear site `key` for input `x`: the base projection `F.linear(x, weight, bias)` (or
        `y`, which must equal it) with the active layers applied, computed with as little extra work as the
        layers allow. In plain stacking the first layer may take a shortcut (see the layer contract in
        `vlkit.adapters.base.AdapterVariant`): `input_transform(x)` (the projection runs once, on the changed
        input, instead of a second projection inside the layer) or `from_base(x, y, weight, bias)` (the layer
        reuses the base output). Every other mode goes through `run_adapters`, exactly as before."""
        layers = self.stack_layers(key)
        if layers is None:
            return self.run_adapters(key, F.linear(x, weight, bias) if y is None else y, x, weight, bias)
        if not layers:
            return F.linear(x, weight, bias) if y is None else y
        first, rest = layers[0], layers[1:]
        cls = type(first)  # looked up on the class first: a miss on an nn.Module instance is slow
        pre = first.input_transform if y is None and hasattr(cls, "input_transform") else None
        if pre is not None:
            y = F.linear(pre(x), weight, bias)
        else:
            if y is None:
                y = F.linear(x, weight, bias)
            shortcut = first.from_base if hasattr(cls, "from_base") else None
            y = shortcut(x, y, weight, bias) if shortcut is not None else first(x, y, weight, bias)
        for layer in rest:
            y = layer(x, y, weight, bias)
        return y

    def run_adapters(
        self, key: str, y: torch.Tensor, x=None, weight=None, bias=None, batch_dim: int | None = None
    ) -> torch.Tensor:
        st = self._state
        if st.route is not None:
            return self._routed(key, y, x, weight, bias, batch_dim)
        if not st.active:
            return y
        layers = [(n, self.layer(n, key)) for n in st.active]
        layers = [(n, layer) for n, layer in layers if layer is not None]
        if not layers:
            return y
        if st.mode == "fuse":
            group = self.fusion_group(st.fusion) if st.fusion in self.fusions else None
            fusion: Any = group[key] if group is not None and key in group else None
            if fusion is None:  # no fusion layer here: the plain average of the adapters' outputs
                return sum(self._run(layer, key, y, x, weight, bias) for _, layer in layers) / len(layers)
            by_name = dict(layers)
            outs = [self._run(by_name[n], key, y, x, weight, bias) for n in fusion.names if n in by_name]
            return fusion(y, outs)
        if st.mode == "parallel":
            base_y = y
            for n, layer in layers:
                w = st.weights.get(n, 1.0)
                y = y + w * (self._run(layer, key, base_y, x, weight, bias) - base_y)
            return y
        for _, layer in layers:
            y = self._run(layer, key, y, x, weight, bias)
        return y

    def _routed(self, key, y, x, weight, bias, batch_dim):
        """Per-sample routing: each adapter's layer runs on its own samples only (gathered along the batch
        dimension, results put back in order), so a mixed batch costs about one adapter pass, not one per
        adapter. A layer with `per_sample = False` (it reads batch-aligned state, e.g. the cross-modal
        adapter's other-tower context) runs on the whole batch and its samples are picked with `where`."""
        st = self._state
        dim = _batch_dim(st.route, y, batch_dim)
        route = _route_for(st.route, y, dim)
        groups = st.route_groups(y.device)
        kind = self.site_kinds[key]
        parts, order, covered = [], [], torch.zeros(route.numel(), dtype=torch.bool, device=y.device)
        out = y
        for i, name in enumerate(st.route_names):
            layer = self.layer(name, key) if name is not None else None
            idx = groups[i]
            if layer is None or idx.numel() == 0:
                continue
            if kind in ("output", "input", "linear") and getattr(layer, "per_sample", True):
                xs = x.index_select(dim, idx) if x is not None else None
                parts.append(self._run(layer, key, y.index_select(dim, idx), xs, weight, bias))
                order.append(idx)
                covered[idx] = True
            else:
                out = torch.where(route == i, self._run(layer, key, y, x, weight, bias), out)
        if not parts:
            return out
        rest = (~covered).nonzero().flatten()
        if rest.numel():
            parts.append(out.index_select(dim, rest))
            order.append(rest)
        perm = torch.cat(order)
        return torch.cat(parts, dim).index_select(dim, torch.argsort(perm))


def _batch_dim(route: torch.Tensor, y: torch.Tensor, batch_dim: int | None) -> int:
    """The batch dimension of `y` under a route: `batch_dim` when given, else 0 (or 1 when only dimension 1
    matches the route's length, for sequence-first layouts)."""
    n = route.numel()
    if batch_dim is None:
        batch_dim = 1 if (y.dim() > 1 and y.shape[0] != n and y.shape[1] == n) else 0
    if y.dim() <= batch_dim or y.shape[batch_dim] != n:
        raise RuntimeError(
            f"a route for {n} samples is set but this forward has batch shape {tuple(y.shape)}; "
            "clear it (AdaptedModel.clear_route()) or set one per batch"
        )
    return batch_dim


def _route_for(route: torch.Tensor, y: torch.Tensor, batch_dim: int | None) -> torch.Tensor:
    """The per-sample route as a tensor broadcastable against `y` along its batch dimension (`_batch_dim`)."""
    n = route.numel()
    batch_dim = _batch_dim(route, y, batch_dim)
    shape = [1] * y.dim()
    shape[batch_dim] = n
    return route.to(y.device).view(shape)


class AdaptedOutput(AdapterHost):
    """Adapters on the output of a sub-layer (attention or MLP), or on its input (sites of kind "input",
    applied to the first argument or `hidden_states=`); tuple outputs keep their other items. On an
    nn.Embedding, sites of kind "tokens" get `(ids, embeddings, weight, None)` (see `tokens_site`)."""

    def forward(self, *args, **kwargs):
        for key in self.site_kinds:
            if self.site_kinds[key] != "input" or not self.has_active(key):
                continue
            if args:
                args = (self.run_adapters(key, args[0]), *args[1:])
            elif "hidden_states" in kwargs:
                kwargs = {**kwargs, "hidden_states": self.run_adapters(key, kwargs["hidden_states"])}
        out = self.base(*args, **kwargs)
        for key in self.site_kinds:  # token-embedding sites first: they replace raw embeddings
            if self.site_kinds[key] == "tokens" and self.has_active(key):
                ids = args[0] if args else kwargs.get("input", kwargs.get("input_ids"))
                out = self.run_adapters(key, out, ids, self.base.weight, None)
        for key in self.site_kinds:
            if self.site_kinds[key] in ("input", "tokens"):
                continue
            if isinstance(out, tuple):
                out = (self.run_adapters(key, out[0]), *out[1:])
            else:
                out = self.run_adapters(key, out)
        return out


class AdaptedLinear(AdapterHost):
    """Adapters on an nn.Linear or a transformers `Conv1D`: each layer sees the input, the base output, and the
    base weight as (out_features, in_features) (`linear_params`; a Conv1D's is its transposed parameter)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base: Any = self._modules["base"]
        kinds = self.site_kinds
        if len(kinds) == 1:  # the usual case: one linear site
            ((key, kind),) = kinds.items()
            if kind == "linear":
                if type(base).forward is nn.Linear.forward:
                    return self.linear_site(key, x, base.weight, base.bias)
                if is_conv1d(base):  # F.linear(x, W.t(), b) is Conv1D's own addmm, bit for bit
                    return self.linear_site(key, x, base.weight.t(), base.bias)
        y = base(x)
        lin = linear_params(base)
        weight, bias = (lin.weight, lin.bias) if lin is not None else (None, None)
        for key in self.site_kinds:
            if self.site_kinds[key] == "linear":
                y = self.run_adapters(key, y, x, weight, bias)
            else:
                y = self.run_adapters(key, y)
        return y


class AdaptedMHA(AdapterHost):
    """nn.MultiheadAttention with adapter sites on q, k, v, out projections and on its output.

    With no projection adapter active it calls the original module; otherwise it computes the same
    attention explicitly (in-projection split into q, k, v; scaled dot-product attention; out-projection).
    """

    def _proj(self, i: int):
        base: Any = self.base
        e = base.embed_dim
        w = base.in_proj_weight[i * e : (i + 1) * e]
        b = base.in_proj_bias[i * e : (i + 1) * e] if base.in_proj_bias is not None else None
        return w, b

    def forward(
        self,
        query,
        key=None,
        value=None,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        key = query if key is None else key
        value = query if value is None else value
        if INPUT_KEY in self.site_kinds and self.has_active(INPUT_KEY):  # self-attention input: q, k, v alike
            adapted = self.run_adapters(INPUT_KEY, query, batch_dim=0 if self.base.batch_first else 1)
            key = adapted if key is query else key
            value = adapted if value is query else value
            query = adapted
        proj_keys = ("attn_q", "attn_k", "attn_v", "attn_out")
        if not any(k in self.site_kinds and self.has_active(k) for k in proj_keys):
            out, weights = self.base(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        else:
            out, weights = self._explicit(query, key, value, key_padding_mask, attn_mask, is_causal), None
            plain = self._plain_samples(proj_keys)
            if plain is not None:  # routed samples with no projection adapter here: the original module, exactly
                base_out = self.base(
                    query,
                    key,
                    value,
                    key_padding_mask=key_padding_mask,
                    need_weights=False,
                    attn_mask=attn_mask,
                    is_causal=is_causal,
                )[0]
                out = torch.where(_route_for(plain, out, 0 if self.base.batch_first else 1), base_out, out)
        if "attn" in self.site_kinds:
            out = self.run_adapters("attn", out, batch_dim=0 if self.base.batch_first else 1)
        return out, weights

    def _plain_samples(self, proj_keys):
        """Under per-sample routing, a bool (batch,) of samples whose adapter has no projection layer in
        this module (they take the original attention path); None when there are none or no route."""
        st = self._state
        if st.route is None:
            return None
        uses = [
            n is not None and any(k in self.site_kinds and self.layer(n, k) is not None for k in proj_keys)
            for n in st.route_names
        ]
        table = torch.tensor([False, *uses])  # index 0: route -1 (no adapter)
        plain = ~table[st.route.cpu() + 1]
        return plain.to(st.route.device) if bool(plain.any()) else None

    def _site(self, key, x, w, b, y=None):
        """Projection `key` of `x` (base output `y` when already computed) with its adapters, if it has any."""
        if key in self.site_kinds:
            return self.linear_site(key, x, w, b, y)
        return F.linear(x, w, b) if y is None else y

    def _explicit(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        base: Any = self.base
        if base.in_proj_weight is None:
            raise RuntimeError("MultiheadAttention with separate q/k/v weights is not supported")
        self_attention = query is key and key is value
        if not base.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        bsz, tgt, e = query.shape
        src = key.shape[1]
        h = base.num_heads
        hd = e // h
        (wq, bq), (wk, bk), (wv, bv) = self._proj(0), self._proj(1), self._proj(2)
        if self_attention:  # one fused in-projection, as the module's own path; q, k, v are views of it
            yq, yk, yv = F.linear(query, base.in_proj_weight, base.in_proj_bias).split(e, dim=-1)
        else:
            yq = yk = yv = None  # each projected where it is needed (with its adapters' shortcuts)
        q = self._site("attn_q", query, wq, bq, yq)
        k = self._site("attn_k", key, wk, bk, yk)
        v = self._site("attn_v", value, wv, bv, yv)
        q = q.view(bsz, tgt, h, hd).transpose(1, 2)
        k = k.view(bsz, src, h, hd).transpose(1, 2)
        v = v.view(bsz, src, h, hd).transpose(1, 2)
        mask = None
        if attn_mask is not None:
            mask = attn_mask
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
            mask = mask.to(q.dtype)
            if mask.dim() == 3:
                mask = mask.view(bsz, h, tgt, src)
        if key_padding_mask is not None:
            kpm = key_padding_mask
            if kpm.dtype == torch.bool:
                kpm = torch.zeros(kpm.shape, dtype=q.dtype, device=q.device).masked_fill(kpm, float("-inf"))
            kpm = kpm.to(q.dtype).view(bsz, 1, 1, src)
            mask = kpm if mask is None else mask + kpm
        drop = base.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=drop, is_causal=bool(is_causal and mask is None)
        )
        o = o.transpose(1, 2).reshape(bsz, tgt, e)
        ow, ob = base.out_proj.weight, base.out_proj.bias
        out = self._site("attn_out", o, ow, ob)
        if not base.batch_first:
            out = out.transpose(0, 1)
        return out
