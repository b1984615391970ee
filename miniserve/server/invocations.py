"""SageMaker's inference route, as vLLM serves it: POST /invocations takes a chat completions or a completions body
(SageMaker sends every request there, and checks health at /ping) and answers as that route would, streams
included. The body's shape picks the route; the route's handler then reads the body as if posted to it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from miniserve.server.chat import create_chat_completion
from miniserve.server.completions import create_completion
from miniserve.server.json_body import decode_json
from miniserve.server.protocol import APIError
from miniserve.server.state import read_body, state_of


async def invocations(request: Request) -> Response:
    state = state_of(request)
    body = await read_body(request, state.server.max_body_bytes)
    handler = _route_for(decode_json(body))
    return await handler(Request(request.scope, _replay(body, request.receive)))


def _route_for(data: Any) -> Callable[[Request], Awaitable[Response]]:
    """The handler the body is for: chat with messages, completions with prompt. A body with both is refused, as
    either route would ignore the other's prompt (and no field is silently dropped)."""
    fields = data.keys() if isinstance(data, dict) else ()
    if "messages" in fields and "prompt" in fields:
        raise APIError(
            "an /invocations body has messages (a chat completions request) or prompt (a completions request), not "
            "both: drop one",
            param="prompt",
        )
    if "messages" in fields:
        return create_chat_completion
    if "prompt" in fields:
        return create_completion
    raise APIError(
        "an /invocations body is a chat completions request (with messages) or a completions request (with prompt)",
        param="messages",
    )


def _replay(body: bytes, receive: Any) -> Any:
    """A receive channel that gives the body already read, then whatever the connection sends next (a stream
    watches it for the client's disconnect)."""
    given = False

    async def replay() -> dict[str, Any]:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
