"""A streamed response's body written from the event loop's callback that has it, not through the ASGI send.

Each engine step brings new tokens for every running stream. Sent the ASGI way, each stream's task is woken and
passes its event down through the app's send wrappers to uvicorn's, then waits to be woken again: at 256 streams
a step, that hop cost one API process more than the engine's step time, so streams fell behind and got several
tokens per event (benchmarks/serve.py's `fake` phase; the serving rows of the README). The server's HTTP protocols
(server/connection.py) give each request a `BodyWriter` in its ASGI scope; a stream whose response is under way
writes each step's events through it while it is `ready()` (server/event_stream.py), and falls back to its task
and the ASGI send when it is not: a socket that takes no more (the task then waits for it, as any send does), a
client gone, or a response not chunked. Under a protocol without writers (plain `uvicorn server:app`, without
`--http server:http`), every event takes the ASGI send.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import h11

EXTENSION = "miniserve.body_writer"  # the key in scope["extensions"]


class BodyWriter(Protocol):
    def ready(self) -> bool:
        """The response has started, is chunked and not ended, the client is connected and its socket takes more."""
        ...

    def write(self, body: bytes) -> None:
        """One piece of the body, written now (only when ready())."""
        ...


class _CycleWriter:
    """What both protocols' writers check: one request's response cycle is under way and its socket takes more."""

    _chunked: Callable[[], bool]  # each protocol's own: the response goes out in chunks

    def __init__(self, cycle: Any):
        self.cycle = cycle

    def ready(self) -> bool:
        c = self.cycle
        return (
            c.response_started
            and not c.response_complete
            and not c.disconnected
            and not c.transport.is_closing()
            and not c.flow.write_paused
            and self._chunked()
        )


class HttpToolsBodyWriter(_CycleWriter):
    """For uvicorn's httptools protocol: the body piece framed as a chunk, as its send frames one."""

    def _chunked(self) -> bool:
        return self.cycle.chunked_encoding is True

    def write(self, body: bytes) -> None:
        self.cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))


class H11BodyWriter(_CycleWriter):
    """For uvicorn's h11 protocol: h11's connection frames the piece (and keeps its own state right)."""

    def _chunked(self) -> bool:
        return self.cycle.conn.our_state is h11.SEND_BODY

    def write(self, body: bytes) -> None:
        self.cycle.transport.write(self.cycle.conn.send(h11.Data(data=body)))


def give_writer(scope: dict, writer: BodyWriter) -> None:
    scope.setdefault("extensions", {})[EXTENSION] = writer


def writer_of(scope: dict) -> BodyWriter | None:
    return (scope.get("extensions") or {}).get(EXTENSION)
