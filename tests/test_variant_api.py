"""The adapter-variant API as an outside plugin sees it: `create_layer` gets the base, `linear_weights` gives any
projection's weights, and a variant declares sharing (`shareable`) and merging (`merge_methods`, `merge`,
`merge_free_options`) itself.

The DoRA-style variant below uses only the public surface (vlkit.adapters, vlkit.hookspecs, vlkit.inject and
the merge / compose entry points), as a plugin package would.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlkit
from vlkit.adapters import AdapterConfig, AdapterVariant, LinearView, linear_weights
from vlkit.hookspecs import hookimpl

DORA = "test_dora"
PRODUCT = "test_scale"


# --- a DoRA-style variant, written as a plugin would ------------------------------------------------------------

@dataclass
class DoraConfig(AdapterConfig):
    rank: int = 2


class DoraLayer(nn.Module):
    """W' = m ⊙ (W + up·down) / ‖W + up·down‖ (row norms), m initialised to ‖W‖; applied as y + x (W' - W)ᵀ."""

    def __init__(self, base, rank: int):
        super().__init__()
        w = base.weight.detach()
        self.magnitude = nn.Parameter(w.norm(dim=1).clone())
        self.down = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))
        self.merged = False

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        v = weight + self.up @ self.down
        return self.magnitude.unsqueeze(1) * v / v.norm(dim=1, keepdim=True)

    def forward(self, x, y, weight, bias):
        return y + F.linear(x, self.adapted_weight(weight) - weight)


class DoraVariant(AdapterVariant):
    name = DORA
    summary = "weight-decomposed low-rank update (test)"
    config_cls = DoraConfig
    kinds = ("linear",)
    default_roles = ("attn.q", "attn.v", "mlp.fc1")
    shareable = {"half_shared_down": ("down",)}

    def __init__(self):
        self.bases: list = []

    def create_layer(self, site, config, base):
        assert tuple(base.weight.shape) == (site.out_features, site.in_features)
        self.bases.append((site, base))
        return DoraLayer(base, config.rank)

    def merged_weight(self, layer, weight, bias):
        return layer.adapted_weight(weight).to(weight.dtype), bias


@dataclass
class ScaleConfig(AdapterConfig):
    init: float = 1.0
    note: str = ""


class ScaleLayer(nn.Module):
    def __init__(self, features: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((features,), float(init)))

    def forward(self, y):
        return y * self.scale


class ScaleVariant(AdapterVariant):
    """Output scaling, written in the older two-argument `create_layer` form; merges with its own `product`."""

    name = PRODUCT
    config_cls = ScaleConfig
    kinds = ("output",)
    default_roles = ("mlp",)
    merge_methods = ("product",)

    def create_layer(self, site, config, base=None):
        return ScaleLayer(site.out_features, config.init)

    def merge_free_options(self, method):
        return ("note",)

    def merge(self, method, configs, tensors, weights, options):
        assert method == "product" and options["rank"] is None
        out = {k: torch.stack([t[k] ** w for t, w in zip(tensors, weights)]).prod(0) for k in tensors[0]}
        return out, dict(configs[0]), {"sources_multiplied": len(tensors)}


class VariantPlugin:
    def __init__(self):
        self.dora = DoraVariant()

    @hookimpl
    def register_adapters(self, register):
        register(DORA, self.dora, DoraVariant.summary)
        register(PRODUCT, ScaleVariant(), "output scaling (test)")


@pytest.fixture
def plugin(reset_plugins):
    p = VariantPlugin()
    vlkit.get_plugins().register_plugin(p, name="test-variant-api")
    return p


def _encode(bb, pixels, tokens):
    with torch.no_grad():
        return bb.encode_image(pixels, normalize=True), bb.encode_text(tokens, normalize=True)


def _layers(bb, name="default"):
    from vlkit.adapters.inject import adapter_layers

    return adapter_layers(bb, name)


# --- create_layer gets the base ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tiny", "hf"])
def test_dora_from_base_weights_identity_merge_unmerge(kind, plugin, make_backbone, sample_inputs):
    from vlkit.adapters.inject import merge_adapter, remove_adapter, unmerge_adapter

    bb = make_backbone(kind)
    pixels, tokens = sample_inputs(bb)
    ref = _encode(bb, pixels, tokens)
    record = vlkit.inject(bb, DORA)
    assert {s.role for s in record.sites} == {"attn.q", "attn.v", "mlp.fc1"}
    assert len(plugin.dora.bases) == len(record.sites)
    layers = _layers(bb)
    for site, base in plugin.dora.bases:
        if kind == "tiny" and site.role.startswith("attn."):
            assert isinstance(base, LinearView) and base.role == site.role
            assert isinstance(base.module, nn.MultiheadAttention)
        else:
            assert isinstance(base, nn.Linear)
        torch.testing.assert_close(layers[site.path].magnitude, base.weight.norm(dim=1), rtol=0, atol=0)
    out = _encode(bb, pixels, tokens)
    for a, r in zip(out, ref):  # identity at init (up to rounding of m·W/‖W‖)
        torch.testing.assert_close(a, r, atol=1e-6, rtol=0)

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            for p in (layer.magnitude, layer.up):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    tuned = _encode(bb, pixels, tokens)
    assert not torch.allclose(tuned[0], ref[0], atol=1e-4)
    before = {k: v.detach().clone() for k, v in bb.base_parameters().items()}
    merge_adapter(bb, "default")
    assert any(not torch.equal(v, before[k]) for k, v in bb.base_parameters().items())
    merged = _encode(bb, pixels, tokens)
    for a, t in zip(merged, tuned):
        torch.testing.assert_close(a, t, atol=1e-5, rtol=0)
    unmerge_adapter(bb, "default")
    for k, v in bb.base_parameters().items():
        assert torch.equal(v, before[k]), f"{k} not restored bit-exactly"
    again = _encode(bb, pixels, tokens)
    assert torch.equal(again[0], tuned[0]) and torch.equal(again[1], tuned[1])
    merge_adapter(bb, "default")
    remove_adapter(bb, "default")
    assert all(torch.equal(v, before[k]) for k, v in bb.base_parameters().items())


def test_dora_adapter_saves_only_its_own_tensors_and_reloads(plugin, make_backbone, sample_inputs, tmp_path):
    bb = make_backbone("tiny")
    pixels, tokens = sample_inputs(bb)
    vlkit.inject(bb, DORA)
    with torch.no_grad():
        for layer in _layers(bb).values():
            layer.up.add_(0.1)
    out = _encode(bb, pixels, tokens)
    path = vlkit.save_adapter(bb, tmp_path / "dora")
    from vlkit.adapters.files import read_adapter_weights

    names = {k.rsplit(".", 1)[-1] for k in read_adapter_weights(path)}
    assert names == {"magnitude", "down", "up"}
    fresh = make_backbone("tiny")
    vlkit.load_adapter(fresh, path)
    again = _encode(fresh, pixels, tokens)
    assert torch.equal(out[0], again[0]) and torch.equal(out[1], again[1])


def test_create_layer_takes_the_declared_base_argument(plugin, make_backbone, sample_inputs):
    import inspect

    for var in (plugin.dora, ScaleVariant(), vlkit.get_plugins().registry("adapter").get("lora")):
        assert "base" in inspect.signature(var.create_layer).parameters  # AdapterVariant's declared signature
    bb = make_backbone("tiny")
    pixels, tokens = sample_inputs(bb)
    ref = _encode(bb, pixels, tokens)
    vlkit.inject(bb, PRODUCT)
    out = _encode(bb, pixels, tokens)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


# --- linear_weights -----------------------------------------------------------------------------------------------

def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_linear_weights_of_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)
    e = mha.embed_dim
    for i, part in enumerate("qkv"):
        w, b = linear_weights(mha, f"attn.{part}")
        assert torch.equal(w, mha.in_proj_weight[i * e:(i + 1) * e])
        assert torch.equal(b, mha.in_proj_bias[i * e:(i + 1) * e])
        assert _same_storage(w, mha.in_proj_weight) and _same_storage(b, mha.in_proj_bias)
        assert linear_weights(mha, part)[0].shape == w.shape
    w, b = linear_weights(mha, "attn.out")
    assert w is mha.out_proj.weight and b is mha.out_proj.bias
    # a view: writing through it changes the module
    view = LinearView(mha, "attn.k")
    assert (view.in_features, view.out_features) == (8, 8)
    with torch.no_grad():
        view.weight.zero_()
    w_all = mha.in_proj_weight.detach()
    assert float(w_all[e:2 * e].abs().sum()) == 0.0 and float(w_all[:e].abs().sum()) > 0
    # separate q/k/v weights (key/value widths differ), no bias
    sep = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, bias=False)
    assert linear_weights(sep, "attn.k")[0] is sep.k_proj_weight and linear_weights(sep, "attn.k")[1] is None
    assert tuple(linear_weights(sep, "attn.v")[0].shape) == (8, 6)
    from vlkit.errors import InjectionError

    with pytest.raises(InjectionError, match="mlp.fc1"):
        linear_weights(mha, "mlp.fc1")


def test_linear_weights_of_plain_linear():
    lin = nn.Linear(3, 5)
    for role in (None, "attn.q", "mlp.fc2"):
        w, b = linear_weights(lin, role)
        assert w is lin.weight and b is lin.bias


def test_linear_weights_on_backbones_match_their_own_slices(make_backbone):
    from vlkit.backbones.base import resolve_module

    hf = make_backbone("hf")
    layer = hf.model.vision_model.encoder.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    for part, attr in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "out_proj")):
        w, b = linear_weights(attn, f"attn.{part}")
        assert w is getattr(attn, attr).weight and b is getattr(attn, attr).bias
    assert linear_weights(mlp, "mlp.fc1")[0] is mlp.fc1.weight and linear_weights(mlp, "mlp.fc2")[0] is mlp.fc2.weight

    tiny = make_backbone("tiny")
    block = tiny.blocks("vision")[0]
    mha = resolve_module(tiny.model, block.sites["attn.q"].host_path)
    assert isinstance(mha, nn.MultiheadAttention)
    vlkit.inject(tiny, "lora", modules="all")  # hosts now wrap the modules; the helper sees through them
    host = resolve_module(tiny.model, block.path).attn
    e = mha.embed_dim
    for i, part in enumerate("qkv"):
        w, b = linear_weights(host, f"attn.{part}")
        assert torch.equal(w, mha.in_proj_weight[i * e:(i + 1) * e]) and _same_storage(w, mha.in_proj_weight)
    fc1 = resolve_module(tiny.model, block.sites["mlp.fc1"].host_path)
    assert linear_weights(fc1, "mlp.fc1")[0] is fc1.base.weight


# --- sharing and merging declared by the variant -----------------------------------------------------------------

def test_sharing_from_the_variant_declaration(plugin, make_backbone):
    from vlkit.compose.sharing import shared_parts, tie_shared
    from vlkit.errors import ConfigError

    assert shared_parts(DORA, "half_shared_down") == ("down",)
    assert shared_parts(plugin.dora, "half_shared_down") == ("down",)
    assert shared_parts(DORA, "shared") == ("*",) and shared_parts(DORA, "per_task") == ()
    with pytest.raises(ConfigError, match=r"half_shared_up.*test_dora.*defined for .*lora"):
        shared_parts(DORA, "half_shared_up")
    bb = make_backbone("tiny")
    vlkit.inject(bb, DORA, name="t1")
    vlkit.inject(bb, DORA, name="t2")
    shared = tie_shared(bb, ["t1", "t2"], "half_shared_down", check=False)
    l1, l2 = _layers(bb, "t1"), _layers(bb, "t2")
    for path in l1:
        assert l1[path].down is l2[path].down and l1[path].up is not l2[path].up
        assert torch.equal(shared[f"{path}.down"], l1[path].down)


def _saved(bb, name, out: Path) -> Path:
    return vlkit.save_adapter(bb, out, name=name)


def test_merge_methods_from_the_variant_declaration(plugin, make_backbone, tmp_path):
    from vlkit.adapters.files import read_adapter_weights
    from vlkit.compose.merge import merge_adapters, merge_methods
    from vlkit.errors import ConfigError, IncompatibleAdapterError

    assert "product" in merge_methods() and merge_methods()[:3] == ("linear", "task_arithmetic", "ties")
    bb = make_backbone("tiny")
    vlkit.inject(bb, PRODUCT, name="a")
    vlkit.inject(bb, PRODUCT, name="b", note="other note")  # a merge-free option
    with torch.no_grad():
        for i, name in enumerate(("a", "b")):
            for layer in _layers(bb, name).values():
                layer.scale.fill_(2.0 + i)
    a, b = _saved(bb, "a", tmp_path / "a"), _saved(bb, "b", tmp_path / "b")
    cfg = merge_adapters([a, b], tmp_path / "m", method="product", weights=[1.0, 2.0])
    assert cfg["composition"]["sources_multiplied"] == 2 and cfg["config"]["note"] == ""
    for t in read_adapter_weights(tmp_path / "m").values():
        assert torch.allclose(t, torch.full_like(t, 2.0 * 3.0 ** 2))
    merge_adapters([a], tmp_path / "one", method="product")  # a variant's own method may take one source
    cfg = merge_adapters([a, b], tmp_path / "lin", method="linear")  # elementwise methods for every variant
    for t in read_adapter_weights(tmp_path / "lin").values():
        assert torch.allclose(t, torch.full_like(t, 2.5))
    vlkit.inject(bb, PRODUCT, name="c", init=0.5)
    c = _saved(bb, "c", tmp_path / "c")
    with pytest.raises(IncompatibleAdapterError, match=r"config differs: init"):
        merge_adapters([a, c], tmp_path / "x", method="product")
    # DoRA (no own methods): elementwise merges work, another variant's method is refused naming its owners
    bb2 = make_backbone("tiny")
    vlkit.inject(bb2, DORA, name="d1")
    vlkit.inject(bb2, DORA, name="d2")
    d1, d2 = _saved(bb2, "d1", tmp_path / "d1"), _saved(bb2, "d2", tmp_path / "d2")
    merge_adapters([d1, d2], tmp_path / "dm", method="task_arithmetic", weights=[0.5, 0.5])
    vlkit.load_adapter(make_backbone("tiny"), tmp_path / "dm")
    with pytest.raises(ConfigError, match=r"'product' is for test_scale adapters; these are 'test_dora'"):
        merge_adapters([d1, d2], tmp_path / "dx", method="product")


def test_core_merge_and_sharing_name_no_variant():
    root = Path(vlkit.__file__).parent
    for rel in ("compose/merge.py", "compose/sharing.py", "adapters/weights.py"):
        text = (root / rel).read_text()
        code = re.sub(r'(?s)""".*?"""', "", text)
        assert not re.search(r"lora|bottleneck|ia3", code, re.I), rel
