"""`POST /v1/generate` of `vlkit serve` on a generative backbone: an image and a prompt in, text out.

    POST /v1/generate   {"adapter", "image", "prompt", "max_new_tokens"?, "num_beams"?}   -> {"text", "adapter"}

`adapter` names what `/v1/embed`'s names (an adapter, a composition, or none/null for the frozen backbone; `auto`
needs a router, which reads dual-encoder embeddings, so a generative server has none). `num_beams` 1 is greedy
decoding, 2..8 beam search, both with the key-value cache, as `vlkit compose run --num-beams N` and the backbone's
own `generate` decode. Each request is one item of the batching engine: a batch, whatever its adapters, is
generated once per group of requests that share their decoding settings (`max_new_tokens`, `num_beams`). In a
greedy group, single adapters and the frozen backbone go together, each sample through its own adapter
(`AdaptedModel.route`, which holds through generation: the encoder, and the decoder at every step, see the same
batch rows); a composition, or an adapter that changes the sequence length (prompt tuning), in its own group.
Beam search multiplies the decoder's rows by the beam width, so a beam group holds the requests of one adapter.
The answer is what `vlkit compose run` prints for the same image, prompt and settings.

The same request reaches a `--cluster ray` replica (`vlkit.serve.ray_app`, through the service's `run`) and the
onnxruntime engine over a generative `vlkit export` (`vlkit.serve.onnx_generative`). A contrastive server answers
`/v1/generate` with a 400, and a generative one the other `/v1/...` operations (`TorchBackend.check_adapter`);
errors are `{"error": "one line"}` as on every vlkit endpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ..errors import RequestError, VlkitError
from .engine import Item
from .inputs import ADAPTER_FIELD, ADAPTER_PATTERN, AUTO, WholeInt, _Strict, adapter_of, decode_base64, open_image
from .inputs import parse_json as parse_body

OP = "generate"
PATH = "/v1/generate"
MAX_NEW_TOKENS = 256
MAX_BEAMS = 8
MAX_PROMPT_CHARS = 4096
ROUTED = "__routed__"


class GenerateBody(_Strict):
    adapter: str | None = Field(None, min_length=1, max_length=256, pattern=ADAPTER_PATTERN, description=ADAPTER_FIELD)
    image: str = Field(..., min_length=1, description="base64 PNG/JPEG image (a data:image/...;base64, URI too)")
    prompt: str = Field(
        ...,
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="the text the model continues, e.g. 'caption:' or 'vqa: what color is it?'",
    )
    max_new_tokens: WholeInt = Field(20, ge=1, le=MAX_NEW_TOKENS, description="most tokens generated")
    num_beams: WholeInt = Field(
        1,
        ge=1,
        le=MAX_BEAMS,
        description="1: greedy decoding; 2..8: beam search of that width (both with the key-value cache)",
    )


class GenerateAnswer(BaseModel):
    text: str = Field(..., description="the generated text")
    adapter: str = Field(..., description="the adapter that answered ('none': the frozen backbone)")


@dataclass
class GenerateItem(Item):
    """A generation request inside the engine: its prompt and decoding settings beside the image."""

    prompt: str = ""
    max_new_tokens: int = 20
    num_beams: int = 1


def is_generative(backbone) -> bool:
    return getattr(backbone, "kind", None) == "generative"


def build_generate_item(backend, config, body: GenerateBody) -> GenerateItem:
    """Decode and check one request (run in a worker thread)."""
    if backend is None or not getattr(backend, "generative", False):
        what = getattr(backend, "spec", None) or "this server's backbone"
        raise RequestError(
            f"{PATH} needs a generative backbone (vl:..., tiny-vl; or --engine onnx over its vlkit export); "
            f"{what} is not one"
        )
    adapter = adapter_of(body.adapter)
    backend.check_adapter(adapter, OP)
    pixels = backend.preprocess(open_image(decode_base64(body.image), int(config.max_pixels)))
    return GenerateItem(
        OP,
        adapter,
        pixels=pixels,
        prompt=body.prompt,
        max_new_tokens=int(body.max_new_tokens),
        num_beams=int(body.num_beams),
    )


class GenerativeRunner:
    """The runner of a generative torch server: batches of `GenerateItem`s (see the module docstring)."""

    def __init__(self, catalog):
        self.catalog = catalog
        self.backbone = catalog.backbone
        self.device = catalog.device or torch.device("cpu")

    def _routable(self, name: str) -> bool:
        entry = self.catalog.entries[name]
        rec = self.catalog.model.records.get(name)
        return (
            entry.kind == "adapter"
            and entry.routable
            and rec is not None
            and all(s.kind not in ("prefix", "sequence") for s in rec.sites)
        )

    def _key(self, it: GenerateItem) -> Any:
        if it.num_beams == 1 and (it.resolved is None or self._routable(it.resolved)):
            return ROUTED
        return it.resolved  # beams: one adapter (or the frozen backbone, None) per group

    def _generate(self, key: Any, group: list[GenerateItem]) -> list[str]:
        cat = self.catalog
        names = list(dict.fromkeys(it.resolved for it in group if it.resolved is not None))
        if key is not ROUTED:
            cat.activate(key)
        elif not names or (len(names) == 1 and all(it.resolved is not None for it in group)):
            cat.activate(names[0] if names else None)
        else:  # each sample through its own adapter (-1: the frozen backbone), in one generation
            cat.activate(None)
            cat.model.route(names, [names.index(it.resolved) if it.resolved is not None else -1 for it in group])
        try:
            px = torch.stack([it.pixels for it in group]).to(self.device)
            with torch.no_grad():
                return self.backbone.generate(
                    px,
                    [it.prompt for it in group],
                    max_new_tokens=group[0].max_new_tokens,
                    num_beams=group[0].num_beams,
                )
        finally:
            cat.activate(None)

    def run(self, items: list[Any]) -> list[Any]:
        out: dict[int, Any] = {}
        groups: dict[tuple, list[tuple[int, GenerateItem]]] = {}
        for i, it in enumerate(items):
            if not isinstance(it, GenerateItem):
                out[i] = RequestError(f"{self.backbone.spec} is a generative backbone: it answers {PATH} only")
                continue
            if it.adapter == AUTO:
                out[i] = RequestError(
                    "adapter 'auto' needs a router, which reads dual-encoder embeddings; a generative backbone has none"
                )
                continue
            if it.adapter is not None and it.adapter not in self.catalog.entries:
                out[i] = RequestError(f"adapter {it.adapter!r} is not loaded", status=404)
                continue
            it.resolved = it.adapter
            groups.setdefault((it.max_new_tokens, it.num_beams, self._key(it)), []).append((i, it))
        for (_, _, key), members in groups.items():
            group = [it for _, it in members]
            try:
                texts: list[Any] = self._generate(key, group)
            except VlkitError as exc:
                texts = [exc if isinstance(exc, RequestError) else RequestError(str(exc))] * len(group)
            for (i, it), text in zip(members, texts):
                out[i] = (
                    text
                    if isinstance(text, BaseException)
                    else {"text": text, "adapter": it.resolved if it.resolved is not None else "none"}
                )
        return [out[i] for i in range(len(items))]


def generate_router(state, *, error_response) -> APIRouter:
    """`POST /v1/generate` over the server's `AppState`: the body checked here, the request answered by the
    service's `run` (one process's engine, or a `--cluster ray` replica), errors through the app's
    `error_response(exc, endpoint, t0, request)`."""
    router = APIRouter()

    @router.post(
        PATH,
        summary="Text from an image and a prompt (generative backbones): a caption, an answer",
        response_model=GenerateAnswer,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": GenerateBody.model_json_schema()}},
            }
        },
    )
    async def generate(request: Request):
        t0 = time.perf_counter()
        try:
            if state.draining:
                raise RequestError("the server is draining (SIGTERM): send the request elsewhere", status=503)
            body = parse_body(await request.body(), GenerateBody)
            result, headers = await state.service.run(OP, body, None)
        except Exception as exc:  # noqa: BLE001 - mapped to the one error shape
            return error_response(exc, PATH, t0, request)
        state.metrics.observe(PATH, 200, time.perf_counter() - t0)
        return JSONResponse(result, headers=headers or None)

    return router
