"""Every command on a generative backbone (`vl:` with a tiny T5): `vlkit probe winoground` scores pairs as VQAScore
does, `vlkit compose run` captions and answers, `POST /v1/generate` writes what `compose run` writes (requests for
different adapters batched, routed per sample), and what does not apply is refused in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import cli
from PIL import Image
from vl_models import make_lm

import vlkit
from vlkit.scoring import VQASCORE_QUESTION

PROMPTS = ["caption:", "vqa: what color is the circle ?"]


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """The backbone spec and two adapter directories (a LoRA in every part, a bottleneck in the LM)."""
    root = tmp_path_factory.mktemp("vlcmd")
    torch.manual_seed(0)  # the tiny LM's random weights too
    spec = f"vl:lm={make_lm('t5', root)},vision=tiny@random,projector=linear"
    m = vlkit.load(spec)
    m.add_adapter("lo", "lora", rank=4, modules="all", towers="all")
    m.add_adapter("bn", "bottleneck", towers="lm")
    m.add_adapter("pt", "prompt-tuning", num_tokens=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("lo", "bn", "pt"):
            for t in m.adapter_parameters(name).values():
                if t.is_floating_point():
                    t.add_(0.3 * torch.randn(t.shape, generator=g))
    dirs = {n: m.save_adapter(root / n, n) for n in ("lo", "bn", "pt")}
    img = root / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(img)
    return {"spec": spec, "root": root, "image": img, **dirs}


def _backbone(vl, *adapters):
    m = vlkit.load(vl["spec"])
    for name in adapters:
        m.load_adapter(vl[name], name=name, activate=False)
    return m


def test_probe_winoground_scores_are_p_yes(vl, capsys, tmp_path):
    from vlkit.probe.winoground import load_winoground_data

    scores = tmp_path / "scores.jsonl"
    code, _, err = cli(["probe", "winoground", "--backbone", vl["spec"], "--adapters", str(vl["lo"]), "-n", "3",
                        "--bootstrap", "20", "--scores", str(scores), "--no-progress"], capsys)
    assert code == 0, err
    assert "group" in err and "backbone" in err  # the usual table
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert {r["system"] for r in rows} == {"backbone", str(vl["lo"])}
    ds, _ = load_winoground_data("synth", n=3)
    m = _backbone(vl, "lo")
    bb = m.backbone
    for r in rows:
        ex = ds[[str(i) for i in ds["id"]].index(str(r["id"]))]
        m.set_adapter("lo") if r["system"] != "backbone" else m.set_adapter()
        for key in ("c0_i0", "c0_i1", "c1_i0", "c1_i1"):
            cap, img = ex[f"caption_{key[1]}"], ex[f"image_{key[4]}"]
            with torch.no_grad():
                p = bb.answer_probability(bb.preprocess_batch([img]), [VQASCORE_QUESTION.format(cap)], "Yes")
            assert abs(float(p) - r[key]) < 1e-5
    assert all(0.0 <= r["c0_i0"] <= 1.0 for r in rows)
    assert len({r["c0_i0"] for r in rows}) > 1  # the adapter changes the scores


def _generate(vl, adapters, active, prompts, mode="stack", n=1):
    m = _backbone(vl, *adapters)
    if active:
        m.set_adapter(*active, mode=mode)
    bb = m.backbone
    px = bb.preprocess_batch([Image.open(vl["image"])] * n)
    with torch.no_grad():
        return bb.generate(px, prompts, max_new_tokens=6)


def test_compose_run_generates_through_adapters_stacks_and_compositions(vl, capsys, tmp_path):
    img = str(vl["image"])
    code, out, err = cli(["compose", "run", str(vl["lo"]), "--image", img, "--prompt", "caption:",
                          "--max-new-tokens", "6", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert [r["text"] for r in res["predictions"]] == _generate(vl, ["lo"], ["lo"], ["caption:"])
    assert f"adapter {vl['lo']}" in err
    # two images, one prompt each, through an a+b stack
    stack = f"{vl['lo']}+{vl['bn']}"
    code, out, err = cli(["compose", "run", stack, "--backbone", vl["spec"], "--image", img, "--image", img,
                          "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "6", "--json"], capsys)
    assert code == 0, err
    want = _generate(vl, ["lo", "bn"], ["lo", "bn"], PROMPTS, n=2)
    assert [r["text"] for r in json.loads(out)["predictions"]] == want
    # a parallel composition: both adapters on every site, summed
    comp = tmp_path / "par"
    code, _, err = cli(["compose", f"{vl['lo']},{vl['bn']}", "--mode", "parallel", "-o", str(comp)], capsys)
    assert code == 0, err
    code, out, err = cli(["compose", "run", str(comp), "--image", img, "--prompt", "caption:",
                          "--max-new-tokens", "6", "--json"], capsys)
    assert code == 0, err
    assert [r["text"] for r in json.loads(out)["predictions"]] == _generate(vl, ["lo", "bn"], ["lo", "bn"],
                                                                            ["caption:"], mode="parallel")
    # one adapter of the composition
    code, out, err = cli(["compose", "run", str(comp), "--adapter", "bn", "--image", img, "--prompt", "caption:",
                          "--max-new-tokens", "6", "--json"], capsys)
    assert code == 0, err
    assert [r["text"] for r in json.loads(out)["predictions"]] == _generate(vl, ["bn"], ["bn"], ["caption:"])


@pytest.mark.parametrize("args,message", [
    (["--text", "a red circle", "--prompt", "caption:"], "--text does not apply to generative backbone"),
    ([], "give --prompt"),
    (["--prompt", "caption:", "--max-new-tokens", "0"], "at least 1"),
    (["--prompt", "a", "--prompt", "b", "--prompt", "c"], "3 prompts for 1 images"),
])
def test_compose_run_refuses_what_does_not_apply(vl, capsys, args, message):
    code, _, err = cli(["compose", "run", str(vl["lo"]), "--image", str(vl["image"]), *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_compose_run_refuses_prompt_on_a_contrastive_backbone(vl, capsys, tmp_path):
    m = vlkit.load("tiny@random")
    m.add_adapter("c", "lora", rank=2)
    d = m.save_adapter(tmp_path / "c", "c")
    comp = tmp_path / "comp"
    assert cli(["compose", str(d), "--mode", "stack", "-o", str(comp)], capsys)[0] == 0
    code, _, err = cli(["compose", "run", str(comp), "--image", str(vl["image"]), "--prompt", "caption:"], capsys)
    assert code == 2 and "--prompt applies to generative backbones" in err, err


@pytest.fixture(scope="module")
def gen_app(vl):
    from fastapi.testclient import TestClient

    from vlkit.serve import ServeConfig, create_app

    app = create_app(ServeConfig(backbone=vl["spec"], adapters=[f"lo={vl['lo']}", f"bn={vl['bn']}", f"pt={vl['pt']}"],
                                 max_batch=8, max_wait_ms=300))
    with TestClient(app) as client:
        yield app, client


def _b64(path):
    import base64

    return base64.b64encode(path.read_bytes()).decode()


def test_serve_generate_equals_compose_run(vl, gen_app, capsys):
    _, client = gen_app
    r = client.post("/v1/generate", json={"adapter": "lo", "image": _b64(vl["image"]), "prompt": "caption:",
                                          "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    code, out, err = cli(["compose", "run", str(vl["lo"]), "--image", str(vl["image"]), "--prompt", "caption:",
                          "--max-new-tokens", "6", "--json"], capsys)
    assert code == 0, err
    assert r.json() == {"text": json.loads(out)["predictions"][0]["text"], "adapter": "lo"}


def test_serve_batches_generation_for_different_adapters_routed_per_sample(vl, gen_app):
    from vlkit.serve.generate_api import GenerateBody, build_generate_item

    app, _ = gen_app
    service = app.state.vlkit.service
    # lo, bn and the frozen backbone routed per sample in one generation; pt (prompt tuning: a longer input) apart
    asks = [("lo", PROMPTS[0]), ("bn", PROMPTS[1]), (None, PROMPTS[0]), ("pt", PROMPTS[1]), ("lo", PROMPTS[1]),
            ("bn", PROMPTS[0])]
    before = dict(service.engine.stats.batch_sizes)
    items = [build_generate_item(service.backend, service.config, GenerateBody(
        adapter=a, image=_b64(vl["image"]), prompt=p, max_new_tokens=6)) for a, p in asks]
    futures = [service.engine.submit(it) for it in items]
    got = [f.result(timeout=120) for f in futures]
    assert service.engine.stats.batch_sizes.get(6, 0) == before.get(6, 0) + 1  # one batch of all six
    for (a, p), res in zip(asks, got):
        assert res == {"text": _generate(vl, [a] if a else [], [a] if a else [], [p])[0], "adapter": a or "none"}
    assert len({res["text"] for res in got}) > 1


@pytest.mark.parametrize("body,status,message", [
    ({"adapter": "nope", "prompt": "caption:"}, 404, "unknown adapter 'nope'"),
    ({"adapter": "auto", "prompt": "caption:"}, 400, "auto"),
    ({"prompt": "caption:", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "caption:", "image": "%%%"}, 400, "not valid base64"),
    ({"prompt": "caption:", "temperature": 1}, 422, "unknown field"),
])
def test_serve_generate_errors_are_4xx_json(vl, gen_app, body, status, message):
    _, client = gen_app
    r = client.post("/v1/generate", json={"image": _b64(vl["image"]), **body})
    assert r.status_code == status and message in r.json()["error"], r.text


def test_serve_refuses_what_a_generative_backbone_does_not_do(vl, gen_app):
    _, client = gen_app
    r = client.post("/v1/classify", json={"image": _b64(vl["image"]), "labels": ["a", "b"]})
    assert r.status_code == 400 and "answers /v1/generate only" in r.json()["error"]
    from fastapi.testclient import TestClient

    from vlkit.serve import ServeConfig, create_app

    with TestClient(create_app(ServeConfig(backbone="tiny@random"))) as client:
        r = client.post("/v1/generate", json={"image": _b64(vl["image"]), "prompt": "caption:"})
        assert r.status_code == 400 and "needs a generative backbone" in r.json()["error"]


ADAPTER_SEEDS = {"t5": 5, "bart": 3, "llama": 5}  # tiny random LMs whose greedy answers vary from step to step


@pytest.mark.parametrize("kind", ["t5", "bart", "llama"])
def test_export_generates_the_same_tokens_in_onnxruntime(vl, capsys, tmp_path, kind):
    from vlkit.export.generative import PROMPTS as EXPORT_PROMPTS
    from vlkit.export.generative import load_sessions, onnx_generate

    torch.manual_seed(ADAPTER_SEEDS[kind])
    spec = vl["spec"] if kind == "t5" else f"vl:lm={make_lm(kind, vl['root'])},vision=tiny@random"
    m = vlkit.load(spec)
    m.add_adapter("lm", "lora", rank=4, modules="all", towers="lm")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in m.adapter_parameters("lm").values():
            t.add_(0.6 * torch.randn(t.shape, generator=g))
    lora = m.save_adapter(tmp_path / "lm", "lm")
    out = tmp_path / "onnx"
    code, stdout, err = cli(["export", "--adapter", str(lora), "-o", str(out), "--seed", "3", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["merged"] == ["lm"] and all(c["passed"] for c in summary["checks"])
    graphs = ("encoder", "decoder") if kind != "llama" else ("prefill",)
    assert {f"{g}.onnx" for g in ("vision", *graphs, "decoder_with_past")} | {"export.json"} <= set(summary["written"])
    # the export runs on its own: a fresh image, the tokenizer from the export, greedy with the KV cache
    sessions, manifest = load_sessions(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    m = vlkit.load(spec)
    m.load_adapter(lora)
    bb = m.backbone
    prompts = [EXPORT_PROMPTS[1], "caption:"]
    px = bb.preprocess_batch([Image.open(vl["image"])] * 2)
    enc = tok(prompts, padding="longest", return_tensors="np")
    g = manifest["generation"]
    ids = onnx_generate(sessions, px.numpy(), enc["input_ids"], enc["attention_mask"], max_new_tokens=6,
                        start=g["decoder_start_token_id"], eos=g["eos_token_id"], pad=g["pad_token_id"],
                        forced_bos=g["forced_bos_token_id"], forced_eos=g["forced_eos_token_id"])
    with torch.no_grad():
        want = bb.generate(px, prompts, max_new_tokens=6)
    assert [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)] == want
    assert len(set(" ".join(manifest["verification"]["texts"]["pytorch"]).split())) > 1  # tokens vary by step


def test_export_refuses_what_does_not_apply_to_a_generative_backbone(vl, capsys, tmp_path):
    code, _, err = cli(["export", "--adapter", str(vl["lo"]), "-o", str(tmp_path / "x"), "--fp16"], capsys)
    assert code == 2 and "--fp16 does not apply to a generative backbone" in err, err
    assert not (tmp_path / "x").exists()


def test_a_dual_encoder_task_is_refused_on_a_generative_backbone(vl, capsys):
    code, _, err = cli(["eval", "-d", "world:photo", "--backbone", vl["spec"], "--bootstrap", "0"], capsys)
    assert code == 2 and "runs on a dual encoder's embeddings" in err and len(err.strip().splitlines()) == 1, err


def test_a_route_composition_is_refused_on_a_generative_backbone(vl, capsys, tmp_path):
    code, _, err = cli(["compose", f"{vl['lo']},{vl['bn']}", "--mode", "route", "-o", str(tmp_path / "r"),
                        "--data", "lo=world:photo", "--data", "bn=world:photo"], capsys)
    assert code == 2 and "--mode route trains a router on dual-encoder embeddings" in err, err


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_decoder_only_backbone_answers_and_scores_a_batch_as_each_example_alone(vl, kind):
    torch.manual_seed(5)
    bb = vlkit.load(f"vl:lm={make_lm(kind, vl['root'])},vision=tiny@random").backbone
    px = bb.preprocess_batch([Image.open(vl["image"])] * 2)
    targets = ["yes", "a red circle"]
    with torch.no_grad():
        both = bb.generate(px, PROMPTS, max_new_tokens=6)  # prompts of different lengths: padding in the batch
        assert both == [bb.generate(px[i:i + 1], [p], max_new_tokens=6)[0] for i, p in enumerate(PROMPTS)]
        scores = bb.sequence_logprob(px, PROMPTS, targets)
        alone = torch.cat([bb.sequence_logprob(px[i:i + 1], [PROMPTS[i]], [targets[i]]) for i in range(2)])
        assert torch.allclose(scores, alone, atol=1e-4)
