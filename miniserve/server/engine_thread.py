"""Runs the engine on one dedicated thread and hands its outputs to asyncio queues.

The engine is not thread-safe and `step()` blocks for a whole forward pass, so exactly one thread owns it:
HTTP handlers never touch the engine, they post commands (add / abort / stop) that the engine thread applies
between steps. Each request's outputs are pushed into the asyncio.Queue the handler gave us, on the
handler's event loop. Continuous batching is the engine's job: every step serves whatever is running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from miniserve.server.metrics import ServerMetrics
from miniserve.server.protocol import APIError

logger = logging.getLogger("miniserve.server")


@dataclass
class _Stream:
    """Where one engine request's outputs go, plus the timestamps the latency metrics need."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    n: int
    num_tokens: int = 0
    last_token_time: float = 0.0


class AsyncEngine:
    def __init__(self, engine: Any, metrics: ServerMetrics | None = None, max_waiting: int | None = None):
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._pending_adds = 0  # posted but not yet applied; counts as waiting for the overload check
        self._pending_lock = threading.Lock()  # += from the event loop, -= from the engine thread
        self._stats: dict = dict(engine.stats())
        self._thread = threading.Thread(target=self._run, name="miniserve-engine", daemon=True)
        self._stopped = False

    # ---- called from the event loop -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._commands.put(("stop",))
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def stats(self) -> dict:
        """The engine's stats() as of its last step (safe to read from any thread)."""
        return self._stats

    def num_waiting(self) -> int:
        return int(self._stats.get("num_waiting", 0)) + self._pending_adds

    async def add_request(self, request_id: str, prompt: str | list[int], params: Any, out: asyncio.Queue) -> None:
        """Queue a request; its RequestOutputs (or an Exception) will be put into `out`.

        Raises the engine's ValueError for a bad prompt, and APIError(503) when too many requests wait.
        """
        if self._stopped or not self._thread.is_alive():
            raise APIError("the engine is not running", status=503, code="engine_unavailable")
        if self.max_waiting is not None and self.num_waiting() >= self.max_waiting:
            raise APIError(
                f"server overloaded: {self.num_waiting()} requests are already waiting "
                f"(limit {self.max_waiting}); retry later",
                status=503,
                code="overloaded",
            )
        stream = _Stream(asyncio.get_running_loop(), out, time.monotonic(), getattr(params, "n", 1) or 1)
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._count_pending(+1)
        self._commands.put(("add", request_id, prompt, params, stream, done))
        await asyncio.wrap_future(done)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (applied before the engine's next step)."""
        self._commands.put(("abort", request_id))

    # ---- the engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            idle = not self.engine.has_unfinished_requests()
            if not self._apply_commands(block=idle):
                break
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # keep serving: fail the in-flight requests, not the server
                logger.exception("engine step failed")
                self._fail_all(exc)
                continue
            now = time.monotonic()
            for out in outputs:
                self._deliver(out, now)
            self._refresh_stats()
        self._stopped = True
        self._fail_all(RuntimeError("the server is shutting down"))

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if the engine is idle); False once told to stop."""
        try:
            cmd = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd[0] == "stop":
                return False
            if cmd[0] == "add":
                self._apply_add(*cmd[1:])
            elif cmd[0] == "abort":
                self._apply_abort(cmd[1])
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
        self._refresh_stats()  # aborts free blocks at once; /metrics should show it even when idle
        return True

    def _apply_add(self, request_id: str, prompt: Any, params: Any, stream: _Stream, done) -> None:
        try:
            self.engine.add_request(request_id, prompt, params)
        except Exception as exc:
            self._count_pending(-1)
            done.set_exception(exc)
            return
        self._streams[request_id] = stream
        self._refresh_stats()  # the engine counts it as waiting now
        self._count_pending(-1)
        done.set_result(None)

    def _count_pending(self, delta: int) -> None:
        with self._pending_lock:
            self._pending_adds += delta

    def _apply_abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        try:
            self.engine.abort_request(request_id)
        except Exception:
            logger.exception("abort of %s failed", request_id)
        if stream is not None and self.metrics is not None:
            self.metrics.observe_finished(["abort"] * stream.n, time.monotonic() - stream.arrival)

    def _deliver(self, out: Any, now: float) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:  # aborted between the step and now
            return
        num_tokens = sum(len(o.token_ids) for o in out.outputs)
        if self.metrics is not None and num_tokens > stream.num_tokens:
            if stream.num_tokens == 0:
                self.metrics.observe_first_token(now - stream.arrival)
            else:
                self.metrics.observe_inter_token(now - stream.last_token_time)
        if num_tokens > stream.num_tokens:
            stream.num_tokens, stream.last_token_time = num_tokens, now
        if out.finished:
            del self._streams[out.request_id]
            if self.metrics is not None:
                self.metrics.observe_finished([o.finish_reason for o in out.outputs], now - stream.arrival)
        _put(stream, out)  # the engine builds fresh RequestOutputs every step, so handing it over is safe

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("abort of %s failed", request_id)
            _put(stream, exc)
        self._streams.clear()
        self._refresh_stats()

    def _refresh_stats(self) -> None:
        try:
            self._stats = dict(self.engine.stats())
        except Exception:
            logger.exception("engine.stats() failed")


def _put(stream: _Stream, item: Any) -> None:
    try:
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
    except RuntimeError:  # the handler's loop is gone (server shutting down)
        pass
