"""The OpenAPI document of `vlkit serve` (`/openapi.json`, `/docs`), complete and honest (issue 25).

`install_openapi(app, api_key=...)` completes what FastAPI generates from the routes: every request body and
answer as a named component (`#/components/schemas/...`, the same pydantic models the server validates with), so
the rules the server checks are in the schema (exactly one of `text` / `image` / `inputs`, non-empty lists, name
patterns, bounded integers); the multipart form of embed and classify (an image file); the answer of every
endpoint; the API key as security schemes (`Authorization: Bearer` and `X-API-Key`), required by every operation
outside `/health` and the docs when the server has a key. Every error status is documented app-wide with its
`{"error"}` body (OpenAI's shape on `/v1/embeddings` and `/v1/models`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .inputs import BODIES, NAME_PATTERN
from .openai_api import EmbeddingsRequest, EmbeddingsResponse, ModelList, OpenAIError


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class EmbedAnswer(_Open):
    embedding: list[float] = Field(..., description="the normalised embedding")
    adapter: str = Field(..., description="the adapter that answered ('none': the frozen backbone)")


class Ranked(_Open):
    p: float


class ClassifyAnswer(_Open):
    scores: dict[str, float]
    top: list[Ranked]
    adapter: str
    task: str | None


class ScoreAnswer(_Open):
    scores: list[float]
    adapter: str
    joint: bool


class AnswerAnswer(_Open):
    answer: Any
    scores: dict[str, float]
    top: list[dict[str, Any]]
    adapter: str
    task: str | None


def _results(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {
        "anyOf": [
            ref,
            {
                "type": "object",
                "required": ["results"],
                "properties": {
                    "results": {
                        "type": "array",
                        "items": ref,
                        "description": "one answer per item of `inputs`, in order",
                    }
                },
            },
        ]
    }


class AdapterList(_Open):
    backbone: str
    adapters: list[dict[str, Any]]
    router: dict[str, Any] | None


class Unloaded(_Open):
    unloaded: str


class Health(_Open):
    status: str = Field(..., description="ok, or draining (503)")


ANSWERS: dict[tuple[str, str], tuple[int, Any]] = {
    ("/v1/embed", "post"): (200, _results(EmbedAnswer)),
    ("/v1/classify", "post"): (200, _results(ClassifyAnswer)),
    ("/v1/score", "post"): (200, _results(ScoreAnswer)),
    ("/v1/answer", "post"): (200, AnswerAnswer),
    ("/v1/adapters", "get"): (200, AdapterList),
    ("/v1/adapters/{name}", "post"): (201, {"type": "object", "description": "the adapter's entry"}),
    ("/v1/adapters/{name}", "delete"): (200, Unloaded),
    ("/health", "get"): (200, Health),
    ("/v1/embeddings", "post"): (200, EmbeddingsResponse),
    ("/v1/models", "get"): (200, ModelList),
}
OPEN = ("/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc")
MODELS: tuple[type[BaseModel], ...] = (
    *BODIES.values(),
    EmbeddingsRequest,
    EmbeddingsResponse,
    ModelList,
    OpenAIError,
    EmbedAnswer,
    ClassifyAnswer,
    ScoreAnswer,
    AnswerAnswer,
    AdapterList,
    Unloaded,
    Health,
)
BODY_PATHS = {"/v1/embed": "embed", "/v1/classify": "classify", "/v1/score": "score", "/v1/answer": "answer"}
FORM_PATHS = ("/v1/embed", "/v1/classify")


def _ref(model) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def components() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def form_schema(op: str) -> dict[str, Any]:
    """The multipart form documented for embed and classify: an image file part with `adapter` (and `top`). The
    server also reads the other fields from a form, but a form carries only strings, so the schema keeps to the
    fields whose form encoding is unambiguous; lists and texts are JSON."""
    props = {k: v for k, v in BODIES[op].model_json_schema().get("properties", {}).items() if k in ("adapter", "top")}
    props["image"] = {"type": "string", "format": "binary", "description": "the image file"}
    return {"type": "object", "properties": props, "required": ["image"], "additionalProperties": False}


def complete(doc: dict[str, Any], api_key: bool) -> dict[str, Any]:
    """`doc` (FastAPI's document) with the components, bodies, answers and security above."""
    comps = doc.setdefault("components", {})
    comps.setdefault("schemas", {}).update(components())
    comps["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "--api-key / VLKIT_API_KEY"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "--api-key / VLKIT_API_KEY"},
    }
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            if path in BODY_PATHS and method == "post":
                content = {"application/json": {"schema": _ref(BODIES[BODY_PATHS[path]])}}
                if path in FORM_PATHS:
                    content["multipart/form-data"] = {"schema": form_schema(BODY_PATHS[path])}
                op["requestBody"] = {"required": True, "content": content}
            elif (path, method) in (("/v1/adapters/{name}", "post"), ("/v1/embeddings", "post")):
                model = BODIES["load"] if path.startswith("/v1/adapters") else EmbeddingsRequest
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(model)}}}
            for param in op.get("parameters", []):
                if param.get("name") == "name" and param.get("in") == "path":
                    param["schema"] = {"type": "string", "pattern": NAME_PATTERN, "maxLength": 256, "title": "Name"}
            answer = ANSWERS.get((path, method))
            if answer is not None:
                status, model = answer
                schema = model if isinstance(model, dict) else _ref(model)
                responses = op.setdefault("responses", {})
                responses.pop("200" if status != 200 else "201", None)
                responses[str(status)] = {
                    "description": responses.get(str(status), {}).get("description", "OK"),
                    "content": {"application/json": {"schema": schema}},
                }
            if path == "/health":
                op["responses"]["503"] = {
                    "description": "Draining (SIGTERM)",
                    "content": {"application/json": {"schema": _ref(Health)}},
                }
            if api_key and path not in OPEN:
                op["security"] = [{"bearer": []}, {"apiKey": []}]
    return doc


def install_openapi(app, *, api_key: bool) -> None:
    """Make `app.openapi()` return the completed document (built once)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(generate(), api_key)
        return app.openapi_schema

    app.openapi = openapi
