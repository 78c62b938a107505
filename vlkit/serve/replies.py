"""The one reply shape of `vlkit serve`, and its last line against a bug.

- `http_status` / `error_text`: the single table from error types to HTTP statuses and one-line messages;
- `error_reply`: a 4xx `{"error"}` (counted in /metrics), or a bug's 500 `{"error", "request_id"}` (`server_error`:
  logged once with its traceback under logger `vlkit.serve`, counted in `vlkit_server_errors_total`);
- `_Guard`: the ASGI middleware in front of every route: request ids (`X-Request-ID`), the API key, the body size
  limit, the in-flight gauge, and any exception a route lets out answered as a 500 (never a dropped connection);
- `install_error_handlers`: Starlette's and FastAPI's own errors (404, 405, validation) in the same shape;
- `finite_response`: an answer holding NaN or infinity is a 422 naming the adapter, never invalid JSON.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.routing import Match

from ..errors import (
    AdapterFileError,
    IncompatibleAdapterError,
    OverloadedError,
    RequestError,
    UnknownNameError,
    VlkitError,
)
from .generate_api import PATH as GENERATE_PATH
from .inputs import one_line
from .openai_api import OPENAI_PATHS, error_body

OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc")

ENDPOINTS = (
    "/v1/embed",
    "/v1/classify",
    "/v1/score",
    "/v1/answer",
    "/v1/adapters",
    "/health",
    "/metrics",
    GENERATE_PATH,
    *OPENAI_PATHS,
    *OPEN_PATHS,
)

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

ERROR_STATUSES = {
    400: "Malformed request, or one the adapter cannot answer",
    401: "Missing or wrong API key",
    403: "A hot-load path outside --adapter-root",
    404: "Unknown adapter or path",
    405: "Method not allowed",
    409: "Name conflict or reserved name",
    413: "Over a size limit",
    415: "Unsupported content type",
    422: "Wrong field, type or value, or a non-finite output",
    429: "Queue full (Retry-After)",
    500: "A bug: logged with its request_id",
    503: "Draining (SIGTERM)",
}

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "request_id": {"type": "string"}},
}

log = logging.getLogger("vlkit.serve")


def http_status(exc: BaseException) -> int:
    """The one table from error types to HTTP statuses."""
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, OverloadedError):
        return 429
    if isinstance(exc, UnknownNameError):
        return 404
    if isinstance(exc, (AdapterFileError, IncompatibleAdapterError)):
        return 422
    if isinstance(exc, (VlkitError, FileNotFoundError)):
        return 400
    return 500


def error_text(exc: BaseException) -> str:
    if isinstance(exc, (VlkitError, FileNotFoundError)):
        return one_line(exc)
    return f"internal error: {type(exc).__name__}: {one_line(exc)[:300]}"


def endpoint_of(path: str) -> str:
    """The metrics label of a request path (a bounded set, whatever paths clients send)."""
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters"
    return path if path in ENDPOINTS else "other"


def server_error(state, exc: BaseException, endpoint: str, seconds: float, request_id: str | None) -> dict:
    """The body of a 500: logged once with its traceback and counted in /metrics."""
    log.error(
        "internal error (request %s, %s): %s: %s",
        request_id,
        endpoint,
        type(exc).__name__,
        one_line(exc)[:300],
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    state.metrics.observe(endpoint, 500, seconds, server_error=True)
    return {"error": error_text(exc), "request_id": request_id}


class _Guard:
    """Pure ASGI middleware: the request id, the API key, the body size limit (the body is read whole, bounded,
    before the app sees it), the in-flight gauge, and the last line against a bug: any exception the app lets
    out is a 500 JSON body with the request id, logged once and counted."""

    def __init__(self, app, state):
        self.app = app
        self.state = state

    async def _reply(self, send, status: int, message: str, headers=(), extra=None, path: str = ""):
        shaped = error_body(status, message) if path in OPENAI_PATHS else {"error": message}
        body = json.dumps({**shaped, **(extra or {})}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        started = False
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = headers.get("x-request-id", "")
        rid = rid if REQUEST_ID.match(rid) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self._serve(scope, receive, send_with_id, headers)
        except Exception as exc:  # noqa: BLE001 - the last line: a bug is a 500, never a dropped connection
            body = server_error(self.state, exc, endpoint_of(scope.get("path", "")), time.perf_counter() - t0, rid)
            if not started:
                await self._reply(send_with_id, 500, body["error"], extra={"request_id": rid})

    async def _serve(self, scope, receive, send, headers):
        st = self.state
        path = scope.get("path", "")
        if st.api_key and path not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), st.api_key.encode()):
                st.metrics.observe(endpoint_of(path), 401, 0.0)
                return await self._reply(
                    send,
                    401,
                    "missing or wrong API key (Authorization: Bearer KEY or X-API-Key: KEY)",
                    [(b"www-authenticate", b"Bearer")],
                    path=path,
                )
        limit = st.config.max_body_bytes
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            return await self._reply(send, 400, "bad Content-Length header", path=path)
        if declared > limit:
            return await self._reply(
                send,
                413,
                f"the body is {declared:,} bytes, over the limit of {limit:,} (--max-body-bytes)",
                [(b"connection", b"close")],
                path=path,
            )
        chunks, size = [], 0
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return await self._reply(
                        send,
                        413,
                        f"the body is over the limit of {limit:,} bytes (--max-body-bytes)",
                        [(b"connection", b"close")],
                        path=path,
                    )
                chunks.append(chunk)
                if not msg.get("more_body", False):
                    break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        with st.metrics.lock:
            st.metrics.inflight += 1
        try:
            await self.app(scope, replay, send)
        finally:
            with st.metrics.lock:
                st.metrics.inflight -= 1


def allowed_methods(app, path: str) -> list[str]:
    """The methods the app's routes take at `path` (HEAD with GET), sorted."""

    def full(route, method: str) -> bool:
        scope = {"type": "http", "path": path, "root_path": "", "method": method, "headers": []}
        try:
            return route.matches(scope)[0] == Match.FULL
        except Exception:  # noqa: BLE001 - a route that cannot say matches nothing
            return False

    return [m for m in ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT") if any(full(r, m) for r in app.routes)]


def finite_response(result: dict, headers: dict | None, body) -> JSONResponse:
    """The answer as JSON; a NaN or infinity in it (an adapter whose weights overflow) is a 422 naming the
    adapter, never an invalid JSON body or a crash."""
    try:
        return JSONResponse(result, headers=headers or None)
    except ValueError:
        name = result.get("adapter") if isinstance(result, dict) else None
        name = name or getattr(body, "adapter", None) or "none"
        who = "the frozen backbone" if name == "none" else f"adapter {name!r}"
        raise RequestError(
            f"{who} produced non-finite values (NaN or infinity) for this request; its weights are broken or overflow",
            status=422,
        ) from None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    for code, text in ERROR_STATUSES.items()
}


def error_reply(state, exc: BaseException, endpoint: str, t0: float, request: Request | None = None) -> JSONResponse:
    """The one error shape: a 4xx `{"error"}` (counted), or a bug's 500 with its request id (logged, counted)."""
    status = http_status(exc)
    headers = {"Retry-After": str(int(exc.retry_after))} if isinstance(exc, OverloadedError) else None
    if status >= 500 and not isinstance(exc, VlkitError):
        rid = getattr(request.state, "request_id", None) if request is not None else None
        return JSONResponse(server_error(state, exc, endpoint, time.perf_counter() - t0, rid), status_code=500)
    state.metrics.observe(endpoint, status, time.perf_counter() - t0)
    return JSONResponse({"error": error_text(exc)}, status_code=status, headers=headers)


def install_error_handlers(app) -> None:
    """Starlette's HTTP errors (404, 405 with every allowed method) and FastAPI's validation errors in the one
    error shape."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Allow: every method of every route of this path, not only the first route's
            allowed = allowed_methods(app, request.url.path)
            if request.method == "OPTIONS":
                return Response(status_code=204, headers={"Allow": ", ".join([*allowed, "OPTIONS"])})
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        return JSONResponse({"error": one_line(exc.detail)}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        err = (exc.errors() or [{}])[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        return JSONResponse({"error": one_line(f"field '{loc}': {err.get('msg', 'invalid')}")}, status_code=422)
