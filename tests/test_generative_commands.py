"""Every command on a generative backbone (`vl:` with a tiny T5): `vlkit probe winoground` scores pairs as VQAScore
does, `vlkit compose run` captions and answers, `POST /v1/generate` writes what `compose run` writes (requests for
different adapters batched, routed per sample), and what does not apply is refused in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlkit
from cli_helpers import cli
from vl_models import make_lm
from vlkit.scoring import VQASCORE_QUESTION

PROMPTS = ["caption:", "vqa: what color is the circle ?"]


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """The backbone spec and two adapter directories (a LoRA in every part, a bottleneck in the LM)."""
    root = tmp_path_factory.mktemp("vlcmd")
    spec = f"vl:lm={make_lm('t5', root)},vision=tiny@random,projector=linear"
    m = vlkit.load(spec)
    m.add_adapter("lo", "lora", rank=4, modules="all", towers="all")
    m.add_adapter("bn", "bottleneck", towers="lm")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("lo", "bn"):
            for t in m.adapter_parameters(name).values():
                if t.is_floating_point():
                    t.add_(0.3 * torch.randn(t.shape, generator=g))
    dirs = {n: m.save_adapter(root / n, n) for n in ("lo", "bn")}
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
