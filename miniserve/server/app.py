"""The OpenAI-compatible HTTP server: app factory, routes, auth, errors, and `run_server` for the CLI.

Requests flow: parse + validate the JSON body (OpenAI error shape on failure) -> tokenize -> check the context
budget -> post one engine request per prompt to the AsyncEngine -> read its outputs back from an asyncio
queue, either collecting them (plain JSON) or diffing each cumulative output into SSE chunks (stream=true).
A client that goes away has its engine requests aborted, which frees their KV blocks before the next step.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from miniserve.config import DEMO_TARGET, EngineConfig
from miniserve.server import responses as fmt
from miniserve.server.connection import ConnectionLimits, guarded_h11
from miniserve.server.engine_thread import AsyncEngine
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

logger = logging.getLogger("miniserve.server")

DEFAULT_MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_WAITING = 1024
DEFAULT_MAX_PROMPTS_PER_REQUEST = 1024
_LIMITS = ConnectionLimits()  # the defaults of the connection settings


# ---------------------------------------------------------------------------------------------- settings


@dataclass
class ServerSettings:
    engine: EngineConfig
    api_key: str | None = None
    served_model_name: str | None = None  # default: the engine's model_name (model directory basename)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_waiting: int | None = DEFAULT_MAX_WAITING  # with this many requests waiting, new ones get 503
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST  # a longer `prompt` list gets 400
    # connections (enforced by the protocol class `connection_protocol()` gives uvicorn)
    header_timeout: float = _LIMITS.header_timeout
    body_timeout: float = _LIMITS.body_timeout
    keep_alive_timeout: float = _LIMITS.keep_alive_timeout
    max_connections: int | None = _LIMITS.max_connections

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes (MINISERVE_MAX_BODY_BYTES) must be >= 1, got {self.max_body_bytes}")
        if self.max_waiting is not None and self.max_waiting < 1:
            raise ValueError(f"max_waiting (MINISERVE_MAX_WAITING) must be >= 1, got {self.max_waiting}")
        if self.max_prompts_per_request < 1:
            raise ValueError(
                "max_prompts_per_request (MINISERVE_MAX_PROMPTS_PER_REQUEST) must be >= 1, "
                f"got {self.max_prompts_per_request}"
            )
        self.connection_limits()  # checks them

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(self.header_timeout, self.body_timeout, self.keep_alive_timeout, self.max_connections)

    def connection_protocol(self) -> type:
        """The uvicorn `http` protocol class that enforces the connection settings."""
        return guarded_h11(self.connection_limits())


def settings_from_env(env: Mapping[str, str] = os.environ) -> ServerSettings:
    """Read the MINISERVE_* environment variables (what `uvicorn server:app` is configured with)."""

    def num(name: str, default: int | None) -> int | None:
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {raw!r}") from None

    def text(name: str) -> str | None:
        raw = env.get(name)
        return raw if raw else None

    def seconds(name: str, default: float) -> float:
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None

    def flag(name: str, default: bool) -> bool:
        raw = env.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {raw!r}")

    engine_kwargs: dict[str, Any] = {
        "model": text("MINISERVE_MODEL"),
        "dtype": text("MINISERVE_DTYPE") or "auto",
        "kv_cache_dtype": text("MINISERVE_KV_CACHE_DTYPE") or "auto",
        "device": text("MINISERVE_DEVICE") or "auto",
        "max_model_len": num("MINISERVE_MAX_MODEL_LEN", None),
        "max_num_seqs": num("MINISERVE_MAX_NUM_SEQS", 256),
        "block_size": num("MINISERVE_BLOCK_SIZE", 16),
        "num_kv_blocks": num("MINISERVE_NUM_KV_BLOCKS", None),
        "speculative_model": text("MINISERVE_SPECULATIVE_MODEL"),
        "num_speculative_tokens": num("MINISERVE_NUM_SPECULATIVE_TOKENS", 4),
        "served_model_name": text("MINISERVE_SERVED_MODEL_NAME"),
        "enable_prefix_caching": flag("MINISERVE_ENABLE_PREFIX_CACHING", True),
    }
    return ServerSettings(
        engine=make_engine_config(**engine_kwargs),
        api_key=text("MINISERVE_API_KEY"),
        served_model_name=text("MINISERVE_SERVED_MODEL_NAME"),
        max_body_bytes=num("MINISERVE_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
        max_waiting=num("MINISERVE_MAX_WAITING", DEFAULT_MAX_WAITING),
        max_prompts_per_request=num("MINISERVE_MAX_PROMPTS_PER_REQUEST", DEFAULT_MAX_PROMPTS_PER_REQUEST),
        header_timeout=seconds("MINISERVE_HEADER_TIMEOUT", _LIMITS.header_timeout),
        body_timeout=seconds("MINISERVE_BODY_TIMEOUT", _LIMITS.body_timeout),
        keep_alive_timeout=seconds("MINISERVE_KEEP_ALIVE_TIMEOUT", _LIMITS.keep_alive_timeout),
        max_connections=num("MINISERVE_MAX_CONNECTIONS", _LIMITS.max_connections),
    )


def make_engine_config(**kwargs: Any) -> EngineConfig:
    """EngineConfig from keyword arguments, skipping those this EngineConfig version does not have."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in kwargs.items() if k in names})


def check_model_dir(config: EngineConfig) -> None:
    """Fail early, with the setting to fix, when the model directory is missing."""
    model = Path(config.model)
    if model.is_dir():
        return
    if model == DEMO_TARGET:
        raise FileNotFoundError(
            f"no model configured and the embedded demo model is missing ({model}); "
            "set MINISERVE_MODEL (or --model) to a Hugging Face model directory"
        )
    raise FileNotFoundError(f"model directory {str(model)!r} does not exist (MINISERVE_MODEL / --model)")


def load_engine(config: EngineConfig) -> Any:
    check_model_dir(config)
    from miniserve.engine.llm_engine import LLMEngine

    return LLMEngine(config)


# ---------------------------------------------------------------------------------------------- state


class ServerState:
    """The loaded engine, its driver loop, metrics, and the helpers every route shares."""

    def __init__(self, settings: ServerSettings, engine: Any):
        self.settings = settings
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self.model_name: str = settings.served_model_name or engine.model_name
        self.metrics = ServerMetrics(lambda: self.loop.stats(), self.model_name)
        self.loop = AsyncEngine(engine, self.metrics, settings.max_waiting)

    async def parse(self, request: Request, model: type) -> Any:
        """Read, decode and validate the body as `model`, then check the model name it asks for."""
        req = parse_request(model, await read_json(request, self.settings.max_body_bytes))
        self.check_model(req.model)
        return req

    def check_prompt_count(self, count: int) -> None:
        limit = self.settings.max_prompts_per_request
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

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        try:
            return self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja errors from the template (e.g. "roles must alternate")
            raise APIError(f"the chat template failed: {exc}", param="messages") from None


def sampling_params(
    req: SamplingFields, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
) -> Any:
    """SamplingParams for one request; its ValueErrors become 400s naming the field."""
    from miniserve.sampling_params import SamplingParams

    kwargs: dict[str, Any] = {
        "n": req.n,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "max_tokens": max_tokens,
        "min_tokens": req.min_tokens,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "stop": [req.stop] if isinstance(req.stop, str) else req.stop,
        "stop_token_ids": req.stop_token_ids,
        "ignore_eos": req.ignore_eos,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "skip_special_tokens": req.skip_special_tokens,
    }
    for name in ("top_k", "min_p", "repetition_penalty"):  # engine defaults unless given
        if getattr(req, name) is not None:
            kwargs[name] = getattr(req, name)
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise APIError(str(exc), param=param_from_value_error(str(exc), type(req))) from None


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


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone away (the body was already read, so only disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class RequestGroup:
    """The engine requests (one per prompt) behind one HTTP request, read back as one output stream."""

    def __init__(self, state: ServerState, base_id: str):
        self.state = state
        self.base_id = base_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.index: dict[str, int] = {}
        self.unfinished: set[str] = set()

    async def start(self, prompts: list[list[int]], params: list[Any], prompt_param: str) -> None:
        """Post every prompt; if one is rejected, abort the ones already posted and raise a 4xx."""
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                rid = f"{self.base_id}-{i}"
                self.index[rid] = i
                self.unfinished.add(rid)  # before awaiting, so a cancellation here still aborts it
                await self.state.loop.add_request(rid, ids, p, self.queue)
        except ValueError as exc:  # the engine's validation: token ids, context or KV pool too small
            self.abort()
            raise APIError(str(exc), param=prompt_param) from None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for rid in self.unfinished:
            self.state.loop.abort(rid)
        self.unfinished.clear()

    async def results(self, request: Request) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, cumulative RequestOutput) until all finish; aborts the rest when closed early."""
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            while self.unfinished:
                item = await self._next(watcher)
                if isinstance(item, BaseException):
                    raise APIError(f"generation failed: {item}", status=500, code="engine_error")
                if item.finished:
                    self.unfinished.discard(item.request_id)
                yield self.index[item.request_id], item
        finally:
            watcher.cancel()
            self.abort()

    async def _next(self, watcher: asyncio.Future) -> Any:
        if watcher.done():
            raise ClientDisconnected()
        if not self.queue.empty():
            return self.queue.get_nowait()
        getter = asyncio.ensure_future(self.queue.get())
        await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        raise ClientDisconnected()


def _sse_response(chunks: AsyncIterator[str], group: RequestGroup) -> StreamingResponse:
    # The background abort covers a client that leaves before the generator even starts.
    return StreamingResponse(
        chunks,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
        background=BackgroundTask(group.abort),
    )


# ---------------------------------------------------------------------------------------------- completions


async def create_completion(request: Request) -> Response:
    state = _state(request)
    req: CompletionRequest = await state.parse(request, CompletionRequest)
    state.check_prompt_count(len(req.prompts()))
    tok = state.tokenizer
    prompt_ids = [tok.encode(p) if isinstance(p, str) else p for p in req.prompts()]
    prompt_lp = req.logprobs if req.echo else None  # echo + logprobs: score the prompt too
    params = [
        sampling_params(req, state.token_budget(len(ids), req.max_tokens, "prompt"), req.logprobs, prompt_lp)
        for ids in prompt_ids
    ]
    group = RequestGroup(state, f"cmpl-{uuid.uuid4().hex}")
    await group.start(prompt_ids, params, "prompt")
    prompt_texts = [p if isinstance(p, str) else tok.decode(p) for p in req.prompts()] if req.echo else None
    head = {
        "id": group.base_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
    }
    if req.stream:
        return _sse_response(_stream_completion(state, req, request, group, head, prompt_ids, prompt_texts), group)
    try:
        finals = await _collect(group, request)
    except ClientDisconnected:
        return Response(status_code=499)
    choices = []
    for i, ids in enumerate(prompt_ids):
        for o in finals[i].outputs:
            lp = None
            if req.logprobs is not None:
                start = len(prompt_texts[i]) if prompt_texts else 0
                lp = fmt.completion_logprobs(tok, ids, o.token_ids, o.logprobs, req.logprobs, start)
                if prompt_texts:
                    lp = fmt.join_logprobs(fmt.prompt_logprobs(tok, ids, finals[i].prompt_logprobs, req.logprobs), lp)
            choices.append(
                {
                    "index": i * req.n + o.index,
                    "text": (prompt_texts[i] if prompt_texts else "") + o.text,
                    "logprobs": lp,
                    "finish_reason": o.finish_reason,
                    "stop_reason": o.stop_reason,
                }
            )
    choices.sort(key=lambda c: c["index"])
    return JSONResponse({**head, "choices": choices, "usage": _usage(prompt_ids, list(finals.values()))})


async def _stream_completion(
    state: ServerState,
    req: CompletionRequest,
    request: Request,
    group: RequestGroup,
    head: dict,
    prompt_ids: list[list[int]],
    prompt_texts: list[str] | None,
) -> AsyncIterator[str]:
    trackers = {(i, j): fmt.ChoiceTracker(ids) for i, ids in enumerate(prompt_ids) for j in range(req.n)}
    offsets = {(i, j): len(prompt_texts[i]) if prompt_texts else 0 for i, j in trackers}
    echo_later = bool(prompt_texts) and req.logprobs is not None  # the prompt's logprobs come with its first output
    finals: dict[int, Any] = {}

    def chunk(index: int, text: str, logprobs: Any = None, finish: str | None = None, stop: Any = None) -> str:
        return fmt.choice_chunk(head, index, {"text": text}, logprobs, finish, stop)

    try:
        if prompt_texts and not echo_later:
            for i, j in trackers:
                yield chunk(i * req.n + j, prompt_texts[i])
        echoed: set[tuple[int, int]] = set()
        async with aclosing(_deltas(group, request, trackers, finals)) as deltas:
            async for i, o, d in deltas:
                if echo_later and (i, o.index) not in echoed:
                    echoed.add((i, o.index))
                    plp = fmt.prompt_logprobs(state.tokenizer, prompt_ids[i], finals[i].prompt_logprobs, req.logprobs)
                    yield chunk(i * req.n + o.index, prompt_texts[i], plp)
                lp = None
                if req.logprobs is not None and d.token_ids:
                    offset = offsets[(i, o.index)]
                    lp = fmt.completion_logprobs(
                        state.tokenizer, d.context, d.token_ids, d.logprobs, req.logprobs, offset
                    )
                    offsets[(i, o.index)] += sum(len(t) for t in lp["tokens"])
                if d.text or lp or d.finished_now:
                    finish = o.finish_reason if d.finished_now else None
                    stop = o.stop_reason if d.finished_now else None
                    yield chunk(i * req.n + o.index, d.text, lp, finish, stop)
        if req.stream_options and req.stream_options.include_usage:
            yield fmt.sse({**head, "choices": [], "usage": _usage(prompt_ids, list(finals.values()))})
    except ClientDisconnected:
        return
    except APIError as exc:
        yield fmt.sse(exc.body())
    yield fmt.SSE_DONE


async def _deltas(
    group: RequestGroup, request: Request, trackers: dict[tuple[int, int], fmt.ChoiceTracker], finals: dict
) -> AsyncIterator[tuple[int, Any, fmt.Delta]]:
    """(prompt index, completion, what is new) for every unfinished choice at every step; fills `finals`."""
    async with aclosing(group.results(request)) as results:
        async for i, out in results:
            finals[i] = out
            for o in out.outputs:
                tracker = trackers[(i, o.index)]
                if not tracker.finished:
                    yield i, o, tracker.advance(o)


async def _collect(group: RequestGroup, request: Request) -> dict[int, Any]:
    finals: dict[int, Any] = {}
    async with aclosing(group.results(request)) as results:
        async for i, out in results:
            finals[i] = out
    return finals


def _usage(prompt_ids: list[list[int]], outputs: list[Any]) -> dict[str, Any]:
    completion_tokens = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    return fmt.usage(sum(len(ids) for ids in prompt_ids), completion_tokens, outputs)


# ---------------------------------------------------------------------------------------------- chat


async def create_chat_completion(request: Request) -> Response:
    state = _state(request)
    req: ChatCompletionRequest = await state.parse(request, ChatCompletionRequest)
    ids = state.encode_chat(req.chat_messages(), req.add_generation_prompt)
    top = (req.top_logprobs or 0) if req.logprobs else None
    budget_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params = sampling_params(req, state.token_budget(len(ids), req.token_budget(), "messages", budget_param), top)
    group = RequestGroup(state, f"chatcmpl-{uuid.uuid4().hex}")
    await group.start([ids], [params], "messages")
    head = {
        "id": group.base_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": state.model_name,
    }
    if req.stream:
        return _sse_response(_stream_chat(state, req, request, group, head, ids), group)
    try:
        out = (await _collect(group, request))[0]
    except ClientDisconnected:
        return Response(status_code=499)
    choices = []
    for o in sorted(out.outputs, key=lambda o: o.index):
        lp = fmt.chat_logprobs(state.tokenizer, ids, o.token_ids, o.logprobs, top) if top is not None else None
        choices.append(
            {
                "index": o.index,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": lp,
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
            }
        )
    return JSONResponse({**head, "choices": choices, "usage": _usage([ids], [out])})


async def _stream_chat(
    state: ServerState,
    req: ChatCompletionRequest,
    request: Request,
    group: RequestGroup,
    head: dict,
    ids: list[int],
) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    top = (req.top_logprobs or 0) if req.logprobs else None
    trackers = {(0, j): fmt.ChoiceTracker(ids) for j in range(req.n)}
    finals: dict[int, Any] = {}

    def chunk(index: int, delta: dict, logprobs: Any = None, finish: str | None = None, stop: Any = None) -> str:
        return fmt.choice_chunk(head, index, {"delta": delta}, logprobs, finish, stop)

    try:
        for j in range(req.n):
            yield chunk(j, {"role": "assistant", "content": ""})
        async with aclosing(_deltas(group, request, trackers, finals)) as deltas:
            async for _, o, d in deltas:
                lp = None
                if top is not None and d.token_ids:
                    lp = fmt.chat_logprobs(state.tokenizer, d.context, d.token_ids, d.logprobs, top)
                if d.text or lp or d.finished_now:
                    delta = {"content": d.text} if d.text or not d.finished_now else {}
                    finish = o.finish_reason if d.finished_now else None
                    stop = o.stop_reason if d.finished_now else None
                    yield chunk(o.index, delta, lp, finish, stop)
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
    state = _state(request)
    req: TokenizeRequest = await state.parse(request, TokenizeRequest)
    if req.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = state.encode_chat(messages, req.add_generation_prompt)
    else:
        ids = state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len})


async def detokenize(request: Request) -> JSONResponse:
    state = _state(request)
    req: DetokenizeRequest = await state.parse(request, DetokenizeRequest)
    vocab = state.engine.vocab_size if hasattr(state.engine, "vocab_size") else state.tokenizer.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(f"token id {bad[0]} is out of range [0, {vocab})", param="tokens")
    return JSONResponse({"prompt": state.tokenizer.decode(req.tokens)})


async def health(request: Request) -> JSONResponse:
    state = getattr(request.app.state, "server", None)
    if state is None or not state.loop.is_alive():
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


def create_app(settings: ServerSettings) -> FastAPI:
    """A FastAPI app that loads the engine on startup and stops its loop on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = await asyncio.to_thread(load_engine, settings.engine)
        state = ServerState(settings, engine)
        state.loop.start()
        app.state.server = state
        logger.info("miniserve: serving %s (max_model_len %d)", state.model_name, state.max_model_len)
        try:
            yield
        finally:
            state.loop.shutdown()

    app = FastAPI(title="miniserve", lifespan=lifespan)
    app.state.settings = settings
    v1 = APIRouter(prefix="/v1")  # RequireAPIKey guards every /v1 path, routed or not
    v1.add_api_route("/completions", create_completion, methods=["POST"])
    v1.add_api_route("/chat/completions", create_chat_completion, methods=["POST"])
    v1.add_api_route("/models", list_models, methods=["GET"])
    app.include_router(v1)
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    _add_error_handlers(app)
    app.add_middleware(RequireAPIKey, api_key=settings.api_key)
    app.add_middleware(CatchAll)  # added last: the outermost layer
    return app


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


# ---------------------------------------------------------------------------------------------- CLI entry


def run_server(
    config: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_waiting: int | None = DEFAULT_MAX_WAITING,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_level: str = "info",
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST,
    connection_limits: ConnectionLimits = _LIMITS,
) -> None:
    """Serve `config`'s model until interrupted (what `miniserve serve` calls)."""
    import uvicorn

    check_model_dir(config)  # before uvicorn starts, so the CLI prints one clear line
    settings = ServerSettings(
        engine=config,
        api_key=api_key or os.environ.get("MINISERVE_API_KEY") or None,
        served_model_name=served_model_name or getattr(config, "served_model_name", None),
        max_body_bytes=max_body_bytes,
        max_waiting=max_waiting,
        max_prompts_per_request=max_prompts_per_request,
        **dataclasses.asdict(connection_limits),
    )
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level, http=settings.connection_protocol())


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The server-only flags of `miniserve serve` (engine flags come from the CLI's add_engine_args)."""
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING, help="queue limit before 503")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument(
        "--max-prompts-per-request",
        type=int,
        default=DEFAULT_MAX_PROMPTS_PER_REQUEST,
        help="a /v1/completions prompt list longer than this gets 400",
    )
    limits = _LIMITS
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=limits.header_timeout,
        help="seconds for a request's head, from connect or the previous response (else 408 and close)",
    )
    parser.add_argument(
        "--body-timeout", type=float, default=limits.body_timeout, help="seconds for a request's body (else 408)"
    )
    parser.add_argument("--keep-alive-timeout", type=float, default=limits.keep_alive_timeout)
    parser.add_argument("--max-connections", type=int, default=limits.max_connections, help="more connections get 503")
    parser.add_argument("--log-level", default="info")


def serve_main(args: argparse.Namespace, config: EngineConfig) -> int:
    """Run the server from parsed `miniserve serve` arguments and the EngineConfig built from them."""
    run_server(
        config,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        served_model_name=getattr(args, "served_model_name", None),
        max_waiting=getattr(args, "max_waiting", DEFAULT_MAX_WAITING),
        max_body_bytes=getattr(args, "max_body_bytes", DEFAULT_MAX_BODY_BYTES),
        log_level=getattr(args, "log_level", "info"),
        max_prompts_per_request=getattr(args, "max_prompts_per_request", DEFAULT_MAX_PROMPTS_PER_REQUEST),
        connection_limits=ConnectionLimits(
            args.header_timeout, args.body_timeout, args.keep_alive_timeout, args.max_connections
        ),
    )
    return 0
