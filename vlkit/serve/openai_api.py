"""OpenAI-compatible embeddings: `POST /v1/embeddings` and `GET /v1/models` (the `openai` client, LangChain,
LlamaIndex, LiteLLM and vector databases speak it).

- `model` names what `/v1/embed`'s `adapter` names: an adapter, a composition, `auto` (the router), or the frozen
  backbone (its spec, as `/v1/models` lists it, or `none`);
- `input` is a string or a list of strings: texts, or with `"modality": "image"` (as Infinity takes them) images
  as `data:image/...;base64,` URIs, or http(s) URLs when the server runs with `--allow-url-images`
  (`vlkit.serve.fetch`: public addresses only, size and time limits, redirects checked);
- `encoding_format`: `float` (default) or `base64` (little-endian float32, as OpenAI sends it);
- `dimensions`: the first N components, normalised again.

Every input is one request to the batching engine, answered exactly as `/v1/embed` answers it, so inputs of
different models batch together. Errors here are OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import base64
import math
import re
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..backbones.base import true_length
from ..errors import RequestError
from .fetch import fetch_image
from .inputs import ADAPTER_PATTERN, AUTO, FROZEN, EmbedBody, WholeInt, parse_json, validate
from .lists import check_count, gather

OPENAI_PATHS = ("/v1/embeddings", "/v1/models")
CODES = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large", 429: "rate_limit_exceeded"}
TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str = Field(
        ...,
        min_length=1,
        max_length=1024,
        pattern=r"^\S+$",
        description="an adapter, a composition, 'auto' (the router) or the frozen backbone (its spec "
        "or 'none'): see GET /v1/models",
    )
    input: str | Annotated[list[str], Field(min_length=1)] = Field(
        ...,
        description="a text, or a list of texts; with modality 'image', images as data:image/...;base64, URIs "
        "(or http(s) URLs with --allow-url-images)",
    )
    modality: Literal["text", "image"] = Field("text", description="what `input` holds (Infinity's field)")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float lists, or base64 of little-endian float32"
    )
    dimensions: WholeInt = Field(
        None,
        ge=1,
        le=65536,  # type: ignore[assignment]
        description="keep the first N components and normalise again",
    )
    user: str = Field(None, max_length=256, description="ignored")  # type: ignore[assignment]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape for `status`."""
    kind = TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": CODES.get(status)}}


def embedding_out(vector: list[float], dimensions: int | None, encoding: str) -> list[float] | str:
    v = np.asarray(vector, dtype=np.float64)
    if dimensions is not None:
        if dimensions > len(v):
            raise RequestError(f"field 'dimensions': {dimensions} is more than the model's {len(v)}", status=422)
        v = v[:dimensions]
        norm = float(np.linalg.norm(v))
        v = v / norm if norm > 0 and math.isfinite(norm) else v
    if encoding == "base64":
        return base64.b64encode(v.astype("<f4").tobytes()).decode()
    return v.tolist()


def count_tokens(backend, texts: list[str]) -> int:
    """The tokens of `texts` up to and including end-of-text (what a forward at their true length runs)."""
    if backend is None or not texts:
        return sum(len(t.split()) + 2 for t in texts)
    import torch

    ids = torch.as_tensor(np.asarray(backend.tokenize(texts)))
    bb = getattr(backend, "backbone", None)
    pad = getattr(bb, "text_pad_id", None)
    pad = 0 if pad is None and bb is None else pad
    if pad is None:
        return int(ids.numel())
    eos = getattr(bb, "text_eos_id", None)
    return sum(true_length(ids[i : i + 1], pad, eos) for i in range(len(ids)))


def adapter_for(model: str, spec: str | None) -> str | None:
    """The `adapter` of `/v1/embed` that `model` names (None: the frozen backbone); 404 for what no adapter is."""
    if model == spec or model.lower() in FROZEN:
        return None
    if not re.match(ADAPTER_PATTERN, model):
        raise RequestError(f"unknown model {model[:200]!r}; GET /v1/models lists them", status=404)
    return AUTO if model.lower() == AUTO else model


def model_cards(listing: dict[str, Any]) -> list[dict[str, Any]]:
    """Everything `model` may name: the backbone, 'auto' when a router serves, every adapter and composition."""
    now = int(time.time())
    ids = [str(listing.get("backbone") or "none")]
    if listing.get("router"):
        ids.append(AUTO)
    ids += [str(a["name"]) for a in listing.get("adapters") or []]
    return [{"id": i, "object": "model", "created": now, "owned_by": "vlkit"} for i in dict.fromkeys(ids)]


def openai_router(state, *, http_status, error_text, finite_response) -> APIRouter:
    """The routes over the server's `AppState` (its service, config and metrics), with the app's mapping from
    errors to statuses (`http_status`, `error_text`) and its check of non-finite answers (`finite_response`)."""
    router = APIRouter(tags=["OpenAI-compatible"])
    config, service = state.config, state.service
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": OpenAIError, "description": text}
        for code, text in (
            (400, "Malformed request, or an image URL refused"),
            (401, "Missing or wrong API key"),
            (403, "An image URL at a non-public address"),
            (404, "Unknown model"),
            (408, "An image URL too slow"),
            (413, "Over a size limit"),
            (422, "A wrong field, type or value, or a non-finite output"),
            (429, "Queue full (Retry-After)"),
            (500, "A bug, logged"),
            (503, "Draining"),
        )
    }

    def failed(exc: BaseException, endpoint: str, t0: float) -> JSONResponse:
        status = http_status(exc)
        if status >= 500:
            raise exc  # the server's last line logs and counts it
        state.metrics.observe(endpoint, status, time.perf_counter() - t0)
        headers = {"Retry-After": str(int(exc.retry_after))} if hasattr(exc, "retry_after") else None
        message = error_text(exc)
        param = message.split("'")[1].split(".")[0] if message.startswith("field '") else None
        param = {"image": "input", "text": "input", "adapter": "model"}.get(param or "", param)
        return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)

    async def one(adapter: str | None, text: str | None, image: str | None) -> dict[str, Any]:
        raw = None
        if image is not None and not image.startswith("data:"):
            if not config.allow_url_images:
                raise RequestError(
                    "image URLs are off on this server (vlkit serve --allow-url-images); send "
                    "data:image/...;base64, URIs"
                )
            raw = await run_in_threadpool(
                fetch_image, image, max_bytes=int(config.max_body_bytes), timeout=float(config.url_timeout)
            )
            image = "(url)"  # the fetched bytes are `raw`
        fields = {"adapter": adapter, "text": text, "image": image}
        body = validate({k: v for k, v in fields.items() if v is not None}, EmbedBody)
        answer, _ = await service.run("embed", body, raw)
        return answer

    @router.post(
        "/v1/embeddings",
        summary="OpenAI-compatible embeddings of texts or images",
        response_model=EmbeddingsResponse,
        responses=errors,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": EmbeddingsRequest.model_json_schema()}},
            }
        },
    )
    async def embeddings(request: Request):
        t0 = time.perf_counter()
        try:
            if state.draining:
                raise RequestError("the server is draining (SIGTERM): send the request elsewhere", status=503)
            body = parse_json(await request.body(), EmbeddingsRequest)
            inputs = [body.input] if isinstance(body.input, str) else list(body.input)
            if not inputs:
                raise RequestError("field 'input': give at least one input", status=422)
            check_count(len(inputs), int(config.max_inputs))
            adapter = adapter_for(body.model, await spec_of(service))
            image = body.modality == "image"
            if image and any(not x.startswith(("data:image/", "http://", "https://")) for x in inputs):
                raise RequestError(
                    "field 'input': with modality 'image' give data:image/...;base64, URIs (or http(s) "
                    "URLs with --allow-url-images)",
                    status=422,
                )
            answers = await gather(one(adapter, None if image else x, x if image else None) for x in inputs)
            data = [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": embedding_out(a["embedding"], body.dimensions, body.encoding_format),
                }
                for i, a in enumerate(answers)
            ]
            tokens = 0 if image else count_tokens(state.backend, inputs)  # ~0.1 ms: no thread hop
            result = {
                "object": "list",
                "data": data,
                "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
            response = finite_response(result, None, None)
        except Exception as exc:  # noqa: BLE001 - OpenAI's error shape
            return failed(exc, "/v1/embeddings", t0)
        state.metrics.observe("/v1/embeddings", 200, time.perf_counter() - t0)
        return response

    @router.get(
        "/v1/models",
        summary="What `model` may name (OpenAI list shape)",
        response_model=ModelList,
        responses={k: v for k, v in errors.items() if k in (401, 500)},
    )
    async def models():
        t0 = time.perf_counter()
        try:
            listing = await service.describe()
        except Exception as exc:  # noqa: BLE001
            return failed(exc, "/v1/models", t0)
        state.metrics.observe("/v1/models", 200, time.perf_counter() - t0)
        return {"object": "list", "data": model_cards(listing)}

    return router


async def spec_of(service) -> str | None:
    backend = getattr(service, "backend", None)
    if backend is not None:
        return backend.spec
    return (await service.describe()).get("backbone")
