"""`POST /v1/generate` beyond greedy on one process: beam search (`num_beams`, what `vlkit compose run --num-beams` and
the backbone's own `generate` write; requests batched by decoding settings, range errors a 422 and the OpenAPI
schema saying so), a `--cluster ray` replica answering it as the single-process server does (its core without Ray,
then Ray Serve for real), and `--engine onnx` over a generative `vlkit export`: the same text as the PyTorch server,
greedy and beam search, without importing transformers."""
from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import cli
from PIL import Image
from vl_models import make_lm

import vlkit

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["caption:", "vqa: what color is the circle ?", "gqa: is the square left of the triangle ?"]
STEPS = 7


def _noisy(m, name: str, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in m.adapter_parameters(name).values():
            if t.is_floating_point():
                t.add_(scale * torch.randn(t.shape, generator=g))


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    """A tiny random Llama behind the tiny image tower (beam search and greedy disagree on it), a LoRA on the LM
    and a bottleneck, and three images."""
    root = tmp_path_factory.mktemp("servegen")
    torch.manual_seed(5)
    spec = f"vl:lm={make_lm('llama', root)},vision=tiny@random"
    m = vlkit.load(spec)
    m.add_adapter("lo", "lora", rank=4, modules="all", towers="lm")
    m.add_adapter("bn", "bottleneck", towers="lm")
    _noisy(m, "lo", 0.6, 1)
    _noisy(m, "bn", 0.3, 2)
    dirs = {n: m.save_adapter(root / n, n) for n in ("lo", "bn")}
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        path = root / f"x{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return {"spec": spec, "root": root, "images": images, **dirs}


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _alone(gen, adapter: str | None, image: Path, prompt: str, beams: int, steps: int = STEPS) -> str:
    """The backbone's own `generate` for one example through one adapter (None: the frozen backbone)."""
    m = vlkit.load(gen["spec"])
    if adapter is not None:
        m.load_adapter(gen[adapter], name=adapter)
    bb = m.backbone
    with torch.no_grad():
        return bb.generate(bb.preprocess_batch([Image.open(image)]), [prompt], max_new_tokens=steps, num_beams=beams)[0]


@pytest.fixture(scope="module")
def app(gen):
    from fastapi.testclient import TestClient

    from vlkit.serve import ServeConfig, create_app

    a = create_app(ServeConfig(backbone=gen["spec"], adapters=[f"lo={gen['lo']}", f"bn={gen['bn']}"], max_batch=8,
                               max_wait_ms=300))
    with TestClient(a) as client:
        yield a, client


def test_beam_search_answers_what_compose_run_and_generate_write(gen, app, capsys):
    _, client = app
    img = gen["images"][0]
    differs = False
    for prompt in PROMPTS:
        r = client.post("/v1/generate", json={"adapter": "lo", "image": _b64(img), "prompt": prompt,
                                              "max_new_tokens": STEPS, "num_beams": 3})
        assert r.status_code == 200, r.text
        code, out, err = cli(["compose", "run", str(gen["lo"]), "--backbone", gen["spec"], "--image", str(img),
                              "--prompt", prompt, "--max-new-tokens", str(STEPS), "--num-beams", "3", "--json"], capsys)
        assert code == 0, err
        res = json.loads(out)
        assert res["num_beams"] == 3 and r.json() == {"text": res["predictions"][0]["text"], "adapter": "lo"}
        assert r.json()["text"] == _alone(gen, "lo", img, prompt, 3)
        greedy = client.post("/v1/generate", json={"adapter": "lo", "image": _b64(img), "prompt": prompt,
                                                   "max_new_tokens": STEPS}).json()["text"]
        differs |= greedy != r.json()["text"]
    assert differs  # beam search is not greedy decoding here
    code, out, _ = cli(["compose", "run", str(gen["lo"]), "--backbone", gen["spec"], "--image", str(img), "--prompt",
                        PROMPTS[0], "--max-new-tokens", str(STEPS), "--beams", "3", "--json"], capsys)
    assert code == 0 and json.loads(out)["num_beams"] == 3  # the older spelling still works


def test_requests_batch_with_those_of_the_same_decoding_settings(gen, app):
    from vlkit.serve.generate_api import GenerateBody, build_generate_item

    a, _ = app
    service = a.state.vlkit.service
    bb = service.backend.backbone
    asks = [("lo", 3, 0), ("bn", 3, 1), (None, 1, 2), ("lo", 1, 0), ("lo", 3, 2), ("bn", 2, 1), ("bn", 1, 1)]
    calls: list[tuple[int, int]] = []
    real = bb.generate

    def spy(pixels, prompts, **kw):
        calls.append((kw["num_beams"], len(prompts)))
        return real(pixels, prompts, **kw)

    items = [build_generate_item(service.backend, service.config, GenerateBody(
        adapter=ad, image=_b64(gen["images"][i]), prompt=PROMPTS[i], max_new_tokens=STEPS, num_beams=k))
        for ad, k, i in asks]
    before = dict(service.engine.stats.batch_sizes)
    bb.generate = spy
    try:
        got = [f.result(timeout=300) for f in [service.engine.submit(it) for it in items]]
    finally:
        del bb.generate
    assert service.engine.stats.batch_sizes.get(7, 0) == before.get(7, 0) + 1  # one batch of all seven
    # greedy: three adapters routed per sample in one generation; beams: one generation per adapter and width
    assert sorted(calls) == [(1, 3), (2, 1), (3, 1), (3, 2)]
    for (ad, k, i), res in zip(asks, got):
        assert res == {"text": _alone(gen, ad, gen["images"][i], PROMPTS[i], k), "adapter": ad or "none"}


@pytest.mark.parametrize("value", [0, 9, -1, "2", 2.5, True, None])
def test_num_beams_out_of_range_is_a_422(gen, app, value):
    _, client = app
    r = client.post("/v1/generate", json={"image": _b64(gen["images"][0]), "prompt": "caption:", "num_beams": value})
    assert r.status_code == 422 and "num_beams" in r.json()["error"] and list(r.json()) == ["error"], r.text


def test_openapi_schema_declares_num_beams(app, gen):
    _, client = app
    body = client.get("/openapi.json").json()["paths"]["/v1/generate"]["post"]["requestBody"]
    prop = body["content"]["application/json"]["schema"]["properties"]["num_beams"]
    assert prop["minimum"] == 1 and prop["maximum"] == 8 and prop["default"] == 1 and prop["type"] == "integer"
    r = client.post("/v1/generate", json={"image": _b64(gen["images"][0]), "prompt": "caption:", "num_beams": 2.0,
                                          "max_new_tokens": 2})
    assert r.status_code == 200, r.text  # 2.0 is the integer 2, as JSON Schema reads it


# --- --cluster ray -------------------------------------------------------------------------------------------
def test_replica_core_generates_what_the_single_process_server_generates(gen, app):
    """One replica's core (what Ray runs, driven by hand here): /v1/generate through its unit, the same text."""
    from vlkit.serve.app import ServeConfig
    from vlkit.serve.cluster import Directory, ReplicaCore

    _, client = app
    d = Directory.from_items([f"lo={gen['lo']}", f"bn={gen['bn']}"])
    core = ReplicaCore(ServeConfig(backbone=gen["spec"], max_wait_ms=1, drain_timeout=10), gen["spec"], tag="r0")
    held: dict = {}

    async def get(unit):
        if unit.id not in held:
            held[unit.id] = await asyncio.get_running_loop().run_in_executor(None, core.load, unit)
        return held[unit.id]

    try:
        for adapter, beams in (("lo", 1), ("bn", 3), (None, 2)):
            body = {"image": _b64(gen["images"][1]), "prompt": PROMPTS[1], "max_new_tokens": STEPS, "num_beams": beams}
            if adapter:
                body["adapter"] = adapter
            unit = d.unit_for(adapter)
            reply = asyncio.run(core.reply("generate", body, None, (lambda u=unit: get(u)) if unit else None))
            assert reply["result"] == client.post("/v1/generate", json=body).json(), reply
        bad = asyncio.run(core.reply("generate", {"image": "x", "prompt": "caption:", "num_beams": 9}, None))
        assert bad["status"] == 422 and "num_beams" in bad["error"]
    finally:
        core.close(10)


@pytest.mark.slow
def test_ray_serve_answers_generate_as_the_single_process_server(gen, app):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    httpx = pytest.importorskip("httpx")
    from vlkit.serve.app import ServeConfig
    from vlkit.serve.ray_app import REPLICA_HEADER, deploy, start_local_ray

    _, client = app
    start_local_ray(num_cpus=2, log_to_driver=False)
    dep = None
    try:
        dep = deploy(ServeConfig(backbone=gen["spec"], adapters=[f"lo={gen['lo']}", f"bn={gen['bn']}"], cluster="ray",
                                 replicas=1, cpus_per_replica=0.5, max_wait_ms=5, port=0))
        c = httpx.Client(base_url=dep.url, timeout=120)
        for adapter, beams in (("lo", 1), ("bn", 1), (None, 3), ("lo", 2)):
            body = {"adapter": adapter, "image": _b64(gen["images"][2]), "prompt": PROMPTS[0],
                    "max_new_tokens": STEPS, "num_beams": beams}
            r = c.post("/v1/generate", json=body)
            assert r.status_code == 200 and REPLICA_HEADER in r.headers, r.text
            assert r.json() == client.post("/v1/generate", json=body).json()
        bad = (({"adapter": "nope", "prompt": "caption:"}, 404), ({"prompt": "caption:", "num_beams": 0}, 422))
        for body, status in bad:
            r = c.post("/v1/generate", json={"image": _b64(gen["images"][0]), **body})
            assert r.status_code == status and list(r.json()) == ["error"], r.text
        assert c.post("/v1/embed", json={"text": "a"}).status_code == 400  # a generative backbone generates only
    finally:
        if dep is not None:
            dep.shutdown()
        ray.shutdown()


# --- --engine onnx -------------------------------------------------------------------------------------------
PROBE = """
import json, sys
from fastapi.testclient import TestClient
from vlkit.serve.app import ServeConfig, create_app
with TestClient(create_app(ServeConfig(engine="onnx", adapters=[sys.argv[1]]))) as c:
    texts = [c.post("/v1/generate", json=json.loads(b)).json()["text"] for b in sys.argv[2:]]
print(json.dumps({"texts": texts, "heavy": sorted(m for m in ("transformers", "ray") if m in sys.modules)}))
"""


@pytest.mark.slow
def test_onnx_engine_generates_the_torch_servers_text(gen, app, capsys):
    pytest.importorskip("onnxruntime")
    _, client = app
    out = gen["root"] / "onnx-lo"
    code, _, err = cli(["export", "--adapter", str(gen["lo"]), "--backbone", gen["spec"], "-o", str(out)], capsys)
    assert code == 0, err
    from fastapi.testclient import TestClient

    from vlkit.serve import ServeConfig, create_app

    with TestClient(create_app(ServeConfig(engine="onnx", adapters=[f"lo={out}"], max_batch=16, max_wait_ms=300))) as c:
        assert c.get("/v1/adapters").json()["adapters"][0]["generative"] is True
        bodies = [{"adapter": "lo", "image": _b64(img), "prompt": p, "max_new_tokens": STEPS, "num_beams": k}
                  for k in (1, 3) for img in gen["images"][:2] for p in PROMPTS]
        t0 = time.perf_counter()
        got = [c.post("/v1/generate", json=b) for b in bodies]
        assert all(r.status_code == 200 for r in got), [r.text for r in got]
        want = [client.post("/v1/generate", json=b).json() for b in bodies]
        assert [r.json() for r in got] == want, time.perf_counter() - t0
        assert len({w["text"] for w in want}) > 2
        r = c.post("/v1/classify", json={"adapter": "lo", "image": _b64(gen["images"][0]), "labels": ["a", "b"]})
        assert r.status_code == 400 and "answers /v1/generate only" in r.json()["error"]
        r = c.post("/v1/generate", json={"image": _b64(gen["images"][0]), "prompt": "caption:"})
        assert r.status_code == 400 and "by name" in r.json()["error"]
    # a fresh process serves the export without importing transformers
    probe = subprocess.run([sys.executable, "-c", PROBE, f"lo={out}", json.dumps(bodies[0]), json.dumps(bodies[-1])],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == {"texts": [want[0]["text"], want[-1]["text"]],
                                                                  "heavy": []}


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_in_generate(gen):
    """/v1/generate of a generative server, positive and negative data from /openapi.json: never a 5xx, responses
    as the schema says; schema-valid requests are refused only for what no schema says (image bytes, an unknown
    adapter name)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from schemathesis.core.failures import FailureGroup
    from test_serve import InProcess
    from test_serve_hardening import _semantic

    s = InProcess(backbone=gen["spec"], adapters=[f"lo={gen['lo']}"], max_wait_ms=1)
    try:
        schema = schemathesis.openapi.from_url(s.url + "/openapi.json")
        schema.config.checks.update(included_check_names=["all"])
        op = schema["/v1/generate"]["POST"]
        problems: list = []
        calls = 0
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @seed(24)
            @settings(max_examples=25, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(op.as_strategy(generation_mode=mode))
            def run(case):
                nonlocal calls
                response = case.call(base_url=s.url, timeout=120)
                calls += 1
                if response.status_code >= 500:
                    problems.append((response.status_code, response.text[:200]))
                try:
                    case.validate_response(response)
                except FailureGroup as group:
                    for f in group.exceptions:
                        unknown = response.status_code == 404 and "unknown adapter" in response.text
                        if not (_semantic("/v1/generate", f, response) or unknown):
                            problems.append((type(f).__name__, response.status_code, response.text[:160]))

            run()
        assert calls >= 40 and problems == [], problems
        ok = s.client.post("/v1/generate", json={"adapter": "lo", "image": _b64(gen["images"][0]), "prompt": "caption:",
                                                 "max_new_tokens": 3, "num_beams": 8})
        assert ok.status_code == 200 and isinstance(ok.json()["text"], str)
    finally:
        s.close()
