"""Lighter servers (issue 25): a `tiny` server (with an adapter) and an ONNX server answer requests without ever
importing ray, open_clip or transformers (checked in a fresh subprocess); the tiny CLIP written out in
`vlkit.world.tiny_model` is open_clip's CLIP: same parameter names, same seeded init, same outputs."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_compose import make_adapter

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("ray", "open_clip", "transformers")
PROBE = """
import json, sys
from fastapi.testclient import TestClient
from vlkit.serve.app import ServeConfig, create_app
app = create_app(ServeConfig(**json.loads(sys.argv[1])))
with TestClient(app) as c:
    codes = [c.post("/v1/embed", json={"adapter": sys.argv[2], "text": "a red circle"}).status_code,
             c.post("/v1/embeddings", json={"model": sys.argv[2], "input": ["a", "b c"]}).status_code]
print(json.dumps({"codes": codes, "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
""".replace("HEAVY", repr(HEAVY))


def _probe(config: dict, adapter: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(config), adapter], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("light"), "lit", 1, "lora")


def test_tiny_server_imports_no_heavy_library(lora):
    got = _probe({"backbone": "tiny@random", "adapters": [str(lora)]}, "lit")
    assert got == {"codes": [200, 200], "heavy": []}


def test_onnx_server_imports_no_heavy_library(lora, tmp_path):
    pytest.importorskip("onnxruntime")
    from vlkit.export.api import export_model
    from vlkit.export.base import ExportOptions

    out = tmp_path / "export"
    export_model(out, adapters=[lora], eval_n=4, options=ExportOptions(seed=0))
    got = _probe({"engine": "onnx", "adapters": [f"lit={out}"]}, "lit")
    assert got == {"codes": [200, 200], "heavy": []}


def test_tiny_model_is_open_clips_clip():
    open_clip_model = pytest.importorskip("open_clip.model")
    from vlkit.world.tiny import build_tiny_model, tiny_config, tiny_tokenizer

    tok, cfg = tiny_tokenizer(), tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = open_clip_model.CLIP(cfg["embed_dim"], copy.deepcopy(cfg["vision_cfg"]),
                                   dict(cfg["text_cfg"], vocab_size=tok.vocab_size)).eval()
    mine = build_tiny_model(tok).eval()
    a, b = ref.state_dict(), mine.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = tok(["a red circle", "two blue squares left of a star"])
    with torch.no_grad():
        assert torch.allclose(ref.encode_image(pixels), mine.encode_image(pixels), atol=1e-6)
        assert torch.allclose(ref.encode_text(tokens), mine.encode_text(tokens), atol=1e-6)
        ref.visual.output_tokens = mine.visual.output_tokens = True
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ref.visual(pixels), mine.visual(pixels)))
