"""Three ASGI layers around the app: the catch-all for errors, the API-key check for every /v1 path, and the
direct routes of the generation endpoints. (Between the first two, Starlette's CORSMiddleware, unless
allowed_origins is empty: it answers a browser's preflight, which carries no key, and adds the CORS headers; and
outside them all, with enable_request_id_headers, the layer that adds X-Request-Id to every answer, and with
root_path, the one that sets the scope's root path.)

All are plain ASGI (not Starlette's BaseHTTPMiddleware, which buffers streams). The key is checked before
routing, so an unknown /v1 path answers 401 to a client without the key, not 404. The catch-all answers an
exception no handler expected with OpenAI's error object and status 500, logs its traceback, and leaves the
keep-alive connection usable; a stream that already started ends with an error event and `[DONE]` instead.
`DirectRoutes` hands POST /v1/completions, /v1/chat/completions, /v1/responses and /invocations to their handlers
without FastAPI's router, dependency machinery and inner middleware: those handlers take the bare request and build
their own responses (streams too, which the router could not return), and a request's time to first token pays
every layer it passes (about 0.2 ms of the API process's ~1 ms).
"""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from miniserve.server.body_writer import writer_of
from miniserve.server.protocol import APIError

logger = logging.getLogger("miniserve.server")

Scope = dict[str, Any]


def _json_bytes(err: APIError) -> bytes:
    # ensure_ascii: whatever the message holds (a lone surrogate included), the bytes are valid JSON
    return json.dumps(err.body(), ensure_ascii=True).encode("ascii")


async def _send_json(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class RequireAPIKey:
    """With a key configured, every path under /v1 (and /invocations) needs `Authorization: Bearer <key>`
    (RFC 6750)."""

    def __init__(self, app: Any, api_keys: list[str]):
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]  # none: no key asked for

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if not self.api_keys or scope["type"] != "http" or not _keyed(route_path(scope)):
            return await self.app(scope, receive, send)
        if self._authorized(scope):
            return await self.app(scope, receive, send)
        err = APIError(
            "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'.",
            status=401,
            code="invalid_api_key",
        )
        await _send_json(send, 401, _json_bytes(err), [(b"www-authenticate", b"Bearer")])

    def _authorized(self, scope: Scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        # (every key compared, so that the time taken says nothing of which one came close)
        matches = [secrets.compare_digest(token, key) for key in self.api_keys]
        return scheme.lower() == b"bearer" and any(matches)


def _warn_if_unguarded(scope: Scope) -> None:
    """`uvicorn server:app` without `--http server:http` runs uvicorn's own protocol, which knows none of the
    connection settings (server/connection.py): say so if any was given (server.py records which)."""
    given = getattr(scope["app"].state, "connection_variables", None)
    if given and writer_of(scope) is None:  # (the protocol gives every request's scope a body writer)
        logger.warning(
            "%s set, but uvicorn runs without `--http server:http`: the connection settings are not in effect",
            ", ".join(given),
        )


def _keyed(path: str) -> bool:
    """Every /v1 path, and SageMaker's /invocations (it generates as /v1 does)."""
    return path in ("/v1", "/invocations") or path.startswith("/v1/")


def route_path(scope: Scope) -> str:
    """The path the app routes on. Under a root path (a proxy's prefix: root_path, or uvicorn's --root-path) the
    router takes "/api/v1/models" as "/v1/models" (Starlette strips the prefix, as here), so every layer that
    judges a path must judge this one: the key check on the raw path would let "/api/v1/..." through unkeyed."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :]
    return path


class CatchAll:
    """The outermost layer: no exception leaves the app as a bare 500 or a dropped connection. On the first
    request it also warns where connection settings were given to a uvicorn that does not run their protocol."""

    def __init__(self, app: Any):
        self.app = app
        self.first = True

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.first:
            self.first = False
            _warn_if_unguarded(scope)
        state = {"started": False, "ended": False, "stream": False}

        async def tracked_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                state["stream"] = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            err = APIError(f"internal server error ({type(exc).__name__}); the server log has the details", status=500)
            if not state["started"]:
                await _send_json(send, 500, _json_bytes(err))
            elif state["stream"] and not state["ended"]:
                event = b"data: " + _json_bytes(err) + b"\n\ndata: [DONE]\n\n"
                await send({"type": "http.response.body", "body": event})
            else:  # a plain response broke off midway: only closing the connection tells the client
                raise


class RequestIdHeader:
    """vLLM's --enable-request-id-headers: every answer, errors and streams included, carries X-Request-Id, the
    request's own or a new one, so a client can tell which answer is which (and find it in a proxy's logs)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        header = (b"x-request-id", given or uuid.uuid4().hex.encode())

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class RootPath:
    """vLLM's --root-path: the prefix a proxy serves the API under, as the ASGI scope's root_path. The router then
    takes a path with the prefix or without it (route_path), and the OpenAPI pages link through it."""

    def __init__(self, app: Any, root_path: str):
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "root_path": self.root_path}
        await self.app(scope, receive, send)


Handler = Callable[[Request], Awaitable[Response]]


class DirectRoutes:
    """POST to one of `routes`' paths runs its handler directly; every other request goes on to the app. The
    errors a handler may raise get the responses the app's exception handlers give them (`errors`, by class);
    anything else goes up to CatchAll."""

    def __init__(self, app: Any, routes: dict[str, Handler], errors: dict[type, Callable[..., Awaitable[Response]]]):
        self.app = app
        self.routes = routes
        self.errors = errors

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        handler = self.routes.get(route_path(scope)) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except tuple(self.errors) as exc:
            answer = next(self.errors[c] for c in type(exc).__mro__ if c in self.errors)
            response = await answer(request, exc)
        await response(scope, receive, send)
