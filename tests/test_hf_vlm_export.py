"""`vlkit export` of the transformers VLMs of `hf:DIR` (LLaVA, Idefics3, SmolVLM, BLIP, vision-encoder-decoder), each
built from a tiny random config: the command writes the vision graph and the language model's prefill and
decoder-with-past graphs with adapters inside (a LoRA in every tower merged; a bottleneck or prompt tuning kept as
they are), its own verification generates the same greedy tokens in onnxruntime as in PyTorch, and the written
export answers a fresh batch (prompts of different lengths, padded) on its own, from its processor or tokenizer,
as the backbone does; a generation setting the export cannot reproduce is refused in one line; the traceable image
features of LLaVA and Idefics3/SmolVLM are the models' own."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from cli_helpers import cli
from PIL import Image
from vlm_models import make_vlm

import vlkit

IMAGE_TOKEN_KINDS = ("llava", "idefics3", "smolvlm")
EXTRA = {  # adapters exported as they are, next to the merged LoRA
    "llava": ("pt", "prompt-tuning", {"num_tokens": 2}),
    "blip": ("bn", "bottleneck", {"towers": "lm"}),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("vlm-export")


def _load(root, kind):
    if kind == "smolvlm":
        pytest.importorskip("num2words", reason="SmolVLM's processor needs num2words")
    return vlkit.load(f"hf:{make_vlm(kind, root)}")


def _adapters(root, kind, tmp_path) -> list:
    """A LoRA in every tower (and the kind's extra adapter), perturbed so that greedy answers vary by step."""
    torch.manual_seed(5)
    m = _load(root, kind)
    specs = [("lo", "lora", {"rank": 4, "modules": "all", "towers": "all"})]
    specs += [EXTRA[kind]] if kind in EXTRA else []
    g = torch.Generator().manual_seed(1)
    dirs = []
    for name, variant, opts in specs:
        m.add_adapter(name, variant, **opts)
        with torch.no_grad():
            for t in m.adapter_parameters(name).values():
                if t.is_floating_point():
                    t.add_(0.3 * torch.randn(t.shape, generator=g))
        dirs.append(m.save_adapter(tmp_path / name, name))
    return dirs


def _images():
    noise = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    return [Image.fromarray(noise), Image.new("RGB", (30, 30), (200, 30, 30))]


def _exported_inputs(kind, out, manifest, bb, images, prompts):
    """Pixels, token ids and mask from the export's own files: the processor for image-token models (its chat
    template and image-token expansion), else the start token and the tokenizer, padded on the left."""
    from transformers import AutoProcessor, AutoTokenizer

    if kind in IMAGE_TOKEN_KINDS:
        proc = AutoProcessor.from_pretrained(out / "tokenizer")
        extra = {"do_image_splitting": False} if kind != "llava" else {}
        texts = [bb.prompt_text(p, 1) for p in prompts]
        enc = proc(text=texts, images=[[im] for im in images] if extra else images, padding=True,
                   padding_side="left", return_tensors="np", **extra)
        px = enc["pixel_values"].reshape(len(images), *enc["pixel_values"].shape[-3:])
        return px, enc["input_ids"], enc["attention_mask"]
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    start, pad = manifest["generation"]["prompt_start_token_id"], manifest["generation"]["pad_token_id"]
    rows = [[start, *tok(p, add_special_tokens=False)["input_ids"]] for p in prompts]
    n = max(len(r) for r in rows)
    ids = np.array([[pad] * (n - len(r)) + r for r in rows])
    mask = np.array([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return bb.preprocess_batch(images).numpy(), ids, mask


@pytest.mark.parametrize("kind", ["llava", "idefics3", "smolvlm", "blip", "vision-encoder-decoder"])
def test_export_generates_the_same_tokens_in_onnxruntime(root, kind, capsys, tmp_path):
    from transformers import AutoTokenizer

    from vlkit.export.generative import load_sessions, onnx_generate

    dirs = _adapters(root, kind, tmp_path)
    out = tmp_path / "onnx"
    if kind == "vision-encoder-decoder":  # the Python API (the others: the command)
        from vlkit.export import export_model
        from vlkit.export.base import ExportOptions

        summary = export_model(out, adapters=dirs, options=ExportOptions(seed=3))
    else:
        args = ["export", *[a for d in dirs for a in ("--adapter", str(d))], "-o", str(out), "--seed", "3", "--json"]
        code, stdout, err = cli(args, capsys)
        assert code == 0, err
        summary = json.loads(stdout)
    assert summary["passed"] and all(c["passed"] for c in summary["checks"])
    assert summary["merged"] == ["lo"]  # the LoRA folded in; a bottleneck or prompt tuning stays an operator
    assert {c["output"] for c in summary["checks"]} >= {"tokens differing", "logits, every step (rel.)"}
    assert {"vision.onnx", "prefill.onnx", "decoder_with_past.onnx", "export.json"} <= set(summary["written"])
    manifest = json.loads((out / "export.json").read_text())
    texts = manifest["verification"]["texts"]
    assert texts["pytorch"] == texts["onnxruntime"] and len(set(" ".join(texts["pytorch"]).split())) > 1
    assert manifest["generation"]["cross_attention"] is (kind not in IMAGE_TOKEN_KINDS)
    # the export on its own: fresh images, prompts of different lengths, its processor or tokenizer
    m = _load(root, kind)
    for d in dirs:
        m.load_adapter(d)
    m.set_adapter(*[d.name for d in dirs])
    bb = m.backbone
    images = _images()
    prompts = ["a red", ""] if kind == "vision-encoder-decoder" else ["vqa: what color is the circle ?", "caption:"]
    px, ids, mask = _exported_inputs(kind, out, manifest, bb, images, prompts)
    assert mask[:, 0].tolist() == [1, 0]  # padded: the short prompt's row
    sessions, _ = load_sessions(out)
    g = manifest["generation"]
    got = onnx_generate(sessions, px.astype(np.float32), ids, mask, max_new_tokens=6,
                        start=g["decoder_start_token_id"], eos=g["eos_token_id"], pad=g["pad_token_id"],
                        forced_bos=g["forced_bos_token_id"], forced_eos=g["forced_eos_token_id"])
    with torch.no_grad():
        want = bb.generate(torch.from_numpy(px), prompts, max_new_tokens=6)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert [t.strip() for t in tok.batch_decode(got, skip_special_tokens=True)] == want


def test_a_generation_setting_the_export_does_not_reproduce_is_refused(root, capsys, tmp_path):
    src = tmp_path / "llava"
    shutil.copytree(make_vlm("llava", root), src)
    cfg = json.loads((src / "generation_config.json").read_text())
    (src / "generation_config.json").write_text(json.dumps({**cfg, "repetition_penalty": 1.3}))
    capsys.readouterr()  # building the model writes progress
    code, _, err = cli(["export", "--backbone", f"hf:{src}", "-o", str(tmp_path / "x")], capsys)
    assert code == 2 and "repetition_penalty" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["llava", "idefics3", "smolvlm"])
def test_traceable_image_features_are_the_models_own(root, kind):
    bb = _load(root, kind).backbone
    px = bb.preprocess_batch(_images())
    inner = bb.model.model
    with torch.no_grad():
        ours = bb.image_features(px)
        if kind == "llava":  # one tensor, not the model's list of one per image
            theirs = torch.stack(list(inner.get_image_features(pixel_values=px).pooler_output))
        else:  # the model's own patch positions (bucketize) in its vision model's forward
            theirs = inner.connector(inner.vision_model(pixel_values=px).last_hidden_state)
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-6)
