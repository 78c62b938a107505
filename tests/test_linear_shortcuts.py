"""Linear sites without extra work (issue 18): the hosts' first-layer shortcuts give what `forward` gives.

In plain stacking the first layer at a linear site may take a shortcut (`input_transform`: (IA)^3's input
scaling projects once; `from_base`: DoRA reuses the base output), and nn.MultiheadAttention self-attention
projects q, k, v in one fused in-projection. Parallel mode with weight 1 runs every layer through its plain
`forward` on the base output, so for a single adapter (or additive ones) both modes must agree, in outputs
and gradients; the shortcut must also remove the second projection (fewer FLOPs).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vlkit
from vlkit.adapters.inject import adapter_layers
from vlkit.adapters.model import AdaptedModel

CASES = [("lora", {"modules": "all"}), ("lora", {"modules": "qv"}), ("dora", {"modules": "all"}),
         ("ia3", {})]


def _perturb(bb, name, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(bb, name).values():
            for p in layer.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _run(bb, px, ids):
    bb.zero_grad()
    out = torch.cat([bb.encode_image(px), bb.encode_text(ids)], dim=0)
    out.pow(2).sum().backward()
    return out.detach(), [p.grad.clone() for p in bb.parameters() if p.requires_grad]


def _generic(bb, names):
    """Every layer through its own forward on the base output (parallel, weights 1)."""
    AdaptedModel.of(bb).state.mode = "parallel"
    AdaptedModel.of(bb).state.weights = {n: 1.0 for n in names}


@pytest.mark.parametrize("kind", ["tiny", "open_clip", "hf"])
@pytest.mark.parametrize("variant,opts", CASES, ids=[f"{v}-{o.get('modules', 'default')}" for v, o in CASES])
def test_shortcut_equals_forward(make_backbone, sample_inputs, kind, variant, opts):
    if variant == "ia3":
        pytest.importorskip("vlkit_ia3")
    bb = make_backbone(kind)
    vlkit.inject(bb, variant, name="a", **opts)
    _perturb(bb, "a")
    px, ids = sample_inputs(bb)
    fast, g_fast = _run(bb, px, ids)
    _generic(bb, ["a"])
    slow, g_slow = _run(bb, px, ids)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fast, g_slow, strict=True):  # float32 rounding differs (W x is y - b), nothing else
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("order", [("ia3", "lora"), ("lora", "ia3")])
def test_input_scaling_stacked_first_or_second(make_backbone, sample_inputs, order):
    """(IA)^3's input scaling at mlp.fc2 with a LoRA at the same site: the shortcut only when it is first."""
    pytest.importorskip("vlkit_ia3")
    bb = make_backbone("hf")
    for i, name in enumerate(order):
        vlkit.inject(bb, name, name=name, modules="mlp")  # both at mlp.fc2 (LoRA also at fc1)
        _perturb(bb, name, seed=i)
    AdaptedModel.of(bb).set_adapter(*order)
    px, ids = sample_inputs(bb)
    stacked, _ = _run(bb, px, ids)
    _generic(bb, list(order))  # both additive at fc2: the sum of their changes equals stacking them
    parallel, _ = _run(bb, px, ids)
    assert torch.allclose(stacked, parallel, atol=1e-5, rtol=1e-5)


def _flops(bb, px):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        bb.encode_image(px)
    return counter.get_total_flops()


@pytest.mark.parametrize("variant", ["ia3", "dora"])
def test_shortcut_projects_once(make_backbone, sample_inputs, variant):
    """The shortcut drops the layer's second projection: fewer FLOPs than the generic path, and, for
    (IA)^3, as many as the frozen model plus the elementwise scalings."""
    if variant == "ia3":
        pytest.importorskip("vlkit_ia3")
    bb = make_backbone("hf")
    px, _ = sample_inputs(bb)
    frozen = _flops(bb, px)
    vlkit.inject(bb, variant, name="a", **({"modules": "mlp"} if variant == "dora" else {}))
    fast = _flops(bb, px)
    _generic(bb, ["a"])
    slow = _flops(bb, px)
    assert fast < slow
    if variant == "ia3":
        assert fast == frozen  # scaling vectors count no FLOPs; the projections are the frozen model's
