"""Conformance: every registered adapter variant on every built-in backbone kind keeps the core's promises.

Variants come from the adapter registry at collection time, so plugin variants (e.g. ia3) are covered too.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

import vlkit
from vlkit.adapters.base import AdapterVariant
from vlkit.adapters.files import CONFIG_NAME, WEIGHTS_NAME
from vlkit.adapters.inject import adapter_layers, adapter_parameters, merge_adapter, remove_adapter, unmerge_adapter
from vlkit.backbones.base import resolve_module
from vlkit.errors import AdapterFileError, ConfigError, IncompatibleAdapterError, UnknownNameError
from vlkit.plugins import registry
from vlkit.adapters.model import AdaptedModel

BACKBONES = ("tiny", "open_clip", "hf")
VARIANT_NAMES = [n for n in registry("adapter").names()  # CLIP-style backbones here; generative ones: test_generative
                 if "contrastive" in registry("adapter").get(n).backbone_kinds]
CASES = [pytest.param(v, {}, id=v) for v in VARIANT_NAMES]
CASES.append(pytest.param("lora", {"modules": "all"}, id="lora-all"))
CASES.append(pytest.param("bottleneck", {"unfreeze_layernorm": True}, id="bottleneck-ln"))
CASES.append(pytest.param("bottleneck", {"attn_position": "input"}, id="bottleneck-attn-input"))
CASES.append(pytest.param("bottleneck", {"attn_position": "input", "mlp_position": "input", "embed": True},
                          id="bottleneck-inputs-embed"))


def _mergeable(variant: str) -> bool:
    return type(registry("adapter").get(variant)).merged_weight is not AdapterVariant.merged_weight


MERGE_CASES = [c for c in CASES if _mergeable(c.values[0])]


def forward_both(bb, pixels, tokens):
    """Normalised image and text embeddings as a trainer gets them: image i paired with text i, so that a
    joint variant (one that fuses the towers) runs its cross-modal path; otherwise the two encoders apart."""
    pair = getattr(bb, "encode_pair", None)
    if pair is not None:
        return pair(pixels, tokens, normalize=True)
    return bb.encode_image(pixels, normalize=True), bb.encode_text(tokens, normalize=True)


def encode(bb, pixels, tokens):
    with torch.no_grad():
        return forward_both(bb, pixels, tokens)


def trainables(bb, name="default") -> dict[int, tuple[str, torch.nn.Parameter]]:
    """id -> (name, parameter) of every parameter of adapter `name`, its extra trainables included."""
    out = {}
    for path, layer in adapter_layers(bb, name).items():
        for pname, p in layer.named_parameters():
            out[id(p)] = (f"{path}.{pname}", p)
    for pname, p in AdaptedModel.of(bb).records[name].extra.items():
        out[id(p)] = (f"base::{pname}", p)
    return out


def state_buffers(bb, name="default") -> dict[str, torch.Tensor]:
    """Floating-point buffers saved with adapter `name` (a training-free variant's state, e.g. a cache)."""
    out = {}
    for path, layer in adapter_layers(bb, name).items():
        persistent = set(layer.state_dict())
        for bname, b in layer.named_buffers():
            if bname in persistent and b.is_floating_point():
                out[f"{path}.{bname}"] = b
    return out


def perturb(bb, name="default", seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(trainables(bb, name).values(), key=lambda t: t[0]):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for _, b in sorted(state_buffers(bb, name).items()):
            b.add_(0.1 * torch.randn(b.shape, generator=g, dtype=b.dtype))


def default_towers(variant: str) -> set[str]:
    """The towers a variant targets with its default options (e.g. text only for coop)."""
    towers = registry("adapter").get(variant).make_config().towers
    return {"vision", "text"} if towers == "both" else {towers}


@pytest.fixture
def sample_inputs():
    """Two random images and two captions, the first beginning with coop's documented initial prompt ("a photo
    of a"), so that a context learner acts on one caption and leaves the other alone."""

    def make(backbone, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn(2, 3, backbone.image_size, backbone.image_size, generator=g)
        return pixels, backbone.tokenize(["a photo of a red cube on the mat", "that hat"])

    return make


def _same(a, b) -> bool:
    """Both towers' outputs bit-identical (a variant may act on one tower only)."""
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- identity at init ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,opts", CASES)
@pytest.mark.parametrize("kind", BACKBONES)
def test_unchanged_at_init(kind, variant, opts, make_backbone, sample_inputs):
    bb = make_backbone(kind)
    pixels, tokens = sample_inputs(bb)
    ref_img, ref_txt = encode(bb, pixels, tokens)
    record = vlkit.inject(bb, variant, **opts)
    assert record.sites and AdaptedModel.of(bb).state.active == ("default",)
    towers = {s.tower for s in record.sites}
    assert towers == default_towers(variant)
    img, txt = encode(bb, pixels, tokens)
    assert img.shape == ref_img.shape and txt.shape == ref_txt.shape
    if getattr(registry("adapter").get(variant), "identity_at_init", True):
        assert (img - ref_img).abs().max() <= 1e-6
        assert (txt - ref_txt).abs().max() <= 1e-6
    # else a prompt variant (e.g. vpt): inserted tokens join every attention softmax, so even at init the
    # outputs move; it declares `identity_at_init = False`. Inactive it is still the frozen backbone (below).
    AdaptedModel.of(bb).set_adapter()  # no adapter active: the frozen backbone exactly
    img0, txt0 = encode(bb, pixels, tokens)
    assert (img0 - ref_img).abs().max() <= 1e-6 and (txt0 - ref_txt).abs().max() <= 1e-6


# --- gradients ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,opts", CASES)
@pytest.mark.parametrize("kind", BACKBONES)
def test_only_adapter_parameters_train(kind, variant, opts, make_backbone, sample_inputs):
    bb = make_backbone(kind)
    pixels, tokens = sample_inputs(bb)
    record = vlkit.inject(bb, variant, **opts)
    if opts.get("unfreeze_layernorm"):
        assert record.extra, "unfreeze_layernorm declares the layer norms as extra trainables"
    own = trainables(bb)
    if getattr(registry("adapter").get(variant), "training_free", False):
        # built from data, never trained (Tip-Adapter's cache): no parameter at all may train
        assert not own and state_buffers(bb)
        assert not any(p.requires_grad for p in bb.parameters())
        assert vlkit.parameter_report(bb)["trainable"] == 0
        return
    assert own
    bb.train()
    img, txt = forward_both(bb, pixels, tokens)
    g = torch.Generator().manual_seed(0)
    w_img, w_txt = torch.randn(img.shape, generator=g), torch.randn(txt.shape, generator=g)
    loss = (img * w_img).sum() + (txt * w_txt).sum() + (img @ txt.T).logsumexp(dim=1).sum()
    loss.backward()
    for name, p in bb.named_parameters():
        if id(p) in own:
            assert p.requires_grad, name
        else:
            assert not p.requires_grad, f"backbone parameter {name} requires grad"
            assert p.grad is None, f"backbone parameter {name} got a gradient"
    for pname, p in own.values():
        assert p.grad is not None, f"adapter parameter {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
    # the parameter report counts exactly these as trainable
    report = vlkit.parameter_report(bb)
    assert report["trainable"] == sum(p.numel() for _, p in own.values())
    assert report["adapters"]["default"]["parameters"] == report["trainable"]


# --- save / load --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,opts", CASES)
@pytest.mark.parametrize("kind", BACKBONES)
def test_save_load_round_trip_is_exact(kind, variant, opts, make_backbone, sample_inputs, tmp_path):
    bb = make_backbone(kind)
    pixels, tokens = sample_inputs(bb)
    record = vlkit.inject(bb, variant, name="mine", **opts)
    perturb(bb, "mine")
    out = encode(bb, pixels, tokens)
    path = vlkit.save_adapter(bb, tmp_path / "adapter", name="mine")
    assert (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()
    saved = json.loads((path / CONFIG_NAME).read_text())
    assert saved["variant"] == variant and saved["name"] == "mine" and saved["targets"] == record.targets
    assert not list(path.glob("*.tmp")), "atomic writes leave no temporary files"

    fresh = make_backbone(kind)
    loaded = vlkit.load_adapter(fresh, path)
    assert loaded.name == "mine" and loaded.variant == variant
    assert loaded.targets == record.targets and loaded.config == record.config
    assert AdaptedModel.of(fresh).state.active == ("mine",)
    assert not any(p.requires_grad for p in fresh.parameters()), "loaded adapters are frozen unless asked"
    a, b = adapter_parameters(bb, "mine"), adapter_parameters(fresh, "mine")
    assert set(a) == set(b) and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    out2 = encode(fresh, pixels, tokens)
    assert torch.equal(out[0], out2[0]) and torch.equal(out[1], out2[1])

    # under another name, inactive, trainable
    other = make_backbone(kind)
    rec = vlkit.load_adapter(other, path, name="again", activate=False, trainable=True)
    assert rec.name == "again" and AdaptedModel.of(other).state.active == ()
    assert all(p.requires_grad for _, p in trainables(other, "again").values())
    AdaptedModel.of(other).set_adapter("again")
    out3 = encode(other, pixels, tokens)
    assert torch.equal(out[0], out3[0]) and torch.equal(out[1], out3[1])
    with pytest.raises(ConfigError, match="already"):
        vlkit.load_adapter(other, path, name="again")


# --- merge --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,opts", MERGE_CASES)
@pytest.mark.parametrize("kind", BACKBONES)
def test_merge_unmerge(kind, variant, opts, make_backbone, sample_inputs):
    bb = make_backbone(kind)
    pixels, tokens = sample_inputs(bb)
    vlkit.inject(bb, variant, **opts)
    perturb(bb)
    before = {k: v.detach().clone() for k, v in bb.base_parameters().items()}
    out = encode(bb, pixels, tokens)
    merge_adapter(bb, "default")
    changed = [k for k, v in bb.base_parameters().items() if not torch.equal(v, before[k])]
    assert changed, "merging changes base weights"
    merged = encode(bb, pixels, tokens)
    torch.testing.assert_close(merged[0], out[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged[1], out[1], atol=1e-5, rtol=0)
    merged_weights = {k: v.detach().clone() for k, v in bb.base_parameters().items()}
    merge_adapter(bb, "default")  # merging twice is a no-op
    assert all(torch.equal(v, merged_weights[k]) for k, v in bb.base_parameters().items())
    unmerge_adapter(bb, "default")
    for k, v in bb.base_parameters().items():
        assert torch.equal(v, before[k]), f"{k} not restored exactly"
    again = encode(bb, pixels, tokens)
    assert torch.equal(again[0], out[0]) and torch.equal(again[1], out[1])

    # removing a merged adapter takes its update out of the weights too
    merge_adapter(bb, "default")
    remove_adapter(bb, "default")
    for k, v in bb.base_parameters().items():
        assert torch.equal(v, before[k]), f"{k} not restored after removing the merged adapter"
    assert AdaptedModel.of(bb).records == {} and AdaptedModel.of(bb).state.active == ()


def test_bottleneck_cannot_merge(make_backbone):
    from vlkit.errors import InjectionError

    bb = make_backbone("tiny")
    vlkit.inject(bb, "bottleneck")
    with pytest.raises(InjectionError):
        merge_adapter(bb, "default")


# --- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_load_onto_other_backbone(variant, make_backbone, backbone_specs, tmp_path):
    bb = make_backbone("tiny")
    vlkit.inject(bb, variant)
    path = vlkit.save_adapter(bb, tmp_path / "a")
    other = make_backbone("open_clip")
    with pytest.raises(IncompatibleAdapterError) as exc:
        vlkit.load_adapter(other, path)
    msg = str(exc.value)
    assert "tiny@random" in msg and backbone_specs["open_clip"] in msg
    assert AdaptedModel.of(other).records == {} and AdaptedModel.of(other).state.active == ()


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_corrupt_adapter_files(variant, make_backbone, tmp_path):
    bb = make_backbone("tiny")
    vlkit.inject(bb, variant)
    good = vlkit.save_adapter(bb, tmp_path / "good")
    cfg_text = (good / CONFIG_NAME).read_text()
    cfg = json.loads(cfg_text)
    weights = (good / WEIGHTS_NAME).read_bytes()

    def copy(name, config=cfg_text, data=weights):
        d = tmp_path / name
        d.mkdir()
        if config is not None:
            (d / CONFIG_NAME).write_text(config)
        if data is not None:
            (d / WEIGHTS_NAME).write_bytes(data)
        return d

    fresh = make_backbone("tiny")
    bad = {
        "garbage weights": copy("garbage", data=b"\x13\x37 this is not safetensors" * 7),
        "truncated weights": copy("truncw", data=weights[: len(weights) // 2]),
        "truncated config": copy("truncc", config=cfg_text[: len(cfg_text) // 2]),
        "config not JSON": copy("notjson", config="not json at all"),
        "config not an object": copy("list", config="[1, 2]"),
        "config of something else": copy("other", config=json.dumps({"format": "peft", "r": 8})),
        "no variant field": copy("novar", config=json.dumps({k: v for k, v in cfg.items() if k != "variant"})),
        "options not an object": copy("optlist", config=json.dumps(dict(cfg, config=["towers", "both"]))),
        "bad format version": copy("fmtver", config=json.dumps(dict(cfg, format_version="one"))),
        "newer format version": copy("newer", config=json.dumps(dict(cfg, format_version=99))),
        "no weights": copy("now", data=None),
        "no config": copy("noc", config=None),
    }
    for what, d in bad.items():
        with pytest.raises(AdapterFileError):
            try:
                vlkit.load_adapter(fresh, d)
            except AdapterFileError:
                raise
            except Exception as exc:
                pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
        assert AdaptedModel.of(fresh).records == {}, what
    with pytest.raises(AdapterFileError, match="does not exist"):
        vlkit.load_adapter(fresh, tmp_path / "missing")
    with pytest.raises(AdapterFileError):
        vlkit.load_adapter(fresh, good / WEIGHTS_NAME)  # a file, not a directory
    # a readable weights file whose tensors do not fit the config
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(good / WEIGHTS_NAME))
    key = sorted(tensors)[0]
    wrong_shape = dict(tensors, **{key: torch.zeros(*tensors[key].shape, 2)})
    d = copy("shape", data=None)
    save_file(wrong_shape, str(d / WEIGHTS_NAME))
    with pytest.raises(IncompatibleAdapterError, match="shape"):
        vlkit.load_adapter(fresh, d)
    d = copy("missingkey", data=None)
    save_file({k: v for k, v in tensors.items() if k != key}, str(d / WEIGHTS_NAME))
    with pytest.raises(IncompatibleAdapterError, match="missing"):
        vlkit.load_adapter(fresh, d)
    assert AdaptedModel.of(fresh).records == {} and AdaptedModel.of(fresh).state.active == ()
    # after all that, the good copy still loads
    vlkit.load_adapter(fresh, good)


def test_saved_adapter_of_an_uninstalled_variant(make_backbone, tmp_path):
    bb = make_backbone("tiny")
    vlkit.inject(bb, "bottleneck")
    path = vlkit.save_adapter(bb, tmp_path / "a")
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg["variant"] = "not_installed_variant"
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(UnknownNameError, match="not_installed_variant"):
        vlkit.load_adapter(make_backbone("tiny"), path)


def test_unknown_variant(make_backbone):
    bb = make_backbone("tiny")
    with pytest.raises(UnknownNameError) as exc:
        vlkit.inject(bb, "no_such_variant")
    for known in VARIANT_NAMES:
        assert known in str(exc.value)
    assert AdaptedModel.of(bb).records == {}


BAD_OPTIONS = [
    pytest.param("bottleneck", {"reduction": 0}, id="reduction=0"),
    pytest.param("bottleneck", {"reduction": -2}, id="reduction<0"),
    pytest.param("bottleneck", {"placement": "everywhere"}, id="placement"),
    pytest.param("bottleneck", {"reduction": "abc"}, id="reduction=abc"),
    pytest.param("lora", {"rank": 0}, id="rank=0"),
    pytest.param("lora", {"rank": 2.5}, id="rank=2.5"),
    pytest.param("lora", {"modules": "nope"}, id="modules"),
    pytest.param("lora", {"reduction": 8}, id="lora-reduction"),
    *[pytest.param(v, {"towers": "both-ish"}, id=f"{v}-towers") for v in VARIANT_NAMES],
    *[pytest.param(v, {"no_such_option": 1}, id=f"{v}-unknown-option") for v in VARIANT_NAMES],
    *[pytest.param(v, {"layers": [99]}, id=f"{v}-layer-range") for v in VARIANT_NAMES],
    *[pytest.param(v, {"targets": ["re:("]}, id=f"{v}-bad-regex") for v in VARIANT_NAMES],
]


@pytest.mark.parametrize("variant,opts", BAD_OPTIONS)
def test_bad_options(variant, opts, make_backbone):
    bb = make_backbone("tiny")
    with pytest.raises(ConfigError):
        vlkit.inject(bb, variant, **opts)
    assert AdaptedModel.of(bb).records == {}
    assert not any(type(m).__name__.startswith("Adapted") for m in bb.modules())


def test_bad_adapter_name_and_duplicate(make_backbone):
    bb = make_backbone("tiny")
    with pytest.raises(ConfigError):
        vlkit.inject(bb, "bottleneck", name="bad name!")
    vlkit.inject(bb, "bottleneck", name="a")
    with pytest.raises(ConfigError, match="already"):
        vlkit.inject(bb, "lora", name="a")
    with pytest.raises(UnknownNameError):
        AdaptedModel.of(bb).set_adapter("zzz")
    with pytest.raises(UnknownNameError):
        vlkit.save_adapter(bb, "/nonexistent-unused", name="zzz")


# --- target matching ----------------------------------------------------------------------------------------------

def _candidates(bb, variant, towers=("vision", "text")):
    var = registry("adapter").get(variant)
    return [s for t in towers for b in bb.blocks(t) for s in b.sites.values() if s.kind in var.kinds]


@pytest.mark.parametrize("variant", ["bottleneck", "lora"])
@pytest.mark.parametrize("kind", BACKBONES)
def test_target_matching(kind, variant, make_backbone):
    cands = _candidates(make_backbone(kind), variant)
    assert len(cands) > 4

    # exact path (of a site inside a block: embed sites have short paths such as `token_embedding`)
    inner = [s for s in cands if s.role != "embed"]
    site = inner[len(inner) // 2]
    bb = make_backbone(kind)
    assert vlkit.inject(bb, variant, targets=[site.path]).targets == [site.path]

    # suffix: the last three components of a path, matched in every tower
    suffix = ".".join(site.path.split(".")[-3:])
    expected = [s.path for s in cands if s.path.endswith("." + suffix)]
    assert 0 < len(expected) < len(cands)
    bb = make_backbone(kind)
    assert vlkit.inject(bb, variant, targets=[suffix]).targets == expected

    # regular expression over paths
    rx = r"re:\.1\."
    expected = [s.path for s in cands if re.search(r"\.1\.", s.path)]
    bb = make_backbone(kind)
    assert vlkit.inject(bb, variant, targets=[rx]).targets == expected

    # layers, negative indices counting from the end of each tower
    bb = make_backbone(kind)
    default = vlkit.inject(bb, variant)
    bb = make_backbone(kind)
    rec = vlkit.inject(bb, variant, layers=[0, -1])
    n = {t: len(bb.blocks(t)) for t in ("vision", "text")}
    assert rec.targets == [s.path for s in default.sites if s.layer in (0, n[s.tower] - 1)]
    assert {s.layer for s in rec.sites} == {0, max(n.values()) - 1} | {0, min(n.values()) - 1}

    # exclude
    roles = sorted({s.role for s in default.sites})
    bb = make_backbone(kind)
    rec = vlkit.inject(bb, variant, exclude=[roles[0]])
    assert rec.targets == [s.path for s in default.sites if s.role != roles[0]]

    # one tower
    bb = make_backbone(kind)
    rec = vlkit.inject(bb, variant, towers="text")
    assert rec.targets == [s.path for s in default.sites if s.tower == "text"]
    assert vlkit.parameter_report(bb)["towers"]["vision"]["trainable"] == 0


def test_target_matching_tiny_paths(make_backbone):
    bb = make_backbone("tiny")
    rec = vlkit.inject(bb, "bottleneck", targets=["resblocks.1.mlp"])
    assert rec.targets == ["visual.transformer.resblocks.1.mlp", "transformer.resblocks.1.mlp"]
    bb = make_backbone("tiny")
    rec = vlkit.inject(bb, "lora", targets=[r"re:^visual\..*\.(0|3)\.attn#(q|v)$"])
    assert rec.targets == [f"visual.transformer.resblocks.{i}.attn#{p}" for i in (0, 3) for p in "qv"]
    bb = make_backbone("tiny")
    rec = vlkit.inject(bb, "lora", modules="all", towers="vision", layers=[-1], exclude=["mlp.fc1", "attn.out"])
    assert rec.targets == [f"visual.transformer.resblocks.3.{p}" for p in ("attn#q", "attn#k", "attn#v", "mlp.c_proj")]
    from vlkit.errors import InjectionError

    with pytest.raises(InjectionError):
        vlkit.inject(make_backbone("tiny"), "lora", targets=["no.such.module"])


# --- several adapters ---------------------------------------------------------------------------------------------

PAIRS = [pytest.param(v, v, id=f"{v}+{v}") for v in VARIANT_NAMES] + [
    pytest.param("bottleneck", "lora", id="bottleneck+lora"),
    pytest.param("lora", "bottleneck", id="lora+bottleneck"),
]


@pytest.mark.parametrize("first,second", PAIRS)
@pytest.mark.parametrize("kind", BACKBONES)
def test_switching_between_adapters_is_exact(kind, first, second, make_backbone, sample_inputs, tmp_path):
    bb = make_backbone(kind)
    pixels, tokens = sample_inputs(bb)
    base = encode(bb, pixels, tokens)
    vlkit.inject(bb, first, name="a")
    perturb(bb, "a", seed=1)
    a_only = encode(bb, pixels, tokens)
    assert not _same(a_only, base)
    vlkit.inject(bb, second, name="b")
    assert AdaptedModel.of(bb).state.active == ("b",)
    perturb(bb, "b", seed=2)
    b_out = encode(bb, pixels, tokens)
    assert not _same(b_out, a_only)
    AdaptedModel.of(bb).set_adapter("a")
    after = encode(bb, pixels, tokens)
    assert torch.equal(after[0], a_only[0]) and torch.equal(after[1], a_only[1])
    AdaptedModel.of(bb).set_adapter("b")
    assert _same(encode(bb, pixels, tokens), b_out)
    AdaptedModel.of(bb).set_adapter()
    off = encode(bb, pixels, tokens)
    assert (off[0] - base[0]).abs().max() <= 1e-6 and (off[1] - base[1]).abs().max() <= 1e-6

    # the same two adapters loaded side by side from disk on a fresh backbone
    vlkit.save_adapter(bb, tmp_path / "a", name="a")
    vlkit.save_adapter(bb, tmp_path / "b", name="b")
    fresh = make_backbone(kind)
    vlkit.load_adapter(fresh, tmp_path / "a")
    vlkit.load_adapter(fresh, tmp_path / "b", activate=False)
    assert AdaptedModel.of(fresh).state.active == ("a",)
    got = encode(fresh, pixels, tokens)
    assert torch.equal(got[0], a_only[0]) and torch.equal(got[1], a_only[1])
    AdaptedModel.of(fresh).set_adapter("b")
    assert _same(encode(fresh, pixels, tokens), b_out)

    # removing one leaves the other untouched
    remove_adapter(bb, "b")
    AdaptedModel.of(bb).set_adapter("a")
    after = encode(bb, pixels, tokens)
    assert torch.equal(after[0], a_only[0]) and torch.equal(after[1], a_only[1])


@pytest.mark.parametrize("role", ["attn", "mlp"])
@pytest.mark.parametrize("kind", BACKBONES)
def test_bottleneck_input_position_adapts_what_the_sublayer_sees(kind, role, make_backbone, sample_inputs):
    """`attn_position: input` / `mlp_position: input` put that site's layer before the sub-layer (for
    attention: its q, k, v input; for the MLP: its first projection's input), and only there."""
    from vlkit.adapters.inject import host_of

    bb = make_backbone(kind)
    both = vlkit.inject(make_backbone(kind), "bottleneck", name="b", towers="vision", layers=[0],
                        **{f"{role}_position": "input"})
    other = "mlp" if role == "attn" else "attn"
    assert sorted(s.role for s in both.sites) == sorted([f"{role}.in", other])
    rec = vlkit.inject(bb, "bottleneck", name="default", towers="vision", layers=[0], placement=role,
                       **{f"{role}_position": "input"})
    [site] = rec.sites
    assert site.kind == "input" and site.key == f"{role}_in"
    perturb(bb)
    base = host_of(bb, site).base
    seen = []
    pre = base.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).detach().clone()), with_kwargs=True)
    pixels, _ = sample_inputs(bb)
    with torch.no_grad():
        feats = bb.encode_image(pixels)
        AdaptedModel.of(bb).set_adapter()
        plain = bb.encode_image(pixels)
    pre.remove()
    assert len(seen) == 2 and not torch.allclose(seen[0], seen[1])
    assert not torch.allclose(feats, plain)
    with pytest.raises(ConfigError, match=f"{role}_position"):
        vlkit.inject(make_backbone(kind), "bottleneck", name="b", **{f"{role}_position": "middle"})


@pytest.mark.parametrize("kind", BACKBONES)
def test_embed_site_adapts_the_tokens_entering_each_tower(kind, make_backbone, sample_inputs):
    """The `embed` site (bottleneck `embed: true`) sits on the token sequence entering each tower's first block."""
    bb = make_backbone(kind)
    rec = vlkit.inject(bb, "bottleneck", name="default", targets=["embed"])
    assert sorted((s.tower, s.layer, s.role) for s in rec.sites) == [("text", 0, "embed"), ("vision", 0, "embed")]
    blocks = {b.tower: resolve_module(bb.model, b.path) for b in bb.all_blocks() if b.index == 0}
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, kwargs, t=t: seen.setdefault(t, []).append(
        (args[0] if args else kwargs["hidden_states"]).detach().clone()), with_kwargs=True) for t, m in blocks.items()]
    pixels, tokens = sample_inputs(bb)
    with torch.no_grad():
        ref = encode(bb, pixels, tokens)
        perturb(bb)
        adapted = encode(bb, pixels, tokens)
        AdaptedModel.of(bb).set_adapter()
        off = encode(bb, pixels, tokens)
    for h in hooks:
        h.remove()
    for t in ("vision", "text"):
        assert torch.equal(seen[t][0], seen[t][2]) and not torch.allclose(seen[t][0], seen[t][1])
    assert not torch.allclose(ref[0], adapted[0]) and not torch.allclose(ref[1], adapted[1])
    assert torch.equal(ref[0], off[0]) and torch.equal(ref[1], off[1])
    with_embed = vlkit.inject(make_backbone(kind), "bottleneck", name="b", embed=True)
    without = vlkit.inject(make_backbone(kind), "bottleneck", name="b")
    assert len(with_embed.sites) == len(without.sites) + 2
