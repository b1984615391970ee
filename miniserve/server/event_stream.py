"""The response of a streamed request: server-sent events as the engine's steps arrive, then `[DONE]`.

A route describes its events (`StreamEvents`: the opening ones, those of each choice's new output, the closing
ones); `EventStream` sends them. The events of a step are written by whichever runs first:
- the event loop's callback that applied the engine's step (server/engine_process.py:EngineProcess._on_step ->
  RequestGroup._wake -> EventStream.push), through the connection's body writer (server/body_writer.py), when
  the socket takes more and nothing else is pending: no task is woken, the common case;
- else the request's task, woken by the group, through the ASGI send, which waits for the socket when it is full.
Either way each event goes out once, in order: a push stands back while the task has a batch to send or is
sending one, and the task never sends what a push took. A request's last step (its finish reason), an engine
error and a client that left are always the task's, which ends the response.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing
from typing import Any

from fastapi import Request

from miniserve.server import responses as fmt
from miniserve.server.body_writer import BodyWriter, writer_of
from miniserve.server.protocol import APIError
from miniserve.server.request_group import RequestGroup
from miniserve.server.state import ClientDisconnected

HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class StreamEvents:
    """What a streaming route sends: its choices' trackers and final outputs, and how each new output reads."""

    choice: Callable[[int, Any, fmt.Delta], list[bytes]]  # events for (prompt index, completion, what is new)
    done = fmt.SSE_DONE  # what ends the stream (OpenAI's Responses streams end without it)

    def __init__(self, trackers: dict[tuple[int, int], fmt.ChoiceTracker]):
        self.trackers = trackers
        self.finals: dict[int, Any] = {}  # prompt index -> its latest (cumulative) output

    def opening(self) -> list[bytes]:
        return []

    def closing(self) -> list[bytes]:
        return []

    def error(self, exc: APIError) -> bytes:
        """The event that ends a stream the engine or the server failed."""
        return fmt.sse(exc.body())

    def batch(self, changed: list[tuple[int, Any]]) -> list[bytes]:
        """The events of every choice that moved in `changed` ((prompt index, cumulative output) pairs)."""
        events: list[bytes] = []
        for i, out in changed:
            self.finals[i] = out
            for o in out.outputs:
                tracker = self.trackers[(i, o.index)]
                if not tracker.finished:
                    events += self.choice(i, o, tracker.advance(o))
        return events


class EventStream:
    """The ASGI response of a streaming request (see the module docstring)."""

    def __init__(self, group: RequestGroup, request: Request, events: StreamEvents):
        self.group = group
        self.request = request
        self.events = events
        self.writer: BodyWriter | None = None
        self.sending = False  # the task is inside an ASGI send (which may wait for the socket)
        self.failure: Exception | None = None  # what a push raised formatting events: the task raises it

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        group, tail = self.group, self.events.done
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await self._send(send, self.events.opening())
            self.writer = writer_of(scope)
            if self.writer is not None:
                group.push = self.push
            async with aclosing(group.results(self.request)) as results:
                async for changed in results:
                    if self.failure is not None:
                        raise self.failure
                    await self._send(send, self.events.batch(changed))
            await self._send(send, self.events.closing())
        except ClientDisconnected:
            tail = b""
        except APIError as exc:
            tail = self.events.error(exc) + self.events.done
        finally:
            group.push = None
            group.abort()  # (a no-op once every request finished)
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def _send(self, send: Any, events: list[bytes]) -> None:
        if not events:
            return
        self.sending = True
        try:
            await send({"type": "http.response.body", "body": b"".join(events), "more_body": True})
        except OSError:  # the connection broke under the write
            raise ClientDisconnected() from None
        finally:
            self.sending = False

    def push(self, changed: list[tuple[int, Any]]) -> bool:
        """Write the events of `changed` now; False (nothing taken) when the task must send them instead."""
        if self.sending or self.failure is not None or not self.writer.ready():
            return False
        try:
            events = self.events.batch(changed)
        except Exception as exc:  # raised in the task instead, as if it had formatted the events itself
            self.failure = exc
            return False
        if events:
            self.writer.write(b"".join(events))
        return True
