"""Fusion adapter: identity at init, gate gradients, per-pair joint scores, two-stage retrieval, pairing."""
from __future__ import annotations

import pytest
import torch

import vlkit
from vlkit.adapters.cross_modal import relative_depth_pairs
from vlkit.errors import ConfigError
from vlkit.scoring import pair_scores, two_stage_scores

TEXTS = ["a red circle left of a blue square", "a blue square", "a green star above a red cross",
         "a small yellow triangle", "a large purple diamond right of a small circle"]


def _setup(mechanism="attention", gate="scalar", perturb=True):
    torch.manual_seed(0)
    bb = vlkit.load_backbone("tiny@random")
    pixels = torch.randn(len(TEXTS), 3, bb.image_size, bb.image_size)
    tokens = bb.tokenize(TEXTS)
    with torch.no_grad():
        ref = (bb.encode_image(pixels, normalize=True), bb.encode_text(tokens, normalize=True))
    vlkit.inject(bb, "fusion", name="f", mechanism=mechanism, gate=gate)
    if perturb:
        with torch.no_grad():
            for n, p in bb.named_parameters():
                if ".adapters.f." in n:
                    p.add_(torch.randn_like(p) * 0.2)
    return bb, pixels, tokens, ref


@pytest.mark.parametrize("mechanism,gate", [("attention", "scalar"), ("gating", "channel")])
def test_identity_at_init(mechanism, gate):
    bb, pixels, tokens, (img0, txt0) = _setup(mechanism, gate, perturb=False)
    with torch.no_grad():
        img, txt = bb.encode_pair(pixels, tokens)
    assert torch.allclose(img, img0, atol=1e-6) and torch.allclose(txt, txt0, atol=1e-6)
    assert bb.joint_active()


@pytest.mark.parametrize("mechanism", ["attention", "gating"])
def test_gates_receive_gradients(mechanism):
    bb, pixels, tokens, _ = _setup(mechanism, perturb=False)
    params = [p for n, p in bb.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        img, txt = bb.encode_pair(pixels, tokens)
        loss = -(img * txt).sum()
        loss.backward()
        opt.step()
    gates = {n: p.grad for n, p in bb.named_parameters() if n.endswith(".gate")}
    assert len(gates) == 8
    assert all(g is not None and g.abs().sum() > 0 for g in gates.values())
    frozen_grads = [n for n, p in bb.named_parameters() if ".adapters." not in n and p.grad is not None]
    assert frozen_grads == []


def test_joint_score_independent_of_batch():
    bb, pixels, tokens, _ = _setup()
    with torch.no_grad():
        full = bb.joint_pair_scores(pixels, tokens)
        for i in range(len(TEXTS)):
            alone = bb.joint_pair_scores(pixels[i:i + 1], tokens[i:i + 1])
            assert torch.allclose(alone, full[i:i + 1], atol=1e-5)
        shuffled = torch.tensor([3, 0, 4, 1, 2])
        again = bb.joint_pair_scores(pixels[shuffled], tokens[shuffled])
    assert torch.allclose(again, full[shuffled], atol=1e-5)


def test_joint_differs_from_dual_after_training_perturbation():
    bb, pixels, tokens, _ = _setup()
    with torch.no_grad():
        joint = pair_scores(bb, pixels, tokens)
        img = bb.encode_image(pixels, normalize=True)
        txt = bb.encode_text(tokens, normalize=True)
    dual = float(bb.logit_scale) * txt @ img.T
    assert joint.shape == (5, 5) and not torch.allclose(joint, dual, atol=1e-4)


def test_two_stage_top1_equals_exhaustive():
    bb, pixels, tokens, _ = _setup()
    with torch.no_grad():
        exhaustive = bb.joint_scores(pixels, tokens)
        t2i, i2t = two_stage_scores(bb, pixels, tokens, k=len(TEXTS))
    assert torch.equal(t2i.argmax(1), exhaustive.argmax(1))
    assert torch.equal(i2t.argmax(0), exhaustive.argmax(0))
    with torch.no_grad():
        t2i_k, _ = two_stage_scores(bb, pixels, tokens, k=2)
        img = bb.encode_image(pixels, normalize=True)
        txt = bb.encode_text(tokens, normalize=True)
    cand = (txt @ img.T).topk(2, dim=1).indices
    for t in range(len(TEXTS)):
        best = cand[t][exhaustive[t, cand[t]].argmax()]
        assert int(t2i_k[t].argmax()) == int(best)


def test_pairing_by_relative_depth_recorded():
    assert relative_depth_pairs([0, 1, 2, 3, 4, 5], [0, 1, 2]) == [[0, 0], [1, 0], [2, 1], [3, 1], [4, 2], [5, 2]]
    bb = vlkit.load_backbone("tiny@random")
    rec = vlkit.inject(bb, "fusion", name="f", layers=[1, 3])
    assert rec.config["pairing"] == [[1, 1], [3, 3]]


def test_fusion_needs_both_towers_and_valid_options():
    bb = vlkit.load_backbone("tiny@random")
    with pytest.raises(ConfigError, match="towers=both"):
        vlkit.inject(bb, "fusion", towers="vision")
    with pytest.raises(ConfigError, match="mechanism"):
        vlkit.inject(bb, "fusion", mechanism="telepathy")


def test_overhead_vs_bottleneck_within_25_percent():
    from vlkit.plugins import registry

    for mech in ("attention", "gating"):
        bb = vlkit.load_backbone("tiny@random")
        rec = vlkit.inject(bb, "fusion", name="f", mechanism=mech)
        own = vlkit.parameter_report(bb)["adapters"]["f"]["parameters"]
        plain = registry("adapter").get("fusion").plain_equivalent_parameters(rec.config_obj, rec.sites)
        assert own <= 1.25 * plain


def test_inspect_shows_gates(tmp_path):
    from vlkit.adapters.inspect import inspect_adapter, plot_gates

    bb, *_ = _setup()
    vlkit.save_adapter(bb, tmp_path / "f", name="f")
    info = inspect_adapter(tmp_path / "f")
    assert info["variant"] == "fusion" and len(info["gates"]) == 8
    assert {g["tower"] for g in info["gates"]} == {"vision", "text"}
    plot_gates(info, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000
