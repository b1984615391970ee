"""The API process's handle on the engine process (server/engine_core.py: the engine's side, and the messages
the two exchange): start it, post requests, route each step's outputs to their streams.

The API process works both pipes from its event loop (pipe.py: no thread hop, so no wait for the GIL): the commands
posted during one pass of the loop go out as one message, and what arrived while the loop was busy is read and
handled in one batch. Each engine request has a RequestStream: its cumulative RequestOutput, extended
in place by each delta. A streaming handler that fell a few steps behind sends everything new as one chunk; a
non-streaming handler is woken only when its request finishes. Memory per request is its output, never a queue of
snapshots.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from miniserve.detokenizer import IncrementalDetokenizer
from miniserve.engine.output_processor import drops_stop_token_text
from miniserve.engine.outputs import CompletionOutput, RequestOutput, logprob_dicts
from miniserve.server import engine_core
from miniserve.server.admission import Admission, shared_count
from miniserve.server.metrics import ServerMetrics
from miniserve.server.pipe import FrameReader, FrameWriter, LoopFrameWriter
from miniserve.server.protocol import APIError

logger = logging.getLogger("miniserve.server")
STATS_WAIT_S = 0.5  # how long a /metrics scrape of a shared engine waits for its stats (EngineProcess.fresh_stats)


class RequestStream:
    """One engine request as the API process sees it: the cumulative output, and whom to wake when it changes."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: Any,
        wake: Callable[[RequestStream], None],
        tokenizer: Any = None,
        asked_n: int | None = None,
    ):
        self.request_id = request_id
        self.n: int = params.n  # the choices the engine runs (best_of of them when the request has best_of)
        self.asked_n = asked_n or params.n  # the request's n
        self.params = params
        want_logprobs = params.logprobs is not None
        completions = [CompletionOutput(i, "", [], logprobs=[] if want_logprobs else None) for i in range(self.n)]
        self.output = RequestOutput(request_id, None, prompt_ids, completions, False)
        self.streamed = params.output_kind != "final_only"  # reports every step (else only its final output)
        self.detokenizers = None  # the engine does not detokenize this request: the API process does
        if not params.detokenize:
            self.detokenizers = [
                IncrementalDetokenizer(tokenizer, params.skip_special_tokens, prompt_ids=prompt_ids)
                for _ in range(self.n)
            ]
        self.error: BaseException | None = None
        self.wake = wake  # called on every change (the handler decides whether that is worth waking for)
        self.arrival = time.monotonic()
        self.last_token_times = [0.0] * self.n  # each choice's latest tokens came then (inter-token latency)
        self.done = False  # finished, failed or aborted: no more updates

    def apply(self, finished: bool, choices: list[tuple], prompt_logprobs: Any, metrics: Any) -> int:
        """Extend the cumulative output by one delta; returns the number of new tokens."""
        new = 0
        outs = self.output.outputs
        for index, token_ids, text, logprobs, finish, stop, cumulative in choices:
            o = outs[index]
            o.token_ids.extend(token_ids)
            new += len(token_ids)
            if self.detokenizers is not None:
                detok = self.detokenizers[index]
                shown = token_ids[:-1] if drops_stop_token_text(finish, stop, self.params) else token_ids
                text = detok.add(shown) + (detok.flush() if finish is not None else "")
            if text:
                o.text += text
            if logprobs is not None and o.logprobs is not None:
                o.logprobs.extend(logprobs)
            o.finish_reason, o.stop_reason, o.cumulative_logprob = finish, stop, cumulative
        if prompt_logprobs is not None:  # (float dicts, the prompt tokens' ranks): vLLM's Logprob dicts
            entries, ranks = prompt_logprobs
            tokens, num_top = self.output.prompt_token_ids, self.params.prompt_logprobs
            self.output.prompt_logprobs = logprob_dicts(entries, tokens, ranks, num_top, None)
        if finished:
            self.output.finished = True
            self.output.metrics = metrics or {}
            self.output.num_cached_tokens = self.output.metrics.pop("num_cached_tokens", 0)
            self.done = True
        return new

    def end(self, error: BaseException | None, reason: str = "abort") -> None:
        """Finish every unfinished choice with `reason` (abort, shutdown), or fail the request with `error`."""
        if self.done:
            return
        for o in self.output.outputs:
            if o.finish_reason is None:
                o.finish_reason = reason
        self.output.finished = True
        self.error = error
        self.done = True


@dataclass
class EngineLink:
    """One API server's ends of its two pipes to an engine process that another process started (the launcher of
    `miniserve serve --api-servers N`: server/launcher.py)."""

    commands: Any  # Connection: this API server -> the engine
    outputs: Any  # Connection: the engine -> this API server
    index: int  # which API server this is (0 observes the per-step metric)
    count: int  # how many API servers share the engine
    outstanding: Any = None  # their shared count of sequences posted and not finished (admission.py)


def spawn_engine(config: Any, count: int = 1) -> tuple[Any, list[EngineLink]]:
    """Start the engine process with a pipe pair for each of `count` API servers; returns it and their links."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited CUDA state, threads or event loop
    commands = [ctx.Pipe(duplex=False) for _ in range(count)]  # (engine's end, API's end)
    outputs = [ctx.Pipe(duplex=False) for _ in range(count)]  # (API's end, engine's end)
    # a daemonic process may not start processes: with tensor parallelism the engine starts its other ranks (and
    # ends them itself, also when this process dies: see miniserve/distributed/)
    daemon = getattr(config, "tensor_parallel_size", 1) == 1
    args = (config, [c[0] for c in commands], [o[1] for o in outputs])
    proc = ctx.Process(target=engine_core.core_main, args=args, name="miniserve-engine", daemon=daemon)
    proc.start()
    # it ignores SIGTERM (engine_core.core_main): at this interpreter's exit, before multiprocessing's hook would
    # SIGTERM and join it for ever (atexit runs last-registered first), whatever is left of it is killed
    atexit.register(_kill_left_over, proc)
    for (engine_end, _), (_, engine_out) in zip(commands, outputs):
        engine_end.close()
        engine_out.close()
    shared = shared_count() if count > 1 else None  # (one API server counts on its own)
    return proc, [EngineLink(c[1], o[0], i, count, shared) for i, (c, o) in enumerate(zip(commands, outputs))]


def _kill_left_over(proc: Any) -> None:
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def _wait_exit(proc: Any, wait: float = 0.0) -> Any:
    """An engine process's exit code, after waiting up to `wait` s for it to end (None: still running); "unknown"
    for the launcher's engine (proc None)."""
    if proc is None:
        return "unknown"
    if wait:
        proc.join(wait)
    return proc.exitcode


def _stop_engine(
    proc: Any, cmd_send: Any, loop: asyncio.AbstractEventLoop | None, post: Callable, timeout: float
) -> None:
    """Tell the engine process to stop (through the event loop's writer while it runs, else on the pipe itself:
    nothing else writes it then) and wait for it, killing it after `timeout` s. The launcher's engine (proc None)
    ends once every API server stopped."""
    if loop is not None and loop.is_running():
        loop.call_soon_threadsafe(post, ("stop",))
    else:
        with contextlib.suppress(OSError):  # already gone (or its pipe full: the kill below ends it)
            FrameWriter(cmd_send).send([("stop",)])
    if proc is not None:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def _lost_while_loading(proc: Any, interrupted: int | None) -> RuntimeError:
    """Why the engine process ended before its first message: the signal that stopped the load, or its exit."""
    if interrupted is not None:
        return RuntimeError(f"{signal.Signals(interrupted).name} came while the model loaded: the load was stopped")
    return RuntimeError(f"the engine process exited with {_wait_exit(proc, 5)} while loading")


def _failed_to_load(msg: tuple, proc: Any, link: EngineLink | None) -> RuntimeError:
    """The engine's ("error", message, traceback, is_user_error) at startup, logged once, as the error to raise."""
    _wait_exit(proc, 5)  # it returns once it has said why
    if link is None or link.index == 0:  # (each API server hears it: one logs it)
        logger.log(logging.DEBUG if msg[3] else logging.ERROR, "engine failed to load:\n%s", msg[2])
    return RuntimeError(f"the engine failed to load: {msg[1]}")


class EngineProcess:
    """The API process's handle: start/stop the engine process (or join one the launcher started: `link`), post
    requests, route each step's outputs. With N API servers they admit against one shared count (admission.py)."""

    def __init__(self, config: Any, max_waiting: int | None = None, link: EngineLink | None = None):
        self.config = config
        self.metrics: ServerMetrics | None = None  # the server's, once it has them (ServerState)
        self.link = link
        self.admission = Admission(config.max_num_seqs, max_waiting, link.outstanding if link is not None else None)
        self.info: dict = {}
        self._stats: dict = {}
        self._streams: dict[str, RequestStream] = {}
        self._acks: dict[str, asyncio.Future] = {}
        self._stats_asked: deque[asyncio.Future] = deque()  # fresh_stats calls, in the order posted
        self._outbox: list[tuple] = []  # commands posted during this pass of the event loop (sent as one message)
        self._writer: LoopFrameWriter | None = None
        self._proc: Any = None  # the engine process, when this API process started it
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._alive = False
        self.accepting = True
        self.on_lost: Callable[[], None] | None = None  # called when the engine process is lost (app.py stops)
        self.lost = False  # the engine process exited unasked: the server's exit status says so (launcher.py)
        self.interrupted: int | None = None  # the signal that stopped the load (stop_loading)

    # ---- life cycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the engine process (or join the launcher's); wait until it has loaded (blocking: off the loop)."""
        link = self.link
        if link is None:
            self._proc, (link,) = spawn_engine(self.config)
            if self.interrupted is not None:  # a signal came as it was being spawned
                self.stop_loading(self.interrupted)
        self._started = True
        self._cmd_send = link.commands
        self._out_reader = FrameReader(link.outputs)
        try:
            msg = self._out_reader.recv()
        except EOFError:
            raise _lost_while_loading(self._proc, self.interrupted) from None
        if msg[0] == "error":
            raise _failed_to_load(msg, self._proc, self.link)
        _, self.info, self._stats = msg
        self._alive = True

    def stop_loading(self, signum: int) -> None:
        """A SIGTERM or SIGINT while `start` waits (a signal handler's call): the engine process, which dies of
        either until loaded, gets SIGTERM (the launcher's gets it from the launcher); `start` names the signal."""
        self.interrupted = signum
        if self._proc is not None and self._proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGTERM)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Work both pipes from `loop` (the server's event loop; call on it): route outputs, send commands posted."""
        self._loop = loop
        self._writer = LoopFrameWriter(self._cmd_send, loop)
        os.set_blocking(self._out_reader.fd, False)
        loop.add_reader(self._out_reader.fd, self._on_readable)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine process (called on a worker thread: the event loop meanwhile sees the pipe close, which
        is then expected, not an unexpected exit)."""
        self.accepting = False
        if self._started:
            self._alive = False
            _stop_engine(self._proc, self._cmd_send, self._loop, self._post, timeout)

    def end_all(self) -> None:
        """After shutdown, on the event loop: end whatever is still waiting for output."""
        self._end_all(RuntimeError("the server is shutting down"))

    def kill(self) -> None:
        """Stop the engine process at once (a second shutdown signal)."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()

    def is_alive(self) -> bool:
        return self._alive and (self._proc is None or self._proc.is_alive())

    def stats(self) -> dict:
        """The engine's stats() as of its latest message."""
        return self._stats

    async def fresh_stats(self) -> dict:
        """The engine's stats now (a step's wait at most): API servers of a shared engine (`link`) hear them at other
        steps, so between scrapes of two the counters could go back; an own one: as is. Scrapes share an answer
        asked for, and past STATS_WAIT_S (a stalled engine) get the last stats known: /metrics keeps answering."""
        if self.link is None or not self.is_alive():
            return self._stats
        if not self._stats_asked:  # (one asked already: its answer serves this scrape too)
            self._stats_asked.append(asyncio.get_running_loop().create_future())
            self._post(("stats",))
        try:
            return await asyncio.wait_for(asyncio.shield(self._stats_asked[-1]), STATS_WAIT_S)
        except asyncio.TimeoutError:  # (the built-in TimeoutError from Python 3.11 on, not on 3.10)
            return self._stats

    # ---- requests (on the event loop) ---------------------------------------------------------------

    async def add_requests(self, requests: list[tuple[str, list[int], Any, RequestStream, str | None, int]]) -> None:
        """Post requests (id, prompt ids, params, stream, serialized compiled grammar or None, priority) in one
        message, so that the engine takes them in one step (one by one, each posted once the one before was accepted,
        N prompts took N steps); returns once it accepted them all. Raises the engine's ValueError for a bad prompt
        (all of them then withdrawn) and APIError(503) when the server is stopping or overloaded (checked for all of
        them before any is posted)."""
        if not self.accepting:
            raise APIError("the server is shutting down; retry the request", status=503, code="shutting_down")
        if not self.is_alive():
            raise APIError("the engine is not running", status=503, code="engine_unavailable")
        self.admission.admit([r[2].n for r in requests])  # (posted and not finished: released by _forget)
        acks = []
        for request_id, prompt, params, stream, grammar, priority in requests:
            acks.append(ack := asyncio.get_running_loop().create_future())
            self._acks[request_id], self._streams[request_id] = ack, stream
            self._post(("add", request_id, prompt, params, grammar, priority))
        answers = [(request_id, *await ack) for (request_id, *_), ack in zip(requests, acks)]
        refused = [(error, is_value) for _, error, is_value in answers if error is not None]
        if refused:  # (the accepted ones withdrawn, not aborted: none ran, so none counts as a finished request)
            for request_id, *_ in requests:
                self._forget(request_id)
            if accepted := [request_id for request_id, error, _ in answers if error is None]:
                self._post(("abort", accepted))
            raise ValueError(refused[0][0]) if refused[0][1] else RuntimeError(refused[0][0])

    def warm_grammars(self) -> None:
        """Have the engine get ready for grammars in the background (before the first one is sent)."""
        self._post(("warm",))

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Stop a request and free its KV blocks (the engine applies it before its next step)."""
        stream = self._forget(request_id)
        if stream is None:
            return
        self._post(("abort", [request_id]))
        if self.metrics is not None:  # (the per-request histograms are of requests the engine finished, as vLLM's)
            reasons = [o.finish_reason or "abort" for o in stream.output.outputs]  # choices done before keep theirs
            self.metrics.observe_finished(reasons, [time.monotonic() - stream.arrival] * len(reasons))
        stream.end(None, reason)
        stream.wake(stream)

    def _forget(self, request_id: str) -> RequestStream | None:
        stream = self._streams.pop(request_id, None)
        ack = self._acks.pop(request_id, None)
        if ack is not None and not ack.done():
            ack.cancel()
        if stream is not None:
            self.admission.release(stream.n)
        return stream

    # ---- the pipes (on the event loop)

    def _post(self, cmd: tuple) -> None:
        """Queue a command; the ones posted during this pass of the loop go out as one message (256 requests that
        arrive at once are one write, and one wake-up of the engine)."""
        self._outbox.append(cmd)
        if len(self._outbox) == 1:
            assert self._loop is not None
            self._loop.call_soon(self._send)

    def _send(self) -> None:
        batch, self._outbox = self._outbox, []
        if self._writer is not None:
            self._writer.send(batch)

    def _on_readable(self) -> None:
        """What one read brought from the engine: each run of steps joined (merge_steps), then routed."""
        try:
            messages = self._out_reader.read_ready()
        except (EOFError, OSError):
            assert self._loop is not None
            self._loop.remove_reader(self._out_reader.fd)
            if self._writer is not None:
                self._writer.close()
            self._on_engine_exit()
            return
        self._on_messages(messages)

    def _on_messages(self, messages: list[tuple]) -> None:
        for msg in merge_steps(messages):
            self._on_message(msg)

    def _on_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "step":
            _, deltas, self._stats, num_tokens = msg
            if self.metrics is not None:
                for n in num_tokens:
                    if n:
                        self.metrics.observe_iteration(n)
            self._on_step(deltas)
        elif kind == "acks":
            _, acks, self._stats = msg
            for request_id, error, is_value_error in acks:
                if (ack := self._acks.pop(request_id, None)) is not None:
                    _answer(ack, (error, is_value_error))
        elif kind == "stats":
            self._stats = msg[1]
            _answer(self._stats_asked.popleft(), self._stats)
        elif kind == "failed":
            _, request_ids, message, self._stats = msg
            self._end(request_ids, RuntimeError(message))

    def _on_step(self, deltas: list[tuple]) -> None:
        now = time.monotonic()
        metrics = self.metrics
        for request_id, finished, choices, prompt_logprobs, req_metrics in deltas:
            stream = self._streams.get(request_id)
            if stream is None:  # aborted meanwhile
                continue
            new = stream.apply(finished, choices, prompt_logprobs, req_metrics)
            if new and metrics is not None:
                if stream.streamed:
                    _observe_streamed(metrics, stream, choices, now)
                else:  # its whole output at once: latencies from the engine's clock
                    _observe_final(metrics, stream, now)
            if finished:
                self._forget(request_id)
                if metrics is not None:
                    _observe_finished(metrics, stream, now - stream.arrival)
            stream.wake(stream)

    def _on_engine_exit(self) -> None:
        lost, self._alive = self._alive, False
        self._end_all(RuntimeError("the engine process exited"))
        if lost:  # (not this side's shutdown; its pipe may close just before it is reaped)
            self.lost = True
            logger.error("the engine process exited unexpectedly (exit code %s)", _wait_exit(self._proc, 1.0))
            if self.on_lost is not None:
                self.on_lost()

    def _end_all(self, error: BaseException) -> None:
        while self._stats_asked:  # (no answer will come)
            _answer(self._stats_asked.popleft(), self._stats)
        self._end(list(self._streams), error)

    def _end(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            stream = self._forget(request_id)
            if stream is not None:
                stream.end(error)
                stream.wake(stream)


def _answer(future: asyncio.Future, value: Any) -> None:
    if not future.done():  # (a scrape whose client left was cancelled)
        future.set_result(value)


def merge_steps(messages: list[tuple]) -> list[tuple]:
    """The engine's messages in order, each run of consecutive steps as one ("step", deltas, latest stats,
    [tokens computed per step]), a request's deltas over the run joined into one: when the event loop fell behind,
    each request is then extended, detokenized and woken once for the run, not once per step, so the work of
    catching up shrinks as the backlog grows."""
    out: list[tuple] = []
    run: list[tuple] = []
    for msg in [*messages, ("end",)]:
        if msg[0] == "step":
            run.append(msg)
            continue
        if len(run) == 1:
            out.append(("step", run[0][1], run[0][2], [run[0][3]]))
        elif run:
            joined: dict[str, tuple] = {}
            for _, deltas, _, _ in run:
                for delta in deltas:
                    prev = joined.get(delta[0])
                    joined[delta[0]] = delta if prev is None else _join_deltas(prev, delta)
            out.append(("step", list(joined.values()), run[-1][2], [m[3] for m in run]))
        run = []
        if msg[0] != "end":
            out.append(msg)
    return out


def _join_deltas(a: tuple, b: tuple) -> tuple:
    """One request's delta `a` followed by its next one, `b` (the format of OutputProcessor.collect_messages)."""
    choices = {c[0]: c for c in a[2]}
    for c in b[2]:
        old = choices.get(c[0])
        if old is None:
            choices[c[0]] = c
            continue
        logprobs = old[3] + c[3] if old[3] is not None and c[3] is not None else old[3] or c[3]
        choices[c[0]] = (c[0], old[1] + c[1], old[2] + c[2], logprobs, c[4], c[5], c[6])
    prompt_logprobs = a[3] if a[3] is not None else b[3]
    # (a request's final metrics come with its last delta: nothing follows them)
    return b[0], b[1], sorted(choices.values(), key=lambda c: c[0]), prompt_logprobs, b[4]


def _finish_lags(out: Any) -> list[float]:
    """How much earlier than the last of a finished request's choices each one finished (the engine's timestamps;
    all 0 where some choice has none: it did not finish)."""
    ends = [t[2] for t in (out.metrics or {}).get("choices", [])]
    if not ends or None in ends:
        return [0.0] * len(out.outputs)
    return [max(ends) - end for end in ends]


def _observe_finished(metrics: ServerMetrics, stream: RequestStream, e2e_seconds: float) -> None:
    """A request the engine finished: each choice's finish reason and latency (each of vLLM's n child requests
    ends when its last token comes: `e2e_seconds`, the last one's, less how much earlier the engine finished it),
    its tokens, parameters, and where its time went (the engine's timestamps, sent with its final output)."""
    out = stream.output
    metrics.observe_finished([o.finish_reason for o in out.outputs], [e2e_seconds - lag for lag in _finish_lags(out)])
    choice_tokens = [len(o.token_ids) for o in out.outputs]
    metrics.observe_request(len(out.prompt_token_ids), choice_tokens, stream.asked_n, stream.params, out.metrics or {})


def _observe_final(metrics: ServerMetrics, stream: RequestStream, now: float) -> None:
    """TTFT and inter-token latency of a request reported only when it finished, per choice (vLLM's n child
    requests): its first token's time from the engine (time.monotonic is one clock for every process), the mean
    gap after it for each later token, up to its end (`now` for the last choice to finish)."""
    out = stream.output
    for o, (_, first, _), lag in zip(out.outputs, out.metrics.get("choices") or [], _finish_lags(out)):
        if first is None:
            continue
        metrics.observe_first_token(max(0.0, first - stream.arrival))
        steps = len(o.token_ids) - 1
        if steps > 0:
            metrics.observe_inter_token(max(0.0, now - lag - first) / steps, steps)


def _observe_streamed(metrics: ServerMetrics, stream: RequestStream, choices: list[tuple], now: float) -> None:
    """Per choice (vLLM's n child requests): TTFT at its first token; then one inter-token latency per token, the
    gap since its last report shared by the tokens it brought (a step may bring several: speculation, an
    overlapped step drained)."""
    outs, last = stream.output.outputs, stream.last_token_times
    for choice in choices:
        index, new = choice[0], len(choice[1])
        if not new:
            continue
        if len(outs[index].token_ids) == new:  # its first tokens
            metrics.observe_first_token(now - stream.arrival)
            later, gap = new - 1, 0.0
        else:
            later, gap = new, (now - last[index]) / new
        if later:
            metrics.observe_inter_token(gap, later)
        last[index] = now
