"""POST /v1/chat/completions: messages through the chat template to one prompt, then choices as messages, plain
or streamed, with reasoning split off (server/reasoning.py), tool calls (server/tool_calls.py) and chat logprobs."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from miniserve.server import responses as fmt
from miniserve.server.beam import beam_outputs, check_beam_fields
from miniserve.server.event_stream import EventStream, StreamEvents
from miniserve.server.protocol import APIError, ChatCompletionRequest
from miniserve.server.reasoning import ContentOutput, ReasoningSetup, check_reasoning_fields, reasoning_setup
from miniserve.server.request_group import (
    RequestGroup,
    answer_head,
    collect_finals,
    request_usage,
    response_head,
    stream_usage,
    structured_spec,
)
from miniserve.server.request_params import pick_best, sampling_params
from miniserve.server.state import ServerState, state_of
from miniserve.server.tool_calls import ToolSetup, tool_setup


@dataclass
class ChatRun:
    """A chat request posted to the engine: what the chat route (and /v1/responses, server/responses_api.py) needs
    to read its output back and shape it."""

    ids: list[int]
    tools: ToolSetup
    reasoning: ReasoningSetup | None
    group: RequestGroup


async def create_chat_completion(request: Request) -> Response:
    state = state_of(request)
    req: ChatCompletionRequest = await state.parse(request, ChatCompletionRequest)
    check_beam_fields(req)
    if req.use_beam_search:
        return await _beam_chat(state, request, req)
    run = await start_chat(state, req, f"chatcmpl-{uuid.uuid4().hex}")
    ids, tools, reasoning, group = run.ids, run.tools, run.reasoning, run.group
    head = response_head(group, request, req.request_id, "chatcmpl", "chat.completion")
    if req.stream:
        return EventStream(group, request, ChatEvents(state, req, head, ids, tools, reasoning))
    finals = await collect_finals(group, request)
    if finals is None:
        return Response(status_code=499)
    with_logprobs = req.logprobs or req.prompt_logprobs is not None
    body = await state.format_answer(with_logprobs, _chat_body, state, req, head, ids, finals[0], tools, reasoning)
    return fmt.JSONBytesResponse(body)


async def _beam_chat(state: ServerState, request: Request, req: ChatCompletionRequest) -> Response:
    """use_beam_search: the n best beams as the choices' messages (server/beam.py); no reasoning split, no tools."""
    if state.server.reasoning_parser is not None:
        raise APIError("use_beam_search is not combined with the server's --reasoning-parser", param="use_beam_search")
    tools = _tool_setup(state, req)
    ids = await _chat_ids(state, req, tools)
    budget_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    budget = state.token_budget(len(ids), req.token_budget(), "messages", budget_param)
    answer = await beam_outputs(state, request, req, [ids], [budget])
    if answer is None:
        return Response(status_code=499)
    outputs, usage = answer
    role = reply_role(state, req)
    head = answer_head(state.model_name, f"chatcmpl-{uuid.uuid4().hex}", request, req.request_id, "chatcmpl",
                       "chat.completion")  # fmt: skip
    choices = [
        {"index": j, "message": {"role": role, "content": c["text"], "reasoning": None}, "logprobs": None,
         "finish_reason": c["finish_reason"], "stop_reason": c["stop_reason"]}
        for j, c in enumerate(outputs[0])
    ]  # fmt: skip
    return fmt.JSONBytesResponse({**head, "choices": choices, "usage": usage})


def _chat_body(
    state: ServerState,
    req: ChatCompletionRequest,
    head: dict[str, Any],
    ids: list[int],
    out: Any,
    tools: ToolSetup,
    reasoning: ReasoningSetup | None,
) -> dict[str, Any]:
    body = {**head, "choices": _chat_choices(state, req, ids, out, tools, reasoning)}
    body["usage"] = request_usage([ids], [out])
    if req.prompt_logprobs is not None:
        body["prompt_logprobs"] = fmt.vllm_prompt_logprobs(
            state.tokenizer, ids, out.prompt_logprobs, req.prompt_logprobs
        )
    if req.return_token_ids:
        body["prompt_token_ids"] = ids
    return body


async def start_chat(state: ServerState, req: ChatCompletionRequest, base_id: str) -> ChatRun:
    """Checks, tools, the output constraint, the prompt and its sampling parameters; then the request posted."""
    state.check_bounds(req)
    check_reasoning_fields(req, state.server.reasoning_parser)
    tools = _tool_setup(state, req)
    constraint = _chat_constraint(req, tools)
    structured = await state.compile_constraint(constraint)
    ids = await _chat_ids(state, req, tools)
    reasoning = reasoning_setup(req, state.server.reasoning_parser, state.tokenizer, ids)
    if reasoning is not None and constraint is not None:
        structured = reasoning.defer(structured, constraint[0])
    top = (req.top_logprobs or 0) if req.logprobs else None
    budget_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    budget = state.token_budget(len(ids), req.token_budget(), "messages", budget_param)
    params = sampling_params(
        req, budget, top, state.vocab_size, req.prompt_logprobs, structured, defaults=state.sampling_defaults
    )
    if tools.reads_special_tokens:
        if "skip_special_tokens" in req.model_fields_set and req.skip_special_tokens:
            raise APIError(
                "skip_special_tokens cannot be true with tool_choice auto on this model: its tool calls start with "
                "the special token [TOOL_CALLS]",
                param="skip_special_tokens",
            )
        params = dataclasses.replace(params, skip_special_tokens=False)
    group = RequestGroup(state, base_id, req.stream)
    await group.start([ids], [params], "messages", req.n, req.priority)
    return ChatRun(ids, tools, reasoning, group)


def _tool_setup(state: ServerState, req: ChatCompletionRequest) -> ToolSetup:
    """The request's tools, read with the chat template it renders with (a model's "tool_use" one when it has tools)."""
    template = state.tokenizer.templates.source(req.chat_template, req.tools)
    return tool_setup(req, template, state.server.tool_call_parser, state.server.enable_auto_tool_choice)


async def _chat_ids(state: ServerState, req: ChatCompletionRequest, tools: ToolSetup) -> list[int]:
    """The prompt: messages (tool calls and results included) and tools through the chat template."""
    return await state.encode_chat(
        req.chat_messages(),
        req.add_generation_prompt,
        truncate=req.truncate_prompt_tokens,
        add_special_tokens=req.add_special_tokens,
        tools=None if req.tools is None else tools.tools,  # [] reaches the template as [], as in vLLM
        documents=req.documents,
        chat_template=req.chat_template,
        continue_final_message=req.continue_final_message,
        template_kwargs=req.chat_template_kwargs,
    )


def _chat_constraint(req: ChatCompletionRequest, tools: ToolSetup) -> tuple[str, dict[str, Any]] | None:
    """The output constraint: tool_choice required/named (their JSON schemas), else the request's own."""
    spec = structured_spec(req)
    forced = tools.constraint()
    if forced is None:
        return spec
    if spec is not None:
        raise APIError(f"{spec[0]} cannot be combined with tool_choice {tools.mode}", param=spec[0])
    return "tool_choice", forced


def reply_role(state: ServerState, req: ChatCompletionRequest) -> str:
    """The reply's role, as vLLM picks it: the server's response_role after a generation prompt; without one the
    model goes on with the last message, so the reply has that message's role."""
    return state.server.response_role if req.add_generation_prompt else req.messages[-1].role


def _echo_text(req: ChatCompletionRequest, role: str) -> str:
    """chat echo: the reply is prefixed with the last message when it has the reply's role (vLLM's meaning)."""
    last = req.messages[-1]
    return last.text() if req.echo and last.role == role else ""


def _chat_choices(
    state: ServerState,
    req: ChatCompletionRequest,
    ids: list[int],
    out: Any,
    tools: ToolSetup,
    reasoning: ReasoningSetup | None,
) -> list[dict[str, Any]]:
    top = (req.top_logprobs or 0) if req.logprobs else None
    as_ids = bool(req.return_tokens_as_token_ids)
    role = reply_role(state, req)
    echo = _echo_text(req, role)
    choices = []
    for o in pick_best(out, req):
        lp = None
        if top is not None:
            lp = fmt.chat_logprobs(state.tokenizer, ids, o.token_ids, o.logprobs, top, as_ids)
        message, finish = assistant_message(tools, reasoning, o, echo)
        message["role"] = role
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


def assistant_message(
    tools: ToolSetup, reasoning: ReasoningSetup | None, o: Any, echo: str
) -> tuple[dict[str, Any], Any]:
    """A finished choice's assistant message and finish_reason: with a reasoning parser, the reasoning split off
    (vLLM's `reasoning` field: null when there is none or it was left out) and tool calls parsed from the content
    alone; content null when the reasoning left none (as vLLM). Without a parser `reasoning` is null too: vLLM's
    messages always carry it, and a client reading it as an attribute would fail on a message without it."""
    if reasoning is None:
        message, finish = tools.message(o.text, o.finish_reason, echo)
        return {**message, "reasoning": None}, finish
    thought, content = reasoning.split(o.text)
    message, finish = tools.message(content, o.finish_reason, echo)
    if reasoning.thinking and message["content"] == "":
        message["content"] = None
    return {**message, "reasoning": thought}, finish


class ChatEvents(StreamEvents):
    """A streamed chat completion's events: each choice's role first, then its deltas (reasoning as
    server/reasoning.py splits it off, content, or tool calls as server/tool_calls.py parses them), vLLM's
    prompt_logprobs with the first output, usage at the end."""

    def __init__(
        self,
        state: ServerState,
        req: ChatCompletionRequest,
        head: dict,
        ids: list[int],
        tools: ToolSetup,
        reasoning: ReasoningSetup | None = None,
    ):
        super().__init__({(0, j): fmt.ChoiceTracker(ids) for j in range(req.n)})
        self.state, self.req, self.ids, self.tools, self.reasoning = state, req, ids, tools, reasoning
        self.splitters = {j: reasoning.splitter() for j in range(req.n)} if reasoning is not None else {}
        self.head = {**head, "object": "chat.completion.chunk"}
        self.parsers = {j: tools.parser() for j in range(req.n)}
        self.num_calls = dict.fromkeys(range(req.n), 0)
        self.top = (req.top_logprobs or 0) if req.logprobs else None
        self.as_ids = bool(req.return_tokens_as_token_ids)
        self.usage = stream_usage(req, [ids], self.trackers)
        self.prompt_sent = req.prompt_logprobs is None
        # a choice's plain content pieces, encoded around the rest of their event (responses.py:TextChunks)
        plain = self.top is None and not req.return_token_ids and tools.mode == "none" and self.usage is None
        plain = plain and reasoning is None
        self.texts = {j: fmt.TextChunks(self.head, j, "content") for j in range(req.n)} if plain else {}

    def chunk(
        self,
        index: int,
        delta: dict,
        logprobs: Any = None,
        finish: Any = None,
        stop: Any = None,
        head: dict | None = None,
        **extra,
    ):
        """One choice's event; `head` replaces the chunk's own fields (id, object, ...), `extra` adds to the choice."""
        usage = self.usage and self.usage(0, index)
        return fmt.choice_chunk(head or self.head, index, {"delta": delta}, logprobs, finish, stop, extra, usage)

    def opening(self) -> list[bytes]:
        """Each choice's role; with return_token_ids the prompt's ids beside the choices, where vLLM's first chunks
        carry them (and a chat response does), not in the choice as completions' chunks do."""
        head = {**self.head, "prompt_token_ids": self.ids} if self.req.return_token_ids else self.head
        role = reply_role(self.state, self.req)
        first = {"role": role, "content": _echo_text(self.req, role)}
        return [self.chunk(j, first, head=head) for j in range(self.req.n)]

    def choice(self, i: int, o: Any, d: fmt.Delta) -> list[bytes]:
        texts = self.texts.get(o.index)
        if texts is not None and self.prompt_sent and d.text and not d.finished_now:
            return [texts.event(d.text)]
        req, tok, events = self.req, self.state.tokenizer, []
        if not self.prompt_sent:  # vLLM sends the prompt's logprobs with the first output
            self.prompt_sent = True
            prompt_lp = self.finals[0].prompt_logprobs
            plp = fmt.vllm_prompt_logprobs(tok, self.ids, prompt_lp, req.prompt_logprobs)
            events.append(fmt.sse({**self.head, "choices": [], "prompt_logprobs": plp}))
        lp = None
        if self.top is not None and d.token_ids:
            lp = fmt.chat_logprobs(tok, d.context, d.token_ids, d.logprobs, self.top, self.as_ids)
        delta = self._delta(o, d.text)
        if delta or lp or d.finished_now or (req.return_token_ids and d.token_ids):
            finish = self.tools.finish_reason(o.finish_reason, self.num_calls[o.index]) if d.finished_now else None
            stop = o.stop_reason if d.finished_now else None
            extra = {"token_ids": d.token_ids} if req.return_token_ids else {}
            events.append(self.chunk(o.index, delta, lp, finish, stop, **extra))
        return events

    def _delta(self, o: Any, text: str) -> dict[str, Any]:
        """Choice `o`'s delta for its new `text`: with a reasoning parser, the new reasoning (vLLM's `reasoning`
        key) and the tool-call code's delta of the new content (fed the content so far, not the whole text)."""
        if self.reasoning is None:
            return self.tools.delta(self.parsers[o.index], self.num_calls, o, text)
        splitter = self.splitters[o.index]
        thought, content = splitter.feed(o.text, final=o.finish_reason is not None)
        view = ContentOutput(o.index, splitter.content, o.finish_reason)
        delta = self.tools.delta(self.parsers[o.index], self.num_calls, view, content)
        return {"reasoning": thought, **delta} if thought and self.reasoning.include else delta

    def closing(self) -> list[bytes]:
        if not (self.req.stream_options and self.req.stream_options.include_usage):
            return []
        return [fmt.sse({**self.head, "choices": [], "usage": request_usage([self.ids], [self.finals[0]])})]
