"""Lists in one request: `inputs` of `/v1/embed`, `/v1/classify` and `/v1/score` (and `input` of `/v1/embeddings`).

A list is split into one single-input request per item (the item's `adapter`, else the request's), each submitted to
the service at once, so the batching engine runs them with each other and with other clients' requests, whatever
their adapters. The answer is `{"results": [...]}` in order; an item that fails fails the request with its error
(the first one by position). `--max-inputs` bounds the items of one request (413 beyond).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import RequestError
from .inputs import BODIES, validate

SHARED = {"classify": ("labels", "prompt", "top"), "score": (), "embed": ()}


def split(op: str, body) -> list[Any]:
    """The single-input bodies of a list body: each item's fields, its adapter or the request's, and the
    request-wide options (labels, prompt, top)."""
    model = BODIES[op]
    shared = {k: getattr(body, k) for k in SHARED[op] if getattr(body, k, None) is not None}
    out = []
    for item in body.inputs:
        fields = {k: v for k, v in item.model_dump().items() if v is not None}
        fields.setdefault("adapter", body.adapter)
        if fields["adapter"] is None:
            del fields["adapter"]
        out.append(validate({**shared, **fields}, model))
    return out


async def gather(calls) -> list[Any]:
    """The results of `calls` (awaitables) in order; the first failure (by position) is raised."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def check_count(n: int, limit: int, what: str = "inputs") -> None:
    if n > limit:
        raise RequestError(f"{n} {what} in one request; the limit is {limit} (--max-inputs)", status=413)


async def run_body(service, config, op: str, body, raw: bytes | None) -> tuple[dict, dict]:
    """(the answer, extra headers) of one request body: the service's own for a single input, `{"results"}` in
    order for `inputs`."""
    inputs = getattr(body, "inputs", None)
    if inputs is None:
        return await service.run(op, body, raw)
    check_count(len(inputs), int(config.max_inputs))
    answers = await gather(service.run(op, single, None) for single in split(op, body))
    headers: dict = {}
    for _, h in answers:
        headers.update(h or {})
    return {"results": [a for a, _ in answers]}, headers
