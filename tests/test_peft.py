"""The `peft` bridge variant and PEFT's directory format, both ways (issue 16).

The round trips run on the tiny transformers CLIP of `hf_clip_dir` (random init, written by conftest): a LoRA
trained in vlkit is written with `--format peft` and loaded by `peft.PeftModel.from_pretrained`, and a
`PeftModel.save_pretrained` directory is loaded by `vlkit.load_adapter`; outputs are compared both ways."""
from __future__ import annotations

import json

import pytest
import torch

import vlkit
from cli_helpers import cli
from vlkit.adapters.inject import adapter_parameters, merge_adapter
from vlkit.errors import ConfigError, IncompatibleAdapterError
from vlkit.adapters.model import AdaptedModel

peft = pytest.importorskip("peft")


def _perturb(bb, name="default", seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(adapter_parameters(bb, name).items()):
            t.add_(scale * torch.randn(t.shape, generator=g, dtype=t.dtype))


def _inputs(bb, n=3):
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 3, bb.image_size, bb.image_size, generator=g), bb.tokenize(["a cat", "the hat", "a"][:n])


def _embed(bb, pixels, tokens):
    with torch.no_grad():
        return bb.encode_image(pixels, normalize=True), bb.encode_text(tokens, normalize=True)


def _peft_clip(hf_clip_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(hf_clip_dir).eval()


def _peft_embed(model, pixels, tokens, bb):
    """PEFT's model through the same vlkit encoders (HFBackbone calls model.vision_model / text_model)."""
    from vlkit.backbones.hf import HFBackbone

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    ref = HFBackbone(inner, bb.spec, bb._tokenizer, bb.image_size, bb.mean, bb.std, bb.context_length)
    return _embed(ref, pixels, tokens)


# --- the bridge variant ---------------------------------------------------------------------------------------------

TUNERS = [
    pytest.param({}, id="default-lora"),
    pytest.param({"peft_type": "LORA", "r": 4, "use_dora": True, "target_modules": "all-linear"}, id="dora"),
    pytest.param({"peft_type": "LOHA", "r": 2, "target_modules": ["q_proj", "v_proj"]}, id="loha"),
    pytest.param({"peft_type": "LOKR", "r": 2, "target_modules": ["fc1"]}, id="lokr"),
    pytest.param({"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "fc2"], "feedforward_modules": ["fc2"]},
                 id="ia3"),
    pytest.param({"peft_type": "OFT", "r": 0, "oft_block_size": 4, "target_modules": ["q_proj"]}, id="oft"),
]


@pytest.mark.parametrize("config", TUNERS)
@pytest.mark.parametrize("kind", ["tiny", "open_clip", "hf"])
def test_bridge_tuners_on_every_backbone(kind, config, make_backbone, tmp_path):
    bb = make_backbone(kind)
    pixels, tokens = _inputs(bb)
    ref = _embed(bb, pixels, tokens)
    rec = vlkit.inject(bb, "peft", **({"config": config} if config else {}))
    assert rec.sites and all(s.kind == "linear" for s in rec.sites)
    got = _embed(bb, pixels, tokens)
    assert max((a - b).abs().max() for a, b in zip(got, ref)) <= 1e-6  # PEFT's tuners start at the identity
    _perturb(bb)
    out = _embed(bb, pixels, tokens)
    assert not torch.allclose(out[0], ref[0])
    # save / load bit-exact
    path = vlkit.save_adapter(bb, tmp_path / "a")
    fresh = make_backbone(kind)
    vlkit.load_adapter(fresh, path)
    again = _embed(fresh, pixels, tokens)
    assert torch.equal(again[0], out[0]) and torch.equal(again[1], out[1])
    # PEFT's own merge folds it into the weights
    merge_adapter(bb, "default")
    merged = _embed(bb, pixels, tokens)
    torch.testing.assert_close(merged[0], out[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged[1], out[1], atol=1e-5, rtol=0)


def test_bridge_lora_equals_vlkit_lora(make_backbone):
    """A PEFT LoRA through the bridge computes what vlkit's own LoRA computes with the same factors."""
    a, b = make_backbone("open_clip"), make_backbone("open_clip")
    pixels, tokens = _inputs(a)
    vlkit.inject(a, "lora", rank=4, alpha=8.0, modules="qv")
    vlkit.inject(b, "peft", config={"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    _perturb(a)
    pa, pb = adapter_parameters(a, "default"), adapter_parameters(b, "default")
    with torch.no_grad():
        for k, t in pa.items():
            site, leaf = k.rsplit(".", 1)
            pb[f"{site}.tuner.{leaf}.default.weight"].copy_(t)
    for x, y in zip(_embed(a, pixels, tokens), _embed(b, pixels, tokens)):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("config,match", [
    ({"peft_type": "VERA"}, "shared state"),
    ({"peft_type": "PREFIX_TUNING"}, "prefix|prompt|target_modules"),
    ({"peft_type": "LORA", "rr": 3}, "rr"),
    ({"peft_type": "NOPE"}, "unknown peft_type"),
    ({"peft_type": "LORA", "modules_to_save": ["head"]}, "modules_to_save"),
    ({"peft_type": "LORA", "init_lora_weights": "pissa"}, "base weights"),
    ({"peft_type": "LORA", "bias": "all"}, "bias"),
])
def test_bridge_clear_errors(config, match, make_backbone):
    bb = make_backbone("tiny")
    with pytest.raises(ConfigError, match=match):
        vlkit.inject(bb, "peft", config=config)
    assert AdaptedModel.of(bb).records == {}
    assert not any(type(m).__name__.startswith("Adapted") for m in bb.modules())


def test_bridge_trains_probes_exports(tmp_path, capsys):
    """`vlkit train ... adapter.variant=peft adapter.config.r=4`, then probe and ONNX export (merged, and as operators)."""
    run = tmp_path / "run"
    code, _, err = cli(["train", "recipes/quickstart.yaml", "adapter.variant=peft", "adapter.config.r=4",
                        "adapter.config.use_dora=true", "optim.steps=3", "eval.every_steps=0", "data.train.n=16",
                        "data.eval.n=8", "checkpoint.every_steps=0", "-o", str(run), "--no-progress"], capsys)
    assert code == 0, err
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["variant"] == "peft" and cfg["config"]["config"]["r"] == 4 and cfg["config"]["config"]["use_dora"]
    bb = vlkit.load_backbone("tiny@random")
    vlkit.load_adapter(bb, run)
    from vlkit.export.api import export_model

    merged = export_model(tmp_path / "onnx", adapters=[run], eval_n=8)
    assert merged["merged"] and max(merged["max_abs_diff"].values()) <= 1e-4
    ops = export_model(tmp_path / "onnx-ops", adapters=[run], eval_n=8, merge=False)
    assert not ops["merged"] and max(ops["max_abs_diff"].values()) <= 1e-4
    code, out, err = cli(["probe", "winoground", "--backbone", "tiny@random", "--data", "synth", "-n", "8",
                          "--bootstrap", "10", "--adapters", str(run), "--no-progress", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["systems"][1]["label"] == str(run)


def test_bridge_compose_merge(make_backbone, tmp_path):
    from vlkit.compose.merge import merge_adapters

    dirs = []
    for i in range(2):
        bb = make_backbone("tiny")
        vlkit.inject(bb, "peft", config={"peft_type": "LORA", "r": 2})
        _perturb(bb, seed=i)
        dirs.append(vlkit.save_adapter(bb, tmp_path / f"s{i}"))
    merge_adapters([str(d) for d in dirs], tmp_path / "m", method="linear")
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "m" / "adapter_model.safetensors"))
    parts = [load_file(str(d / "adapter_model.safetensors")) for d in dirs]
    assert set(got) == set(parts[0])
    for k, t in got.items():
        torch.testing.assert_close(t, (parts[0][k] + parts[1][k]) / 2)
    bb = make_backbone("tiny")
    rec = vlkit.load_adapter(bb, tmp_path / "m")
    assert rec.variant == "peft"



@pytest.mark.parametrize("config,ok", [
    ({"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "fc2"], "feedforward_modules": ["fc2"]}, False),
    ({"peft_type": "LORA", "r": 2, "use_dora": True}, False),
    ({"peft_type": "LORA", "r": 2}, True),
], ids=["ia3", "dora", "lora"])
def test_bridge_task_vector_merges_only_for_zero_neutral_tuners(config, ok, make_backbone, tmp_path):
    from vlkit.compose.merge import merge_adapters

    dirs = []
    for i in range(2):
        bb = make_backbone("tiny")
        vlkit.inject(bb, "peft", config=config)
        _perturb(bb, seed=i)
        dirs.append(vlkit.save_adapter(bb, tmp_path / f"s{i}"))
    if ok:
        merge_adapters([str(d) for d in dirs], tmp_path / "ta", method="task_arithmetic")
    else:
        with pytest.raises(ConfigError, match="not a task vector|no task vector"):
            merge_adapters([str(d) for d in dirs], tmp_path / "ta", method="ties")
        assert not (tmp_path / "ta").exists()
    merge_adapters([str(d) for d in dirs], tmp_path / "lin", method="linear")

# --- PEFT's directory format ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,opts", [
    pytest.param("lora", {"rank": 4, "alpha": 8.0, "modules": "all"}, id="vlkit-lora"),
    pytest.param("peft", {"config": {"peft_type": "LORA", "r": 4, "use_dora": True,
                                     "target_modules": ["q_proj", "v_proj", "fc1"]}}, id="bridge-dora"),
])
def test_vlkit_to_peft(variant, opts, hf_clip_dir, tmp_path, capsys):
    spec = f"hf:{hf_clip_dir}"
    bb = vlkit.load_backbone(spec)
    vlkit.inject(bb, variant, **opts)
    _perturb(bb)
    src = vlkit.save_adapter(bb, tmp_path / "vl")
    out = tmp_path / "peft"
    code, stdout, err = cli(["export", "--format", "peft", "-a", str(src), "-o", str(out), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["format"] == "peft" and max(summary["max_abs_diff"].values()) <= 1e-5
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and "format" not in cfg
    pixels, tokens = _inputs(bb)
    mine = _embed(bb, pixels, tokens)
    base = _embed(vlkit.load_backbone(spec), pixels, tokens)
    model = peft.PeftModel.from_pretrained(_peft_clip(hf_clip_dir), str(out)).eval()
    theirs = _peft_embed(model, pixels, tokens, bb)
    assert not torch.allclose(theirs[0], base[0], atol=1e-4)  # PEFT really applied the adapter
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # and back: vlkit reads the PEFT directory it wrote
    fresh = vlkit.load_backbone(spec)
    rec = vlkit.load_adapter(fresh, out)
    assert rec.variant == variant
    for a, b in zip(_embed(fresh, pixels, tokens), mine):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("peft_opts,variant", [
    pytest.param({"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "out_proj", "fc2"]}, "lora", id="lora"),
    pytest.param({"r": 4, "lora_alpha": 4, "use_rslora": True, "target_modules": ["k_proj"]}, "lora", id="rslora"),
    pytest.param({"r": 2, "use_dora": True, "target_modules": ["q_proj", "fc1"]}, "peft", id="dora"),
    pytest.param({"r": 2, "rank_pattern": {"fc1": 4}, "target_modules": ["q_proj", "fc1"]}, "peft", id="rank-pattern"),
])
def test_peft_to_vlkit(peft_opts, variant, hf_clip_dir, tmp_path):
    spec = f"hf:{hf_clip_dir}"
    model = peft.get_peft_model(_peft_clip(hf_clip_dir), peft.LoraConfig(**peft_opts))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    model.save_pretrained(str(tmp_path / "p"))
    bb = vlkit.load_backbone(spec)
    pixels, tokens = _inputs(bb)
    theirs = _peft_embed(model, pixels, tokens, bb)
    rec = vlkit.load_adapter(bb, tmp_path / "p")
    assert rec.variant == variant
    mine = _embed(bb, pixels, tokens)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_peft_format_errors(make_backbone, hf_clip_dir, tmp_path, capsys):
    # a PEFT directory onto a backbone it was not made for
    model = peft.get_peft_model(_peft_clip(hf_clip_dir), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path / "p"))
    with pytest.raises(IncompatibleAdapterError, match="no projection"):
        vlkit.load_adapter(make_backbone("open_clip"), tmp_path / "p")
    # another PEFT type
    model = peft.get_peft_model(_peft_clip(hf_clip_dir), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    model.save_pretrained(str(tmp_path / "ia3"))
    from vlkit.errors import AdapterFileError

    with pytest.raises(AdapterFileError, match="IA3"):
        vlkit.load_adapter(vlkit.load_backbone(f"hf:{hf_clip_dir}"), tmp_path / "ia3")
    # --format peft of a tiny-backbone adapter, and of a bottleneck: one clear line, exit 2
    bb = make_backbone("tiny")
    vlkit.inject(bb, "lora")
    src = vlkit.save_adapter(bb, tmp_path / "tiny")
    code, _, err = cli(["export", "--format", "peft", "-a", str(src), "-o", str(tmp_path / "o1")], capsys)
    assert code == 2 and "hf:" in err and not (tmp_path / "o1").exists()
    bb = vlkit.load_backbone(f"hf:{hf_clip_dir}")
    vlkit.inject(bb, "bottleneck")
    src = vlkit.save_adapter(bb, tmp_path / "bn")
    code, _, err = cli(["export", "--format", "peft", "-a", str(src), "-o", str(tmp_path / "o2")], capsys)
    assert code == 2 and "bottleneck" in err and not (tmp_path / "o2").exists()
