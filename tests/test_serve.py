"""`vlkit serve` through a real HTTP client (httpx) against running servers on 127.0.0.1: every endpoint, answers
equal to `vlkit compose run`, mixed-adapter batches, bad requests (server stays up), 429, limits, the API key, hot
load/unload (a corrupt adapter refused while the others serve), SIGTERM with requests in flight, the onnx engine."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import vlkit
from test_compose import make_adapter

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SPEC = "tiny@random"
CLASSES = ["circle", "square", "star", "cross"]
ANSWERS = ["red", "blue", "green", "yes", "no", "one", "two"]
ROOT = Path(__file__).resolve().parents[1]


def png(seed: int, size=(64, 64)) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def pil(raw: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(raw)).convert("RGB")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Adapters with tasks (classification head from prompts, VQA with a head file, one without a task) and a route
    composition over them with a router: what `vlkit compose run` and `vlkit serve` both take."""
    from safetensors.torch import save_file

    from vlkit.compose.composition import write_composition
    from vlkit.compose.predict import load_task
    from vlkit.compose.router import Router, save_router

    tmp = tmp_path_factory.mktemp("serve")
    cls = make_adapter(tmp, "cls", 1)
    (cls / "task.json").write_text(json.dumps({"name": "classification", "metric": "accuracy", "options": {
        "class_names": CLASSES, "prompt": "a photo of a {}", "head": "text"}}))
    vqa = make_adapter(tmp, "vqa", 2, "lora")
    meta = {"name": "vqa", "metric": "accuracy", "options": {"answers": ANSWERS, "hidden": 16}}
    bb = vlkit.load_backbone(SPEC)
    torch.manual_seed(0)
    save_file(load_task(bb, meta).head_state(), str(vqa / "head.safetensors"))
    (vqa / "task.json").write_text(json.dumps(meta))
    plain = make_adapter(tmp, "plain", 3)
    extra = make_adapter(tmp, "extra", 4)
    (extra / "task.json").write_text((cls / "task.json").read_text())
    corrupt = make_adapter(tmp, "corrupt", 5)
    w = corrupt / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])  # truncated weights
    comp = tmp / "router"
    torch.manual_seed(1)
    router = Router(bb.embed_dim, ["cls", "vqa", "plain", None])
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 2.0)
    comp.mkdir()
    entry = save_router(router, comp)
    write_composition(comp, "route", bb, [("cls", cls), ("vqa", vqa), ("plain", plain)], extra={"router": entry})
    images = [png(i, (64, 64) if i % 2 else (80, 50)) for i in range(8)]
    return {"cls": cls, "vqa": vqa, "plain": plain, "extra": extra, "corrupt": corrupt, "comp": comp,
            "images": images, "tmp": tmp}


class InProcess:
    """uvicorn on 127.0.0.1, a free port, in a thread of the test process."""

    def __init__(self, **config):
        import uvicorn

        from vlkit.serve import ServeConfig, create_app

        self.app = create_app(ServeConfig(**config))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert self.thread.is_alive() and time.time() - t0 < 60, "server did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def close(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(world):
    s = InProcess(backbone=SPEC, adapters=[str(world["comp"])], max_batch=16, max_wait_ms=30)
    yield s
    s.close()


def reference(world, raw, texts=None, **kw):
    from vlkit.compose.predict import run_composition

    bb = vlkit.load_backbone(SPEC).eval()
    return run_composition(bb, world["comp"], [pil(raw)], texts, **kw)["predictions"][0]


def test_endpoints_health_adapters_metrics_docs(server, world):
    c = server.client
    h = c.get("/health").json()
    assert h["status"] == "ok" and h["engine"] == "torch" and h["backbone"] == SPEC and h["adapters"] == 3
    listed = c.get("/v1/adapters").json()
    assert {a["name"] for a in listed["adapters"]} == {"cls", "vqa", "plain"}
    assert listed["router"]["routes_to"] == ["cls", "vqa", "plain", "none"]
    img = b64(world["images"][0])
    e = c.post("/v1/embed", json={"adapter": "cls", "text": "a red circle"}).json()["embedding"]
    assert len(e) == 128 and abs(sum(x * x for x in e) - 1) < 1e-4
    e2 = c.post("/v1/embed", json={"adapter": "cls", "image": f"data:image/png;base64,{img}"}).json()["embedding"]
    assert len(e2) == 128
    assert c.post("/v1/classify", json={"adapter": "cls", "image": img}).json()["task"] == "classification"
    assert len(c.post("/v1/score", json={"image": img, "texts": ["a", "b c"]}).json()["scores"]) == 2
    assert c.post("/v1/answer", json={"adapter": "vqa", "image": img, "question": "what colour"}).json()["answer"] in ANSWERS
    # multipart upload, same answer as base64 JSON
    mp = c.post("/v1/classify", files={"image": ("x.png", world["images"][0], "image/png")}, data={"adapter": "cls"})
    assert mp.status_code == 200 and mp.json() == c.post("/v1/classify", json={"adapter": "cls", "image": img}).json()
    m = c.get("/metrics")
    assert m.headers["content-type"].startswith("text/plain") and "vlkit_requests_total{" in m.text
    assert 'vlkit_request_seconds_bucket{endpoint="/v1/classify",le="+Inf"}' in m.text
    assert c.get("/docs").status_code == 200
    spec = c.get("/openapi.json").json()
    assert {"/v1/embed", "/v1/classify", "/v1/score", "/v1/answer", "/v1/adapters", "/v1/adapters/{name}", "/health",
            "/metrics"} <= set(spec["paths"])


def test_answers_equal_compose_run(server, world):
    c = server.client
    for raw in world["images"][:3]:
        img = b64(raw)
        r = c.post("/v1/classify", json={"adapter": "cls", "image": img}).json()
        ref = reference(world, raw, adapter="cls")
        assert r["top"] == ref["top"] and r["adapter"] == ref["adapter"] == "cls"
        assert set(r["scores"]) == set(CLASSES)
        r = c.post("/v1/answer", json={"adapter": "vqa", "image": img, "question": "what colour is the circle"}).json()
        ref = reference(world, raw, ["what colour is the circle"], adapter="vqa")
        assert r["answer"] == ref["answer"] and r["top"] == ref["top"]
        r = c.post("/v1/score", json={"adapter": "plain", "image": img, "texts": ["a red circle"]}).json()
        assert r["scores"] == [reference(world, raw, ["a red circle"], adapter="plain")["score"]]
        ref = reference(world, raw, route="auto")  # the router picks per input
        chosen = ref["adapter"].split(" ")[0]
        assert c.post("/v1/embed", json={"adapter": "auto", "image": img}).json()["adapter"] == chosen
        r = c.post("/v1/classify", json={"adapter": "auto", "image": img})
        if ref.get("top"):
            assert r.json()["top"] == ref["top"] and r.json()["adapter"] == chosen
        else:
            assert r.status_code == 400 and "error" in r.json()
    # embeddings: the adapter's own encoders
    bb = vlkit.load_backbone(SPEC).eval()
    vlkit.load_adapter(bb, world["cls"], name="cls")
    with torch.no_grad():
        want = bb.encode_text(bb.tokenize(["a red circle"]), normalize=True)[0]
    got = torch.tensor(c.post("/v1/embed", json={"adapter": "cls", "text": "a red circle"}).json()["embedding"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mixed_adapter_requests_batch_together_and_match(server, world):
    c = server.client
    before = c.get("/metrics").text
    jobs = []
    for i, raw in enumerate(world["images"]):
        adapter = ["cls", "vqa", "plain", None, "auto"][i % 5]
        if adapter == "vqa":
            jobs.append(("/v1/answer", {"adapter": "vqa", "image": b64(raw), "question": "is there a star"}, raw, adapter))
        elif adapter in ("plain", None):
            jobs.append(("/v1/score", {"adapter": adapter, "image": b64(raw), "texts": ["a star", "a cross"]}, raw,
                         adapter))
        else:
            jobs.append(("/v1/classify", {"adapter": adapter, "image": b64(raw), "labels": CLASSES}
                         if adapter == "auto" else {"adapter": adapter, "image": b64(raw)}, raw, adapter))
    with ThreadPoolExecutor(len(jobs)) as ex:
        res = list(ex.map(lambda j: httpx.post(server.url + j[0], json=j[1], timeout=60), jobs))
    assert all(r.status_code == 200 for r in res), [r.text for r in res]
    for (path, body, raw, adapter), r in zip(jobs, res):
        got = r.json()
        if path == "/v1/classify" and adapter == "cls":
            ref = reference(world, raw, adapter="cls")["top"]
            assert [t["class"] for t in got["top"]] == [t["class"] for t in ref]
            assert all(abs(a["p"] - b["p"]) <= 2e-4 for a, b in zip(got["top"], ref))
        if path == "/v1/answer":
            assert got["answer"] == reference(world, raw, ["is there a star"], adapter="vqa")["answer"]
        if path == "/v1/score" and adapter == "plain":
            want = [reference(world, raw, [t], adapter="plain")["score"] for t in body["texts"]]
            assert all(abs(a - b) <= 2e-4 for a, b in zip(got["scores"], want))
    sizes = {int(k.split('"')[1]) for k in c.get("/metrics").text.splitlines() if k.startswith("vlkit_batch_size{")}
    assert max(sizes) > 1, before  # several adapters in one batch


@pytest.mark.parametrize("kind", ["malformed", "not-object", "wrong-type", "unknown-field", "not-base64", "not-image",
                                  "unknown-adapter", "missing", "media-type", "no-task", "wrong-task"])
def test_bad_requests_are_4xx_json_and_the_server_stays_up(server, world, kind):
    c = server.client
    img = b64(world["images"][1])
    req = {
        "malformed": dict(content=b'{"adapter": "cls", "image": ', headers={"content-type": "application/json"}),
        "not-object": dict(json=[1, 2]),
        "wrong-type": dict(json={"adapter": "cls", "image": img, "labels": "circle"}),
        "unknown-field": dict(json={"adapter": "cls", "img": img}),
        "not-base64": dict(json={"adapter": "cls", "image": "%%% not base64 %%%"}),
        "not-image": dict(json={"adapter": "cls", "image": b64(b"GIF89a but not really an image at all")}),
        "unknown-adapter": dict(json={"adapter": "nope", "image": img}),
        "missing": dict(json={"adapter": "cls"}),
        "media-type": dict(content=b"x", headers={"content-type": "text/plain"}),
        "no-task": dict(json={"adapter": "plain", "image": img}),
        "wrong-task": dict(json={"adapter": "vqa", "image": img}),
    }[kind]
    r = c.post("/v1/classify", **req)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and body["error"]
    expected = {"malformed": 400, "not-object": 422, "wrong-type": 422, "unknown-field": 422, "not-base64": 400,
                "not-image": 400, "unknown-adapter": 404, "missing": 422, "media-type": 415}
    assert r.status_code == expected.get(kind, 400)
    assert c.get("/health").json()["status"] == "ok"
    assert c.post("/v1/classify", json={"adapter": "cls", "image": img}).status_code == 200


def test_hot_load_and_unload_corrupt_refused_while_others_serve(server, world):
    c = server.client
    img = b64(world["images"][2])
    with ThreadPoolExecutor(4) as ex:  # requests keep flowing during the loads
        background = [ex.submit(httpx.post, server.url + "/v1/classify", json={"adapter": "cls", "image": img},
                                timeout=60) for _ in range(6)]
        bad = c.post("/v1/adapters/broken", json={"path": str(world["corrupt"])})
        assert bad.status_code == 422 and "corrupt" in bad.json()["error"]
        missing = c.post("/v1/adapters/ghost", json={"path": str(world["tmp"] / "nothing")})
        assert missing.status_code == 422
        assert c.post("/v1/adapters/bad name", json={"path": str(world["extra"])}).status_code == 400
        ok = c.post("/v1/adapters/extra", json={"path": str(world["extra"])})
        assert ok.status_code == 201 and ok.json()["task"] == "classification", ok.text
        assert all(f.result().status_code == 200 for f in background)
    assert c.post("/v1/adapters/extra", json={"path": str(world["extra"])}).status_code == 409
    assert "extra" in {a["name"] for a in c.get("/v1/adapters").json()["adapters"]}
    r = c.post("/v1/classify", json={"adapter": "extra", "image": img}).json()
    bb = vlkit.load_backbone(SPEC).eval()
    from vlkit.compose.predict import run_composition
    from vlkit.compose.composition import write_composition

    solo = world["tmp"] / "solo"
    if not solo.exists():
        write_composition(solo, "route", bb, [("extra", world["extra"])])
    assert r["top"] == run_composition(bb, solo, [pil(world["images"][2])], adapter="extra")["predictions"][0]["top"]
    assert c.delete("/v1/adapters/extra").json() == {"unloaded": "extra"}
    assert c.post("/v1/classify", json={"adapter": "extra", "image": img}).status_code == 404
    assert c.delete("/v1/adapters/extra").status_code == 404
    assert c.delete("/v1/adapters/cls").status_code == 409  # a route of the router
    assert c.post("/v1/classify", json={"adapter": "cls", "image": img}).status_code == 200


def _spawn(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    env.setdefault("PYTHONPATH", str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "vlkit", "serve", "--port", "0", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    t0 = time.time()
    while time.time() - t0 < 120:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if "vlkit serve:" in line and "http://" in line:
            url = line.split(" on ")[1].split(" ")[0].rstrip(",")
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, url
    proc.kill()
    raise AssertionError("server did not start: " + "".join(lines))


def test_api_key_limits_overload_and_sigterm_drain(world):
    """One subprocess server: the key (from VLKIT_API_KEY), body and pixel limits, a bounded queue (429 with
    Retry-After), then SIGTERM while the admitted requests wait: each gets its answer, then the process exits."""
    proc, url = _spawn(["--backbone", SPEC, "--adapters", str(world["comp"]), "--queue-size", "3",
                        "--max-batch", "64", "--max-wait-ms", "2500", "--max-body-bytes", "60000",
                        "--max-pixels", "10000"], {"VLKIT_API_KEY": "s3cret"})
    try:
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(url + "/health").status_code == 200  # open
        r = httpx.get(url + "/v1/adapters")
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert httpx.get(url + "/v1/adapters", headers={"X-API-Key": "wrong"}).status_code == 401
        assert httpx.get(url + "/v1/adapters", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert httpx.get(url + "/metrics", headers=auth).status_code == 200
        big = httpx.post(url + "/v1/embed", headers=auth, json={"adapter": "cls", "text": "x" * 70000})
        assert big.status_code == 413 and "limit" in big.json()["error"]
        huge = httpx.post(url + "/v1/embed", headers=auth, json={"adapter": "cls", "image": b64(png(0, (120, 100)))})
        assert huge.status_code == 413 and "pixels" in huge.json()["error"]
        img = b64(world["images"][3])
        body = {"adapter": "cls", "image": img}
        with ThreadPoolExecutor(10) as ex:
            futs = [ex.submit(httpx.post, url + "/v1/classify", json=body, headers=auth, timeout=60) for _ in range(10)]
            time.sleep(1.0)  # the admitted ones now wait in the 2.5 s batching window
            proc.send_signal(signal.SIGTERM)
            res = [f.result() for f in futs]
        codes = sorted(r.status_code for r in res)
        assert codes.count(200) == 3 and codes.count(429) == 7, codes
        for r in res:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1 and "queue" in r.json()["error"]
            else:
                assert r.json()["adapter"] == "cls" and len(r.json()["top"]) == 3
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_binds_loopback_by_default_and_cli_errors(world, capsys):
    from cli_helpers import cli
    from vlkit.serve.app import ServeConfig

    assert ServeConfig().host == "127.0.0.1"
    code, _, err = cli(["serve", "--backbone", SPEC, "--adapters", str(world["corrupt"]), "--port", "0"], capsys)
    assert code == 2 and "corrupt" in err and err.count("\n") == 1
    code, _, err = cli(["serve", "--backbone", SPEC, "--engine", "tpu"], capsys)
    assert code == 2 and "--engine" in err


def test_onnx_engine_matches_torch(world, server):
    pytest.importorskip("onnxruntime")
    from vlkit.export.api import export_model
    from vlkit.export.base import ExportOptions

    out = world["tmp"] / "export-cls"
    export_model(out, adapters=[world["cls"]], eval_n=8, options=ExportOptions(seed=0))
    s = InProcess(engine="onnx", adapters=[f"cls={out}"], max_batch=8, max_wait_ms=10)
    try:
        c = s.client
        assert c.get("/health").json()["engine"] == "onnx"
        for raw in world["images"][:3]:
            img = b64(raw)
            a = torch.tensor(c.post("/v1/embed", json={"adapter": "cls", "image": img}).json()["embedding"])
            b = torch.tensor(server.client.post("/v1/embed", json={"adapter": "cls", "image": img}).json()["embedding"])
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            body = {"adapter": "cls", "image": img, "labels": CLASSES}
            x, y = c.post("/v1/classify", json=body).json(), server.client.post("/v1/classify", json=body).json()
            assert all(abs(x["scores"][k] - y["scores"][k]) <= 2e-4 for k in CLASSES)
            body = {"adapter": "cls", "image": img, "texts": ["a red circle", "two stars"]}
            x, y = c.post("/v1/score", json=body).json(), server.client.post("/v1/score", json=body).json()
            assert all(abs(p - q) <= 1e-3 for p, q in zip(x["scores"], y["scores"]))
        r = c.post("/v1/answer", json={"adapter": "cls", "image": img, "question": "what"})
        assert r.status_code == 400 and "VQA" in r.json()["error"]
        assert c.post("/v1/embed", json={"adapter": "auto", "text": "x"}).status_code == 400
    finally:
        s.close()


def test_threads_flag_sets_the_engine_threads_and_refuses_zero(capsys):
    import torch

    from cli_helpers import cli
    from vlkit.errors import ConfigError
    from vlkit.serve.app import ServeConfig, make_backend

    with pytest.raises(ConfigError, match="--threads"):
        ServeConfig(backbone="tiny", threads=0).check()
    code, _, err = cli(["serve", "--backbone", "tiny", "--threads", "0"], capsys)
    assert code == 2 and "--threads" in err
    before = torch.get_num_threads()
    try:
        make_backend(ServeConfig(backbone="tiny@random", threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
