"""Tests for the vlkit-ia3 plugin; they need it installed: `pip install --no-deps -e plugins/vlkit-ia3`."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys

import pytest
import torch

import vlkit
from vlkit.adapters.inject import adapter_layers, inject, merge_adapter, unmerge_adapter
from vlkit.errors import ConfigError
from vlkit.plugins import ENTRY_POINT_GROUP, PluginSystem, reset_plugins
from vlkit.adapters.model import AdaptedModel

SPEC = "tiny@random"


def _cli(*args: str, env_extra: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("VLKIT_PLUGINS", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "vlkit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _inputs(bb):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, bb.image_size, bb.image_size, generator=g)
    tokens = bb.tokenize(["a photo of a cat", "a red square"])
    return pixels, tokens


def _embed(bb, pixels, tokens):
    with torch.no_grad():
        return bb.encode_image(pixels, normalize=True), bb.encode_text(tokens, normalize=True)


def _ia3_params(bb):
    return {n: p for n, p in bb.model.named_parameters() if ".adapters." in n and n.endswith(".ia3_l")}


@pytest.fixture(autouse=True)
def _all_plugins(monkeypatch):
    """Every installed plugin loads (a VLKIT_PLUGINS from the caller's environment must not hide ia3)."""
    monkeypatch.delenv("VLKIT_PLUGINS", raising=False)
    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture(scope="module")
def injected_dir(tmp_path_factory):
    """`vlkit inject --backbone tiny@random --adapter ia3 -o DIR`, run once for the module."""
    out = tmp_path_factory.mktemp("ia3") / "adapter"
    res = _cli("inject", "--backbone", SPEC, "--adapter", "ia3", "-o", str(out), "--json")
    assert res.returncode == 0, res.stderr
    return out


# --- discovery ------------------------------------------------------------------------------------------

def test_entry_point_is_installed():
    eps = [ep for ep in md.entry_points(group=ENTRY_POINT_GROUP) if ep.name == "ia3"]
    assert len(eps) == 1
    assert eps[0].value == "vlkit_ia3"
    assert eps[0].dist is not None and eps[0].dist.version == "0.2.0"


def test_plugins_json_lists_ia3():
    res = _cli("plugins", "--json")
    assert res.returncode == 0, res.stderr
    infos = {p["name"]: p for p in json.loads(res.stdout)}
    assert "ia3" in infos
    info = infos["ia3"]
    assert info["version"] == "0.2.0"
    assert info["builtin"] is False
    assert info["registers"] == {"adapter": ["ia3", "ia3-weight"], "task": ["caption-match"], "probe": ["word-order"]}


def test_vlkit_plugins_env_filters(monkeypatch):
    monkeypatch.setenv("VLKIT_PLUGINS", "")
    hidden = PluginSystem()
    assert "ia3" not in hidden.registry("adapter") and "ia3-weight" not in hidden.registry("adapter")
    assert "caption-match" not in hidden.registry("task") and "word-order" not in hidden.registry("probe")
    monkeypatch.setenv("VLKIT_PLUGINS", "ia3")
    system = PluginSystem()
    for kind, name in (("adapter", "ia3"), ("adapter", "ia3-weight"), ("task", "caption-match"),
                       ("probe", "word-order")):
        assert name in system.registry(kind)
        assert system.registry(kind).entry(name).plugin == "ia3"


def test_hidden_plugin_is_unknown_on_the_cli(tmp_path):
    res = _cli("inject", "--backbone", SPEC, "--adapter", "ia3", "-o", str(tmp_path / "x"),
               env_extra={"VLKIT_PLUGINS": ""})
    assert res.returncode == 2
    assert "unknown adapter 'ia3'" in res.stderr
    assert not (tmp_path / "x").exists()


# --- config ---------------------------------------------------------------------------------------------

def test_config_validation():
    from vlkit_ia3.variant import IA3Variant

    var = IA3Variant()
    cfg = var.make_config()
    assert (cfg.modules, cfg.init) == ("attn_mlp", 1.0)
    assert var.make_config(init="0.5").init == 0.5  # CLI strings are coerced by the core
    with pytest.raises(ConfigError, match="init"):
        var.make_config(init=0)
    with pytest.raises(ConfigError, match="modules"):
        var.make_config(modules="qv")
    with pytest.raises(ConfigError, match="unknown"):
        var.make_config(rank=4)


@pytest.mark.parametrize("modules,roles", [("attn_mlp", {"attn.k", "attn.v", "mlp.fc2"}),
                                           ("attn", {"attn.k", "attn.v"}), ("mlp", {"mlp.fc2"})])
def test_modules_select_sites(modules, roles):
    bb = vlkit.load_backbone(SPEC)
    record = inject(bb, "ia3", modules=modules)
    assert {s.role for s in record.sites} == roles
    assert len(record.sites) == len(roles) * len(bb.all_blocks())
    layers = adapter_layers(bb, "default")
    for site in record.sites:
        layer = layers[site.path]
        assert layer.scales_input == (site.role == "mlp.fc2")
        assert layer.ia3_l.numel() == (site.in_features if layer.scales_input else site.out_features)


# --- end to end -----------------------------------------------------------------------------------------

def test_adapter_directory(injected_dir):
    cfg = json.loads((injected_dir / "adapter_config.json").read_text())
    assert cfg["variant"] == "ia3"
    assert cfg["variant_plugin"] == "ia3"
    assert cfg["config"]["modules"] == "attn_mlp" and cfg["config"]["init"] == 1.0
    bb = vlkit.load_backbone(SPEC)
    expected = sum(s.in_features if s.role == "mlp.fc2" else s.out_features
                   for b in bb.all_blocks() for s in b.sites.values() if s.role in ("attn.k", "attn.v", "mlp.fc2"))
    assert cfg["num_parameters"] == expected


def test_identity_at_init(injected_dir):
    torch.manual_seed(0)
    bb = vlkit.load_backbone(SPEC)
    pixels, tokens = _inputs(bb)
    frozen = _embed(bb, pixels, tokens)
    vlkit.load_adapter(bb, injected_dir)
    assert AdaptedModel.of(bb).state.active == ("default",)
    assert all(torch.equal(p, torch.ones_like(p)) for p in _ia3_params(bb).values())
    adapted = _embed(bb, pixels, tokens)
    for a, f in zip(adapted, frozen):
        torch.testing.assert_close(a, f, atol=1e-6, rtol=0)


def test_only_ia3_parameters_get_gradients(injected_dir):
    torch.manual_seed(0)
    bb = vlkit.load_backbone(SPEC)
    vlkit.load_adapter(bb, injected_dir, trainable=True)
    pixels, tokens = _inputs(bb)
    img, txt, scale = bb(pixels, tokens)
    logits = scale * img @ txt.t()
    target = torch.arange(2)
    loss = torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.t(), target)
    loss.backward()
    ia3 = _ia3_params(bb)
    assert ia3
    for name, p in bb.model.named_parameters():
        if name in ia3:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for p in ia3.values())


def _perturbed(injected_dir):
    torch.manual_seed(1)
    bb = vlkit.load_backbone(SPEC)
    vlkit.load_adapter(bb, injected_dir, name="tuned")
    with torch.no_grad():
        for p in _ia3_params(bb).values():
            p.mul_(1 + 0.2 * torch.randn_like(p))
    return bb


def test_save_and_reload_is_bit_exact(injected_dir, tmp_path):
    bb = _perturbed(injected_dir)
    pixels, tokens = _inputs(bb)
    tuned = _embed(bb, pixels, tokens)
    AdaptedModel.of(bb).set_adapter()
    frozen = _embed(bb, pixels, tokens)
    assert not torch.allclose(tuned[0], frozen[0], atol=1e-4)
    vlkit.save_adapter(bb, tmp_path / "tuned", name="tuned")

    fresh = vlkit.load_backbone(SPEC)
    vlkit.load_adapter(fresh, tmp_path / "tuned")
    assert AdaptedModel.of(fresh).state.active == ("tuned",)
    reloaded = _embed(fresh, pixels, tokens)
    for a, b in zip(reloaded, tuned):
        assert torch.equal(a, b)


def test_merge_and_unmerge(injected_dir):
    bb = _perturbed(injected_dir)
    pixels, tokens = _inputs(bb)
    unmerged = _embed(bb, pixels, tokens)
    base = {n: p.detach().clone() for n, p in bb.base_parameters().items()}

    merge_adapter(bb, "tuned")
    changed = [n for n, p in bb.base_parameters().items() if not torch.equal(p, base[n])]
    assert changed and all(("attn.in_proj" in n) or ("mlp.c_proj.weight" in n) for n in changed)
    merged = _embed(bb, pixels, tokens)
    for a, b in zip(merged, unmerged):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    unmerge_adapter(bb, "tuned")
    for n, p in bb.base_parameters().items():
        assert torch.equal(p, base[n]), n
    again = _embed(bb, pixels, tokens)
    for a, b in zip(again, unmerged):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_layer_math_matches_merged_weights():
    """The layer's forward and its merged weights agree on a standalone projection."""
    from vlkit_ia3.variant import IA3Layer

    torch.manual_seed(0)
    w, b = torch.randn(6, 5), torch.randn(6)
    x = torch.randn(3, 5)
    y = torch.nn.functional.linear(x, w, b)
    for scales_input, n in ((False, 6), (True, 5)):
        layer = IA3Layer(n, scales_input)
        assert torch.equal(layer(x, y, w, b), y)  # exact at init
        with torch.no_grad():
            layer.ia3_l.copy_(torch.rand(n) + 0.5)
        mw, mb = layer.merge(w, b)
        torch.testing.assert_close(layer(x, y, w, b), torch.nn.functional.linear(x, mw, mb))
        if scales_input:
            assert torch.equal(mb, b)
