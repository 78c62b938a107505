"""`vlkit serve` speaks OpenAI's embeddings protocol (issue 25): the official `openai` client gets text and image
embeddings for two adapters equal to `/v1/embed`'s; `/v1/models`; OpenAI's error shape; image URLs off by default
and, when on, never to loopback or private addresses (redirects included); lists in `/v1/embed`, `/v1/classify` and
`/v1/score` mixing adapters, answered as the single forms are, batched with each other; `Allow` headers."""
from __future__ import annotations

import base64
import http.server
import json
import struct
import threading

import pytest
from test_compose import make_adapter
from test_serve import SPEC, InProcess, b64, png

httpx = pytest.importorskip("httpx")
CLASSES = ["circle", "square", "star", "cross"]
TEXTS = ["a red circle", "two blue squares left of a small green star above the big cross", "a"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai")
    cls = make_adapter(tmp, "cls", 1, "lora")
    (cls / "task.json").write_text(json.dumps({"name": "classification", "metric": "accuracy", "options": {
        "class_names": CLASSES, "prompt": "a photo of a {}", "head": "text"}}))
    return {"cls": cls, "plain": make_adapter(tmp, "plain", 2)}


@pytest.fixture(scope="module")
def server(dirs):
    s = InProcess(backbone=SPEC, adapters=[str(dirs["cls"]), str(dirs["plain"])], max_wait_ms=20, max_inputs=8,
                  allow_url_images=True, url_timeout=3)
    yield s
    s.close()


def _embed(server, adapter, **field):
    r = server.client.post("/v1/embed", json={"adapter": adapter, **field})
    assert r.status_code == 200, r.text
    return r.json()["embedding"]


def _close(a, b, tol=1e-6):
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= tol


def _uri(seed: int) -> str:
    return "data:image/png;base64," + b64(png(seed))


def test_openai_client_text_and_image_embeddings_equal_embed(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    for model in ("cls", "plain"):
        got = client.embeddings.create(model=model, input=TEXTS)  # the client's default: base64 on the wire
        assert got.model == model and [d.index for d in got.data] == [0, 1, 2]
        assert got.usage.prompt_tokens == got.usage.total_tokens > len(TEXTS) * 2
        for d, text in zip(got.data, TEXTS):
            _close(d.embedding, _embed(server, model, text=text))
        floats = client.embeddings.create(model=model, input=TEXTS[0], encoding_format="float")
        _close(floats.data[0].embedding, _embed(server, model, text=TEXTS[0]))
        images = client.embeddings.create(model=model, input=[_uri(1), _uri(2)], extra_body={"modality": "image"},
                                          encoding_format="float")
        for d, seed in zip(images.data, (1, 2)):
            _close(d.embedding, _embed(server, model, image=b64(png(seed))))
    assert client.embeddings.create(model="cls", input="x").data[0].embedding != \
        client.embeddings.create(model="plain", input="x").data[0].embedding
    frozen = client.embeddings.create(model=SPEC, input=TEXTS[0], encoding_format="float").data[0].embedding
    _close(frozen, _embed(server, None, text=TEXTS[0]))
    ids = {m.id for m in client.models.list()}
    assert ids == {SPEC, "cls", "plain"}


def test_dimensions_base64_and_raw_shape(server):
    c = server.client
    full = _embed(server, "cls", text=TEXTS[1])
    r = c.post("/v1/embeddings", json={"model": "cls", "input": TEXTS[1], "dimensions": 16,
                                       "encoding_format": "base64"})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "list" and body["data"][0]["object"] == "embedding"
    vec = struct.unpack("<16f", base64.b64decode(body["data"][0]["embedding"]))
    norm = sum(x * x for x in full[:16]) ** 0.5
    _close(list(vec), [x / norm for x in full[:16]], 1e-5)
    assert abs(sum(x * x for x in vec) - 1) < 1e-4
    listed = c.get("/v1/models").json()
    assert listed["object"] == "list" and {m["object"] for m in listed["data"]} == {"model"}


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "input": "x"}, 404, None),
    ({"model": "cls", "input": [1, 2, 3]}, 422, "input"),
    ({"model": "cls", "input": []}, 422, "input"),
    ({"model": "cls", "input": "x", "dimensions": 100000}, 422, "dimensions"),
    ({"model": "cls", "input": "x", "dimensions": 129}, 422, "dimensions"),
    ({"model": "cls", "input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
    ({"model": "cls", "input": ["plain text"], "modality": "image"}, 422, "input"),
    ({"model": "cls", "input": ["data:image/png;base64,!!!"], "modality": "image"}, 400, "input"),
    ({"model": "cls", "input": ["x"] * 9}, 413, None),
    ({"input": "x"}, 422, "model"),
])
def test_errors_have_openai_shape(server, body, status, param):
    r = server.client.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_api_key_error_has_openai_shape(dirs):
    openai = pytest.importorskip("openai")
    s = InProcess(backbone=SPEC, api_key="k")
    try:
        r = s.client.post("/v1/embeddings", json={"model": SPEC, "input": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong").embeddings.create(model=SPEC, input="x")
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="k").embeddings.create(model="none", input="x")
        assert len(ok.data[0].embedding) == 128
    finally:
        s.close()


class _Local(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def local_http():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Local)
    port = srv.server_address[1]
    _Local.routes = {"/img.png": (200, {"Content-Type": "image/png"}, png(4)),
                     "/hop": (302, {"Location": f"http://127.0.0.2:{port}/img.png"}, b""),
                     "/big": (200, {}, b"x" * 5000)}
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}"
    srv.shutdown()


def test_image_urls_refuse_loopback_and_private_addresses(server, local_http):
    from vlkit.serve.fetch import public_address

    for url in (local_http + "/img.png", "http://localhost:9/x.png", "http://10.0.0.1/x.png", "http://[::1]/x",
                "http://169.254.169.254/latest", "http://[::ffff:127.0.0.1]/x"):
        r = server.client.post("/v1/embeddings", json={"model": "cls", "input": [url], "modality": "image"})
        assert r.status_code == 403 and "refused" in r.json()["error"]["message"], (url, r.text)
    r = server.client.post("/v1/embeddings", json={"model": "cls", "input": ["ftp://x/y"], "modality": "image"})
    assert r.status_code == 422
    assert public_address("8.8.8.8") and not any(public_address(a) for a in (
        "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.1.1", "100.64.0.1", "0.0.0.0", "::1",
        "fe80::1", "fc00::1", "::ffff:10.0.0.1", "224.0.0.1", "not an address"))


def test_image_url_fetch_through_the_test_hook(local_http):
    """Positive path, redirects and limits of the fetcher, with a hook that lets 127.0.0.1 (only) through."""
    from vlkit.errors import RequestError
    from vlkit.serve.fetch import fetch_image

    only_one = {"allow": lambda a: a == "127.0.0.1", "max_bytes": 100_000, "timeout": 3}
    assert fetch_image(local_http + "/img.png", **only_one) == png(4)
    with pytest.raises(RequestError) as e:  # a redirect to another loopback address is checked again
        fetch_image(local_http + "/hop", **only_one)
    assert e.value.status == 403 and "127.0.0.2" in str(e.value)
    with pytest.raises(RequestError) as e:
        fetch_image(local_http + "/big", **{**only_one, "max_bytes": 1000})
    assert e.value.status == 413
    with pytest.raises(RequestError):
        fetch_image(local_http + "/missing", **only_one)


def test_image_urls_off_by_default(dirs):
    s = InProcess(backbone=SPEC)
    try:
        r = s.client.post("/v1/embeddings", json={"model": SPEC, "input": ["https://example.com/x.png"],
                                                  "modality": "image"})
        assert r.status_code == 400 and "--allow-url-images" in r.json()["error"]["message"]
    finally:
        s.close()


def test_lists_mix_adapters_and_equal_single_requests(server):
    c = server.client
    items = [{"text": TEXTS[0]}, {"adapter": "plain", "text": TEXTS[1]}, {"image": b64(png(5))},
             {"adapter": "none", "image": b64(png(6))}]
    r = c.post("/v1/embed", json={"adapter": "cls", "inputs": items})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["adapter"] for x in results] == ["cls", "plain", "cls", "none"]
    for item, got in zip(items, results):
        single = {k: v for k, v in item.items() if k != "adapter"}
        _close(got["embedding"], _embed(server, item.get("adapter", "cls"), **single))
    img = b64(png(7))
    r = c.post("/v1/classify", json={"inputs": [{"adapter": "cls", "image": img}, {"adapter": "plain", "image": img}],
                                     "labels": CLASSES, "top": 2})
    assert r.status_code == 200, r.text
    for got, adapter in zip(r.json()["results"], ("cls", "plain")):
        one = c.post("/v1/classify", json={"adapter": adapter, "image": img, "labels": CLASSES, "top": 2}).json()
        assert got == one
    r = c.post("/v1/score", json={"adapter": "plain", "inputs": [{"image": img, "texts": TEXTS},
                                                                {"adapter": "cls", "image": img, "texts": ["x"]}]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0] == c.post("/v1/score", json={"adapter": "plain", "image": img,
                                                               "texts": TEXTS}).json()
    assert r.json()["results"][1]["adapter"] == "cls"


@pytest.mark.parametrize("path,body,status", [
    ("/v1/embed", {"inputs": []}, 422),
    ("/v1/embed", {"inputs": [{"text": "x"}] * 9}, 413),
    ("/v1/embed", {"text": "x", "inputs": [{"text": "x"}]}, 422),
    ("/v1/embed", {}, 422),
    ("/v1/embed", {"inputs": [{"text": "x", "image": "y"}]}, 422),
    ("/v1/embed", {"inputs": [{"adapter": "ghost", "text": "x"}, {"text": "y"}]}, 404),
    ("/v1/classify", {"inputs": [{"image": "x"}], "labels": []}, 422),
    ("/v1/classify", {"inputs": [{"image": "x"}], "labels": ["a", "a"]}, 422),
    ("/v1/score", {"image": "x", "texts": []}, 422),
    ("/v1/score", {"inputs": [{"image": "x", "texts": ["a"]}], "texts": ["b"]}, 422),
    ("/v1/embed", {"adapter": "bad name", "text": "x"}, 422),
])
def test_list_errors(server, path, body, status):
    r = server.client.post(path, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}


def test_lists_batch_together(server):
    from concurrent.futures import ThreadPoolExecutor

    c = server.client
    before = server.app.state.vlkit.engine.stats.batch_sizes.copy()
    bodies = [{"inputs": [{"adapter": a, "text": f"{t} {i}"} for a in ("cls", "plain") for t in TEXTS[:2]]}
              for i in range(3)]
    with ThreadPoolExecutor(3) as ex:
        assert all(r.status_code == 200 for r in ex.map(lambda b: httpx.post(server.url + "/v1/embed", json=b,
                                                                             timeout=60), bodies))
    sizes = server.app.state.vlkit.engine.stats.batch_sizes
    grown = {k: v - before.get(k, 0) for k, v in sizes.items() if v > before.get(k, 0)}
    assert max(grown) >= 4, grown  # items of one list (two adapters) in one forward
    assert c.get("/health").json()["status"] == "ok"


def test_allow_header_lists_every_method(server):
    c = server.client
    r = c.options("/v1/adapters/x")
    assert r.status_code == 204 and set(r.headers["allow"].split(", ")) == {"DELETE", "POST", "OPTIONS"}
    r = c.put("/v1/adapters/x", json={})
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"DELETE", "POST"}
    assert c.request("PATCH", "/v1/embeddings").headers["allow"] == "POST"


def test_openapi_document_is_complete(server):
    doc = server.client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert {"bearer", "apiKey"} == set(doc["components"]["securitySchemes"])
    assert [g["required"] for g in schemas["EmbedBody"]["oneOf"]] == [["text"], ["image"], ["inputs"]]
    assert schemas["EmbedBody"]["properties"]["inputs"]["minItems"] == 1
    assert schemas["ClassifyBody"]["properties"]["labels"]["uniqueItems"] is True
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            ok = [c for c in op["responses"] if c.startswith("2")]
            assert ok and all("content" in op["responses"][c] or path == "/metrics" for c in ok), (path, method)
            assert {"401", "404", "422", "429"} <= set(op["responses"]), (path, method)
            assert "security" not in op  # this server has no key
    name = doc["paths"]["/v1/adapters/{name}"]["delete"]["parameters"][0]["schema"]
    assert name["pattern"] == "^[A-Za-z0-9_-]+$"
    err = doc["paths"]["/v1/embeddings"]["post"]["responses"]["404"]["content"]["application/json"]["schema"]
    assert err["$ref"].endswith("/OpenAIError")
    keyed = InProcess(backbone=SPEC, api_key="k")
    try:
        doc = keyed.client.get("/openapi.json").json()
        secured = {(p, m) for p, ops in doc["paths"].items() for m, op in ops.items() if "security" in op}
        assert ("/v1/embeddings", "post") in secured and ("/health", "get") not in secured
    finally:
        keyed.close()


def test_a_lone_request_does_not_wait_for_company():
    """Requests one at a time run at once; requests that arrive together wait `max_wait_ms` for each other."""
    import time

    from vlkit.serve.engine import BatchingEngine, Item

    class Echo:
        def run(self, items):
            return [{"n": len(items)} for _ in items]

    engine = BatchingEngine(Echo(), max_batch=8, max_wait_ms=400)
    try:
        engine.submit(Item("embed", None)).result(5)  # no history yet: it waits
        t0 = time.perf_counter()
        for _ in range(3):
            assert engine.submit(Item("embed", None)).result(5) == {"n": 1}
        assert time.perf_counter() - t0 < 0.3  # three in a row, none waited 400 ms
        with engine.cond:  # three arrive together (the worker sees them at once)
            futures = [engine.submit(Item("embed", None)) for _ in range(3)]
        assert [f.result(5)["n"] for f in futures] == [3, 3, 3]
    finally:
        engine.close(5)


def test_list_and_url_flags_are_checked(capsys):
    from cli_helpers import cli

    for flag, value in (("--max-inputs", "0"), ("--max-texts", "0"), ("--url-timeout", "0")):
        code, _, err = cli(["serve", "--backbone", SPEC, flag, value, "--port", "0"], capsys)
        assert code == 2 and flag in err and err.count("\n") == 1, err
