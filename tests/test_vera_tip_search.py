"""VeRA (shared random projections, trainable scaling vectors) and Tip-Adapter's α/β search on a validation
set: parity with PEFT's VeRA forward, exact merge, what the file holds, and the search against a by-hand grid."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vlkit
from vlkit.adapters.inject import adapter_layers, merge_adapter
from vlkit.adapters.vera import VeraConfig, VeraLayer, shared_projections
from vlkit.errors import ConfigError


def _inputs(bb):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, bb.image_size, bb.image_size, generator=g), bb.tokenize(["a red cube", "that hat"])


def _set_lambdas(bb, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(bb, name).values():
            layer.lambda_b.copy_(0.5 * torch.randn(layer.lambda_b.shape, generator=g))
            layer.lambda_d.copy_(torch.randn(layer.lambda_d.shape, generator=g))


def test_vera_layer_equals_peft_vera_forward():
    from peft import VeraConfig as PeftVeraConfig
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.vera.layer import Linear as PeftVeraLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40)
    ours = VeraLayer(24, 40, VeraConfig(rank=16, projection_seed=3))
    with torch.no_grad():
        ours.lambda_b.normal_()
        ours.lambda_d.normal_()
    a, b = BufferDict({"default": ours.vera_A.clone()}), BufferDict({"default": ours.vera_B.clone()})
    theirs = PeftVeraLinear(base, a, b, "default", PeftVeraConfig(r=16, target_modules=["x"]), r=16)
    with torch.no_grad():
        theirs.vera_lambda_b["default"].copy_(ours.lambda_b)
        theirs.vera_lambda_d["default"].copy_(ours.lambda_d)
    x = torch.randn(5, 24)
    torch.testing.assert_close(ours(x, base(x), base.weight, base.bias), theirs(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base.weight + ours.delta_weight(), theirs.get_delta_weight("default") + base.weight,
                               rtol=1e-5, atol=1e-6)


def test_projections_are_shared_and_regenerated_from_the_seed():
    a1, b1 = shared_projections(7, 8, 16, 32)
    assert shared_projections(7, 8, 16, 32)[0] is a1  # one tensor for every layer of this shape
    from vlkit.adapters import vera

    vera._PROJECTIONS.clear()
    a2, b2 = shared_projections(7, 8, 16, 32)
    assert a2 is not a1 and torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(shared_projections(8, 8, 16, 32)[0], a1)


def test_vera_identity_at_init_trains_only_vectors_and_saves_only_them(make_backbone, tmp_path):
    bb = make_backbone("tiny")
    pixels, tokens = _inputs(bb)
    with torch.no_grad():
        before = bb.encode_image(pixels), bb.encode_text(tokens)
    rec = vlkit.inject(bb, "vera", rank=32, modules="all")
    with torch.no_grad():
        # MHA projections run unfused once wrapped: equal to float rounding, as every variant (conformance)
        torch.testing.assert_close(bb.encode_image(pixels), before[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bb.encode_text(tokens), before[1], rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lambda_b", "lambda_d")) for n in trainable)
    _set_lambdas(bb)
    loss = bb.encode_image(pixels).sum() + bb.encode_text(tokens).sum()
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in bb.parameters())
    vlkit.save_adapter(bb, tmp_path / "v")
    saved = load_file(str(tmp_path / "v" / "adapter_model.safetensors"))
    assert saved and all(k.endswith(("lambda_b", "lambda_d")) for k in saved)
    per_site = {k.rsplit(".", 1)[0] for k in saved}
    assert len(per_site) == len(rec.sites)
    with torch.no_grad():
        want = bb.encode_image(pixels), bb.encode_text(tokens)
    fresh = make_backbone("tiny")
    vlkit.load_adapter(fresh, tmp_path / "v")
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(pixels), want[0]) and torch.equal(fresh.encode_text(tokens), want[1])


@pytest.mark.parametrize("kind", ["tiny", "open_clip", "hf"])
def test_vera_merges_exactly(kind, make_backbone):
    bb = make_backbone(kind)
    pixels, tokens = _inputs(bb)
    vlkit.inject(bb, "vera", rank=16, modules="all")
    _set_lambdas(bb)
    with torch.no_grad():
        live = bb.encode_image(pixels), bb.encode_text(tokens)
    merge_adapter(bb, "default")
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(pixels), live[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bb.encode_text(tokens), live[1], rtol=1e-4, atol=1e-5)


def test_vera_bad_options_and_task_vector_merges_are_refused(make_backbone, tmp_path):
    bb = make_backbone("tiny")
    with pytest.raises(ConfigError, match="rank"):
        vlkit.inject(bb, "vera", rank=0)
    with pytest.raises(ConfigError, match="modules"):
        vlkit.inject(bb, "vera", modules="everything")
    from vlkit.compose.merge import merge_adapters

    for i in range(2):
        b = make_backbone("tiny")
        vlkit.inject(b, "vera", rank=8)
        _set_lambdas(b, seed=i)
        vlkit.save_adapter(b, tmp_path / f"v{i}")
    with pytest.raises(ConfigError, match="not a task vector"):
        merge_adapters([tmp_path / "v0", tmp_path / "v1"], tmp_path / "m", method="ties")
    merge_adapters([tmp_path / "v0", tmp_path / "v1"], tmp_path / "m", method="linear")
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["variant"] == "vera"


# --- Tip-Adapter: α and β from a validation set ---------------------------------------------------------------

def test_tip_adapter_search_picks_the_best_pair_of_a_hand_computed_grid():
    from vlkit.adapters.tip_adapter import _features, build_tip_adapter, search_alpha_beta
    from vlkit.data import load_data
    from vlkit.data.api import few_shot
    from vlkit.tasks.classification import ClassificationTask

    bb = vlkit.load_backbone("tiny")
    spec = {"kind": "world", "domain": "satellite", "task": "classification", "n": 200}
    shots = few_shot(load_data({**spec, "seed": 0}), 4, seed=1)
    val = few_shot(load_data({**spec, "seed": 5}), 4, seed=2)
    task = ClassificationTask(bb, shots)
    train, held = task.prepare(bb, shots), task.prepare(bb, val)
    alphas, betas = (0.5, 2.0, 8.0), (1.0, 5.5, 30.0)
    found = search_alpha_beta(bb, task, train, held, alphas=alphas, betas=betas)
    # by hand: the same logits, written out
    with torch.no_grad():
        w = task.class_embeddings(bb).float()
    keys, feats = _features(bb, train["pixels"], 64), _features(bb, held["pixels"], 64)
    onehot = F.one_hot(torch.as_tensor(train["labels"]).long(), w.shape[0]).float()
    target = torch.as_tensor(held["labels"]).long()
    grid = {}
    for a in alphas:
        for b in betas:
            logits = bb.logit_scale * feats @ w.t() + a * torch.exp(-b * (1 - feats @ keys.t())) @ onehot
            grid[(a, b)] = float((logits.argmax(-1) == target).float().mean()) * 100
    assert found["accuracy"] == pytest.approx(max(grid.values()))
    assert grid[(found["alpha"], found["beta"])] == pytest.approx(found["accuracy"])
    rec = build_tip_adapter(bb, shots, task=task, val=val, name="tip")
    assert rec.search["accuracy"] >= rec.search["default_accuracy"]
    assert (rec.config["alpha"], rec.config["beta"]) == (rec.search["alpha"], rec.search["beta"])


def test_fewshot_protocol_searches_alpha_beta_on_a_few_shot_val_set(monkeypatch):
    from vlkit.adapters import tip_adapter
    from vlkit.train.fewshot import run_fewshot

    seen = []
    real = tip_adapter.search_alpha_beta

    def spy(backbone, task, train, val, **kw):
        found = real(backbone, task, train, val, **kw)
        seen.append((torch.as_tensor(train["labels"]).tolist(), torch.as_tensor(val["labels"]).tolist(), found))
        return found

    monkeypatch.setattr(tip_adapter, "search_alpha_beta", spy)
    res = run_fewshot("tiny", ["tip-adapter"], shots=[2], seeds=[1], domain="satellite", n_eval=60, plot=False)
    [(train_labels, val_labels, found)] = seen
    classes = sorted(set(train_labels))
    assert sorted(val_labels) == sorted(classes * 2)  # min(shots, 4) = 2 validation examples per class
    [row] = res["runs"]
    assert row["trainable"] == 0 and (row["alpha"], row["beta"]) == (found["alpha"], found["beta"])
