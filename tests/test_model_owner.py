"""`vlkit.AdaptedModel`, the one owner of a backbone's adapters: the PEFT-like API end to end on `tiny`, handles,
what a load adds, one owner per backbone, and the README's Python snippet as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import vlkit
from vlkit.adapters.model import AdaptedModel
from vlkit.errors import ConfigError, UnknownNameError

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def model():
    return vlkit.load("tiny@random")


def _pixels(m, n=3):
    return torch.randn(n, 3, m.image_size, m.image_size, generator=torch.Generator().manual_seed(0))


def test_one_owner_per_backbone(model):
    assert isinstance(model, AdaptedModel)
    assert AdaptedModel.of(model.backbone) is model and AdaptedModel.of(model) is model
    with pytest.raises(ConfigError):
        AdaptedModel(model.backbone)
    with pytest.raises(TypeError):
        AdaptedModel.of(object())


def test_add_activate_disable_and_handles(model):
    px = _pixels(model)
    with torch.no_grad():
        base = model.encode_image(px)
        h = model.add_adapter("a", "lora", rank=4)
        assert h.name == "a" and h.variant == "lora" and h.config["rank"] == 4 and h.sites
        assert model.active_adapters == ("a",)
        assert torch.allclose(model.encode_image(px), base, atol=1e-6)  # identity at init
        for p in model.adapter_layers("a").values():
            for t in p.parameters():
                t.data.normal_()
        changed = model.encode_image(px)
        assert not torch.allclose(changed, base)
        with model.disabled():
            assert torch.equal(model.encode_image(px), base)
        assert torch.equal(model.encode_image(px), changed) and model.active_adapters == ("a",)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    with pytest.raises(UnknownNameError):
        model.set_adapter("nope")


def test_save_load_roundtrip_is_bit_exact_and_track_tells_what_was_added(model, tmp_path):
    model.add_adapter("a", "bottleneck", reduction=8)
    for t in model.adapter_parameters("a").values():
        t.normal_()
    model.save_adapter(tmp_path / "a", "a")
    other = vlkit.load("tiny@random")
    with other.track() as added:
        h = other.load_adapter(tmp_path / "a", name="b")
    assert added.adapters == ["b"] and added.fusions == [] and h.name == "b"
    mine, theirs = model.adapter_parameters("a"), other.adapter_parameters("b")
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    px = _pixels(model)
    with torch.no_grad():
        assert torch.equal(model.encode_image(px), other.encode_image(px))


def test_route_matches_per_sample_activation(model):
    model.add_adapter("a", "lora", rank=4)
    model.add_adapter("b", "bottleneck", reduction=8)
    for n in ("a", "b"):
        for t in model.adapter_parameters(n).values():
            t.normal_(std=0.05)
    px = _pixels(model)
    with torch.no_grad():
        model.route(["a", "b", None])
        routed = model.encode_image(px)
        model.clear_route()
        for i, name in enumerate(["a", "b", None]):
            model.set_adapter(name)
            assert torch.allclose(routed[i], model.encode_image(px[i:i + 1])[0], atol=1e-5)


def test_merge_and_unload_after_a_deleted_outer_host(model):
    """A LoRA projection inside a bottleneck-wrapped MLP: delete the bottleneck, fold the LoRA for good."""
    model.add_adapter("lo", "lora", rank=4, modules="all")
    model.add_adapter("bn", "bottleneck", reduction=8)
    for t in model.adapter_parameters("lo").values():
        t.normal_(std=0.05)
    px = _pixels(model)
    model.delete_adapter("bn")
    model.set_adapter("lo")
    with torch.no_grad():
        want = model.encode_image(px)
        assert model.merge_and_unload() == ["lo"]
        assert torch.allclose(model.encode_image(px), want, atol=1e-5)
    assert not model.records and model.active_adapters == ()
    assert not any(".adapters." in n for n, _ in model.backbone.named_parameters())


def test_merge_unmerge_restores_weights_exactly(model):
    model.add_adapter("a", "lora", rank=4)
    for t in model.adapter_parameters("a").values():
        t.normal_(std=0.05)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if ".adapters." not in k}
    px = _pixels(model)
    with torch.no_grad():
        unmerged = model.encode_image(px)
        model.merge_adapter("a")
        assert torch.allclose(model.encode_image(px), unmerged, atol=1e-4)
        model.unmerge_adapter("a")
    after = {k: v for k, v in model.backbone.state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_functional_api_reaches_the_same_owner(model):
    rec = vlkit.inject(model.backbone, "lora", name="f", rank=2)
    assert rec.name == "f" and "f" in model and model.active_adapters == ("f",)
    assert vlkit.parameter_report(model.backbone)["adapters"]["f"]["variant"] == "lora"


def test_readme_python_api_snippet_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "med" / "adapter_model.safetensors").is_file()
