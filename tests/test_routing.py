"""Per-sample routing runs each adapter on its own samples only; the results must equal running each sample
through its adapter alone, on every backbone layout (batch-first and sequence-first), batch 1 included."""
from __future__ import annotations

import pytest
import torch

import vlkit
from vlkit.adapters.inject import adapter_layers
from vlkit.adapters.model import AdaptedModel


def _perturb(bb, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(bb, name).values():
            for p in layer.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["tiny", "open_clip", "hf"])
@pytest.mark.parametrize("batch", [1, 5])
def test_mixed_route_equals_each_adapter_alone(kind, batch, make_backbone):
    bb = make_backbone(kind)
    for i, (name, variant, opts) in enumerate([("lo", "lora", {"rank": 2, "modules": "all"}),
                                               ("bn", "bottleneck", {"reduction": 8}),
                                               ("vo", "lora", {"rank": 2, "towers": "vision"})]):
        vlkit.inject(bb, variant, name=name, **opts)
        _perturb(bb, name, i)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, bb.image_size, bb.image_size, generator=g)
    tokens = bb.tokenize(["a red cube", "that hat", "a blue ring", "two stars", "a cross"][:batch])
    names = ["bn", None, "lo", "vo", "bn"][:batch] if batch > 1 else ["lo"]
    with torch.no_grad():
        AdaptedModel.of(bb).route(names)
        img, txt = bb.encode_image(pixels), bb.encode_text(tokens)
        AdaptedModel.of(bb).clear_route()
        for i, name in enumerate(names):
            AdaptedModel.of(bb).set_adapter(*([name] if name else []))
            torch.testing.assert_close(img[i:i + 1], bb.encode_image(pixels[i:i + 1]), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(txt[i:i + 1], bb.encode_text(tokens[i:i + 1]), rtol=1e-4, atol=1e-5)


def test_routed_gradients_reach_only_the_routed_adapters(make_backbone):
    bb = make_backbone("tiny")
    for name in ("a", "b", "c"):
        vlkit.inject(bb, "lora", name=name, rank=2)
        _perturb(bb, name, ord(name))
    for name in ("a", "b", "c"):  # each inject freezes what was there before: train all three
        for layer in adapter_layers(bb, name).values():
            layer.requires_grad_(True)
    AdaptedModel.of(bb).route(["a", "b", "a"])
    pixels = torch.randn(3, 3, bb.image_size, bb.image_size)
    bb.encode_image(pixels).sum().backward()
    AdaptedModel.of(bb).clear_route()
    got = {name: any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                     for l in adapter_layers(bb, name).values() for p in l.parameters())
           for name in ("a", "b", "c")}
    assert got == {"a": True, "b": True, "c": False}


class _FixedRouter:
    """A router-like object (names, predict) that sends sample i to `names[index[i]]`."""

    def __init__(self, names, index):
        self.names, self.index = names, torch.tensor(index)

    def predict(self, features):
        return self.index[: len(features)]


def test_routed_view_runs_prompt_adapters_per_group(make_backbone):
    """VPT and CoOp act on the whole batch, so a routed view (a router or a domain gate) runs them per group of
    samples; each sample's output equals it alone through its adapter (or the frozen backbone)."""
    from vlkit.compose.router import RoutedBackbone

    bb = make_backbone("tiny")
    vlkit.inject(bb, "vpt", name="vp", num_tokens=2)
    vlkit.inject(bb, "lora", name="lo", rank=2, modules="all")
    _perturb(bb, "vp", 0)
    _perturb(bb, "lo", 1)
    model = AdaptedModel.of(bb)
    assert not model.routes_per_sample(["vp", None]) and model.routes_per_sample(["lo", None])
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, bb.image_size, bb.image_size, generator=g)
    tokens = bb.tokenize(["a red cube", "that hat", "a blue ring", "two stars"])
    index = [0, 2, 1, 0]
    view = RoutedBackbone(bb, _FixedRouter(["vp", "lo", None], index))
    before = model.active_adapters
    with torch.no_grad():
        img, txt = view.encode_pair(pixels, tokens, normalize=False)
        assert model.active_adapters == before  # the state is put back
        for i, k in enumerate(index):
            name = ["vp", "lo", None][k]
            with model.activated(name) if name else model.disabled():
                torch.testing.assert_close(img[i:i + 1], bb.encode_image(pixels[i:i + 1]), rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(txt[i:i + 1], bb.encode_text(tokens[i:i + 1]), rtol=1e-4, atol=1e-5)
