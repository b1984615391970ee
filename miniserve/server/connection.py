"""Connection limits the ASGI app cannot enforce: deadlines for a request's head and body, a cap on the head's size
and on simultaneous connections, in subclasses of uvicorn's HTTP protocols.

uvicorn closes a keep-alive connection that sits idle after a response, but nothing closes one that never sends
a request, trickles its headers a byte at a time or stalls halfway through its body: each holds a socket (and
a file descriptor) for as long as the client likes. The app only sees a request once its head is complete, so
these limits live in the protocol. One set of rules (`_Guard`) serves both of uvicorn's HTTP/1.1 protocols: each
says what its client owes now (the next request's head, a body, or nothing while the app answers), and each phase
gets one deadline, armed when the phase begins. httptools (a C parser, the default `http_parser`) costs less per
request and per streamed event than h11 (pure Python), which `http_parser="h11"` selects.

Both also give each request's ASGI scope a writer for a streamed body (server/body_writer.py).

`miniserve serve` uses them; with uvicorn, pass `--http server:http` (server.py builds it from MINISERVE_*).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from miniserve.config import ServerConfig
from miniserve.server.body_writer import H11BodyWriter, HttpToolsBodyWriter, give_writer, writer_of
from miniserve.server.middleware import route_path
from miniserve.server.protocol import APIError

_DEFAULTS = ServerConfig()  # the settings (config.py) say what the defaults are


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = _DEFAULTS.header_timeout  # seconds for a request's head, from connect or last response
    body_timeout: float = _DEFAULTS.body_timeout  # seconds for a request's body, from the end of its head
    keep_alive_timeout: float = _DEFAULTS.keep_alive_timeout  # seconds an idle keep-alive connection stays open
    max_connections: int | None = _DEFAULTS.max_connections  # one more gets 503 and is closed; None = no cap
    write_timeout: float = _DEFAULTS.write_timeout  # seconds an answer may wait on a client that reads none of it
    root_path: str = ""  # the app's root path (ServerConfig.root_path): over the cap, UNCAPPED_PATHS under it too

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout", "write_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")


MAX_HEAD_BYTES = 16 * 1024  # a request line and headers past this get 400 (h11's own limit in uvicorn)
# What a connection over the cap is still answered on (then closed): a liveness probe or a metrics scrape refused
# by a server that is only busy would have it restarted, or hide the very overload it is there to show
UNCAPPED_PATHS = frozenset({"/health", "/ping", "/metrics"})


def guarded_protocol(limits: ConnectionLimits, parser: str = "httptools") -> type:
    """The protocol class to give uvicorn (`http=`): httptools' or h11's (`parser`), with these limits."""
    base = GuardedHttpToolsProtocol if parser == "httptools" else GuardedH11Protocol
    return type(base.__name__, (base,), {"limits": limits})


class _Guard:
    """The deadlines and the connection cap, mixed in before a uvicorn protocol that says what its client owes
    (`_owed`: "head", "body" or None), whether the owed head has begun to arrive (`_head_begun`) and whether the
    response to the owed body has started (`_answering`)."""

    limits = ConnectionLimits()
    transport: asyncio.Transport  # the protocol's own
    loop: asyncio.AbstractEventLoop
    connections: set
    _owed: Callable[[], str | None]  # each protocol class defines these three
    _head_begun: Callable[[], bool]
    _answering: Callable[[], bool]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.keep_alive_timeout
        self._phase: str | None = None  # "head" or "body": what the deadline below waits for
        self._deadline: asyncio.TimerHandle | None = None
        self._unread: asyncio.TimerHandle | None = None  # armed while the client reads none of the answer

    # ---- asyncio.Protocol and uvicorn hooks (before the protocol's own in the MRO): each ends with `_watch()`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        cap = self.limits.max_connections
        if cap is not None and len(self.connections) > cap:
            self.app = _Refuse(cap, self.app, self.limits.root_path)  # answered 503, then the connection closes
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._read_again()
        super().connection_lost(exc)  # type: ignore[misc]

    def pause_writing(self) -> None:
        """The transport's buffer passed its high-water mark: the client reads slower than it is sent to, or not
        at all. As nginx's send_timeout: when the socket has taken nothing more for write_timeout, the client is
        dropped (closing would wait for the buffer to drain, which it never does), freeing the queued answer and
        the handler waiting to write more; each write the socket takes gives another write_timeout."""
        super().pause_writing()  # type: ignore[misc]
        if self._unread is None:
            self._wait_for_reads()

    def resume_writing(self) -> None:
        self._read_again()
        super().resume_writing()  # type: ignore[misc]

    def _wait_for_reads(self) -> None:
        queued = self.transport.get_write_buffer_size()  # (nothing is added while writing is paused)
        self._unread = self.loop.call_later(self.limits.write_timeout, self._unless_read, queued)

    def _unless_read(self, queued: int) -> None:
        if self.transport.get_write_buffer_size() < queued:
            self._wait_for_reads()
        else:
            self._unread = None
            self.transport.abort()

    def _read_again(self) -> None:
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None

    def _watch(self) -> None:
        phase = self._owed()
        if phase == self._phase:
            return
        self._disarm()
        if phase is None or self.transport.is_closing():
            return
        self._phase = phase
        timeout = self.limits.header_timeout if phase == "head" else self.limits.body_timeout
        self._deadline = self.loop.call_later(timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _expired(self) -> None:
        phase = self._phase
        self._deadline, self._phase = None, None
        if self.transport.is_closing():
            return
        late = self._head_begun() if phase == "head" else not self._answering()  # a request began, unanswered
        if not late:
            self.transport.close()  # an idle connection, or a response is already on its way: just close
            return
        timeout = self.limits.header_timeout if phase == "head" else self.limits.body_timeout
        err = APIError(
            f"the request {phase} did not arrive within {timeout:g} seconds", status=408, code="request_timeout"
        )
        self._send_and_close(408, err)

    def _send_and_close(self, status: int, err: APIError) -> None:
        """Answer `err` before any response began on this connection, then close it."""
        body = json.dumps(err.body()).encode()
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()

    def _malformed(self, msg: str) -> None:
        self._send_and_close(400, APIError(f"malformed HTTP request: {msg}", code="invalid_http_request"))


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol under `_Guard`: what the client owes is h11's view of it (`their_state`)."""

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes h11 cannot parse as a request (or a head over its size limit)."""
        self._malformed(msg)

    def handle_events(self) -> None:
        super().handle_events()  # may have begun a request: its cycle's task has not run yet
        cycle = self.cycle
        if cycle is not None and writer_of(cycle.scope) is None:
            give_writer(cycle.scope, H11BodyWriter(cycle))

    def _owed(self) -> str | None:
        their = self.conn.their_state
        return "head" if their is h11.IDLE else "body" if their is h11.SEND_BODY else None

    def _head_begun(self) -> bool:
        return bool(self.conn.trailing_data[0])

    def _answering(self) -> bool:
        return self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE)


class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
    """uvicorn's httptools protocol under `_Guard`: what the client owes follows the parser's callbacks, and the
    head's size is counted there (httptools sets no limit of its own)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._owes: str | None = "head"
        self._begun = False  # some of the owed head arrived
        self._head_bytes = 0
        self._too_large = False
        self._cycles: list[Any] = []  # every request of the connection not answered yet (pipelined ones too)

    def connection_lost(self, exc: Exception | None) -> None:
        """uvicorn tells only the connection's newest request that the client left: a pipelined one queued behind
        the request running would leave that one generating for nobody. Every unanswered request is told."""
        for cycle in self._cycles:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes httptools cannot parse as a request (or a callback below refused)."""
        self._malformed(f"request head larger than {MAX_HEAD_BYTES} bytes" if self._too_large else msg)

    # ---- the parser's callbacks (inside data_received)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._owes, self._begun, self._head_bytes = "head", True, 0

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._owes = "body"
        if self.cycle is not None and self.cycle.scope is self.scope:  # (not for an upgrade: no cycle begun)
            give_writer(self.scope, HttpToolsBodyWriter(self.cycle))
            self._cycles = [c for c in self._cycles if not c.response_complete] + [self.cycle]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._owes = None

    def on_response_complete(self) -> None:
        if self._owes is None and not self.pipeline:  # nothing queued: the next request's head is owed
            self._owes, self._begun = "head", False
        super().on_response_complete()  # (then _Guard watches)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._too_large = True
            raise ValueError("request head too large")  # the parser stops; uvicorn answers with send_400_response

    def _owed(self) -> str | None:
        return self._owes

    def _head_begun(self) -> bool:
        return self._begun

    def _answering(self) -> bool:
        return self.cycle is not None and self.cycle.response_started


class _Refuse:
    """The ASGI app of a connection over the cap: 503 in OpenAI's shape, and `Connection: close`; the app's own
    answer, closing the connection too, on UNCAPPED_PATHS."""

    def __init__(self, cap: int, app: Any, root_path: str = ""):
        self.cap = cap
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        rooted = {**scope, "root_path": scope.get("root_path") or self.root_path}  # (the app sets its own later)
        if scope["type"] == "http" and route_path(rooted) in UNCAPPED_PATHS:
            await self.app(scope, receive, _closing(send))
            return
        while (await receive()).get("more_body"):  # read the body first: closing on unread data resets the socket
            pass
        err = APIError(
            f"too many connections (the limit is {self.cap}, MINISERVE_MAX_CONNECTIONS); retry later",
            status=503,
            code="overloaded",
        )
        body = json.dumps(err.body()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"retry-after", b"1"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _closing(send: Any) -> Any:
    """`send` with `Connection: close` on the response's head (uvicorn then closes the connection after it)."""

    async def closing_send(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return closing_send
