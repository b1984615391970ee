"""Connection limits the ASGI app cannot enforce: deadlines for a request's head and body, and a cap on
simultaneous connections, in a subclass of uvicorn's h11 protocol.

uvicorn closes a keep-alive connection that sits idle after a response, but nothing closes one that never sends
a request, trickles its headers a byte at a time or stalls halfway through its body: each holds a socket (and
a file descriptor) for as long as the client likes. The app only sees a request once its head is complete, so
these limits live in the protocol. They follow h11's view of the client (`their_state`): IDLE means its next
request's head is due, SEND_BODY its body; each phase gets one deadline, armed when the phase begins.

`miniserve serve` uses it; with uvicorn, pass `--http server:http` (server.py builds it from MINISERVE_*).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from miniserve.config import ServerConfig
from miniserve.server.protocol import APIError

_DEFAULTS = ServerConfig()  # the settings (config.py) say what the defaults are


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = _DEFAULTS.header_timeout  # seconds for a request's head, from connect or last response
    body_timeout: float = _DEFAULTS.body_timeout  # seconds for a request's body, from the end of its head
    keep_alive_timeout: float = _DEFAULTS.keep_alive_timeout  # seconds an idle keep-alive connection stays open
    max_connections: int | None = _DEFAULTS.max_connections  # one more gets 503 and is closed; None = no cap

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")


def guarded_h11(limits: ConnectionLimits) -> type[H11Protocol]:
    """The protocol class to give uvicorn (`http=`): GuardedH11Protocol with these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


class GuardedH11Protocol(H11Protocol):
    limits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.keep_alive_timeout
        self._phase: str | None = None  # "head" or "body": what the deadline below waits for
        self._deadline: asyncio.TimerHandle | None = None

    # ---- asyncio.Protocol and uvicorn hooks: each ends by looking at what the client owes now

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cap = self.limits.max_connections
        if cap is not None and len(self.connections) > cap:
            self.app = _Refuse(cap)  # its first request is answered 503, then the connection closes
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes h11 cannot parse as a request (or a head over its size limit)."""
        self._send_and_close(400, APIError(f"malformed HTTP request: {msg}", code="invalid_http_request"))

    # ---- the deadline

    def _watch(self) -> None:
        their = self.conn.their_state
        phase = "head" if their is h11.IDLE else "body" if their is h11.SEND_BODY else None
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
        started = bool(self.conn.trailing_data[0]) if phase == "head" else True  # some of a request arrived
        if started and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # and nothing was answered yet
            what, timeout = (
                ("head", self.limits.header_timeout) if phase == "head" else ("body", self.limits.body_timeout)
            )
            err = APIError(
                f"the request {what} did not arrive within {timeout:g} seconds", status=408, code="request_timeout"
            )
            self._send_and_close(408, err)
        else:
            self.transport.close()  # an idle connection, or a response is already on its way: just close

    def _send_and_close(self, status: int, err: APIError) -> None:
        body = json.dumps(err.body()).encode()
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        try:
            for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # h11 will not frame a response here: closing says enough
            pass
        self.transport.close()


class _Refuse:
    """The ASGI app of a connection over the cap: 503 in OpenAI's shape, and `Connection: close`."""

    def __init__(self, cap: int):
        self.cap = cap

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
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
