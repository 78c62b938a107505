"""The HTTP app of `vlkit serve`: `create_app(config)` builds a FastAPI app, `run_server(config)` serves it.

`build_app(config, service)` holds the endpoints, limits, API key, error shape and metrics over a service: one
process's `LocalService` (a backend and its batching engine), or the Ray Serve one of `--cluster ray`
(`vlkit.serve.ray_app.RayService`), so both servers answer the same requests the same way.

Endpoints (JSON bodies, or multipart/form-data with an `image` file part):

    POST   /v1/embed               {"adapter", "text" | "image"}            -> {"embedding": [...], "adapter"}
    POST   /v1/classify            {"adapter", "image", "labels"?}          -> {"scores": {label: p}, "top", ...}
    POST   /v1/score               {"adapter", "image", "texts": [...]}     -> {"scores": [...], "joint"}
    POST   /v1/answer              {"adapter", "image", "question"}         -> {"answer", "scores": {...}, "top"}
    POST   /v1/generate            {"adapter", "image", "prompt", ...}      -> {"text", "adapter"} (generative)
    GET    /v1/adapters                                                     -> {"backbone", "adapters", "router"}
    POST   /v1/adapters/{name}     {"path": DIR}  hot load                  -> the adapter's entry (201)
    DELETE /v1/adapters/{name}     unload                                   -> {"unloaded": name}
    GET    /health   GET /metrics (Prometheus text)   GET /docs (OpenAPI)

Every error is `{"error": "one line"}` with a 4xx status: 400 malformed JSON (also nested too deep, or a number
of too many digits), non-image bytes or a request the adapter cannot answer, 401 without the API key, 403 a hot
load outside `--adapter-root`, 404 unknown adapter, 409 a name conflict or a reserved name (`auto`, `none`), 413
over the body or pixel limit, 415 an unsupported content type, 422 a wrong field or type (a prompt without
exactly one `{}`, a `top` outside 1..1000) or an adapter whose output is not finite, 429 a full queue (with
Retry-After), 503 while draining. The single mapping from error types to statuses, and the last line against a bug
(a 500 `{"error", "request_id"}`, logged once under logger `vlkit.serve` and counted in `/metrics` as
`vlkit_server_errors_total`), are `vlkit.serve.replies`. Every response carries an `X-Request-ID` header.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from vlkit import __version__

from ..adapters.files import read_adapter_config
from ..backbones.state import check_adapter_name
from ..compose.resolve import source_dirs
from ..errors import (
    ConfigError,
    RequestError,
)
from .backends import TorchBackend
from .engine import BatchingEngine, Item
from .generate_api import OP as GENERATE
from .generate_api import build_generate_item, generate_router
from .guards import check_served_name, client_path, prompt_problem
from .inputs import BODIES, LoadBody, adapter_of, decode_base64, form_fields, one_line, open_image, parse_json
from .lists import run_body
from .metrics import Metrics
from .onnx_engine import OnnxBackend
from .openai_api import openai_router
from .replies import (
    ERROR_RESPONSES,
    _Guard,
    error_reply,
    error_text,
    finite_response,
    http_status,
    install_error_handlers,
)
from .schema import install_openapi

MAX_TEXTS = 256
MAX_TEXT_CHARS = 4096


@dataclass
class ServeConfig:
    """Everything `vlkit serve` takes (the CLI flags one to one)."""

    backbone: str | None = None
    adapters: list[str] | str = field(default_factory=list)
    engine: str = "torch"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    queue_size: int = 256
    max_body_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    api_key: str | None = None
    device: str | None = None
    drain_timeout: float = 30.0
    providers: list[str] | None = None
    cluster: str = "none"  # none | ray (Ray Serve, vlkit.serve.ray_app)
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_adapters_per_replica: int = 4
    ray_address: str | None = None  # None: start a local Ray instance on 127.0.0.1
    threads: int | None = None  # intra-op threads of torch / onnxruntime (None: the library's default)
    adapter_root: str | None = None  # hot loads (POST /v1/adapters/NAME) only from inside this directory
    max_inputs: int = 256  # items of one list request (inputs of embed/classify/score, input of /v1/embeddings)
    max_texts: int = MAX_TEXTS  # texts of one input (score texts, classify labels)
    allow_url_images: bool = False  # /v1/embeddings: http(s) image URLs (public addresses only)
    url_timeout: float = 10.0  # seconds to fetch one image URL

    def check(self) -> None:
        if self.engine not in ("torch", "onnx"):
            raise ConfigError(f"--engine must be torch or onnx, got {self.engine!r}")
        for k in ("max_batch", "queue_size", "max_body_bytes", "max_pixels", "max_inputs", "max_texts"):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"--{k.replace('_', '-')} must be at least 1, got {getattr(self, k)}")
        if not float(self.url_timeout) > 0:
            raise ConfigError(f"--url-timeout must be above 0, got {self.url_timeout}")
        if self.threads is not None and int(self.threads) < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if float(self.max_wait_ms) < 0:
            raise ConfigError(f"--max-wait-ms must be at least 0, got {self.max_wait_ms}")
        if not (0 <= int(self.port) < 65536):
            raise ConfigError(f"--port must be 0..65535, got {self.port}")
        if self.engine == "torch" and not self.backbone and not self.adapters:
            raise ConfigError("give --backbone (and --adapters)")
        if self.adapter_root is not None and not os.path.isdir(self.adapter_root):
            raise ConfigError(f"--adapter-root {self.adapter_root} is not a directory")
        if self.cluster not in ("none", "ray"):
            raise ConfigError(f"--cluster must be none or ray, got {self.cluster!r}")
        if self.cluster == "ray":
            if self.engine != "torch":
                raise ConfigError(
                    "--cluster ray serves the torch engine (replicas share one backbone and load "
                    "adapters on demand); serve onnx exports with one `vlkit serve --engine onnx` per "
                    "machine"
                )
            if int(self.replicas) < 1 or int(self.max_adapters_per_replica) < 1:
                raise ConfigError("--replicas and --max-adapters-per-replica must be at least 1")
            if float(self.gpus_per_replica) < 0 or float(self.cpus_per_replica) < 0:
                raise ConfigError("--gpus-per-replica and --cpus-per-replica must be at least 0")


def backbone_spec(config: ServeConfig) -> str:
    """The backbone a torch server loads: --backbone, else the one the first adapter was made for."""
    if config.backbone:
        return config.backbone

    return read_adapter_config(source_dirs(config.adapters)[0][1]).get("backbone") or "tiny"


def make_backend(config: ServeConfig):
    if config.engine == "onnx":
        return OnnxBackend(config.adapters, providers=config.providers, threads=config.threads)

    if config.threads:
        import torch

        torch.set_num_threads(int(config.threads))

    return TorchBackend(backbone_spec(config), config.adapters, device=config.device)


class AppState:
    def __init__(self, config: ServeConfig, service):

        self.config = config
        self.service = service
        self.backend = getattr(service, "backend", None)
        self.engine = getattr(service, "engine", None)
        self.metrics = Metrics()
        self.api_key = config.api_key or os.environ.get("VLKIT_API_KEY") or None
        self.draining = False


async def read_body(request: Request, op: str):
    """The request's body as the `op` model, and the raw bytes of a multipart `image` file part (or None)."""
    model = BODIES[op]
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form()
        except Exception as exc:  # noqa: BLE001 - a malformed form is the client's
            raise RequestError(f"malformed form body: {one_line(exc)[:200]}") from None
        body, upload = form_fields(form, model)
        if op == "embed" and getattr(body, "text", None) is not None:
            raise RequestError("a form uploads an image: send `text` as JSON", status=422)
        raw = await upload.read() if upload is not None else None
        return body, raw
    if ctype not in ("", "application/json") and not ctype.endswith("+json"):
        raise RequestError(
            f"unsupported content type {ctype!r}: send application/json or multipart/form-data", status=415
        )
    return parse_json(await request.body(), model), None


def build_item(backend, config: ServeConfig, op: str, body, raw: bytes | None):
    """One request as an engine `Item`: decode, check limits and tensorise (run in a worker thread)."""
    if op == GENERATE:
        return build_generate_item(backend, config, body)
    adapter = adapter_of(body.adapter)
    backend.check_adapter(adapter, op)
    image_field = getattr(body, "image", None)
    pixels = None
    if raw is not None or image_field:
        data = raw if raw is not None else decode_base64(str(image_field))
        pixels = backend.preprocess(open_image(data, config.max_pixels))
    texts, labels = None, None
    if op == "embed":
        if (pixels is None) == (body.text is None):
            raise RequestError("embed takes exactly one of `text` and `image`", status=422)
        texts = [body.text] if body.text is not None else None
    elif op == "score":
        if not body.texts:
            raise RequestError("field 'texts': give at least one text", status=422)
        texts = list(body.texts)
    elif op == "answer":
        texts = [body.question]
    elif op == "classify" and body.labels is not None:
        if not body.labels or len(set(body.labels)) != len(body.labels):
            raise RequestError("field 'labels': give distinct labels", status=422)
        prompt = body.prompt or backend.prompt_for(adapter)
        why = prompt_problem(prompt)
        if why is not None:
            raise RequestError(f"field 'prompt': {why}", status=422)
        labels = list(body.labels)
        texts = [prompt.format(x) for x in labels]
    if texts is not None:
        if len(texts) > int(config.max_texts):
            raise RequestError(
                f"{len(texts)} texts in one input; the limit is {config.max_texts} (--max-texts)", status=413
            )
        if any(len(t) > MAX_TEXT_CHARS for t in texts):
            raise RequestError(f"a text is over {MAX_TEXT_CHARS} characters", status=413)
    if op in ("classify", "score", "answer") and pixels is None:
        raise RequestError("field 'image': required", status=422)
    top = int(getattr(body, "top", 3))
    if not 1 <= top <= 1000:
        raise RequestError("field 'top': must be 1..1000", status=422)
    return Item(op, adapter, pixels=pixels, tokens=backend.tokenize(texts) if texts else None, labels=labels, top=top)


class LocalService:
    """What the endpoints call in one process: one backend (torch or onnx) behind one batching engine.
    (`vlkit.serve.ray_app.RayService` answers the same calls from Ray Serve replicas.)"""

    def __init__(self, config: ServeConfig, backend):

        self.config = config
        self.backend = backend
        self.engine = BatchingEngine(
            backend.runner, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms, queue_size=config.queue_size
        )

    async def run(self, op: str, body, raw: bytes | None) -> tuple[dict, dict]:
        """(the answer, extra response headers) of one request."""
        from starlette.concurrency import run_in_threadpool

        item = await run_in_threadpool(build_item, self.backend, self.config, op, body, raw)
        return await asyncio.wrap_future(self.engine.submit(item)), {}

    async def describe(self) -> dict[str, Any]:
        return self.backend.describe()

    async def load(self, name: str, path: str) -> dict[str, Any]:
        return await asyncio.wrap_future(self.engine.control(lambda: self.backend.load(name, path)))

    async def unload(self, name: str) -> None:
        await asyncio.wrap_future(self.engine.control(lambda: self.backend.unload(name)))

    def health(self) -> dict[str, Any]:
        b, e = self.backend, self.engine
        return {"engine": b.name, "backbone": b.spec, "adapters": b.count(), "queue": e.depth, "max_batch": e.max_batch}

    def metrics(self, metrics, draining: bool) -> str:
        return metrics.render(self.engine, self.backend.count(), draining)

    async def close(self, timeout: float) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close, timeout)


async def hot_load(state, name: str, request: Request) -> dict[str, Any]:
    """POST /v1/adapters/NAME: `name` no request means otherwise (reserved, the backbone's, served already) and
    the body's path as sent, inside --adapter-root (`vlkit.serve.guards`), loaded by the service."""
    if state.draining:
        raise RequestError("the server is draining (SIGTERM): send the request elsewhere", status=503)
    body = parse_json(await request.body(), LoadBody)
    listing = await state.service.describe()
    check_served_name(
        check_adapter_name(name), listing.get("backbone"), {str(a.get("name")) for a in listing.get("adapters") or []}
    )
    path = client_path(body.path, state.config.adapter_root)
    return await state.service.load(name, str(path))


def create_app(config: ServeConfig | None = None, *, backend=None, **overrides):
    """The FastAPI app for `config` (or keyword overrides); `backend` replaces the one `config` would build."""
    config = config or ServeConfig(**overrides)
    config.check()
    return build_app(config, LocalService(config, backend or make_backend(config)))


def build_app(config: ServeConfig, service):
    """The FastAPI app: every endpoint, the error shape, limits, API key and metrics, over `service`
    (`LocalService`, or the Ray Serve one of `--cluster ray`)."""
    from contextlib import asynccontextmanager

    state = AppState(config, service)

    @asynccontextmanager
    async def lifespan(app):
        yield
        state.draining = True
        await service.close(config.drain_timeout)

    app = FastAPI(
        title="vlkit serve",
        version=__version__,
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
        description="One frozen vision-language backbone serving many adapters; requests for different "
        'adapters are batched together. Errors are {"error": "one line"}.',
    )
    app.state.vlkit = state

    install_error_handlers(app)

    def error_response(exc: BaseException, endpoint: str, t0: float, request: Request | None = None) -> JSONResponse:
        return error_reply(state, exc, endpoint, t0, request)

    async def handle(request: Request, op: str):
        t0 = time.perf_counter()
        endpoint = f"/v1/{op}"
        body = None
        try:
            if state.draining:
                raise RequestError("the server is draining (SIGTERM): send the request elsewhere", status=503)
            body, raw = await read_body(request, op)
            result, headers = await run_body(service, config, op, body, raw)
            response = finite_response(result, headers, body)
        except Exception as exc:  # noqa: BLE001 - mapped to the one error shape
            return error_response(exc, endpoint, t0, request)
        state.metrics.observe(endpoint, 200, time.perf_counter() - t0)
        return response

    @app.post("/v1/embed", summary="Normalised embeddings of texts or images")
    async def embed(request: Request):
        return await handle(request, "embed")

    @app.post("/v1/classify", summary="Class scores from the adapter's task head, or for given labels")
    async def classify(request: Request):
        return await handle(request, "classify")

    @app.post("/v1/score", summary="Image-text scores (joint scoring for fusion adapters)")
    async def score(request: Request):
        return await handle(request, "score")

    @app.post("/v1/answer", summary="Answer a question about an image (VQA adapters)")
    async def answer(request: Request):
        return await handle(request, "answer")

    @app.get("/v1/adapters", summary="Served adapters, their tasks and the router")
    async def list_adapters():
        return await service.describe()

    @app.post("/v1/adapters/{name}", summary="Hot load an adapter directory under `name`", status_code=201)
    async def load_adapter(name: str, request: Request):
        t0 = time.perf_counter()
        try:
            entry = await hot_load(state, name, request)
        except Exception as exc:  # noqa: BLE001
            return error_response(exc, "/v1/adapters", t0, request)
        state.metrics.observe("/v1/adapters", 201, time.perf_counter() - t0)
        return JSONResponse(entry, status_code=201)

    @app.delete("/v1/adapters/{name}", summary="Unload an adapter")
    async def unload_adapter(name: str, request: Request):
        t0 = time.perf_counter()
        try:
            await service.unload(name)
        except Exception as exc:  # noqa: BLE001
            return error_response(exc, "/v1/adapters", t0, request)
        state.metrics.observe("/v1/adapters", 200, time.perf_counter() - t0)
        return {"unloaded": name}

    @app.get("/health", summary="Liveness and what is loaded")
    async def health():
        body = {"status": "draining" if state.draining else "ok", **service.health()}
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get("/metrics", summary="Prometheus metrics (text format)", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(
            service.metrics(state.metrics, state.draining), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    app.include_router(
        openai_router(state, http_status=http_status, error_text=error_text, finite_response=finite_response)
    )
    app.include_router(generate_router(state, error_response=error_response))
    install_openapi(app, api_key=bool(state.api_key))
    app.add_middleware(_Guard, state=state)
    return app


def run_server(config: ServeConfig, *, on_ready=None, log_level: str = "warning") -> None:
    """Serve `config` with uvicorn until SIGTERM/SIGINT; then stop accepting, answer what was admitted, exit."""
    import uvicorn

    config.check()
    sock = listen_socket(config.host, int(config.port))  # a port in use: one line, before the backbone loads
    try:
        asgi = create_app(config)
    except BaseException:
        sock.close()
        raise
    state = asgi.state.vlkit

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.draining = True
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if on_ready is not None and self.started:
                on_ready(self)

    ucfg = uvicorn.Config(
        asgi,
        host=config.host,
        port=int(config.port),
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=config.drain_timeout,  # type: ignore[arg-type]  # a float works
        lifespan="on",
    )
    try:
        Server(ucfg).run(sockets=[sock])
    finally:
        sock.close()


def listen_socket(host: str, port: int):
    """A socket bound to host:port for uvicorn; an address in use (or not this machine's) is a ConfigError,
    one line, before the server starts."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = (
            "the address is in use (give another --port, or --port 0 for a free one)"
            if exc.errno == errno.EADDRINUSE
            else exc.strerror or str(exc)
        )
        raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None
    return sock
