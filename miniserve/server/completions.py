"""POST /v1/completions: prompts (text or token ids, one or many) to choices, plain or streamed; echo, logprobs
(OpenAI's legacy format) and vLLM's extras (prompt_logprobs, return_token_ids)."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from miniserve.server import responses as fmt
from miniserve.server.beam import beam_outputs, check_beam_fields
from miniserve.server.event_stream import EventStream, StreamEvents
from miniserve.server.protocol import CompletionRequest
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


async def create_completion(request: Request) -> Response:
    state = state_of(request)
    req: CompletionRequest = await state.parse(request, CompletionRequest)
    state.check_prompt_count(len(req.prompts()))
    state.check_bounds(req)
    check_beam_fields(req)
    structured = await state.compile_constraint(structured_spec(req))
    prompt_ids = await state.encode_prompts(req.prompts(), req.add_special_tokens, req.truncate_prompt_tokens)
    if req.use_beam_search:
        return await _beam_completion(state, request, req, prompt_ids)
    params = [
        sampling_params(
            req,
            state.token_budget(len(ids), 1 if req.echo_only() else req.max_tokens, "prompt"),
            req.logprobs,
            state.vocab_size,
            _prompt_logprobs(req),
            structured,
            defaults=state.sampling_defaults,
        )
        for ids in prompt_ids
    ]
    group = RequestGroup(state, f"cmpl-{uuid.uuid4().hex}", req.stream)
    await group.start(prompt_ids, params, "prompt", req.n, req.priority)
    prompt_texts = _echo_texts(state, req, prompt_ids) if req.echo else None
    head = response_head(group, request, req.request_id, "cmpl", "text_completion")
    if req.stream:
        return EventStream(group, request, CompletionEvents(state, req, head, prompt_ids, prompt_texts))
    finals = await collect_finals(group, request)
    if finals is None:
        return Response(status_code=499)
    if req.echo_only():
        finals = {i: _prompt_only(out) for i, out in finals.items()}
    listed = req.logprobs is not None or req.prompt_logprobs is not None
    choices = await state.format_answer(listed, _completion_choices, state, req, prompt_ids, prompt_texts, finals)
    return fmt.JSONBytesResponse(
        {**head, "choices": choices, "usage": request_usage(prompt_ids, list(finals.values()))}
    )


async def _beam_completion(
    state: ServerState, request: Request, req: CompletionRequest, prompt_ids: list[list[int]]
) -> Response:
    """use_beam_search: each prompt's n best beams as its choices (server/beam.py)."""
    budgets = [state.token_budget(len(ids), req.max_tokens, "prompt") for ids in prompt_ids]
    answer = await beam_outputs(state, request, req, prompt_ids, budgets)
    if answer is None:
        return Response(status_code=499)
    outputs, usage = answer
    head = answer_head(state.model_name, f"cmpl-{uuid.uuid4().hex}", request, req.request_id, "cmpl", "text_completion")
    choices = [
        {"index": i * req.n + j, "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"],
         "stop_reason": c["stop_reason"]}
        for i, beams in enumerate(outputs) for j, c in enumerate(beams)
    ]  # fmt: skip
    return fmt.JSONBytesResponse({**head, "choices": choices, "usage": usage})


def _prompt_logprobs(req: CompletionRequest) -> int | None:
    """Top-N logprobs the prompt is scored with: echo with logprobs (the legacy format) and vLLM's prompt_logprobs
    share one pass."""
    asked = [n for n in (req.logprobs if req.echo else None, req.prompt_logprobs) if n is not None]
    return max(asked, default=None)


def _prompt_only(out: Any) -> Any:
    """An echo_only request's output: its choices emptied of the one token the engine had to generate."""

    def emptied(o: Any) -> Any:
        logprobs = None if o.logprobs is None else []
        return dataclasses.replace(o, text="", token_ids=[], logprobs=logprobs, cumulative_logprob=None)

    return dataclasses.replace(out, outputs=[emptied(o) for o in out.outputs])


def _echo_texts(state: ServerState, req: CompletionRequest, prompt_ids: list[list[int]]) -> list[str]:
    """The prompts as echoed: as sent, or as the model saw them when they were token ids or may have been cut."""
    as_sent = req.truncate_prompt_tokens is None
    return [
        p if isinstance(p, str) and as_sent else state.tokenizer.decode(ids, skip_special_tokens=True)
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
                skip = req.skip_special_tokens
                lp, _ = fmt.completion_logprobs(tok, ids, o.token_ids, o.logprobs, req.logprobs, start, as_ids, skip)
                if prompt_texts:
                    prompt_lp = finals[i].prompt_logprobs
                    plp = fmt.prompt_logprobs(tok, ids, prompt_lp, req.logprobs, prompt_texts[i], as_ids)
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


def _completion_extras(
    state: ServerState, req: CompletionRequest, prompt_ids: list[int], out: Any, token_ids: list[int] | None
) -> dict[str, Any]:
    """vLLM's per-choice extras: prompt_logprobs, and with return_token_ids the prompt's and the choice's ids."""
    extras: dict[str, Any] = {}
    if req.prompt_logprobs is not None:
        extras["prompt_logprobs"] = fmt.vllm_prompt_logprobs(
            state.tokenizer, prompt_ids, out.prompt_logprobs, req.prompt_logprobs
        )
    if req.return_token_ids:
        extras["prompt_token_ids"] = prompt_ids
        if token_ids is not None:
            extras["token_ids"] = token_ids
    return extras


class CompletionEvents(StreamEvents):
    """A streamed completion's events: each choice's text (and logprobs, token ids) as it grows; with echo, the
    prompt's text first; the prompt's logprobs (echo's legacy ones or vLLM's prompt_logprobs) with the choice's
    first output; usage at the end (stream_options)."""

    def __init__(
        self,
        state: ServerState,
        req: CompletionRequest,
        head: dict,
        prompt_ids: list[list[int]],
        prompt_texts: list[str] | None,
    ):
        super().__init__({(i, j): fmt.ChoiceTracker(ids) for i, ids in enumerate(prompt_ids) for j in range(req.n)})
        self.state, self.req, self.head = state, req, head
        self.prompt_ids, self.prompt_texts = prompt_ids, prompt_texts
        self.offsets = {(i, j): len(prompt_texts[i]) if prompt_texts else 0 for i, j in self.trackers}
        self.prompt_later = (bool(prompt_texts) and req.logprobs is not None) or req.prompt_logprobs is not None
        self.started: set[tuple[int, int]] = set()
        self.as_ids = bool(req.return_tokens_as_token_ids)
        self.usage = stream_usage(req, prompt_ids, self.trackers)
        # a choice's plain text pieces, encoded around the rest of their event (responses.py:TextChunks)
        plain = req.logprobs is None and not req.return_token_ids and not self.prompt_later and self.usage is None
        self.texts = {(i, j): fmt.TextChunks(head, i * req.n + j, "text") for i, j in self.trackers} if plain else {}

    def chunk(self, i: int, j: int, text: str, logprobs: Any = None, finish: Any = None, stop: Any = None, **extra):
        index, usage = i * self.req.n + j, self.usage and self.usage(i, j)
        return fmt.choice_chunk(self.head, index, {"text": text}, logprobs, finish, stop, extra, usage)

    def opening(self) -> list[bytes]:
        if not self.prompt_texts or self.prompt_later:
            return []
        return [self.chunk(i, j, self.prompt_texts[i]) for i, j in self.trackers]

    def batch(self, changed: list[tuple[int, Any]]) -> list[bytes]:
        if self.req.echo_only():
            changed = [(i, _prompt_only(out)) for i, out in changed]
        return super().batch(changed)

    def choice(self, i: int, o: Any, d: fmt.Delta) -> list[bytes]:
        texts = self.texts.get((i, o.index))
        if texts is not None and d.text and not d.finished_now:
            return [texts.event(d.text)]
        req, prompt_texts, events = self.req, self.prompt_texts, []
        first = (i, o.index) not in self.started
        self.started.add((i, o.index))
        if first and self.prompt_later:
            plp = None
            if prompt_texts and req.logprobs is not None:
                prompt_lp, tok = self.finals[i].prompt_logprobs, self.state.tokenizer
                ids = self.prompt_ids[i]
                plp = fmt.prompt_logprobs(tok, ids, prompt_lp, req.logprobs, prompt_texts[i], self.as_ids)
            extras = _completion_extras(self.state, req, self.prompt_ids[i], self.finals[i], None)
            events.append(self.chunk(i, o.index, prompt_texts[i] if prompt_texts else "", plp, **extras))
        lp = None
        if req.logprobs is not None and d.token_ids:
            tok, offset, skip = self.state.tokenizer, self.offsets[(i, o.index)], req.skip_special_tokens
            lp, self.offsets[(i, o.index)] = fmt.completion_logprobs(
                tok, d.context, d.token_ids, d.logprobs, req.logprobs, offset, self.as_ids, skip
            )
        if d.text or lp or d.finished_now or (req.return_token_ids and d.token_ids):
            finish = o.finish_reason if d.finished_now else None
            stop = o.stop_reason if d.finished_now else None
            extra = {"token_ids": d.token_ids} if req.return_token_ids else {}
            if req.return_token_ids and first and not self.prompt_later:
                extra["prompt_token_ids"] = self.prompt_ids[i]
            events.append(self.chunk(i, o.index, d.text, lp, finish, stop, **extra))
        return events

    def closing(self) -> list[bytes]:
        if not (self.req.stream_options and self.req.stream_options.include_usage):
            return []
        usage = request_usage(self.prompt_ids, list(self.finals.values()))
        return [fmt.sse({**self.head, "choices": [], "usage": usage})]
