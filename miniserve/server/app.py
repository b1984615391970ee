"""The OpenAI-compatible HTTP server: app factory, routes, auth, errors, and `run_server` for the CLI.

Requests flow: parse + validate the JSON body (OpenAI error shape on failure) -> check the prompt's size ->
tokenize (in a worker thread, off the event loop) -> check the context budget -> post one engine request per
prompt to the engine process (engine_process.py) -> read the cumulative outputs back as they grow, either
collecting them (plain JSON, woken once at the end) or diffing them into SSE chunks (stream=true, woken once per
engine step, several steps' tokens in one chunk when the client fell behind).
A client that goes away has its engine requests aborted, which frees their KV blocks before the next step; a
client that stops reading is aborted after MINISERVE_STREAM_STALL_TIMEOUT. On SIGTERM/SIGINT the server stops
accepting, lets requests finish for at most MINISERVE_DRAIN_TIMEOUT seconds, then ends the rest (finish_reason
"abort" on streams, 503 otherwise); a second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from miniserve.config import EngineConfig, ServerConfig
from miniserve.engine.sampler import bad_words_token_ids
from miniserve.engine.stop_strings import check_stop_strings
from miniserve.engine.structured_output import GrammarCompiler, StructuredOutputsUnavailable
from miniserve.sampling_params import StructuredOutputsParams
from miniserve.server import responses as fmt
from miniserve.server.connection import ConnectionLimits, guarded_h11
from miniserve.server.engine_process import EngineProcess, RequestStream
from miniserve.server.json_body import decode_json
from miniserve.server.metrics import ServerMetrics
from miniserve.server.middleware import CatchAll, RequireAPIKey
from miniserve.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    param_from_value_error,
    parse_request,
)
from miniserve.server.request_params import pick_best, sampling_params
from miniserve.server.tool_calls import ToolSetup, tool_setup
from miniserve.settings import from_sources

logger = logging.getLogger("miniserve.server")

CPU_THREADS = 4  # tokenizing and chat templates run here, not on the event loop


# ---------------------------------------------------------------------------------------------- loading


def load_tokenizer(config: EngineConfig) -> Any:
    from miniserve.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(config.tokenizer or config.model)


def max_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters one token stands for: the longest vocabulary entry as stored (a byte
    token "<0x41>" or a byte-level "Ġ" pair is never shorter than the text it decodes to), doubled for
    normalizers that compose characters. A text longer than limit * this has more than `limit` tokens."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return 2 * max((len(token) for token in vocab), default=1)


# ---------------------------------------------------------------------------------------------- state


class ServerState:
    """The engine process, the tokenizer, metrics, the requests in flight, and the helpers every route shares."""

    def __init__(
        self, config: EngineConfig, server: ServerConfig, engine: EngineProcess, tokenizer: Any, token_chars: int
    ):
        self.config, self.server = config, server
        self.engine = engine
        self.tokenizer = tokenizer
        self.token_chars = token_chars
        self.max_model_len: int = engine.info["max_model_len"]
        self.vocab_size: int = engine.info["vocab_size"]
        self.model_name: str = server.served_model_name or engine.info["model_name"]
        self.metrics = ServerMetrics(engine.stats, self.model_name, engine.info["cache_config"])
        engine.metrics = self.metrics
        # structured outputs compile here, off the event loop and off the engine's step loop (structured_output.py)
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, engine.info["eos_token_ids"])
        self.grammars_warming = False
        self.cpu = ThreadPoolExecutor(CPU_THREADS, thread_name_prefix="miniserve-cpu")
        self.groups: set[RequestGroup] = set()  # requests in flight (what a shutdown drains)
        self.draining = False

    async def run_cpu(self, fn: Any, *args: Any) -> Any:
        """fn(*args) on a worker thread: tokenizing a long prompt or rendering a template must not stall the
        event loop (the tokenizer releases the GIL on long texts, see Tokenizer.encode)."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)

    def check_prompt_chars(self, num_chars: int, what: str, for_generation: bool = True) -> None:
        """400 for a text prompt too long to take, decided before tokenizing it (for /tokenize, by the
        character limit alone: it does not generate)."""
        limit = self.server.max_prompt_chars
        if num_chars > limit:
            raise APIError(
                f"the {what} has {num_chars} characters, more than this server accepts ({limit}, "
                "MINISERVE_MAX_PROMPT_CHARS)",
                param=what,
                code="prompt_too_long",
            )
        tokens = self.server.max_prompt_tokens or self.max_model_len
        if for_generation and num_chars > tokens * self.token_chars:  # more tokens than that, however it splits
            self.check_prompt_tokens(tokens + 1, what)

    def check_prompt_tokens(self, num_tokens: int, what: str) -> None:
        limit = self.server.max_prompt_tokens
        if limit is not None and num_tokens > limit:
            raise APIError(
                f"the {what} has {num_tokens} tokens, more than this server accepts ({limit}, "
                "MINISERVE_MAX_PROMPT_TOKENS)",
                param=what,
                code="prompt_too_long",
            )
        if num_tokens >= self.max_model_len:
            self.token_budget(num_tokens, None, what)

    async def encode_prompts(
        self, prompts: list[str | list[int]], add_special_tokens: bool = True, truncate: int | None = None
    ) -> list[list[int]]:
        """Token ids of every prompt, size limits checked (text ones tokenized off the event loop), each cut to
        its last `truncate` tokens when longer (truncate_prompt_tokens)."""
        for p in prompts:
            if isinstance(p, str):  # a prompt to be truncated may have more tokens than the limit
                self.check_prompt_chars(len(p), "prompt", for_generation=truncate is None)
        if any(isinstance(p, str) for p in prompts):
            tok = self.tokenizer
            specials = add_special_tokens
            prompts = await self.run_cpu(
                lambda: [tok.encode(p, add_special_tokens=specials) if isinstance(p, str) else p for p in prompts]
            )
        prompts = [self.truncate(ids, truncate) for ids in prompts]
        for ids in prompts:
            self.check_prompt_tokens(len(ids), "prompt")
        return prompts

    async def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        for_generation: bool = True,
        truncate: int | None = None,
        **options: Any,
    ) -> list[int]:
        """The rendered chat's token ids, size limits checked (rendered and tokenized off the event loop);
        `options` go to Tokenizer.encode_chat (tools, chat_template, continue_final_message...)."""
        chars = sum(len(m.get("content") or "") for m in messages)
        self.check_prompt_chars(chars, "messages", for_generation and truncate is None)
        try:
            ids = await self.run_cpu(lambda: self.tokenizer.encode_chat(messages, add_generation_prompt, **options))
        except Exception as exc:  # jinja errors from the template (e.g. "roles must alternate")
            raise APIError(f"the chat template failed: {exc}", param="messages") from None
        ids = self.truncate(ids, truncate)
        if for_generation:
            self.check_prompt_tokens(len(ids), "messages")
        return ids

    def truncate(self, ids: list[int], keep: int | None) -> list[int]:
        """truncate_prompt_tokens: keep the prompt's last `keep` tokens (-1: as many as the context holds)."""
        if keep == -1:
            keep = self.max_model_len - 1  # at least one token of room to generate
        return ids[-keep:] if keep is not None and len(ids) > keep else ids

    async def compile_constraint(self, spec: tuple[str, dict[str, Any]] | None) -> StructuredOutputsParams | None:
        """A request's output constraint as StructuredOutputsParams, its grammar compiled (on a worker thread,
        cached): a bad schema/regex/grammar, or no xgrammar, is a 400 naming the field it came from."""
        if spec is None:
            return None
        if not self.grammars_warming:  # the engine gets ready while this process compiles the first grammar
            self.grammars_warming = True
            self.engine.warm_grammars()
        field, kwargs = spec
        try:
            params = StructuredOutputsParams(**kwargs)
            await self.run_cpu(self.grammars.compile, params)
        except (ValueError, StructuredOutputsUnavailable) as exc:
            raise APIError(f"{field}: {exc}", param=field) from None
        return params

    def begin_drain(self) -> None:
        """First shutdown signal: refuse new requests; end the ones still running after drain_timeout."""
        if self.engine.accepting:
            self.engine.accepting = False
            logger.info("shutting down: draining %d requests for at most %.1fs", len(self.groups), self.drain_s)
            asyncio.get_running_loop().call_later(self.drain_s, self._end_in_flight)

    @property
    def drain_s(self) -> float:
        return self.server.drain_timeout

    def _end_in_flight(self) -> None:
        if self.groups:
            logger.warning("drain timeout: ending %d requests still in flight", len(self.groups))
        for group in list(self.groups):
            group.abort("shutdown")

    async def parse(self, request: Request, model: type) -> Any:
        """Read, decode and validate the body as `model`, then check the model name it asks for. Fields no schema
        knows are ignored with one warning (as vLLM does); every known field is honoured or refused (400)."""
        req = parse_request(model, await read_json(request, self.server.max_body_bytes))
        ignored = req.ignored_fields()
        if ignored:
            logger.warning("%s %s: fields ignored (not in the API): %s", request.method, request.url.path, ignored)
        self.check_model(req.model)
        return req

    def check_stop(self, req: SamplingFields) -> None:
        """The engine's bounds on the stop list, checked before any prompt is tokenized."""
        stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
        config = self.config
        try:
            check_stop_strings(stops, config.max_stop_strings, config.max_stop_string_length)
        except ValueError as exc:
            raise APIError(str(exc), param="stop") from None

    def check_prompt_count(self, count: int) -> None:
        limit = self.server.max_prompts_per_request
        if count > limit:
            raise APIError(
                f"prompt: {count} prompts in one request, more than the limit of {limit} "
                "(MINISERVE_MAX_PROMPTS_PER_REQUEST); split the batch",
                param="prompt",
            )

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                status=404,
                param="model",
                code="model_not_found",
            )

    def token_budget(self, prompt_len: int, max_tokens: int | None, what: str, param: str = "max_tokens") -> int:
        """max_tokens for this prompt (None = the rest of the context); 400 if it cannot fit."""
        limit = self.max_model_len
        if prompt_len >= limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens, but the {what} has {prompt_len} "
                f"tokens, which leaves no room for the completion. Please reduce the length of the {what}.",
                param=what,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
                f"completion). Please reduce the length of the {what} or completion.",
                param=param,
                code="context_length_exceeded",
            )
        return max_tokens


# ---------------------------------------------------------------------------------------------- requests


class ClientDisconnected(Exception):
    pass


async def read_json(request: Request, limit: int) -> Any:
    """The decoded JSON body; 413 past `limit` bytes (checked while reading), 400 if it is not usable JSON."""
    too_large = APIError(
        f"request body is larger than the limit of {limit} bytes", status=413, code="request_too_large"
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise ClientDisconnected() from None
    return decode_json(bytes(body))


class RequestGroup:
    """The engine requests (one per prompt) behind one HTTP request, read back as one output stream.

    The engine process's outputs extend each request's cumulative output in place and mark it changed; the
    handler wakes on one asyncio.Event: at every step when streaming, only when a request ends otherwise. A
    streaming handler that has not taken what is new for stream_stall_timeout seconds (its client stopped
    reading, so the send blocks) has its requests aborted."""

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

    async def start(self, prompts: list[list[int]], params: list[Any], prompt_param: str) -> None:
        """Post every prompt; if one is rejected, abort the ones already posted and raise a 4xx. A compiled grammar
        travels with the request that first needs it (engine/structured_output.py: GrammarCompiler.payload)."""
        self.state.groups.add(self)
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                rid = f"{self.base_id}-{i}"
                self.index[rid] = i
                stream = RequestStream(rid, ids, p, self._wake, self.state.tokenizer)
                self.streams.append(stream)
                await self.state.engine.add_request(rid, ids, p, stream, await self._engine_work(p))
        except ValueError as exc:  # the engine's validation: token ids, context or KV pool too small
            self.abort()
            raise APIError(str(exc), param=prompt_param) from None
        except BaseException:
            self.abort()
            raise

    async def _engine_work(self, p: Any) -> str | None:
        """What the engine's step loop should not do, done here on a worker thread: bad words tokenized, and the
        grammar's payload (serialized: megabytes for a large vocabulary), which this returns."""
        state = self.state
        if p.bad_words and p.bad_words_token_ids is None:
            p.bad_words_token_ids = await state.run_cpu(bad_words_token_ids, state.tokenizer, p.bad_words)
        if p.structured_outputs is None:
            return None
        return await state.run_cpu(state.grammars.payload, p.structured_outputs)

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
        self.dirty[self.index[stream.request_id]] = None
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
                if all(s.done for s in self.streams):
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


def _sse_response(chunks: AsyncIterator[bytes], group: RequestGroup) -> StreamingResponse:
    async def abort() -> None:  # covers a client that leaves before the generator even starts
        group.abort()

    return StreamingResponse(
        chunks,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
        background=BackgroundTask(abort),
    )


# ---------------------------------------------------------------------------------------------- completions


async def create_completion(request: Request) -> Response:
    state = _state(request)
    req: CompletionRequest = await state.parse(request, CompletionRequest)
    state.check_prompt_count(len(req.prompts()))
    state.check_stop(req)
    structured = await state.compile_constraint(_structured_spec(req))
    prompt_ids = await state.encode_prompts(req.prompts(), req.add_special_tokens, req.truncate_prompt_tokens)
    params = [
        sampling_params(
            req,
            state.token_budget(len(ids), req.max_tokens, "prompt"),
            req.logprobs,
            state.vocab_size,
            _prompt_logprobs(req),
            structured,
        )
        for ids in prompt_ids
    ]
    group = RequestGroup(state, f"cmpl-{uuid.uuid4().hex}", req.stream)
    await group.start(prompt_ids, params, "prompt")
    prompt_texts = _echo_texts(state, req, prompt_ids) if req.echo else None
    head = {
        "id": req.request_id or group.base_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
    }
    if req.stream:
        return _sse_response(_stream_completion(state, req, request, group, head, prompt_ids, prompt_texts), group)
    finals = await _collect(group, request)
    if finals is None:
        return Response(status_code=499)
    choices = _completion_choices(state, req, prompt_ids, prompt_texts, finals)
    return fmt.JSONBytesResponse({**head, "choices": choices, "usage": _usage(prompt_ids, list(finals.values()))})


def _prompt_logprobs(req: CompletionRequest) -> int | None:
    """Top-N logprobs the prompt is scored with: echo with logprobs (the legacy format) and vLLM's prompt_logprobs
    share one pass."""
    asked = [n for n in (req.logprobs if req.echo else None, req.prompt_logprobs) if n is not None]
    return max(asked, default=None)


def _echo_texts(state: ServerState, req: CompletionRequest, prompt_ids: list[list[int]]) -> list[str]:
    """The prompts as echoed: as sent, or as the model saw them when they were token ids or may have been cut."""
    as_sent = req.truncate_prompt_tokens is None
    return [
        p if isinstance(p, str) and as_sent else state.tokenizer.decode(ids)
        for p, ids in zip(req.prompts(), prompt_ids)
    ]


def _completion_choices(
    state: ServerState,
    req: CompletionRequest,
    prompt_ids: list[list[int]],
    prompt_texts: list[str] | None,
    finals: dict[int, Any],
) -> list[dict[str, Any]]:
    tok, as_ids = state.tokenizer, bool(req.return_tokens_as_token_ids)
    choices = []
    for i, ids in enumerate(prompt_ids):
        for o in pick_best(finals[i], req):
            lp = None
            if req.logprobs is not None:
                start = len(prompt_texts[i]) if prompt_texts else 0
                lp = fmt.completion_logprobs(tok, ids, o.token_ids, o.logprobs, req.logprobs, start, as_ids)
                if prompt_texts:
                    plp = fmt.prompt_logprobs(tok, ids, finals[i].prompt_logprobs, req.logprobs, as_ids)
                    lp = fmt.join_logprobs(plp, lp)
            choice = {
                "index": i * req.n + o.index,
                "text": (prompt_texts[i] if prompt_texts else "") + o.text,
                "logprobs": lp,
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
            }
            choices.append({**choice, **_completion_extras(state, req, ids, finals[i], o.token_ids)})
    choices.sort(key=lambda c: c["index"])
    return choices


def _structured_spec(req: SamplingFields) -> tuple[str, dict[str, Any]] | None:
    """(the field it came from, StructuredOutputsParams keywords), or None: the request's output constraint."""
    try:
        return req.structured_spec()
    except ValueError as exc:
        raise APIError(str(exc), param=param_from_value_error(str(exc), type(req))) from None


def _completion_extras(
    state: ServerState, req: CompletionRequest, prompt_ids: list[int], out: Any, token_ids: list[int] | None
) -> dict[str, Any]:
    """vLLM's per-choice extras: prompt_logprobs, and with return_token_ids the prompt's and the choice's ids."""
    extras: dict[str, Any] = {}
    if req.prompt_logprobs is not None:
        extras["prompt_logprobs"] = fmt.vllm_prompt_logprobs(
            state.tokenizer, prompt_ids, out.prompt_logprobs, req.prompt_logprobs, bool(req.return_tokens_as_token_ids)
        )
    if req.return_token_ids:
        extras["prompt_token_ids"] = prompt_ids
        if token_ids is not None:
            extras["token_ids"] = token_ids
    return extras


async def _stream_completion(
    state: ServerState,
    req: CompletionRequest,
    request: Request,
    group: RequestGroup,
    head: dict,
    prompt_ids: list[list[int]],
    prompt_texts: list[str] | None,
) -> AsyncIterator[bytes]:
    trackers = {(i, j): fmt.ChoiceTracker(ids) for i, ids in enumerate(prompt_ids) for j in range(req.n)}
    offsets = {(i, j): len(prompt_texts[i]) if prompt_texts else 0 for i, j in trackers}
    # the prompt's logprobs (legacy echo format or vLLM's prompt_logprobs) come with the choice's first output
    prompt_later = (bool(prompt_texts) and req.logprobs is not None) or req.prompt_logprobs is not None
    finals: dict[int, Any] = {}
    as_ids = bool(req.return_tokens_as_token_ids)
    usage = _stream_usage(req, prompt_ids, trackers)

    def chunk(i: int, j: int, text: str, logprobs: Any = None, finish: Any = None, stop: Any = None, **extra) -> bytes:
        return fmt.choice_chunk(head, i * req.n + j, {"text": text}, logprobs, finish, stop, extra, usage())

    try:
        if prompt_texts and not prompt_later:
            for i, j in trackers:
                yield chunk(i, j, prompt_texts[i])
        started: set[tuple[int, int]] = set()
        async with aclosing(_deltas(group, request, trackers, finals)) as deltas:
            async for i, o, d in deltas:
                first = (i, o.index) not in started
                started.add((i, o.index))
                if first and prompt_later:
                    plp = None
                    if prompt_texts and req.logprobs is not None:
                        plp = fmt.prompt_logprobs(
                            state.tokenizer, prompt_ids[i], finals[i].prompt_logprobs, req.logprobs, as_ids
                        )
                    extras = _completion_extras(state, req, prompt_ids[i], finals[i], None)
                    yield chunk(i, o.index, prompt_texts[i] if prompt_texts else "", plp, **extras)
                lp = None
                if req.logprobs is not None and d.token_ids:
                    offset = offsets[(i, o.index)]
                    lp = fmt.completion_logprobs(
                        state.tokenizer, d.context, d.token_ids, d.logprobs, req.logprobs, offset, as_ids
                    )
                    offsets[(i, o.index)] += sum(len(t) for t in lp["tokens"])
                if d.text or lp or d.finished_now or (req.return_token_ids and d.token_ids):
                    finish = o.finish_reason if d.finished_now else None
                    stop = o.stop_reason if d.finished_now else None
                    extra = {"token_ids": d.token_ids} if req.return_token_ids else {}
                    if req.return_token_ids and first and not prompt_later:
                        extra["prompt_token_ids"] = prompt_ids[i]
                    yield chunk(i, o.index, d.text, lp, finish, stop, **extra)
        if req.stream_options and req.stream_options.include_usage:
            yield fmt.sse({**head, "choices": [], "usage": _usage(prompt_ids, list(finals.values()))})
    except ClientDisconnected:
        return
    except APIError as exc:
        yield fmt.sse(exc.body())
    yield fmt.SSE_DONE


def _stream_usage(req: SamplingFields, prompt_ids: list[list[int]], trackers: dict) -> Any:
    """With stream_options.continuous_usage_stats (and include_usage), every chunk carries the usage so far."""
    opts = req.stream_options
    if not (opts and opts.include_usage and opts.continuous_usage_stats):
        return lambda: None
    prompt = sum(len(ids) for ids in prompt_ids)

    def now() -> dict[str, Any]:
        completion = sum(t.num_tokens for t in trackers.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    return now


async def _deltas(
    group: RequestGroup, request: Request, trackers: dict[tuple[int, int], fmt.ChoiceTracker], finals: dict
) -> AsyncIterator[tuple[int, Any, fmt.Delta]]:
    """(prompt index, completion, what is new) for every choice that moved since the handler last looked (one
    engine step, or several when the client was slow); fills `finals`."""
    async with aclosing(group.results(request)) as results:
        async for batch in results:
            for i, out in batch:
                finals[i] = out
                for o in out.outputs:
                    tracker = trackers[(i, o.index)]
                    if not tracker.finished:
                        yield i, o, tracker.advance(o)


async def _collect(group: RequestGroup, request: Request) -> dict[int, Any] | None:
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


def _usage(prompt_ids: list[list[int]], outputs: list[Any]) -> dict[str, Any]:
    completion_tokens = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    return fmt.usage(sum(len(ids) for ids in prompt_ids), completion_tokens, outputs)


# ---------------------------------------------------------------------------------------------- chat


async def create_chat_completion(request: Request) -> Response:
    state = _state(request)
    req: ChatCompletionRequest = await state.parse(request, ChatCompletionRequest)
    state.check_stop(req)
    tools = tool_setup(req, state.tokenizer.chat_template)
    structured = await state.compile_constraint(_chat_constraint(req, tools))
    ids = await _chat_ids(state, req, tools)
    top = (req.top_logprobs or 0) if req.logprobs else None
    budget_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    budget = state.token_budget(len(ids), req.token_budget(), "messages", budget_param)
    params = sampling_params(req, budget, top, state.vocab_size, req.prompt_logprobs, structured)
    group = RequestGroup(state, f"chatcmpl-{uuid.uuid4().hex}", req.stream)
    await group.start([ids], [params], "messages")
    head = {
        "id": req.request_id or group.base_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": state.model_name,
    }
    if req.stream:
        return _sse_response(_stream_chat(state, req, request, group, head, ids, tools), group)
    finals = await _collect(group, request)
    if finals is None:
        return Response(status_code=499)
    out = finals[0]
    body = {**head, "choices": _chat_choices(state, req, ids, out, tools), "usage": _usage([ids], [out])}
    if req.prompt_logprobs is not None:
        as_ids = bool(req.return_tokens_as_token_ids)
        body["prompt_logprobs"] = fmt.vllm_prompt_logprobs(
            state.tokenizer, ids, out.prompt_logprobs, req.prompt_logprobs, as_ids
        )
    if req.return_token_ids:
        body["prompt_token_ids"] = ids
    return fmt.JSONBytesResponse(body)


async def _chat_ids(state: ServerState, req: ChatCompletionRequest, tools: ToolSetup) -> list[int]:
    """The prompt: messages (tool calls and results included) and tools through the chat template."""
    return await state.encode_chat(
        req.chat_messages(),
        req.add_generation_prompt,
        truncate=req.truncate_prompt_tokens,
        add_special_tokens=req.add_special_tokens,
        tools=tools.tools or None,
        documents=req.documents,
        chat_template=req.chat_template,
        continue_final_message=req.continue_final_message,
        **(req.chat_template_kwargs or {}),
    )


def _chat_constraint(req: ChatCompletionRequest, tools: ToolSetup) -> tuple[str, dict[str, Any]] | None:
    """The output constraint: tool_choice required/named (their JSON schemas), else the request's own."""
    spec = _structured_spec(req)
    forced = tools.constraint()
    if forced is None:
        return spec
    if spec is not None:
        raise APIError(f"{spec[0]} cannot be combined with tool_choice {tools.mode}", param=spec[0])
    return "tool_choice", forced


def _echo_text(req: ChatCompletionRequest) -> str:
    """chat echo: the reply is prefixed with the last message when it is the assistant's (vLLM's meaning)."""
    last = req.messages[-1]
    return last.text() if req.echo and last.role == "assistant" else ""


def _chat_choices(
    state: ServerState, req: ChatCompletionRequest, ids: list[int], out: Any, tools: ToolSetup
) -> list[dict[str, Any]]:
    top = (req.top_logprobs or 0) if req.logprobs else None
    as_ids = bool(req.return_tokens_as_token_ids)
    echo = _echo_text(req)
    choices = []
    for o in pick_best(out, req):
        lp = None
        if top is not None:
            lp = fmt.chat_logprobs(state.tokenizer, ids, o.token_ids, o.logprobs, top, as_ids)
        message, finish = tools.message(o.text, o.finish_reason, echo)
        choice = {
            "index": o.index,
            "message": message,
            "logprobs": lp,
            "finish_reason": finish,
            "stop_reason": o.stop_reason,
        }
        if req.return_token_ids:
            choice["token_ids"] = o.token_ids
        choices.append(choice)
    return choices


async def _stream_chat(
    state: ServerState,
    req: ChatCompletionRequest,
    request: Request,
    group: RequestGroup,
    head: dict,
    ids: list[int],
    tools: ToolSetup,
) -> AsyncIterator[bytes]:
    head = {**head, "object": "chat.completion.chunk"}
    parsers = {j: tools.parser() for j in range(req.n)}
    num_calls = dict.fromkeys(range(req.n), 0)
    top = (req.top_logprobs or 0) if req.logprobs else None
    trackers = {(0, j): fmt.ChoiceTracker(ids) for j in range(req.n)}
    finals: dict[int, Any] = {}
    as_ids = bool(req.return_tokens_as_token_ids)
    usage = _stream_usage(req, [ids], trackers)

    def chunk(index: int, delta: dict, logprobs: Any = None, finish: Any = None, stop: Any = None, **extra) -> bytes:
        return fmt.choice_chunk(head, index, {"delta": delta}, logprobs, finish, stop, extra, usage())

    try:
        first_extra = {"prompt_token_ids": ids} if req.return_token_ids else {}
        for j in range(req.n):
            yield chunk(j, {"role": "assistant", "content": _echo_text(req)}, **first_extra)
        prompt_sent = req.prompt_logprobs is None
        async with aclosing(_deltas(group, request, trackers, finals)) as deltas:
            async for _, o, d in deltas:
                if not prompt_sent:  # vLLM sends the prompt's logprobs with the first output
                    prompt_sent = True
                    plp = fmt.vllm_prompt_logprobs(
                        state.tokenizer, ids, finals[0].prompt_logprobs, req.prompt_logprobs, as_ids
                    )
                    yield fmt.sse({**head, "choices": [], "prompt_logprobs": plp})
                lp = None
                if top is not None and d.token_ids:
                    lp = fmt.chat_logprobs(state.tokenizer, d.context, d.token_ids, d.logprobs, top, as_ids)
                delta = tools.delta(parsers[o.index], num_calls, o, d.text)
                if delta or lp or d.finished_now or (req.return_token_ids and d.token_ids):
                    finish = tools.finish_reason(o.finish_reason, num_calls[o.index]) if d.finished_now else None
                    stop = o.stop_reason if d.finished_now else None
                    extra = {"token_ids": d.token_ids} if req.return_token_ids else {}
                    yield chunk(o.index, delta, lp, finish, stop, **extra)
        if req.stream_options and req.stream_options.include_usage:
            yield fmt.sse({**head, "choices": [], "usage": _usage([ids], [finals[0]])})
    except ClientDisconnected:
        return
    except APIError as exc:
        yield fmt.sse(exc.body())
    yield fmt.SSE_DONE


# ---------------------------------------------------------------------------------------------- small routes


async def list_models(request: Request) -> JSONResponse:
    state = _state(request)
    card = {
        "id": state.model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "miniserve",
        "root": state.model_name,  # the served name: where the weights sit on the server is not the client's business
        "max_model_len": state.max_model_len,
    }
    return JSONResponse({"object": "list", "data": [card]})


async def tokenize(request: Request) -> JSONResponse:
    """vLLM's /tokenize: a prompt, or messages rendered as /v1/chat/completions renders them."""
    state = _state(request)
    req: TokenizeRequest = await state.parse(request, TokenizeRequest)
    if req.messages is not None:
        ids = await state.encode_chat(
            [m.for_template() for m in req.messages],
            req.add_generation_prompt,
            for_generation=False,
            # as in chat: the template's own specials unless add_special_tokens is given explicitly
            add_special_tokens=req.add_special_tokens if "add_special_tokens" in req.model_fields_set else None,
            tools=[t.model_dump(by_alias=True, exclude_none=True) for t in req.tools] if req.tools else None,
            documents=req.documents,
            chat_template=req.chat_template,
            continue_final_message=req.continue_final_message,
            **(req.chat_template_kwargs or {}),
        )
    else:
        state.check_prompt_chars(len(req.prompt), "prompt", for_generation=False)
        ids = await state.run_cpu(state.tokenizer.encode, req.prompt, req.add_special_tokens)
    body: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}
    if req.return_token_strs:  # the vocabulary's own strings (e.g. "▁world", "Ġworld"), as vLLM returns them
        body["token_strs"] = [state.tokenizer.id_to_token(t) for t in ids]
    return fmt.JSONBytesResponse(body)


async def version(request: Request) -> JSONResponse:
    from miniserve import __version__

    return JSONResponse({"version": __version__})


async def detokenize(request: Request) -> JSONResponse:
    state = _state(request)
    req: DetokenizeRequest = await state.parse(request, DetokenizeRequest)
    vocab = state.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(f"token id {bad[0]} is out of range [0, {vocab})", param="tokens")
    return JSONResponse({"prompt": await state.run_cpu(state.tokenizer.decode, req.tokens)})


async def health(request: Request) -> JSONResponse:
    state = getattr(request.app.state, "server", None)
    if state is None or not state.engine.is_alive():
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _state(request: Request) -> ServerState:
    state = getattr(request.app.state, "server", None)
    if state is None:
        raise APIError("the model is not loaded", status=503, code="engine_unavailable")
    return state


# ---------------------------------------------------------------------------------------------- the app


def create_app(config: EngineConfig, server: ServerConfig) -> FastAPI:
    """A FastAPI app that loads the engine on startup and stops its loop on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config.check_dirs()
        tokenizer = await asyncio.to_thread(load_tokenizer, config)
        token_chars = await asyncio.to_thread(max_token_chars, tokenizer)
        engine = EngineProcess(config, max_waiting=server.max_waiting)
        await asyncio.to_thread(engine.start)
        try:
            engine.attach(asyncio.get_running_loop())
            state = ServerState(config, server, engine, tokenizer, token_chars)
            app.state.server = state
            _install_signal_handlers(state)
            logger.info("miniserve: serving %s (max_model_len %d)", state.model_name, state.max_model_len)
            yield
        finally:
            await asyncio.to_thread(engine.shutdown)
            engine.end_all()

    app = FastAPI(title="miniserve", lifespan=lifespan)
    v1 = APIRouter(prefix="/v1")  # RequireAPIKey guards every /v1 path, routed or not
    v1.add_api_route("/completions", create_completion, methods=["POST"])
    v1.add_api_route("/chat/completions", create_chat_completion, methods=["POST"])
    v1.add_api_route("/models", list_models, methods=["GET"])
    app.include_router(v1)
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/version", version, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    _add_error_handlers(app)
    app.add_middleware(RequireAPIKey, api_key=server.api_key)
    app.add_middleware(CatchAll)  # added last: the outermost layer
    return app


def _install_signal_handlers(state: ServerState) -> None:
    """Chain onto the server's SIGTERM/SIGINT handlers (uvicorn's: stop accepting, wait for responses): the first
    signal also starts the bounded drain, a second one exits at once."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            if state.draining:
                logger.warning("second signal: exiting now")
                state.engine.kill()
                os._exit(128 + signum)
            state.draining = True
            loop.call_soon_threadsafe(state.begin_drain)
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(str(exc.detail), status=exc.status_code, code=f"http_{exc.status_code}")
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(str(exc)).body(), status_code=400)

    async def client_gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it: the client left while sending its request

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ClientDisconnected, client_gone)


# ---------------------------------------------------------------------------------------------- entry points


def settings_from_env(env: Mapping[str, str] = os.environ) -> tuple[EngineConfig, ServerConfig]:
    """What `uvicorn server:app` is configured with: the MINISERVE_* variables (checked here, so that a bad value
    or a missing model directory is one line at startup; the model itself loads in the lifespan)."""
    config = from_sources(EngineConfig, env=env)
    config.check_dirs()
    return config, from_sources(ServerConfig, env=env)


def connection_protocol(server: ServerConfig) -> type:
    """The uvicorn `http` protocol class that enforces the connection settings (server/connection.py)."""
    limits = ConnectionLimits(
        server.header_timeout, server.body_timeout, server.keep_alive_timeout, server.max_connections
    )
    return guarded_h11(limits)


def run_server(config: EngineConfig, server: ServerConfig) -> None:
    """Serve `config`'s model until interrupted (what `miniserve serve` calls)."""
    import uvicorn

    config.check_dirs()  # before uvicorn starts, so the CLI prints one clear line
    uvicorn.run(
        create_app(config, server),
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        http=connection_protocol(server),
        # past the drain, uvicorn stops waiting for connections (a client that never reads holds its send forever)
        timeout_graceful_shutdown=server.drain_timeout + 2.0,
    )
