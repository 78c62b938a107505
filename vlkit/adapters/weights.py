"""The base weights behind a site: (weight, bias) of any projection, whatever attention module holds it.

`linear_weights(module, role)` gives the weight (out_features, in_features) and bias (out_features or
None) of one projection, as views of the module's own parameters (writing into them under
`torch.no_grad()` changes the module; they carry autograd like any slice of a parameter):

- `nn.MultiheadAttention` (open_clip, tiny): roles `attn.q` / `attn.k` / `attn.v` are the rows of the
  fused `in_proj_weight` / `in_proj_bias` (or the separate `q_proj_weight`, ... when key/value widths
  differ); `attn.out` is `out_proj`;
- attention with separate projections (transformers `CLIPAttention` and the like): `q_proj`, `k_proj`,
  `v_proj`, `out_proj` (also `o_proj`) for `attn.q` / `attn.k` / `attn.v` / `attn.out`;
- GPT-2's attention (`GPT2Attention`): `attn.qkv` is the fused `c_attn`, `attn.out` is `c_proj` (cross-attention:
  `xattn.q` is `q_attn`, `xattn.kv` the fused `c_attn`);
- an MLP module: `mlp.fc1` is `fc1` / `c_fc`, `mlp.fc2` is `fc2` / `c_proj`;
- `nn.Linear` (or any module with a `weight`): its own weight and bias, whatever the role;
- transformers' `Conv1D` (GPT-2's projections, weight stored (in, out)): its weight transposed, a view, so it is
  (out_features, in_features) like every other (`vlkit.backbones.hosts.linear_params`).

Adapter hosts (vlkit's wrappers) are seen through. `base_for_site` is what `inject` hands a variant's
`create_layer` as `base`; `LinearView` is that object for a projection that is not a module of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones.hosts import linear_params, unwrap_host
from ..errors import InjectionError

ATTN_PARTS = ("q", "k", "v", "out")
_SEPARATE = {
    "q": ("q_proj", "q_attn"),
    "k": ("k_proj",),
    "v": ("v_proj",),
    "out": ("out_proj", "o_proj", "c_proj"),
    "qkv": ("qkv", "c_attn"),
    "kv": ("c_attn",),
}
_MLP = {"fc1": ("fc1", "c_fc"), "fc2": ("fc2", "c_proj")}


def _part(role: str | None) -> str | None:
    """`attn.q` -> `q`, `mlp.fc1` -> `fc1`, `q` -> `q`; None stays None."""
    return None if role is None else role.split(".")[-1]


def linear_weights(module: nn.Module, role: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the projection `role` of `module` (see the module docstring for the kinds).

    `role` is a site role (`attn.q`, `attn.k`, `attn.v`, `attn.out`, `mlp.fc1`, `mlp.fc2`) or its last part
    (`q`, `fc1`, ...); for a plain linear module it may be None. InjectionError when `module` has no such
    projection."""
    module = unwrap_host(module)
    part = _part(role)
    if isinstance(module, LinearView):
        return module.weight, module.bias
    lin = linear_params(module)
    if lin is not None:
        return lin.weight, lin.bias
    if isinstance(module, nn.MultiheadAttention):
        if part == "out":
            return module.out_proj.weight, module.out_proj.bias
        if part not in ("q", "k", "v"):
            raise InjectionError(
                f"nn.MultiheadAttention has no projection for role {role!r} "
                f"(roles: {', '.join('attn.' + p for p in ATTN_PARTS)})"
            )
        i = "qkv".index(part)
        e = module.embed_dim
        rows = slice(i * e, (i + 1) * e)
        if module.in_proj_weight is not None:
            weight = module.in_proj_weight[rows]
        else:
            weight = getattr(module, f"{part}_proj_weight")
        bias = module.in_proj_bias[rows] if module.in_proj_bias is not None else None
        return weight, bias
    if part in _SEPARATE or part in _MLP:
        for attr in _SEPARATE.get(part, ()) + _MLP.get(part, ()):
            sub = getattr(module, attr, None)
            if sub is not None:
                sub = unwrap_host(sub)
                lin = linear_params(sub)
                if lin is not None:
                    return lin.weight, lin.bias
                sub_weight = getattr(sub, "weight", None)
                if isinstance(sub_weight, torch.Tensor):
                    return sub_weight, getattr(sub, "bias", None)
    own = getattr(module, "weight", None)
    if isinstance(own, torch.Tensor) and own.dim() == 2:
        return own, getattr(module, "bias", None)
    raise InjectionError(f"{type(module).__name__} has no linear projection for role {role!r}")


class LinearView:
    """The projection `role` of a module that holds several (nn.MultiheadAttention's q, k, v), or a transformers
    `Conv1D` (its weight transposed), seen as a linear layer: live `weight` (out_features, in_features) / `bias`
    (views into the module's parameters, read on each access),
    `in_features`, `out_features`, and `module` / `role` it came from. Not an nn.Module, so keeping it on
    an adapter layer does not put the base's parameters into the adapter."""

    def __init__(self, module: nn.Module, role: str):
        self.module = unwrap_host(module)
        self.role = role
        linear_weights(self.module, role)  # fail early on an unknown role

    @property
    def weight(self) -> torch.Tensor:
        return linear_weights(self.module, self.role)[0]

    @property
    def bias(self) -> torch.Tensor | None:
        return linear_weights(self.module, self.role)[1]

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def __repr__(self) -> str:
        return f"LinearView({type(self.module).__name__}, role={self.role!r}, shape={tuple(self.weight.shape)})"


def base_for_site(module: nn.Module, site) -> nn.Module | LinearView:
    """What a variant's `create_layer` gets as `base` for `site`, given the module at `site.host_path`.

    Linear sites: the nn.Linear itself, or a LinearView: of the role's rows when the host module holds several
    projections (nn.MultiheadAttention), of the transposed weight of a transformers `Conv1D` (GPT-2), so `weight`
    is (out_features, in_features) everywhere. Every other kind (output, input, ...): the wrapped module itself."""
    module = unwrap_host(module)
    if site.kind != "linear":
        return module
    if isinstance(module, nn.Linear):
        return module
    return LinearView(module, site.role)
