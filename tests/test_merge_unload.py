"""`merge_and_unload`: adapters folded into the weights for good, with no copy kept: outputs equal the merged
(and unmerged) model, held memory and module tree equal the frozen backbone's."""
from __future__ import annotations

import pytest
import torch

import vlkit
from vlkit.adapters.inject import inject, merge_adapter, merge_and_unload
from vlkit.errors import InjectionError
from vlkit.adapters.model import AdaptedModel


def _inputs(bb):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, bb.image_size, bb.image_size, generator=g), bb.tokenize(["a red square", "a cat"])


def _embed(bb, pixels, tokens):
    with torch.no_grad():
        return torch.cat([bb.encode_image(pixels, normalize=True), bb.encode_text(tokens, normalize=True)])


def _trained(bb, variant, name, **opts):
    inject(bb, variant, name=name, **opts)
    with torch.no_grad():
        for n, p in bb.model.named_parameters():
            if f".adapters.{name}." in n:
                p.add_(0.05 * torch.randn_like(p))
    return bb


def _bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) + sum(
        t.numel() * t.element_size() for m in module.modules() for t in getattr(m, "_saved_base", ()) or ()
        if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("spec", ["tiny@random"])
@pytest.mark.parametrize("variant,opts", [("lora", {"rank": 4, "targets": ["attn.q", "attn.v", "mlp.fc1"]}),
                                          ("lora", {"rank": 2})])
def test_merge_and_unload_equals_the_adapted_model_and_frees_the_copy(spec, variant, opts):
    frozen = vlkit.load_backbone(spec)
    pixels, tokens = _inputs(frozen)
    frozen_bytes = _bytes(frozen.model)
    names = [n for n, _ in frozen.model.named_parameters()]
    bb = _trained(vlkit.load_backbone(spec), variant, "a", **opts)
    want = _embed(bb, pixels, tokens)
    merged = merge_and_unload(bb)
    assert merged == ["a"] and AdaptedModel.of(bb).records == {} and AdaptedModel.of(bb).state.active == ()
    got = _embed(bb, pixels, tokens)
    assert torch.allclose(got, want, atol=1e-5)
    assert [n for n, _ in bb.model.named_parameters()] == names  # the frozen module tree, hosts gone
    assert _bytes(bb.model) == frozen_bytes
    assert bb.fingerprint() == frozen.fingerprint()


def test_merge_and_unload_after_merge_adapter_drops_the_saved_copy():
    bb = _trained(vlkit.load_backbone("tiny@random"), "lora", "a", rank=2)
    merge_adapter(bb, "a")
    assert _bytes(bb.model) > _bytes(vlkit.load_backbone("tiny@random").model)
    merge_and_unload(bb, "a")
    assert _bytes(bb.model) == _bytes(vlkit.load_backbone("tiny@random").model)


def test_two_stacked_lora_adapters_fold_to_their_sum():
    bb = vlkit.load_backbone("tiny@random")
    _trained(bb, "lora", "a", rank=2)
    _trained(bb, "lora", "b", rank=2)
    AdaptedModel.of(bb).set_adapter("a", "b")
    pixels, tokens = _inputs(bb)
    want = _embed(bb, pixels, tokens)
    assert merge_and_unload(bb) == ["a", "b"]
    assert torch.allclose(_embed(bb, pixels, tokens), want, atol=1e-5)


def test_a_variant_that_cannot_merge_changes_nothing():
    bb = _trained(vlkit.load_backbone("tiny@random"), "bottleneck", "a")
    pixels, tokens = _inputs(bb)
    want = _embed(bb, pixels, tokens)
    with pytest.raises(InjectionError, match="cannot be merged.*nothing was merged"):
        merge_and_unload(bb)
    assert "a" in AdaptedModel.of(bb).records and torch.equal(_embed(bb, pixels, tokens), want)


def test_export_merge_folds_for_good_and_verifies(tmp_path, capsys):
    import json

    from cli_helpers import cli

    bb = _trained(vlkit.load_backbone("tiny"), "lora", "a", rank=2)
    vlkit.save_adapter(bb, tmp_path / "a", name="a")
    code, out, err = cli(["export", "--adapter", str(tmp_path / "a"), "-o", str(tmp_path / "x"), "--merge",
                          "--eval-n", "16", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["passed"] and summary["merged"] == ["a"]
    code, _, err = cli(["export", "--adapter", str(tmp_path / "a"), "-o", str(tmp_path / "y"), "--merge",
                        "--no-merge"], capsys)
    assert code == 2 and "contradict" in err
