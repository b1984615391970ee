"""One HTTP request's engine requests (one per prompt), read back as they grow: what the completion, chat and
Responses routes share. A plain request's handler is woken as each of its requests finishes, and `collect_finals`
returns once all have; a stream's new output is written at every engine step (server/event_stream.py), by the
step's own callback when it can (`RequestGroup.push`, set by the stream), else by the request's task, woken here.
A client that goes away has its requests aborted, which frees their KV blocks before the next step; a client that
stops reading is aborted after MINISERVE_STREAM_STALL_TIMEOUT."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import Request

from miniserve.engine.sampler import bad_words_token_ids
from miniserve.server import responses as fmt
from miniserve.server.engine_process import RequestStream
from miniserve.server.protocol import (
    APIError,
    SamplingFields,
    param_from_value_error,
)
from miniserve.server.state import ClientDisconnected, ServerState

logger = logging.getLogger("miniserve.server")


class RequestGroup:
    """The engine requests (one per prompt) behind one HTTP request, read back as one output stream.

    The engine process's outputs extend each request's cumulative output in place and mark it changed; the
    handler wakes on one asyncio.Event: when streaming, at every step whose output `push` did not take; only when
    a request ends otherwise. A streaming handler that has not taken what is new for stream_stall_timeout seconds
    (its client stopped reading, so the send blocks) has its requests aborted."""

    def __init__(self, state: ServerState, base_id: str, streaming: bool):
        self.state = state
        self.base_id = base_id
        self.streaming = streaming
        self.streams: list[RequestStream] = []
        self.changed = asyncio.Event()
        self.dirty: dict[int, None] = {}  # prompt indexes changed since the handler last looked (ordered set)
        self.index: dict[str, int] = {}
        self.pending_since: float | None = None  # when output started waiting for the handler
        self.disconnected = False
        self.ended_by: str | None = None  # "shutdown" or "stalled" when the server ended it
        # a stream's writer of new output, tried before waking the handler (False: it took nothing)
        self.push: Callable[[list[tuple[int, Any]]], bool] | None = None

    async def start(
        self, prompts: list[list[int]], params: list[Any], prompt_param: str, n: int, priority: int = 0
    ) -> None:
        """Post every prompt (the request asked for `n` choices of each, at its `priority`), all before the engine
        answers (so it takes them in one step); if one is rejected, abort the others and raise a 4xx. A compiled
        grammar travels with the request that first needs it (engine/structured_output.py: GrammarCompiler.payload)."""
        self.state.groups.add(self)
        batch = []
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                rid = f"{self.base_id}-{i}"
                self.index[rid] = i
                stream = RequestStream(rid, ids, p, self._wake, self.state.tokenizer, n)
                self.streams.append(stream)
                batch.append((rid, ids, p, stream, await self._engine_work(p), priority))
            await self.state.engine.add_requests(batch)
            if self.state.server.enable_log_requests:
                for rid, ids, p, *_ in batch:
                    self._log_request(rid, ids, p)
        except ValueError as exc:  # the engine's validation: token ids, context or KV pool too small, a sampling field
            self.abort()
            raise APIError(str(exc), param=param_from_value_error(str(exc), SamplingFields) or prompt_param) from None
        except BaseException:
            self.abort()
            raise

    def _log_request(self, request_id: str, ids: list[int], params: Any) -> None:
        """vLLM's --enable-log-requests line: the prompt's text and ids, each cut at max_log_len."""
        cut = self.state.server.max_log_len
        shown = ids if cut is None else ids[:cut]
        text = self.state.tokenizer.decode(shown, skip_special_tokens=False)
        text = text if cut is None else text[:cut]
        line = "Received request %s: prompt: %r, params: %s, prompt_token_ids: %s"
        logger.info(line, request_id, text, params, shown)

    async def _engine_work(self, p: Any) -> str | None:
        """What the engine's step loop should not do, done here on a worker thread: bad words tokenized, and the
        grammar's payload (serialized: megabytes for a large vocabulary), which this returns."""
        state = self.state
        if p.bad_words and p.bad_words_token_ids is None:
            p.bad_words_token_ids = await state.run_cpu(bad_words_token_ids, state.tokenizer, p.bad_words)
        if p.structured_outputs is None:
            return None
        return await state.run_cpu(state.grammars.payload, p.structured_outputs, pool=state.grammar_cpu)

    def abort(self, ended_by: str | None = None) -> None:
        """Abort every unfinished request (a no-op for finished ones); `ended_by` says the server did it."""
        if ended_by is not None and self.ended_by is None and not all(s.done for s in self.streams):
            self.ended_by = ended_by
        for stream in self.streams:
            if not stream.done:
                self.state.engine.abort(stream.request_id)
        self.state.groups.discard(self)

    def _wake(self, stream: RequestStream) -> None:
        if not (self.streaming or stream.done):
            return
        index = self.index[stream.request_id]
        # (while the handler has not taken what is pending, new output waits behind it: order is kept)
        pushable = self.push is not None and not stream.done and not self.changed.is_set()
        if pushable and self.push([(index, stream.output)]):
            return
        self.dirty[index] = None
        if not self.changed.is_set():
            self.changed.set()
            self.pending_since = time.monotonic()
        elif self.streaming and self.pending_since is not None and not stream.done:
            stall = self.state.server.stream_stall_timeout
            if time.monotonic() - self.pending_since > stall:
                logger.warning("%s: the client has not read for %.1fs, aborting it", self.base_id, stall)
                self.abort("stalled")

    async def results(self, request: Request) -> AsyncIterator[list[tuple[int, Any]]]:
        """Batches of (prompt index, cumulative RequestOutput) that changed, until all finish; aborts the rest
        when closed early (client gone, error)."""
        watcher = asyncio.ensure_future(self._watch_disconnect(request))
        try:
            while True:
                await self.changed.wait()
                self.changed.clear()
                self.pending_since = None
                if self.disconnected:
                    raise ClientDisconnected()
                changed = [(i, self.streams[i]) for i in self.dirty]
                self.dirty.clear()
                for _, stream in changed:
                    if stream.error is not None:
                        raise APIError(f"generation failed: {stream.error}", status=500, code="engine_error")
                yield [(i, stream.output) for i, stream in changed]
                # (output that came while the handler was busy with this batch, the last included, is taken next)
                if not self.dirty and all(s.done for s in self.streams):
                    return
        finally:
            watcher.cancel()
            self.abort()

    async def _watch_disconnect(self, request: Request) -> None:
        """Marks the group when the client goes away (the body was already read, so only disconnect can come)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        self.changed.set()


async def collect_finals(group: RequestGroup, request: Request) -> dict[int, Any] | None:
    """Every request's final output by prompt index; None when the client left; 503 when the server ended it."""
    finals: dict[int, Any] = {}
    try:
        async with aclosing(group.results(request)) as results:
            async for batch in results:
                finals.update(batch)
    except ClientDisconnected:
        return None
    if group.ended_by == "shutdown":
        raise APIError("the server is shutting down; retry the request", status=503, code="shutting_down")
    return finals


def response_head(group: RequestGroup, request: Request, given: str | None, prefix: str, kind: str) -> dict:
    """A response's id, object, created and model. The id as vLLM makes it: `prefix` and the client's X-Request-Id
    header, else its request_id field; the group's own id when it gave neither (the engine's request ids stay the
    server's: clients may repeat theirs)."""
    return answer_head(group.state.model_name, group.base_id, request, given, prefix, kind)


def answer_head(model: str, own_id: str, request: Request, given: str | None, prefix: str, kind: str) -> dict:
    """`response_head` for an answer made of several groups (or none): `own_id` where the client gave no id."""
    client_id = request.headers.get("x-request-id") or given
    response_id = f"{prefix}-{client_id}" if client_id else own_id
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": model}


def request_usage(prompt_ids: list[list[int]], outputs: list[Any]) -> dict[str, Any]:
    completion_tokens = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    return fmt.usage(sum(len(ids) for ids in prompt_ids), completion_tokens, outputs)


def stream_usage(req: SamplingFields, prompt_ids: list[list[int]], trackers: dict) -> Any:
    """With stream_options.continuous_usage_stats (and include_usage), every chunk carries its choice's usage so
    far: its prompt's tokens and the tokens of that choice alone, as vLLM's chunks (the closing usage chunk has the
    request's totals). None without the option."""
    opts = req.stream_options
    if not (opts and opts.include_usage and opts.continuous_usage_stats):
        return None

    def now(i: int, j: int) -> dict[str, Any]:
        prompt, completion = len(prompt_ids[i]), trackers[(i, j)].num_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    return now


def structured_spec(req: SamplingFields) -> tuple[str, dict[str, Any]] | None:
    """(the field it came from, StructuredOutputsParams keywords), or None: the request's output constraint."""
    try:
        return req.structured_spec()
    except ValueError as exc:
        raise APIError(str(exc), param=param_from_value_error(str(exc), type(req))) from None
