"""What every route shares: the server's state (engine process, tokenizer, metrics, requests in flight, the
checks every request goes through) and reading a request's JSON body."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from fastapi import Request
from starlette.requests import ClientDisconnect

from miniserve.chat_template import ChatMessageError
from miniserve.config import EngineConfig, ServerConfig, resolve_chat_template
from miniserve.engine.sampler import check_bad_words
from miniserve.engine.stop_strings import check_stop_strings
from miniserve.engine.structured_output import GrammarCompiler, StructuredOutputsUnavailable
from miniserve.sampling_params import StructuredOutputsParams, logprobs_count, truncation_length
from miniserve.server.engine_process import EngineProcess
from miniserve.server.json_body import decode_json
from miniserve.server.metrics import ServerMetrics
from miniserve.server.protocol import (
    APIError,
    SamplingFields,
    StreamOptions,
    parse_request,
)

logger = logging.getLogger("miniserve.server")

CPU_THREADS = 4  # tokenizing and chat templates run here, not on the event loop
GRAMMAR_THREADS = 2  # grammars compile apart: one that takes seconds (a long pattern) must not hold up tokenizing
LARGE_BODY_BYTES = 256 << 10  # request bodies larger than this are decoded and validated off the event loop


def load_tokenizer(config: EngineConfig) -> Any:
    from miniserve.tokenizer import Tokenizer

    template = resolve_chat_template(config.chat_template)
    return Tokenizer.from_pretrained(config.tokenizer or config.model, template, config.chat_template_content_format)


def max_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters one token stands for: the longest vocabulary entry as stored (a byte
    token "<0x41>" or a byte-level "Ġ" pair is never shorter than the text it decodes to), doubled for
    normalizers that compose characters. A text longer than limit * this has more than `limit` tokens."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return 2 * max((len(token) for token in vocab), default=1)


class InFlight(Protocol):
    """What a shutdown needs of a request in flight (request_group.py: RequestGroup)."""

    def abort(self, ended_by: str | None = None) -> None: ...


class ServerState:
    """The engine process, the tokenizer, metrics, the requests in flight, and the helpers every route shares."""

    def __init__(
        self, config: EngineConfig, server: ServerConfig, engine: EngineProcess, tokenizer: Any, token_chars: int
    ):
        self.config, self.server, self.engine = config, server, engine
        self.tokenizer, self.token_chars = tokenizer, token_chars
        self.max_model_len: int = engine.info["max_model_len"]
        self.vocab_size: int = engine.info["vocab_size"]
        self.sampling_defaults: dict[str, float | int] = engine.info["sampling_defaults"]
        # the names clients may send, the first in responses; as vLLM, without a served name the --model path too
        self.model_names: list[str] = server.served_model_names() or [engine.info["model_name"]]
        self.model_name = self.model_names[0]
        self.model_path = None if server.served_model_name else config.model.rstrip("/")
        self.metrics = ServerMetrics(engine.stats, self.model_name, self.max_model_len, engine.info["cache_config"])
        engine.metrics = self.metrics
        # structured outputs compile here, off the event loop and off the engine's step loop (structured_output.py)
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, engine.info["eos_token_ids"])
        self.grammars_warming = False
        self.cpu = ThreadPoolExecutor(CPU_THREADS, thread_name_prefix="miniserve-cpu")
        self.grammar_cpu = ThreadPoolExecutor(GRAMMAR_THREADS, thread_name_prefix="miniserve-grammar")
        self.groups: set[InFlight] = set()  # requests in flight (what a shutdown drains)
        self.draining = False

    async def run_cpu(self, fn: Any, *args: Any, pool: ThreadPoolExecutor | None = None) -> Any:
        """fn(*args) on a worker thread (of `pool`, or the tokenizing one): tokenizing a long prompt or rendering a
        template must not stall the event loop (the tokenizer releases the GIL on long texts, Tokenizer.encode)."""
        return await asyncio.get_running_loop().run_in_executor(pool or self.cpu, fn, *args)

    async def format_answer(self, with_logprobs: bool, fn: Any, *args: Any) -> Any:
        """fn(*args), on a worker thread when the answer lists logprobs: each listed token is decoded twice, and
        a request with many (choices x positions x top) would otherwise hold up every other request, /health
        included, for seconds."""
        return await self.run_cpu(fn, *args) if with_logprobs else fn(*args)

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
            limited = self.server.max_prompt_tokens is not None
            beyond = "this server accepts (MINISERVE_MAX_PROMPT_TOKENS)" if limited else "this model's context length"
            raise APIError(
                f"the {what} has {num_chars} characters, so more than {tokens} tokens (a token of this tokenizer "
                f"holds at most {self.token_chars} characters): more than {beyond}. Please reduce its length.",
                param=what,
                code="prompt_too_long" if limited else "context_length_exceeded",
            )

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
        self.check_truncation(truncate)
        for p in prompts:
            if isinstance(p, str):  # a prompt to be truncated may have more tokens than the limit
                self.check_prompt_chars(len(p), "prompt", for_generation=truncate is None)
        if any(isinstance(p, str) for p in prompts):
            prompts = await self.run_cpu(lambda: [self._encode(p, add_special_tokens, truncate) for p in prompts])
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
        """The rendered chat's token ids, size limits checked (rendered and tokenized off the event loop): the
        messages' text before rendering, the rendered text (tools, documents, a request's template) before
        tokenizing. `options` go to Tokenizer.chat_prompt (tools, chat_template, continue_final_message...)."""
        if options.get("chat_template") is not None and not self.server.trust_request_chat_template:
            raise APIError(
                "this server does not run a request's own chat_template (start it with "
                "--trust-request-chat-template or MINISERVE_TRUST_REQUEST_CHAT_TEMPLATE=1 to allow it)",
                param="chat_template",
            )
        self.check_truncation(truncate)
        chars = sum(len(m.get("content") or "") for m in messages)
        self.check_prompt_chars(chars, "messages", for_generation and truncate is None)

        def check_text(text: str) -> None:
            self.check_prompt_chars(len(text), "messages", for_generation and truncate is None)

        try:
            ids = await self.run_cpu(
                lambda: self.tokenizer.chat_prompt(messages, add_generation_prompt, check_text=check_text, **options)[1]
            )
        except APIError:
            raise
        except ChatMessageError as exc:
            raise APIError(str(exc), param="messages") from None
        except Exception as exc:  # jinja errors from the template (e.g. "roles must alternate")
            raise APIError(f"the chat template failed: {exc}", param="messages") from None
        ids = self.truncate(ids, truncate)
        if for_generation:
            self.check_prompt_tokens(len(ids), "messages")
        return ids

    def check_truncation(self, truncate: int | None) -> None:
        """truncate_prompt_tokens within the context, before any prompt is tokenized (a 400 naming it)."""
        try:
            truncation_length(truncate, self.max_model_len)
        except ValueError as exc:
            raise APIError(str(exc), param="truncate_prompt_tokens") from None

    def truncate(self, ids: list[int], keep: int | None) -> list[int]:
        """truncate_prompt_tokens: keep the prompt's last `keep` tokens (-1: as many as the context holds)."""
        keep = truncation_length(keep, self.max_model_len)
        return ids[-keep:] if keep is not None and len(ids) > keep else ids

    def _encode(self, prompt: str | list[int], add_special_tokens: bool, truncate: int | None) -> list[int]:
        """A text prompt's ids; truncated, its BOS stays (Tokenizer.encode_last, as vLLM's tokenizer truncates)."""
        if not isinstance(prompt, str):
            return prompt
        if truncate is None:
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return self.tokenizer.encode_last(prompt, truncation_length(truncate, self.max_model_len), add_special_tokens)

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
            await self.run_cpu(self.grammars.compile, params, pool=self.grammar_cpu)
        except StructuredOutputsUnavailable as exc:  # names the field that asked for a constraint
            raise APIError(f"{field}: {exc}", param=field) from None
        except ValueError as exc:  # names the field holding the schema (a forced tool call's: its tool's)
            where = "tools" if field == "tool_choice" else field
            raise APIError(f"{where}: {exc}", param=where) from None
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
        """Read, decode and validate the body as `model` (past LARGE_BODY_BYTES on a worker thread: MBs of chat
        messages took a second of every stream's time), then check the model name it asks for. Fields no schema
        knows are ignored with one warning (as vLLM does); every known field is honoured or refused (400)."""
        raw = await read_body(request, self.server.max_body_bytes)
        if len(raw) > LARGE_BODY_BYTES:
            req, ignored = await self.run_cpu(_decode_and_validate, model, raw)
        else:
            req, ignored = _decode_and_validate(model, raw)
        if ignored:
            logger.warning("%s %s: fields ignored (not in the API): %s", request.method, request.url.path, ignored)
        self.check_model(req.model)
        _default_from_flags(self.server, req)
        return req

    def check_bounds(self, req: SamplingFields) -> None:
        """The engine's bounds on the stop list, bad_words and top logprobs, checked before any prompt is
        tokenized; a top-logprobs count of -1 becomes the vocabulary's size (what the answer then lists)."""
        stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
        config = self.config
        _named("stop", check_stop_strings, stops, config.max_stop_strings, config.max_stop_string_length)
        _named("bad_words", check_bad_words, req.bad_words, config.max_bad_words)
        for name in ("logprobs", "top_logprobs", "prompt_logprobs"):  # (integers: chat's logprobs is a bool)
            value = getattr(req, name, None)
            if type(value) is int:
                setattr(req, name, _named(name, logprobs_count, name, value, config.max_logprobs, self.vocab_size))

    def check_prompt_count(self, count: int) -> None:
        limit = self.server.max_prompts_per_request
        if count > limit:
            raise APIError(
                f"prompt: {count} prompts in one request, more than the limit of {limit} "
                "(MINISERVE_MAX_PROMPTS_PER_REQUEST); split the batch",
                param="prompt",
            )

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names and model.rstrip("/") != self.model_path:
            raise APIError(
                f"The model `{model}` does not exist. This server serves `{'`, `'.join(self.model_names)}`.",
                status=404,
                param="model",
                code="model_not_found",
            )

    def token_budget(self, prompt_len: int, max_tokens: int | None, what: str, param: str = "max_tokens") -> int:
        """max_tokens for this prompt (None = the rest of the context), at most the model's max_new_tokens
        (generation_config.json, as vLLM); 400 if it cannot fit."""
        limit = self.max_model_len
        if prompt_len >= limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens, but the {what} has {prompt_len} "
                f"tokens, which leaves no room for the completion. Please reduce the length of the {what}.",
                param=what,
                code="context_length_exceeded",
            )
        cap = self.sampling_defaults.get("max_tokens")
        if max_tokens is None:
            return min(limit - prompt_len, cap or limit)
        if prompt_len + max_tokens > limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
                f"completion). Please reduce the length of the {what} or completion.",
                param=param,
                code="context_length_exceeded",
            )
        return min(max_tokens, cap or max_tokens)


def _named(param: str, check: Any, *args: Any) -> Any:
    """`check(*args)`, its ValueError a 400 naming `param`."""
    try:
        return check(*args)
    except ValueError as exc:
        raise APIError(str(exc), param=param) from None


class ClientDisconnected(Exception):
    pass


def _default_from_flags(server: ServerConfig, req: Any) -> None:
    """The serve flags that are a request field's default, as vLLM's: --return-tokens-as-token-ids where the
    request leaves it unset, --enable-force-include-usage on every stream (continuous usage then needs no
    include_usage of its own)."""
    if not isinstance(req, SamplingFields):  # (the Responses API's request has neither field)
        return
    if req.return_tokens_as_token_ids is None:
        req.return_tokens_as_token_ids = server.return_tokens_as_token_ids
    if server.enable_force_include_usage and req.stream:
        opts = req.stream_options or StreamOptions()
        req.stream_options = opts.model_copy(update={"include_usage": True})
    opts = req.stream_options
    if opts is not None and opts.continuous_usage_stats and not opts.include_usage:  # (not forced on)
        raise APIError(
            "stream_options: continuous_usage_stats needs include_usage true: without it no chunk carries usage",
            param="stream_options",
        )


def _decode_and_validate(model: type, raw: bytes) -> tuple[Any, list[str]]:
    """The body as `model` (400 if it is not usable JSON or does not validate), and the fields it ignores."""
    req = parse_request(model, decode_json(raw))
    return req, req.ignored_fields()


async def read_body(request: Request, limit: int) -> bytes:
    """The body's bytes; 413 past `limit` bytes (checked while reading)."""
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
    return bytes(body)


def state_of(request: Request) -> ServerState:
    state = getattr(request.app.state, "server", None)
    if state is None:
        raise APIError("the model is not loaded", status=503, code="engine_unavailable")
    return state
